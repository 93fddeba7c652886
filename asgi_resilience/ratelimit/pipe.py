"""One pipelined connection to one Redis server, shared by every concurrent caller.

Commands are written as they come: all those issued in one turn of the event loop leave in one
write, and replies are matched to callers in order as they arrive (Redis answers each
connection in order). A burst of a thousand decisions is then a handful of writes and reads on
one connection instead of a thousand connections from a pool.

A deadline here is a bound on Redis' silence, not on a caller's wait: a pipe *stalls* when it
owes replies and no byte has come back for ``timeout`` seconds since it last heard from Redis
(or since the oldest unanswered command was written). Time spent queued behind other callers'
replies while Redis keeps answering, or while our own event loop is busy, is no failure. When
the stall timer fires it first asks the socket whether a reply is already waiting unread (a
busy event loop, or one such as uvloop that runs timers before polling): then Redis did answer,
and the pipe carries on. A stalled pipe fails the calls it owes at once and refuses new ones
without waiting, until Redis speaks again (the late replies are matched to the failed calls
and dropped, so the connection stays in step and needs no reconnect); if Redis stays silent
for ``give_up`` seconds the owner opens a new connection instead.

Written here rather than on redis-py's connections: a redis-py pipeline waits for a whole batch
under one deadline, and cancelling that wait (our timeout) drops the connection, which turns a
burst into reconnects; it also cannot tell Redis' silence from our own loop's lag. Replies are
parsed by ``hiredis.Reader``, the C parser redis-py uses too; URLs are parsed by redis-py.
"""

from __future__ import annotations

import asyncio
import select
import ssl as ssl_module
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import hiredis

from ..exceptions import ReplyError as ReplyError
from .backends import BackendError

__all__ = ["Address", "Pipe", "ReplyError", "open_pipe", "pack"]


@dataclass(frozen=True)
class Address:
    """Where a Redis server is and how to log in: a TCP ``host``/``port`` or a unix ``path``."""

    host: str = "127.0.0.1"
    port: int = 6379
    path: str | None = None
    ssl: ssl_module.SSLContext | None = None
    username: str | None = None
    password: str | None = None
    db: int = 0

    def __str__(self) -> str:
        return f"unix:{self.path}" if self.path else f"{self.host}:{self.port}"

    def moved_to(self, host: str, port: int) -> Address:
        """The same login at another server (a cluster node named by a redirect)."""
        return Address(host, port, None, self.ssl, self.username, self.password, self.db)


