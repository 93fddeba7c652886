"""Real servers in subprocesses, on loopback ports nothing else can take from under them.

uvicorn is started on port 0 (``start_uvicorn``): the kernel picks a free port at bind time
and the port is read back from uvicorn's "Uvicorn running on http://127.0.0.1:PORT" line.
A command that must be given a port (``asgi-resilience run`` takes 1-65535) is started on a
free one (``start_on_a_free_port``), and started again on another if that port was taken
between the moment it was found free and the server's bind (it exits with "address already
in use"). Either way the server is ours once its log says it is running there: readiness
polled before that could be answered by another process's server.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
UVICORN = [sys.executable, "-m", "uvicorn"]

_RUNNING_ON = re.compile(
    r"(?:Uvicorn running|Running|Listening) (?:on|at):? https?://[^\s:]+:(\d+)"
)
_ADDRESS_IN_USE = "address already in use"  # errno's text, in uvicorn's error and ours


class ServerExited(RuntimeError):
    """The server process ended before it was up; the message carries its output."""


def metric_total(exposition: str, name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` in a ``/metrics`` answer whose labels include
    ``labels`` (0 if none): every worker's, every status's..."""
    from prometheus_client.parser import text_string_to_metric_families

    return sum(
        sample.value
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


def free_port() -> int:
    """A loopback port nothing listened on a moment ago. Another process may take it before
    it is used: give it to a server only through ``start_on_a_free_port`` (which starts again
    elsewhere), or to code that binds it at once in this process."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ServerProcess:
    """A server process of the test's and the file its stdout and stderr go to."""

    process: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log.read_text()

    def stop(self, timeout: float = 15) -> int:
        """SIGTERM, then the exit code."""
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def kill(self) -> None:
        """Kill it if it still runs (a fixture's clean-up)."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)


def wait_until_listening(
    process: subprocess.Popen[bytes], output: Callable[[], str], seconds: float = 15
) -> int:
    """The port ``process`` listens on, once its ``output`` says "Uvicorn running on ...".

    uvicorn writes it after the application's startup completed (with ``--workers``: after
    binding, before the workers start). Raises ``ServerExited`` if the process ends first."""
    deadline = time.monotonic() + seconds
    while True:
        running = _RUNNING_ON.search(output())
        if running is not None:
            return int(running[1])
        if process.poll() is not None:
            raise ServerExited(f"the server exited with {process.returncode}:\n{output()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the server did not start in {seconds} s:\n{output()}")
        time.sleep(0.05)  # another process: nothing to wait on but its log


def wait_until_ready(
    base_url: str,
    process: subprocess.Popen[bytes],
    path: str = "/health/ready",
    *,
    output: Callable[[], str],
    seconds: float = 15,
) -> None:
    """Poll ``base_url + path`` until it answers 200; ``ServerExited`` if the process ends."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            if httpx.get(base_url + path, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if process.poll() is not None:
            raise ServerExited(f"the server exited with {process.returncode}:\n{output()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{base_url}{path} never answered 200:\n{output()}")
        time.sleep(0.05)  # another process: nothing to wait on but its answers


def uvicorn(
    app: str, *options: str, log: Path, env: Mapping[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """``python -m uvicorn <app> --port 0 <options>`` from the repository root, stdout and
    stderr into ``log``; returns at once (``start_uvicorn`` waits until it listens)."""
    with log.open("wb") as out:
        return subprocess.Popen(
            [*UVICORN, app, "--port", "0", *options],
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def start_uvicorn(
    app: str, *options: str, log: Path, env: Mapping[str, str] | None = None
) -> ServerProcess:
    """uvicorn serving ``app`` on a port it picked itself, once it listens there."""
    process = uvicorn(app, *options, log=log, env=env)
    try:
        port = wait_until_listening(process, log.read_text)
    except BaseException:
        _kill(process)
        raise
    return ServerProcess(process, port, log)


def start_on_a_free_port(
    start: Callable[[int], subprocess.Popen[bytes]],
    output: Callable[[], str],
    attempts: int = 5,
) -> tuple[subprocess.Popen[bytes], int]:
    """``start(port)`` on a free port, once the process's ``output`` says it listens there;
    on another port when that one was taken meanwhile. The process and its port."""
    attempt = 1
    while True:
        process = start(free_port())
        try:
            return process, wait_until_listening(process, output)
        except ServerExited:
            if attempt == attempts or _ADDRESS_IN_USE not in output().lower():
                raise
            attempt += 1
        except BaseException:
            _kill(process)
            raise


def _kill(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.kill()
        process.wait(5)


def start_command(
    command: Callable[[int], list[str]],
    *,
    env: Mapping[str, str],
    log: Path,
    started: list[subprocess.Popen[bytes]],
) -> ServerProcess:
    """``command(port)`` (a server taking its port as an argument) on a free port, from the
    repository root, stdout and stderr into ``log``, once its ``/health/ready`` answers 200;
    each process it starts is appended to ``started`` (for the caller to kill at the end)."""

    def on(port: int) -> subprocess.Popen[bytes]:
        with log.open("wb") as out:
            process = subprocess.Popen(
                command(port), cwd=ROOT, env=dict(env), stdout=out, stderr=subprocess.STDOUT
            )
        started.append(process)
        return process

    process, port = start_on_a_free_port(on, log.read_text)
    server = ServerProcess(process, port, log)
    wait_until_ready(server.base_url, process, output=log.read_text)
    return server
