"""Redis servers of a test's own: one to stall or kill, a 3-node cluster, a Sentinel set.

Each is a ``redis-server`` process on a free port of 127.0.0.1, started by the fixture and
stopped by its PID; nothing is kept on disk but the files Redis Cluster and Sentinel write in
the test's temporary folder. ``redis-server`` must be given its port: one that was taken
between being found free and Redis binding it makes ``start`` try again on another.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from tests.servers import ServerExited
from tests.servers import free_port as free_port

_IN_USE = "Address already in use"  # what redis-server logs before it exits


def free_cluster_port() -> int:
    """A free port whose cluster bus port (10,000 above it) is free too."""
    while True:
        port = free_port()
        if port > 55_000:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + 10_000))
            except OSError:
                continue
        return port


def redis_server_binary() -> str:
    """``redis-server``'s path; skip (fail under ``CI=true``) where it is not installed."""
    binary = shutil.which("redis-server")
    if binary is None:
        message = "redis-server is not installed"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{message}, and CI=true requires it", pytrace=False)
        pytest.skip(message)
    return binary


class RedisServer:
    """One ``redis-server`` process: ``stop`` kills it, ``pause``/``resume`` stall it.

    Without ``port`` it takes a free one (with ``--cluster-enabled``, one whose cluster bus
    port is free too), and another one if that was taken by the time it starts."""

    def __init__(
        self, folder: Path, *args: str, config: Path | None = None, port: int | None = None
    ) -> None:
        self.root = folder
        self.config = config
        self.args = args
        self.process: subprocess.Popen[bytes] | None = None
        pick = free_cluster_port if "--cluster-enabled" in args else free_port
        self.pick_port: Callable[[], int] | None = pick if port is None else None
        self.use_port(pick() if port is None else port)

    def use_port(self, port: int) -> None:
        self.port = port
        self.folder = self.root / str(port)
        self.folder.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, *, wait: bool = True) -> RedisServer:
        """Start it; with ``wait``, return once it answers PING."""
        for attempt in range(1, 6):
            command = [redis_server_binary()]
            if self.config is not None:  # a config file comes first
                command.append(str(self.config))
            command += ["--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder)]
            command += ["--save", "", "--appendonly", "no", "--logfile", "redis.log", *self.args]
            (self.folder / "redis.log").unlink(missing_ok=True)  # this run's lines only
            self.process = subprocess.Popen(command, cwd=self.folder)
            if not wait:
                break
            try:
                self.wait_until_up()
                break
            except ServerExited:
                if self.pick_port is None or attempt == 5 or _IN_USE not in self.log():
                    raise
                self.use_port(self.pick_port())
        return self

    def wait_until_up(self, seconds: float = 10) -> None:
        deadline = time.monotonic() + seconds
        # Logged once it listens: until then a server answering on the port is someone else's.
        while "Running mode=" not in self.full_log():
            assert self.process is not None
            if self.process.poll() is not None:
                raise ServerExited(f"redis-server exited:\n{self.log()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"redis-server did not start in {seconds} s:\n{self.log()}")
            time.sleep(0.02)  # another process: nothing to wait on but its log
        while True:
            try:
                with redis.Redis(port=self.port, socket_timeout=1) as client:
                    client.ping()
                return
            except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=5)

    def full_log(self) -> str:
        path = self.folder / "redis.log"
        return path.read_text() if path.exists() else ""

    def log(self) -> str:
        return self.full_log()[-3000:]

    def pause(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGCONT)
            self.process.kill()
            self.process.wait(10)
        self.process = None


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path).start()
    yield server
    server.stop()


def wait_for(condition: object, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not callable(condition) or not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def redis_cluster(tmp_path: Path) -> Iterator[list[RedisServer]]:
    """Three primaries sharing the 16,384 slots, no replicas."""
    nodes = [
        RedisServer(tmp_path, *("--cluster-enabled", "yes", "--cluster-node-timeout", "5000"))
        for _ in range(3)
    ]
    try:
        for node in nodes:
            node.start()
        bounds = [0, 5461, 10923, 16384]
        for index, node in enumerate(nodes):
            with node.client() as client:
                client.execute_command(
                    "CLUSTER", "ADDSLOTSRANGE", bounds[index], bounds[index + 1] - 1
                )
                if index:
                    client.execute_command("CLUSTER", "MEET", "127.0.0.1", nodes[0].port)

        def ready() -> bool:
            for node in nodes:
                with node.client() as client:
                    info = client.execute_command("CLUSTER", "INFO")
                    text = info.decode() if isinstance(info, bytes) else str(info)
                    if "cluster_state:ok" not in text or "cluster_known_nodes:3" not in text:
                        return False
            return True

        wait_for(ready, 20, "the cluster to agree")
        yield nodes
    finally:
        for node in nodes:
            node.stop()


class SentinelSet:
    """A master, its replica, and one sentinel watching them (quorum 1)."""

    def __init__(self, folder: Path) -> None:
        self.master = RedisServer(folder)
        self.replica = RedisServer(folder)
        self.config = folder / "sentinel.conf"
        self.sentinel = RedisServer(folder, "--sentinel", config=self.config)

    @property
    def sentinel_port(self) -> int:
        return self.sentinel.port

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.sentinel_port}/mymaster/0"

    def start(self) -> None:
        """The master, then its replica and the sentinel (told the port the master got)."""
        self.master.start()
        self.replica.args = ("--replicaof", "127.0.0.1", str(self.master.port))
        self.replica.start()
        self.config.write_text(
            f"sentinel monitor mymaster 127.0.0.1 {self.master.port} 1\n"
            "sentinel down-after-milliseconds mymaster 1000\n"
            "sentinel failover-timeout mymaster 5000\n"
        )
        self.sentinel.start()

    def master_port(self) -> int:
        with self.sentinel.client() as client:
            _, port = client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", "mymaster")
        return int(port)


@pytest.fixture
def redis_sentinel(tmp_path: Path) -> Iterator[SentinelSet]:
    servers = SentinelSet(tmp_path)
    try:
        servers.start()

        def replica_known() -> bool:
            with servers.replica.client() as client:
                if client.info("replication").get("master_link_status") != "up":
                    return False
            with servers.sentinel.client() as client:
                replicas = client.sentinel_slaves("mymaster")
            return any(
                replica.get("master-link-status") == "ok" and not replica.get("is_disconnected")
                for replica in replicas
            )

        wait_for(replica_known, 20, "the sentinel to find the replica")
        yield servers
    finally:
        for server in (servers.sentinel, servers.replica, servers.master):
            server.stop()
