"""Redis servers of a test's own: one to stall or kill, a 3-node cluster, a Sentinel set.

Each is a ``redis-server`` process on a free port of 127.0.0.1, started by the fixture and
stopped by its PID; nothing is kept on disk but the files Redis Cluster and Sentinel write in
the test's temporary folder.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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
    """One ``redis-server`` process: ``stop`` kills it, ``pause``/``resume`` stall it."""

    def __init__(
        self, folder: Path, *args: str, config: Path | None = None, port: int | None = None
    ) -> None:
        self.port = port or free_port()
        self.config = config
        self.folder = folder / str(self.port)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.args = args
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, *, wait: bool = True) -> RedisServer:
        command = [redis_server_binary()]
        if self.config is not None:  # a config file comes first
            command.append(str(self.config))
        command += ["--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder)]
        command += ["--save", "", "--appendonly", "no", "--logfile", "redis.log", *self.args]
        self.process = subprocess.Popen(command, cwd=self.folder)
        if wait:
            self.wait_until_up()
        return self

    def wait_until_up(self, seconds: float = 10) -> None:
        deadline = time.monotonic() + seconds
        while True:
            assert self.process is not None and self.process.poll() is None, self.log()
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

    def log(self) -> str:
        path = self.folder / "redis.log"
        return path.read_text()[-3000:] if path.exists() else ""

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
        RedisServer(
            tmp_path,
            *("--cluster-enabled", "yes", "--cluster-node-timeout", "5000"),
            port=free_cluster_port(),
        )
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
        self.sentinel_port = free_port()
        config = folder / "sentinel.conf"
        config.write_text(
            f"sentinel monitor mymaster 127.0.0.1 {self.master.port} 1\n"
            "sentinel down-after-milliseconds mymaster 1000\n"
            "sentinel failover-timeout mymaster 5000\n"
        )
        self.sentinel = RedisServer(folder, "--sentinel", config=config, port=self.sentinel_port)

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.sentinel_port}/mymaster/0"

    def master_port(self) -> int:
        with self.sentinel.client() as client:
            _, port = client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", "mymaster")
        return int(port)


@pytest.fixture
def redis_sentinel(tmp_path: Path) -> Iterator[SentinelSet]:
    servers = SentinelSet(tmp_path)
    try:
        servers.master.start()
        servers.replica.args = ("--replicaof", "127.0.0.1", str(servers.master.port))
        servers.replica.start()
        servers.sentinel.start()

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
