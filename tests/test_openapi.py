"""The stack's error responses in a FastAPI app's OpenAPI document (``asgi_resilience.openapi``):
what the configured layers can answer, on each operation, in a valid document whose schemas the
real responses match."""

from __future__ import annotations

from typing import Any

import anyio
import httpx
import pytest
from fastapi import FastAPI, HTTPException
from jsonschema import Draft202012Validator  # type: ignore[import-untyped]
from openapi_spec_validator import validate
from pydantic import BaseModel
from starlette.applications import Starlette

from asgi_resilience import resilient
from asgi_resilience.openapi import document_errors
from tests.asgi import client_for

pytestmark = pytest.mark.anyio


class Item(BaseModel):
    name: str


class Problem(BaseModel):  # an application's own model, under the name our schema prefers
    question: str
    answer: str


def api(**fastapi_options: Any) -> FastAPI:
    app = FastAPI(**fastapi_options)

    @app.get("/users/{user_id}", responses={404: {"description": "No such user"}})
    async def user(user_id: int) -> Item:
        if user_id == 0:
            raise RuntimeError("user 0 is cursed")
        if user_id != 1:
            raise HTTPException(404, detail="No such user")
        return Item(name="Ada")

    @app.post("/items", status_code=201)
    async def create(item: Item) -> Item:
        return item

    @app.get("/internal/ping")
    async def ping() -> dict[str, str]:
        return {"pong": "yes"}

    @app.get("/reports/{report_id}")
    async def report(report_id: int) -> dict[str, int]:
        await anyio.sleep(float(report_id) / 1000)
        return {"report": report_id}

    return app


def responses_of(document: dict[str, Any], path: str, method: str = "get") -> dict[str, Any]:
    responses: dict[str, Any] = document["paths"][path][method]["responses"]
    return responses


def statuses(document: dict[str, Any], path: str, method: str = "get") -> set[int]:
    return {int(code) for code in responses_of(document, path, method)}


def error_schema_of(document: dict[str, Any], path: str, code: int, method: str = "get") -> Any:
    """The body schema the document gives ``code`` on the operation (through ``$ref``s)."""
    response = responses_of(document, path, method)[str(code)]
    if "$ref" in response:
        response = document["components"]["responses"][response["$ref"].rsplit("/", 1)[1]]
    [(media, body)] = response["content"].items()
    return media, body["schema"]


def conforms(document: dict[str, Any], schema: dict[str, Any], instance: Any) -> None:
    """``instance`` matches ``schema`` of ``document`` (``$ref``s into its components)."""
    Draft202012Validator({**schema, "components": document["components"]}).validate(instance)


async def test_the_document_is_valid_and_lists_only_what_the_stack_can_answer() -> None:
    app = api()
    resilient(app, environ={})
    document = app.openapi()
    validate(document)  # openapi-spec-validator: a valid OpenAPI 3.1 document
    assert "Problem" in document["components"]["schemas"]
    assert statuses(document, "/users/{user_id}") == {200, 404, 422, 500}
    assert statuses(document, "/items", "post") == {201, 422, 500}
    assert statuses(document, "/internal/ping") == {200, 500}  # nothing to validate: no 422
    for code in (422, 500):
        media, schema = error_schema_of(document, "/items", code, "post")
        assert media == "application/problem+json"
        assert schema == {"$ref": "#/components/schemas/Problem"}


async def test_each_limit_adds_its_status_only_where_it_applies() -> None:
    app = api()
    resilient(
        app,
        environ={},
        rate_limit="100/second",
        rate_limit_exempt_paths=["/internal"],
        timeout=5,
        timeout_routes={"/reports/{report_id}": None},
        max_body_size=1024,
        max_concurrency=8,
    )
    document = app.openapi()
    validate(document)
    assert statuses(document, "/users/{user_id}") == {200, 404, 422, 429, 500, 503, 504}
    assert statuses(document, "/items", "post") == {201, 413, 422, 429, 500, 503, 504}
    assert statuses(document, "/internal/ping") == {200, 500, 503, 504}  # exempt: no 429
    assert 504 not in statuses(document, "/reports/{report_id}")  # no deadline there
    too_many = document["components"]["responses"]["TooManyRequests"]
    assert {"Retry-After", "RateLimit", "RateLimit-Policy"} <= set(too_many["headers"])


async def test_a_plain_stack_documents_no_limit() -> None:
    app = api()
    resilient(app, environ={})
    document = app.openapi()
    for path, item in document["paths"].items():
        for operation in item.values():
            assert not {"413", "429", "503", "504"} & set(operation["responses"]), path


