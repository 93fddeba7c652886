"""URLs of the Django site in tests/apps/frameworks.py."""

from __future__ import annotations

from django.http import HttpRequest, JsonResponse
from django.urls import path


async def item(request: HttpRequest, item_id: int) -> JsonResponse:
    return JsonResponse({"item": item_id})


def boom(request: HttpRequest) -> JsonResponse:  # a sync view: run in a thread by Django
    raise RuntimeError("kaboom")


urlpatterns = [path("items/<int:item_id>", item), path("boom", boom)]
