"""``JsonLinesSink``: the access log's JSON lines written straight to a stream, buffered."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from asgi_resilience import (
    AccessLogMiddleware,
    ErrorMiddleware,
    JsonFormatter,
    JsonLinesSink,
    RequestIdMiddleware,
    resilient,
)
from asgi_resilience.types import ASGIApp, Receive, Scope, Send
from tests.asgi import call, http_scope, layers
from tests.servers import ROOT, start_on_a_free_port

pytestmark = pytest.mark.anyio


async def endpoint(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["path"] == "/boom":
        raise RuntimeError("boom")
    status = 404 if scope["path"] == "/missing" else 200
    await send({"type": "http.response.start", "status": status, "headers": []})
    await send({"type": "http.response.body", "body": b'{"ok": true}'})


def stack(**options: Any) -> ASGIApp:
    return RequestIdMiddleware(AccessLogMiddleware(ErrorMiddleware(endpoint), **options))


async def get(app: ASGIApp, path: str = "/items", agent: bytes = b"probe/1.0") -> int:
    headers = [(b"x-request-id", b"req-1"), (b"user-agent", agent)]
    return (await call(app, http_scope(path, headers=headers, query_string=b"q=1"))).status


class Recording(io.StringIO):
    """A stream that counts its writes."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


async def test_lines_are_byte_identical_to_the_json_formatters(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # One clock for both runs: the same durations and the same timestamp.
    monkeypatch.setattr("asgi_resilience.context.perf_counter", lambda: 100.0)
    monkeypatch.setattr("asgi_resilience.access_log.perf_counter", lambda: 100.0015)
    monkeypatch.setattr("asgi_resilience.access_log.time", lambda: 1_700_000_000.25)
    monkeypatch.setattr(time, "time", lambda: 1_700_000_000.25)
    monkeypatch.setattr(time, "time_ns", lambda: 1_700_000_000_250_000_000)
    static = {"service": "shop", "version": "1.2"}
    formatted = io.StringIO()
    handler = logging.StreamHandler(formatted)
    handler.setFormatter(JsonFormatter(static_fields=static))
    logger = logging.Logger("asgi_resilience.access")  # no filters, no propagation
    logger.addHandler(handler)
    written = io.StringIO()
    sink = JsonLinesSink(written, static_fields=static)
    through_logging = stack(logger=logger, include_query=True)
    through_sink = stack(logger=logger, sink=sink, include_query=True)
    logger.removeHandler(handler)  # the sink's run must not log
    for path, agent in (("/items", b"probe/1.0"), ("/missing", b"caf\xe9"), ("/boom", b"x")):
        logger.addHandler(handler)
        await get(through_logging, path, agent)
        logger.removeHandler(handler)
        await get(through_sink, path, agent)
    sink.flush()
    assert written.getvalue() == formatted.getvalue()
    lines = [json.loads(line) for line in written.getvalue().splitlines()]
    assert [(line["status"], line["level"]) for line in lines] == [
        (200, "INFO"),
        (404, "WARNING"),
        (500, "ERROR"),
    ]
    assert lines[2]["error"] == "RuntimeError" and lines[1]["user_agent"] == "café"


async def test_lines_wait_in_the_buffer_and_go_out_in_one_write() -> None:
    stream = Recording()
    sink = JsonLinesSink(stream, buffer_size=2_000, flush_interval=60)
    app = stack(sink=sink)
    sizes = []
    for _ in range(30):
        await get(app)
        sizes.append(len(stream.writes))
    longest = max(len(line) for line in stream.getvalue().splitlines()) + 1
    # Out when a line takes the buffer past buffer_size, that line with the rest.
    assert stream.writes and all(2_000 < len(w) <= 2_000 + longest for w in stream.writes)
    assert max(b - a for a, b in zip([0, *sizes], sizes, strict=False)) == 1  # one per request
    written, out = len(stream.writes), stream.getvalue().count("\n")
    sink.flush()
    assert len(stream.writes) == written + (out < 30) and stream.getvalue().count("\n") == 30
    sink.flush()  # nothing left: no empty write
    assert len(stream.writes) == written + (out < 30)


async def test_a_waiting_line_is_written_after_flush_interval() -> None:
    stream = Recording()
    sink = JsonLinesSink(stream, flush_interval=0.05)
    app = stack(sink=sink)
    await get(app)
    await get(app)
    assert stream.writes == []
    with anyio.fail_after(5):
        for _ in range(500):
            await anyio.sleep(0.01)
            if stream.writes:
                break
    assert len(stream.writes) == 1 and len(stream.getvalue().splitlines()) == 2
    await get(app)  # a new timer for the next line
    with anyio.fail_after(5):
        for _ in range(500):
            await anyio.sleep(0.01)
            if len(stream.writes) == 2:
                break
    assert len(stream.getvalue().splitlines()) == 3


async def test_the_loggers_level_still_decides() -> None:
    stream = Recording()
    logger = logging.Logger("quiet", level=logging.WARNING)
    app = stack(sink=JsonLinesSink(stream, buffer_size=0), logger=logger)
    await get(app, "/items")
    await get(app, "/missing")
    assert [json.loads(line)["status"] for line in stream.getvalue().splitlines()] == [404]


class Broken(io.StringIO):
    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")


@pytest.mark.parametrize("broken", ["pipe", "closed"])
async def test_a_broken_stream_is_reported_once_and_never_fails_a_request(
    broken: str, caplog: pytest.LogCaptureFixture
) -> None:
    stream: io.StringIO = Broken() if broken == "pipe" else io.StringIO()
    if broken == "closed":
        stream.close()
    sink = JsonLinesSink(stream, buffer_size=0)
    app = stack(sink=sink)
    with caplog.at_level(logging.INFO, logger="asgi_resilience"):
        statuses = [await get(app) for _ in range(5)]
    assert statuses == [200] * 5
    reports = [r for r in caplog.records if r.name == "asgi_resilience"]
    assert len(reports) == 1 and "dropped" in reports[0].getMessage()
    assert sink.dropped == 5


def test_options_are_checked() -> None:
    for options, needle in (
        ({"buffer_size": -1}, "buffer_size"),
        ({"buffer_size": "64k"}, "buffer_size"),
        ({"flush_interval": 0}, "flush_interval"),
        ({"flush_interval": float("inf")}, "flush_interval"),
    ):
        with pytest.raises(ValueError, match=needle):
            JsonLinesSink(**options)
    with pytest.raises(ValueError, match="stream"):
        JsonLinesSink("stdout")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sink"):
        AccessLogMiddleware(endpoint, sink=io.StringIO())  # type: ignore[arg-type]


async def test_resilient_flushes_the_sink_when_its_lifespan_shuts_down() -> None:
    stream = Recording()
    app = resilient(endpoint, access_log_sink=JsonLinesSink(stream, flush_interval=60), environ={})
    await app.lifespan.startup()
    await get(app)
    assert stream.writes == []
    await app.lifespan.shutdown()
    assert len(stream.getvalue().splitlines()) == 1


def test_no_line_is_lost_when_uvicorn_gets_sigterm_under_load(tmp_path: Path) -> None:
    """``asgi-resilience run`` (JSON logs: the access log through a sink on stdout) under 20
    connections at once, SIGTERM in the middle: one line for every request answered."""
    command = [sys.executable, "-m", "asgi_resilience.cli", "run", "tests.apps.hello:app"]
    stdout_path, stderr_path = tmp_path / "stdout.log", tmp_path / "stderr.log"

    def on(port: int) -> subprocess.Popen[bytes]:
        with stdout_path.open("wb") as stdout, stderr_path.open("wb") as stderr:
            return subprocess.Popen(
                [*command, "--port", str(port)], cwd=ROOT, stdout=stdout, stderr=stderr
            )

    server, port = start_on_a_free_port(
        on, lambda: stdout_path.read_text() + stderr_path.read_text()
    )
    answered = 0

    async def drive() -> None:
        nonlocal answered
        loaded = anyio.Event()
        base = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(base_url=base, timeout=5) as client:

            async def loop() -> None:
                nonlocal answered
                while True:
                    try:
                        response = await client.get("/hello")
                    except httpx.TransportError:
                        return  # the listener closed: the server is going
                    if response.status_code == 200:
                        answered += 1
                        if answered == 300:
                            loaded.set()

            async with anyio.create_task_group() as tasks:
                for _ in range(20):
                    tasks.start_soon(loop)
                with anyio.move_on_after(10):
                    await loaded.wait()  # well under load before the signal
                server.send_signal(signal.SIGTERM)

    try:
        anyio.run(drive)
        assert server.wait(15) == 0, stderr_path.read_text()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    lines = [json.loads(line) for line in stdout_path.read_text().splitlines()]
    access = [line for line in lines if line["logger"] == "asgi_resilience.access"]
    assert answered >= 300
    assert len(access) == answered
    assert {line["path"] for line in access} == {"/hello"}


async def test_writes_are_whole_lines_of_at_most_4_kib() -> None:
    stream = Recording()
    sink = JsonLinesSink(stream, buffer_size=1_000_000, flush_interval=60)
    app = stack(sink=sink)
    for _ in range(100):
        await get(app)
    sink.flush()
    assert len(stream.writes) > 1
    assert all(len(w) <= 4096 and w.endswith("\n") for w in stream.writes)
    assert [json.loads(line)["status"] for line in stream.getvalue().splitlines()] == [200] * 100


def test_workers_sharing_one_pipe_never_splice_each_others_lines() -> None:
    """Two processes, each writing 5,000 lines through a sink into the same pipe."""
    script = (
        "import sys\n"
        "from asgi_resilience import JsonLinesSink\n"
        "sink = JsonLinesSink(sys.stdout)\n"
        "for n in range(5000):\n"
        "    sink.emit(20, 'asgi_resilience.access', 'GET / 200', {'n': n, 'pad': 'x' * 200})\n"
        "sink.flush()\n"
    )
    read, write = os.pipe()
    workers = [subprocess.Popen([sys.executable, "-c", script], stdout=write) for _ in range(2)]
    os.close(write)
    with os.fdopen(read) as pipe:
        lines = pipe.read().splitlines()
    for worker in workers:
        assert worker.wait(30) == 0
    decoded = [json.loads(line) for line in lines]  # a spliced line would not parse
    assert len(decoded) == 10_000 and sorted(d["n"] for d in decoded) == sorted(
        list(range(5000)) * 2
    )


async def test_a_character_the_stream_cannot_encode_is_escaped_not_fatal() -> None:
    raw = io.BytesIO()
    stream = io.TextIOWrapper(raw, encoding="ascii")
    sink = JsonLinesSink(stream, buffer_size=0)
    app = stack(sink=sink)
    await get(app, "/caf\u00e9")
    await get(app, "/items")
    text = raw.getvalue().decode("ascii")
    assert "caf\\u00e9" in text  # escaped, still JSON
    assert [json.loads(line)["path"] for line in text.splitlines()] == ["/caf\u00e9", "/items"]
    assert sink.dropped == 0


class FullDisk(Recording):
    """A stream whose first write fails as a full disk does."""

    def write(self, text: str) -> int:
        if not self.writes:
            self.writes.append("")
            raise OSError(28, "No space left on device")
        return super().write(text)


async def test_a_failed_write_drops_its_lines_and_the_next_ones_are_tried(
    caplog: pytest.LogCaptureFixture,
) -> None:
    stream = FullDisk()
    sink = JsonLinesSink(stream, buffer_size=0)
    app = stack(sink=sink)
    with caplog.at_level(logging.INFO, logger="asgi_resilience"):
        for _ in range(3):
            await get(app)
    assert sink.dropped == 1 and len(stream.getvalue().splitlines()) == 2
    reports = [r for r in caplog.records if r.name == "asgi_resilience"]
    assert len(reports) == 1 and "No space left" in reports[0].getMessage()


def test_the_cli_wraps_a_plain_app_with_a_sink_on_stdout_unless_logs_are_plain() -> None:
    from asgi_resilience import cli

    def sink_of(app: object) -> object:
        for layer in layers(app):
            if isinstance(layer, AccessLogMiddleware):
                return layer.sink
        raise AssertionError("no access log in the stack")

    sink = sink_of(cli._wrapped("tests.apps.hello:app", plain=False))
    assert isinstance(sink, JsonLinesSink) and sink.stream is sys.stdout
    assert sink_of(cli._wrapped("tests.apps.hello:app", plain=True)) is None