async def test_a_rate_limit_that_denies_on_backend_errors_documents_503() -> None:
    app = api()
    resilient(app, environ={}, rate_limit="5/second", rate_limit_on_backend_error="deny")
    assert 503 in statuses(app.openapi(), "/users/{user_id}")


async def test_the_documented_schemas_are_the_bodies_the_stack_answers() -> None:
    app = api()
    stack = resilient(
        app,
        environ={},
        access_log=False,
        rate_limit="5/minute",
        rate_limit_exempt_paths=["/reports"],
        timeout=0.01,
        max_body_size=64,
    )
    document = app.openapi()
    async with client_for(stack) as client:
        answers = {
            404: await client.get("/users/2"),
            500: await client.get("/users/0"),
            422: await client.get("/users/abc"),
            413: await client.post("/items", json={"name": "x" * 100}),
        }
        answers[504] = await client.get("/reports/50")  # 0.05 s against a 0.01 s deadline
        for _ in range(2):  # 5 a minute: four went above, the sixth is refused
            answers[429] = await client.get("/users/1")
    for code, response in answers.items():
        assert response.status_code == code
        path, method = {413: ("/items", "post"), 504: ("/reports/{report_id}", "get")}.get(
            code, ("/users/{user_id}", "get")
        )
        media, schema = error_schema_of(document, path, code, method)
        assert response.headers["content-type"] == media
        conforms(document, schema, response.json())
    assert answers[422].json()["errors"]  # the validation problem lists its errors


async def test_with_envelopes_success_and_error_bodies_are_documented_as_enveloped() -> None:
    app = api()
    stack = resilient(app, environ={}, envelope=True, access_log=False)
    document = app.openapi()
    validate(document)
    assert "ErrorEnvelope" in document["components"]["schemas"]
    async with client_for(stack) as client:
        ok = await client.get("/users/1")
        created = await client.post("/items", json={"name": "Ada"})
        missing = await client.get("/users/2")
        broken = await client.get("/users/0")
        served = await client.get("/openapi.json")
    assert served.json() == document  # the document itself is never enveloped
    for response, path, code, method in [
        (ok, "/users/{user_id}", 200, "get"),
        (created, "/items", 201, "post"),
        (missing, "/users/{user_id}", 404, "get"),
        (broken, "/users/{user_id}", 500, "get"),
    ]:
        assert response.status_code == code
        media, schema = error_schema_of(document, path, code, method)
        assert media == "application/json"
        conforms(document, schema, response.json())
    bad = {"success": True, "data": {"name": 1}, "meta": ok.json()["meta"]}
    with pytest.raises(Exception, match="is not of type 'string'"):
        conforms(document, error_schema_of(document, "/users/{user_id}", 200)[1], bad)


async def test_the_docs_page_loads_the_completed_document() -> None:
    app = api(openapi_url="/api/openapi.json")
    stack = resilient(app, environ={}, envelope=True, rate_limit="10/second")
    async with client_for(stack) as client:
        docs = await client.get("/docs")
        document = (await client.get("/api/openapi.json")).json()
    assert docs.status_code == 200 and "/api/openapi.json" in docs.text
    validate(document)
    assert "429" in document["paths"]["/items"]["post"]["responses"]


async def test_without_the_error_layer_the_apps_own_error_bodies_stay_documented_as_they_are() -> (
    None
):
    app = api()
    resilient(app, environ={}, errors=False, rate_limit="10/second")
    document = app.openapi()
    validate(document)
    media, schema = error_schema_of(document, "/items", 422, "post")
    assert media == "application/json" and schema["$ref"].endswith("/HTTPValidationError")
    assert statuses(document, "/items", "post") == {201, 422, 429}  # no 500 of ours


async def test_document_errors_by_hand() -> None:
    app = api()
    document_errors(app, [400, 404, 500])
    document = app.openapi()
    validate(document)
    assert statuses(document, "/internal/ping") == {200, 400, 404, 500}
    # the 404 the operation documents keeps its description, with the problem body
    declared = responses_of(document, "/users/{user_id}")["404"]
    assert declared["description"] == "No such user"
    assert declared["content"]["application/problem+json"]["schema"]["$ref"].endswith("/Problem")


