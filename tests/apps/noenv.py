"""A resilient() app that ignores the environment (``environ={}``): ``run --management-port``
cannot reach it (test_cli_doctor.py)."""

from starlette.applications import Starlette

from asgi_resilience import resilient

app = resilient(Starlette(), environ={})
