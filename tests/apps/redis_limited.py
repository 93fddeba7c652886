"""An app whose module builds a Redis-limited stack when imported (test_extras.py)."""

from starlette.applications import Starlette

from asgi_resilience import resilient

app = resilient(
    Starlette(), rate_limit="5/second", rate_limit_backend="redis://127.0.0.1:6379/0", environ={}
)