async def test_document_errors_takes_a_callable_and_the_last_call_wins() -> None:
    app = api()
    resilient(app, environ={}, envelope=True)

    def per_operation(path: str, method: str, operation: dict[str, Any]) -> list[int]:
        return [409] if method == "post" else []

    document_errors(app, per_operation)  # by hand, after resilient(): replaces its additions
    document = app.openapi()
    validate(document)
    assert statuses(document, "/items", "post") == {201, 409, 422}
    assert statuses(document, "/internal/ping") == {200}
    created = responses_of(document, "/items", "post")["201"]["content"]["application/json"]
    assert created["schema"] == {"$ref": "#/components/schemas/Item"}  # enveloped no more
    assert app.openapi() is document  # built once, cached as FastAPI does


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda app: document_errors(app, [200]), r"HTTP error statuses \(400-599\), got 200"),
        (lambda app: document_errors(app, ("404",)), "got '404'"),  # type: ignore[arg-type]
        (lambda app: document_errors(app, format="xml"), "format must be 'problem' or 'envelope'"),
        (lambda app: document_errors(Starlette()), "has none"),
    ],
)
def test_document_errors_refuses_what_it_cannot_document(call: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call(api())


async def test_a_document_built_before_resilient_is_completed_too() -> None:
    app = api()
    app.openapi()  # cached by FastAPI before the stack was built
    resilient(app, environ={}, rate_limit="10/second")
    assert 429 in statuses(app.openapi(), "/items", "post")


async def test_many_concurrent_first_requests_all_get_the_same_completed_document() -> None:
    app = api()
    stack = resilient(app, environ={}, rate_limit="1000/second", access_log=False)
    documents: list[httpx.Response] = []
    async with client_for(stack) as client, anyio.create_task_group() as group:
        for _ in range(200):
            group.start_soon(lambda: _append(documents, client.get("/openapi.json")))
    bodies = [response.json() for response in documents]
    assert len(bodies) == 200 and all(body == bodies[0] for body in bodies)
    responses = bodies[0]["paths"]["/items"]["post"]["responses"]
    assert list(responses) == sorted(responses)
    assert responses["429"] == {"$ref": "#/components/responses/TooManyRequests"}


async def _append(into: list[httpx.Response], request: Any) -> None:
    into.append(await request)


@pytest.mark.parametrize("envelope", [False, True])
async def test_an_openapi_30_document_stays_valid_openapi_30(envelope: bool) -> None:
    app = api()
    app.openapi_version = "3.0.3"
    validate(app.openapi())  # valid before
    app.openapi_schema = None
    resilient(app, environ={}, envelope=envelope, rate_limit="10/second")
    document = app.openapi()
    assert document["openapi"] == "3.0.3"
    validate(document)
    text = str(document)
    assert "'const'" not in text and "['string', 'null']" not in text


async def test_the_applications_own_schemas_and_responses_are_never_overwritten() -> None:
    app = FastAPI(responses={404: {"description": "Ours"}})

    @app.get("/quiz")
    async def quiz() -> Problem:
        return Problem(question="?", answer="!")

    original = app.openapi()
    theirs = original["components"]["schemas"]["Problem"]
    app.openapi_schema = None
    resilient(app, environ={}, rate_limit="10/second")
    document = app.openapi()
    validate(document)
    assert document["components"]["schemas"]["Problem"] == theirs
    ours = document["components"]["schemas"]["AsgiResilienceProblem"]
    assert "request_id" in ours["properties"]
    _media, schema = error_schema_of(document, "/quiz", 429)
    assert schema == {"$ref": "#/components/schemas/AsgiResilienceProblem"}
    ok = document["paths"]["/quiz"]["get"]["responses"]["200"]["content"]["application/json"]
    assert ok["schema"] == {"$ref": "#/components/schemas/Problem"}


async def test_a_mounted_fastapi_sub_app_keeps_its_docs_and_gets_its_errors_documented() -> None:
    sub = api()
    root = FastAPI()
    root.mount("/v1", sub)
    stack = resilient(
        root,
        environ={},
        envelope=True,
        rate_limit="10/second",
        rate_limit_exempt_paths=["/v1/internal"],
        access_log=False,
    )
    async with client_for(stack) as client:
        served = await client.get("/v1/openapi.json")
        docs = await client.get("/v1/docs")
        enveloped = await client.get("/v1/users/1")
    assert served.status_code == 200 and "success" not in served.json()
    document = served.json()
    validate(document)
    assert docs.status_code == 200 and "/v1/openapi.json" in docs.text
    assert statuses(document, "/users/{user_id}") >= {429, 500}
    assert 429 not in statuses(document, "/internal/ping")  # exempt under its full path
    assert enveloped.json()["success"] is True
    _media, schema = error_schema_of(document, "/users/{user_id}", 200)
    assert schema["properties"]["data"] == {"$ref": "#/components/schemas/Item"}
