"""The stack's lifespan (a failing check) and one given to the framework (a passing one):
``asgi-resilience check`` must run both (test_cli_doctor.py)."""

from starlette.applications import Starlette

from asgi_resilience import Lifespan, resilient

inner = Lifespan()
outer = Lifespan()


@inner.check("inner-dep", timeout=1)
async def inner_dep() -> None:
    pass


@outer.check("outer-dep", timeout=1)
async def outer_dep() -> None:
    raise ConnectionRefusedError("outer-dep refused the connection")


app = resilient(Starlette(lifespan=inner), lifespan=outer, environ={})
