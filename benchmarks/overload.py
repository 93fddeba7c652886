"""Overload: goodput and latency of a real uvicorn under an open-loop load, with and without
protection.

A real uvicorn (one worker, a subprocess pinned to one CPU) serves a route costing about 2 ms of
CPU (``benchmarks/overload_app.py``). Its capacity is measured first (closed loop, a few
connections). Then an open-loop generator (pinned to the other CPU) sends requests at a fixed
arrival rate, whether or not earlier ones were answered, at 0.5x, 1x, 2x and 4x the capacity
for ``--seconds`` each. Latency counts from the moment a request was due to be sent, so a
generator that falls behind does not hide queueing. Reported per variant and load: goodput
(answers 200 within the 1 s objective, per second), p50/p99 latency of admitted requests, the
p99 time to answer a shed one (503), and how many got no answer within 5 s.

    python -m benchmarks.overload [--seconds 10] [--limit 4]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OBJECTIVE = 1.0  # seconds: an answer later than this is no use to the client
GIVE_UP = 5.0  # seconds a request may stay unanswered before it counts as lost
REQUEST = b"GET /work HTTP/1.1\r\nHost: bench\r\n\r\n"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pinned(cpu: int) -> list[str]:
    return ["taskset", "-c", str(cpu)] if os.cpu_count() and os.cpu_count() > 1 else []  # type: ignore[operator]


class Server:
    """uvicorn serving the benchmark app, started and stopped by its PID."""

    def __init__(self, variant: str, limit: int, uvicorn_limit: int | None = None) -> None:
        self.port = free_port()
        env = {**os.environ, "OVERLOAD_VARIANT": variant, "OVERLOAD_LIMIT": str(limit)}
        command = [*pinned(1), sys.executable, "-m", "uvicorn", "benchmarks.overload_app:app"]
        command += ["--port", str(self.port), "--no-access-log", "--log-level", "error"]
        if uvicorn_limit is not None:
            command += ["--limit-concurrency", str(uvicorn_limit)]
        self.process = subprocess.Popen(command, cwd=ROOT, env=env)
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), 0.2):
                    break
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError("the benchmark server did not start") from None
                time.sleep(0.05)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(15)


async def read_status(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    await reader.readexactly(length)
    return int(head.split(b" ", 2)[1])


async def capacity(port: int, seconds: float = 3.0, connections: int = 4) -> float:
    """Requests per second the server completes with a few requests always in flight."""
    done = 0
    deadline = time.monotonic() + seconds

    async def loop() -> None:
        nonlocal done
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while time.monotonic() < deadline:
            writer.write(REQUEST)
            await read_status(reader)
            done += 1
        writer.close()

    started = time.monotonic()
    await asyncio.gather(*(loop() for _ in range(connections)))
    return done / (time.monotonic() - started)


@dataclass
class Outcome:
    admitted: list[float] = field(default_factory=list)  # latencies of 200s
    shed: list[float] = field(default_factory=list)  # latencies of 503s
    other: int = 0
    lost: int = 0


async def open_loop(
    port: int, rate: float, seconds: float, connections: int | None = None
) -> Outcome:
    """Send ``rate`` requests a second for ``seconds``, never waiting for earlier answers.

    Each request goes out on an idle connection, or a new one. With ``connections``, at most
    that many are open, as a load balancer's pool to one instance: a request finding them all
    busy waits for one (its wait counts in its latency, and past ``GIVE_UP`` it is lost)."""
    outcome = Outcome()
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    pool = asyncio.Semaphore(connections or 1_000_000)
    tasks: set[asyncio.Task[None]] = set()
    start = time.monotonic()

    async def exchange() -> tuple[int, tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
        connection = idle.pop() if idle else await asyncio.open_connection("127.0.0.1", port)
        try:
            connection[1].write(REQUEST)
            return await read_status(connection[0]), connection
        except BaseException:
            connection[1].close()
            raise

    async def pooled() -> tuple[int, tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
        async with pool:
            return await exchange()

    async def one(due: float) -> None:
        try:
            status, connection = await asyncio.wait_for(pooled(), GIVE_UP)
        except (TimeoutError, OSError, asyncio.IncompleteReadError):
            outcome.lost += 1
            return
        latency = time.monotonic() - due
        if status == 200:
            outcome.admitted.append(latency)
        elif status == 503:
            outcome.shed.append(latency)
        else:
            outcome.other += 1
        idle.append(connection)

    count = int(rate * seconds)
    for index in range(count):
        due = start + index / rate
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.ensure_future(one(due))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(tasks, timeout=GIVE_UP + 1)
    for task in tasks:
        task.cancel()
        outcome.lost += 1
    for _, writer in idle:
        writer.close()
    return outcome


def percentile(values: list[float], share: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(len(ordered) * share) - 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--limit", type=int, default=4, help="the fixed limits' concurrency")
    parser.add_argument(
        "--only",
        action="append",
        choices=["none", "uvicorn", "fixed", "adaptive"],
        help="run these variants only (repeatable; default: all)",
    )
    parser.add_argument(
        "--load", action="append", type=float, help="these loads only (default 0.5 1 2 4)"
    )
    parser.add_argument(
        "--connections",
        type=int,
        default=None,
        help="at most this many connections, as a load balancer's pool (default: no bound)",
    )
    args = parser.parse_args()
    if os.cpu_count() and os.cpu_count() > 1:  # type: ignore[operator]
        os.sched_setaffinity(0, {0})  # the generator on CPU 0, the server on CPU 1
    variants = [
        ("none", "no protection", "none", None),
        ("uvicorn", f"uvicorn --limit-concurrency {args.limit * 2}", "none", args.limit * 2),
        ("fixed", f"ours, fixed {args.limit} + queue {args.limit}", "fixed", None),
        ("adaptive", "ours, adaptive", "adaptive", None),
    ]
    chosen = [v[1:] for v in variants if not args.only or v[0] in args.only]
    server = Server("none", args.limit)
    try:
        measured = asyncio.run(capacity(server.port))
        unloaded = asyncio.run(open_loop(server.port, measured * 0.25, 3))
    finally:
        server.stop()
    unloaded_p99 = percentile(unloaded.admitted, 0.99)
    print(f"capacity {measured:.0f} req/s; unloaded p99 {unloaded_p99 * 1000:.1f} ms")
    print(
        f"{'variant':<34} {'load':>5} {'goodput/s':>10} {'% of cap':>9} {'p50 ms':>8} "
        f"{'p99 ms':>8} {'shed p99 ms':>12} {'shed':>6} {'lost':>6}"
    )
    for name, variant, uvicorn_limit in chosen:
        for load in args.load or (0.5, 1, 2, 4):
            server = Server(variant, args.limit, uvicorn_limit)
            try:
                asyncio.run(open_loop(server.port, measured * 0.25, 1))  # warm up
                outcome = asyncio.run(
                    open_loop(server.port, measured * load, args.seconds, args.connections)
                )
            finally:
                server.stop()
            good = sum(1 for latency in outcome.admitted if latency <= OBJECTIVE)
            goodput = good / args.seconds
            print(
                f"{name:<34} {load:>4}x {goodput:>10.0f} {goodput / measured:>8.0%} "
                f"{percentile(outcome.admitted, 0.5) * 1000:>8.1f} "
                f"{percentile(outcome.admitted, 0.99) * 1000:>8.1f} "
                f"{percentile(outcome.shed, 0.99) * 1000:>12.1f} {len(outcome.shed):>6} "
                f"{outcome.lost:>6}"
            )


if __name__ == "__main__":
    main()