def pack(*args: bytes) -> bytes:
    """A command in RESP: ``*<n>`` then each argument as a bulk string."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        parts.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(parts)


class Pipe(asyncio.Protocol):
    """The connection: ``call`` writes a packed command and returns the future of its reply."""

    def __init__(self, address: Address, loop: asyncio.AbstractEventLoop) -> None:
        self.address = address
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.error: BackendError | None = None  # set once the connection is gone
        self.stalled_at: float | None = None  # when Redis last went silent past a deadline
        self._reader = hiredis.Reader(replyError=ReplyError)
        self._pending: deque[tuple[asyncio.Future[Any], float]] = deque()
        self._out: list[bytes] = []
        self._heard = 0.0  # last byte from Redis, or the start of the wait for the oldest reply
        self._timer: asyncio.TimerHandle | None = None
        self._fd = -1

    # -- asyncio.Protocol ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have the same methods.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        self._fd = sock.fileno() if sock is not None else -1

    def data_received(self, data: bytes) -> None:
        self._heard = time.monotonic()
        self.stalled_at = None  # Redis speaks again
        reader, pending = self._reader, self._pending
        reader.feed(data)
        try:
            reply = reader.gets()
            while reply is not False:
                future = pending.popleft()[0]
                if not future.done():  # a call failed by a stall meanwhile: drop its reply
                    future.set_result(reply)
                reply = reader.gets()
        except (hiredis.ProtocolError, IndexError) as exc:  # nonsense, or a reply nobody asked
            self._lose(BackendError(f"Redis at {self.address} sent an invalid reply: {exc!r}"))
            assert self.transport is not None
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        reason = f": {exc!r}" if exc is not None else ""
        self._lose(BackendError(f"the connection to Redis at {self.address} closed{reason}"))

    # -- calls -----------------------------------------------------------------------------------

    @property
    def usable(self) -> bool:
        """Open and not stalled: a call now would be written."""
        return self.error is None and self.stalled_at is None

    def call(self, command: bytes, timeout: float) -> asyncio.Future[Any]:
        """Write ``command`` (coalesced with the others of this loop turn); its reply's future.

        The future fails with ``BackendError`` when the connection is lost or Redis is silent
        for ``timeout`` seconds while it owes this reply (see the module docstring).
        """
        if self.error is not None:
            raise BackendError(str(self.error))  # a fresh one: a shared one's traceback grows
        if self.stalled_at is not None:
            raise BackendError(f"Redis at {self.address} is not answering")
        future = self.loop.create_future()
        self._pending.append((future, timeout))
        if not self._out:
            self.loop.call_soon(self._flush)
        self._out.append(command)
        return future

    def _flush(self) -> None:
        out, self._out = self._out, []
        if self.error is not None or self.transport is None:
            return
        self.transport.write(b"".join(out))
        if len(self._pending) == len(out):  # nothing owed from before: the wait starts now
            self._heard = time.monotonic()
        self._arm(self._heard + self._pending[0][1])

    def _arm(self, deadline: float) -> None:
        """Have the stall timer fire at ``deadline``, or sooner if it already would."""
        timer = self._timer
        if timer is not None:
            if timer.when() <= deadline:
                return
            timer.cancel()  # armed by calls with a longer timeout (the connection's setup)
        self._timer = self.loop.call_at(deadline, self._check)

    def _check(self) -> None:
        """The stall timer: fail everything owed if Redis has been silent too long."""
        self._timer = None
        if self.error is not None or self.stalled_at is not None:
            return
        if len(self._pending) == len(self._out):
            return  # nothing written is owed; what is not sent yet arms the timer when it is
        deadline = self._heard + self._pending[0][1]
        now = time.monotonic()
        if now < deadline:
            self._arm(deadline)
            return
        if self._unread():  # Redis answered; we were too busy to read it yet
            self._heard = now
            self._arm(now + self._pending[0][1])
            return
        self.stalled_at = now
        message = (
            f"Redis at {self.address} did not answer within {self._pending[0][1] * 1000:.0f} ms"
        )
        for future, _ in self._pending:  # kept: their late replies are read and dropped
            if not future.done():
                future.set_exception(BackendError(message))  # one each: a shared one's
                # traceback would grow with every caller that raises it

    def _unread(self) -> bool:
        if self._fd < 0:
            return False
        poller = select.poll()  # not select.select(): it fails for descriptors above 1023
        poller.register(self._fd, select.POLLIN)
        try:
            return bool(poller.poll(0))
        except OSError:
            return False

    def _lose(self, error: BackendError) -> None:
        if self.error is None:
            self.error = error
        while self._pending:
            future = self._pending.popleft()[0]
            if not future.done():
                future.set_exception(BackendError(str(error)))  # one each, as in _check
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def close(self) -> None:
        self._lose(BackendError(f"the connection to Redis at {self.address} was closed"))
        if self.transport is not None and not self.loop.is_closed():
            self.transport.close()


async def open_pipe(
    address: Address, timeout: float, setup: Sequence[bytes] = ()
) -> tuple[Pipe, list[Any]]:
    """Connect to ``address``, log in, select the database and send ``setup`` commands.

    The login and ``setup`` go out in one write; the pipe is returned with the replies to
    ``setup`` once Redis accepted them all.

    Raises:
        BackendError: the server cannot be reached, refuses the login or a setup command, or
            does not answer within ``timeout`` seconds.
    """
    loop = asyncio.get_running_loop()
    if address.path is not None:
        connecting = loop.create_unix_connection(lambda: Pipe(address, loop), address.path)
    else:
        server_hostname = address.host if address.ssl is not None else None
        connecting = loop.create_connection(
            lambda: Pipe(address, loop),
            address.host,
            address.port,
            ssl=address.ssl,
            server_hostname=server_hostname,
        )
    try:
        _, pipe = await asyncio.wait_for(connecting, timeout)
    except (OSError, asyncio.TimeoutError) as exc:  # ssl.SSLError is an OSError
        raise BackendError(f"cannot connect to Redis at {address}: {exc!r}") from exc
    commands = []
    if address.password is not None:
        login = [address.username.encode()] if address.username else []
        commands.append(pack(b"AUTH", *login, address.password.encode()))
    if address.db:
        commands.append(pack(b"SELECT", b"%d" % address.db))
    commands += setup
    try:
        replies = await asyncio.gather(*(pipe.call(c, timeout) for c in commands))
        for reply in replies:
            if isinstance(reply, ReplyError):
                raise BackendError(f"Redis at {address} refused the connection setup: {reply}")
    except BaseException:
        pipe.close()
        raise
    return pipe, replies[len(commands) - len(setup) :]
