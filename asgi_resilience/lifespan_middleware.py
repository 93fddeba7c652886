"""``LifespanMiddleware``: kept as an import path; it lives in ``asgi_resilience.lifespan``."""

from __future__ import annotations

from .lifespan import LifespanMiddleware as LifespanMiddleware

__all__ = ["LifespanMiddleware"]
