"""SIGTERM draining in-process: the handler chain, the delay, and where it is not installed.

The real-server version (uvicorn, 50 in-flight requests) is in test_server.py.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any, ClassVar

import anyio
import pytest

from asgi_resilience import Lifespan
from asgi_resilience.lifespan import _drain

pytestmark = pytest.mark.anyio


class Recorder:
    """Stands for the server's own SIGTERM handler."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.calls.append(signum)


class FakeTimer:
    """Stands for the ``threading.Timer`` that waits out the drain delay: the test fires it."""

    made: ClassVar[list[FakeTimer]] = []

    def __init__(self, delay: float, function: Any, args: tuple[Any, ...] = ()) -> None:
        self.delay, self.function, self.args = delay, function, args
        self.started = self.cancelled = False
        self.daemon = False
        FakeTimer.made.append(self)

    def start(self) -> None:
        self.started = True

    def cancel(self) -> None:
        self.cancelled = True

    async def fire(self) -> None:
        """The delay is over: run the function in a thread of its own, as the timer would."""
        if self.started and not self.cancelled:
            await anyio.to_thread.run_sync(self.function, *self.args)


@pytest.fixture
def timers(monkeypatch: pytest.MonkeyPatch) -> list[FakeTimer]:
    FakeTimer.made = []
    monkeypatch.setattr(_drain, "_Timer", FakeTimer)
    return FakeTimer.made


@pytest.fixture
def server_handler() -> Iterator[Recorder]:
    """Installs a recording SIGTERM handler, as uvicorn does before the lifespan starts."""
    recorder = Recorder()
    original = signal.signal(signal.SIGTERM, recorder)
    try:
        yield recorder
    finally:
        signal.signal(signal.SIGTERM, original)


async def test_sigterm_drains_then_hands_over_after_the_delay(
    server_handler: Recorder, timers: list[FakeTimer]
) -> None:
    lifespan = Lifespan(drain_delay=0.3)
    await lifespan.startup()
    assert lifespan.watching_sigterm
    signal.raise_signal(signal.SIGTERM)
    assert lifespan.state == "draining"  # at once
    assert server_handler.calls == []  # the server keeps serving meanwhile
    [timer] = timers
    assert (timer.delay, timer.started) == (0.3, True)
    assert lifespan.going_away is not None and not lifespan.going_away.is_set()
    await timer.fire()  # the drain delay is over
    assert server_handler.calls == [signal.SIGTERM]
    assert lifespan.going_away.is_set()  # long-lived connections told to close first
    await lifespan.shutdown()
    assert signal.getsignal(signal.SIGTERM) is server_handler  # restored
    assert not lifespan.watching_sigterm
    assert lifespan.shutdown_report == [] and str(lifespan.state) in {"stopped"}


async def test_without_a_delay_the_server_handler_runs_at_once(server_handler: Recorder) -> None:
    lifespan = Lifespan()
    await lifespan.startup()
    signal.raise_signal(signal.SIGTERM)
    assert lifespan.state == "draining"
    assert server_handler.calls == [signal.SIGTERM]
    await lifespan.shutdown()


async def test_a_second_sigterm_hands_over_at_once_and_only_once(
    server_handler: Recorder, timers: list[FakeTimer]
) -> None:
    lifespan = Lifespan(drain_delay=0.3)
    await lifespan.startup()
    signal.raise_signal(signal.SIGTERM)
    assert server_handler.calls == []
    signal.raise_signal(signal.SIGTERM)  # an impatient operator
    assert server_handler.calls == [signal.SIGTERM]
    [timer] = timers
    assert timer.cancelled  # the pending hand-over will not happen a second time
    await timer.fire()
    assert server_handler.calls == [signal.SIGTERM]
    await lifespan.shutdown()


async def test_shutdown_before_the_delay_ends_cancels_the_hand_over(
    server_handler: Recorder, timers: list[FakeTimer]
) -> None:
    lifespan = Lifespan(drain_delay=0.2)
    await lifespan.startup()
    signal.raise_signal(signal.SIGTERM)
    await lifespan.shutdown()
    [timer] = timers
    assert timer.cancelled
    await timer.fire()
    assert server_handler.calls == []
    assert signal.getsignal(signal.SIGTERM) is server_handler


async def test_an_ignored_sigterm_stays_ignored() -> None:
    original = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        lifespan = Lifespan()
        await lifespan.startup()
        signal.raise_signal(signal.SIGTERM)  # handed over to SIG_IGN: nothing happens
        assert lifespan.state == "draining"
        await lifespan.shutdown()
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, original)


async def test_a_handler_replaced_meanwhile_is_left_alone(server_handler: Recorder) -> None:
    lifespan = Lifespan()
    await lifespan.startup()
    other = Recorder()
    signal.signal(signal.SIGTERM, other)
    await lifespan.shutdown()
    assert signal.getsignal(signal.SIGTERM) is other


def test_default_action_terminates_after_draining() -> None:
    """With no server handler (SIG_DFL), the hand-over is the default action: termination."""
    code = """
import signal, anyio
from asgi_resilience import Lifespan
from asgi_resilience.lifespan import _drain

async def main():
    lifespan = Lifespan(drain_delay=0.1)
    await lifespan.startup()
    signal.raise_signal(signal.SIGTERM)
    print(lifespan.state, flush=True)
    await anyio.sleep(5)
    print("still alive", flush=True)

anyio.run(main)
"""
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=20
    )
    assert result.returncode == -signal.SIGTERM
    assert result.stdout.split() == ["draining"]


def test_outside_the_main_thread_no_handler_is_installed() -> None:
    before = signal.getsignal(signal.SIGTERM)
    outcome: dict[str, Any] = {}

    def run() -> None:
        lifespan = Lifespan()

        async def main() -> None:
            await lifespan.startup()
            outcome["state"] = lifespan.state
            await lifespan.shutdown()

        anyio.run(main)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(10)
    assert outcome == {"state": "ready"}
    assert signal.getsignal(signal.SIGTERM) == before
