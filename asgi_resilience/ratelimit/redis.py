"""``RedisBackend``: rate limits shared by every process, exact under any burst.

Needs the ``redis`` extra (asyncio only). Each strategy's Lua script runs atomically in Redis
with Redis' own clock (``TIME``), so processes with skewed clocks agree and concurrent requests
can never both take the last unit: a limit of N admits exactly N. Keys are
``<prefix>{<sha256>}``: client-derived values (addresses, API keys) never reach Redis in clear,
and the braces make every key its own cluster hash slot.

Decisions are pipelined (``pipe.py``): the decisions of one process share one connection per
Redis server, those made in the same turn of the event loop leave in one write, and each is one
``EVALSHA`` (one round trip, shared). The scripts are loaded when a connection opens; a server
that lost them (``SCRIPT FLUSH``, a failover) gets the one that missed by ``EVAL``, in the same
round trip as its retry. ``timeout`` bounds how long Redis may stay silent while it owes us an
answer, never the time a decision waits behind others.

Servers: one Redis (``redis://``, ``rediss://``, ``unix://``), a Redis Cluster
(``redis+cluster://host:port[,host:port...]``: keys are sent to the node owning their slot,
``MOVED`` and ``ASK`` redirects are followed and the slot map reloaded), or the master named by
Sentinel (``redis+sentinel://host:26379[,host:port...]/<service_name>[/db]``: found through the
sentinels on each connect, and found again when it is lost or turns out to be a replica).
"""

from __future__ import annotations

import asyncio
import binascii
import hashlib
import math
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any
from urllib.parse import unquote, urlsplit

from .._extras import missing_extra
from .backends import BackendError

try:
    from redis.asyncio.connection import parse_url

    from .pipe import Address, Pipe, ReplyError, open_pipe, pack
except ModuleNotFoundError as exc:  # tested in a subprocess without them
    missing_extra(exc, "redis", "the Redis rate limit backend", ("redis", "hiredis"))
from .rates import Rate
from .strategies import Decision, RateStatus, Strategy, strategy_for

__all__ = ["RedisBackend"]

_STRATEGIES = tuple(strategy_for(name) for name in ("gcra", "fixed-window", "sliding-window"))
_SHA = {s.name: hashlib.sha1(s.lua.encode()).hexdigest().encode() for s in _STRATEGIES}
_LOAD_SCRIPTS = tuple(pack(b"SCRIPT", b"LOAD", s.lua.encode()) for s in _STRATEGIES)
_GIVE_UP = 1.0  # seconds a silent connection may keep Redis' answers owed before a new one
_RETRY_CONNECT = 0.1  # seconds between two connection attempts to a server that failed one
_CONNECT_TIMEOUT = 1.0  # seconds a connection (locate, connect, log in, load scripts) may take
_SLOTS = 16384
_MAX_REDIRECTS = 5


class _WrongKind(BackendError):
    """The server answers, but is not the kind the URL says (a cluster node for a plain URL,
    or the other way round)."""


class _Link:
    """The pipe to one server and its life: opened on first use (one attempt at a time,
    shared by every caller), replaced when lost, given up on after a long silence.

    Who waits for a connection: the first one, and the startup ping, wait for it (up to the
    connect timeout); after a connection was closed (an idle timeout, a proxy, a restart)
    decisions wait for the new one up to their own timeout, since a healthy Redis may close a
    connection at any time; after a silence or a failed connection attempt they fail at once
    (for ``_RETRY_CONNECT`` seconds after a failed attempt: one attempt per interval, not one
    per request) while the next connection is opened in the background.
    """

    def __init__(self, locate: Callable[[float], Awaitable[Address]], *, role: bool) -> None:
        self.locate = locate
        self.role = role  # check at connect that the server is a master, not a replica
        self.pipe: Pipe | None = None
        self._opening: asyncio.Task[Pipe] | None = None
        self._failing_until = -math.inf
        self._failure = ""

    async def get(self, timeout: float, *, wait: bool = False) -> Pipe:
        """A usable pipe (``_call`` checks ``self.pipe`` itself first: its fast path)."""
        loop = asyncio.get_running_loop()
        pipe, patience = self.pipe, timeout  # how long a decision may wait for a reconnect
        if pipe is not None and pipe.loop is not loop:  # made in an event loop since gone
            pipe.close()
            pipe = self.pipe = None
        if pipe is None:
            patience = math.inf  # the first connection
        elif pipe.error is None:
            if pipe.stalled_at is None:
                return pipe
            if time.monotonic() - pipe.stalled_at < _GIVE_UP:
                raise BackendError(f"Redis at {pipe.address} is not answering")
            pipe.close()  # silent too long: a half-open connection, or a server still stopped
            patience = 0.0
        if time.monotonic() < self._failing_until and not wait:
            raise BackendError(self._failure)  # a fresh error: its traceback stays short
        opening = self._opening
        if opening is None or opening.get_loop() is not loop:
            connect_timeout = max(timeout, _CONNECT_TIMEOUT)  # nobody waits on most of them
            opening = self._opening = loop.create_task(self._open(connect_timeout))
            opening.add_done_callback(_retrieve)
        if wait:
            patience = math.inf
        try:
            if patience == math.inf:
                return await asyncio.shield(opening)
            return await asyncio.wait_for(asyncio.shield(opening), patience)
        except asyncio.TimeoutError:
            raise BackendError(f"reconnecting to Redis ({self.pipe_error(pipe)})") from None
        except asyncio.CancelledError:
            if opening.cancelled():  # closed meanwhile (aclose), not this caller cancelled
                raise BackendError("the Redis backend was closed") from None
            raise

    @staticmethod
    def pipe_error(pipe: Pipe | None) -> str:
        return str(pipe.error) if pipe is not None and pipe.error else "the connection was lost"

    async def _open(self, timeout: float) -> Pipe:
        setup = [*_LOAD_SCRIPTS, pack(b"ROLE")] if self.role else _LOAD_SCRIPTS
        try:
            address = await self.locate(timeout)
            pipe, replies = await open_pipe(address, timeout, setup)
            if self.role and not (replies[-1] and replies[-1][0] == b"master"):
                pipe.close()
                raise BackendError(
                    f"Redis at {address} is a replica, not the master: point the URL at the "
                    "master, or use redis+sentinel:// to find it"
                )
        except Exception as exc:  # a sentinel's odd reply, a refused login, a dead server
            self._failing_until = time.monotonic() + _RETRY_CONNECT
            self._failure = str(exc) if isinstance(exc, BackendError) else repr(exc)
            raise BackendError(self._failure) from exc
        finally:
            if self._opening is asyncio.current_task():
                self._opening = None
        self.pipe = pipe
        self._failing_until = -math.inf
        return pipe

    def close(self) -> None:
        opening, self._opening = self._opening, None
        if opening is not None and not opening.get_loop().is_closed():
            opening.cancel()  # a connection that would be opened after the close
        if self.pipe is not None:
            self.pipe.close()
            self.pipe = None

    def connected(self) -> list[str]:
        pipe = self.pipe
        return [str(pipe.address)] if pipe is not None and pipe.error is None else []


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Read the outcome of work nobody may wait for any more (a connection attempt whose
    callers were all cancelled, the reply to ``ASKING``), so that it is not reported as an
    exception never retrieved."""
    if not future.cancelled():
        future.exception()


async def _call(link: _Link, command: bytes, timeout: float, *, wait: bool = False) -> Any:
    pipe = link.pipe
    if pipe is None or not pipe.usable or pipe.loop is not asyncio.get_running_loop():
        pipe = await link.get(timeout, wait=wait)
    return await pipe.call(command, timeout)


def _fixed(address: Address) -> Callable[[float], Awaitable[Address]]:
    async def locate(timeout: float) -> Address:
        return address

    return locate


class _Single:
    """One Redis server, fixed or the master Sentinel names."""

    def __init__(self, link: _Link) -> None:
        self.link = link

    async def call(
        self, slot_tag: bytes, command: bytes, timeout: float, *, wait: bool = False
    ) -> Any:
        reply = await _call(self.link, command, timeout, wait=wait)
        if isinstance(reply, ReplyError):
            text = str(reply)
            if text.startswith(("MOVED ", "ASK ")):
                raise _WrongKind(f"{_CLUSTER_NODE}: {text}")
            if text.startswith("READONLY"):  # the master was demoted: find the new one
                self.link.close()
        return reply

    async def ping(self, timeout: float) -> None:
        info = await self.call(b"", pack(b"INFO", b"cluster"), timeout, wait=True)
        if isinstance(info, bytes) and b"cluster_enabled:1" in info:
            raise _WrongKind(_CLUSTER_NODE)
        if isinstance(info, ReplyError):
            raise BackendError(f"Redis refused INFO: {info}")

    def close(self) -> None:
        self.link.close()

    def connected(self) -> list[str]:
        return self.link.connected()


_CLUSTER_NODE = (
    "this Redis server is a Redis Cluster node: use a 'redis+cluster://host:port' URL (or a "
    "RedisCluster client) so that each key goes to the node that owns it"
)


class _Cluster:
    """A Redis Cluster: a pipe per primary, keys sent by slot, the slot map loaded with
    ``CLUSTER SLOTS`` on first use and again after a ``MOVED`` redirect."""

    def __init__(self, startup: Sequence[Address]) -> None:
        self.startup = tuple(startup)
        self.slots: list[Address] | None = None
        self.links: dict[Address, _Link] = {}
        self._loading: asyncio.Task[None] | None = None

    def link(self, address: Address) -> _Link:
        link = self.links.get(address)
        if link is None:
            link = self.links[address] = _Link(_fixed(address), role=False)
        return link

    async def call(self, slot_tag: bytes, command: bytes, timeout: float) -> Any:
        slot = binascii.crc_hqx(slot_tag, 0) % _SLOTS
        slots = self.slots if self.slots is not None else await self.load(timeout)
        address, asking = slots[slot], False
        for _ in range(_MAX_REDIRECTS + 1):  # the first try, then each redirect
            link = self.link(address)
            try:
                if asking:  # ASKING and the command, back to back on the same connection
                    pipe = await link.get(timeout)
                    pipe.call(pack(b"ASKING"), timeout).add_done_callback(_retrieve)
                    reply = await pipe.call(command, timeout)
                else:
                    reply = await _call(link, command, timeout)
            except BackendError:
                self._reload(timeout)  # a primary gone: its replica may own the slots now
                raise
            if not isinstance(reply, ReplyError):
                return reply
            kind, _, where = str(reply).partition(" ")
            if kind not in ("MOVED", "ASK"):
                return reply
            host, _, port = where.partition(" ")[2].rpartition(":")
            address, asking = address.moved_to(host or address.host, int(port)), kind == "ASK"
            if kind == "MOVED":
                slots[slot] = address  # right at once; the whole map is reloaded behind it
                self._reload(timeout)
        raise BackendError(f"Redis Cluster redirected a decision {_MAX_REDIRECTS} times")

    async def load(self, timeout: float) -> list[Address]:
        if self._loading is None:
            self._reload(timeout)
        assert self._loading is not None
        await asyncio.shield(self._loading)
        assert self.slots is not None
        return self.slots

    def _reload(self, timeout: float) -> None:
        if self._loading is None:
            self._loading = asyncio.get_running_loop().create_task(self._load(timeout))
            self._loading.add_done_callback(_retrieve)

    async def _load(self, timeout: float) -> None:
        try:
            known = [*self.links, *self.startup] if self.slots is not None else self.startup
            errors = []
            for address in dict.fromkeys(known):
                try:
                    link = self.link(address)
                    reply = await _call(link, pack(b"CLUSTER", b"SLOTS"), timeout, wait=True)
                except BackendError as exc:
                    errors.append(str(exc))
                    continue
                if isinstance(reply, ReplyError):
                    if "cluster support disabled" in str(reply):
                        raise _WrongKind(
                            f"Redis at {address} is not a cluster node ({reply}): use 'redis://'"
                        )
                    errors.append(f"{address}: {reply}")  # LOADING, CLUSTERDOWN: the next one
                    continue
                self.slots = _slot_map(reply, address)
                return
            raise BackendError(f"no Redis Cluster node answered: {'; '.join(errors)}")
        finally:
            self._loading = None

    async def ping(self, timeout: float) -> None:
        self.slots = None
        slots = await self.load(timeout)
        for address in dict.fromkeys(slots):
            reply = await _call(self.link(address), pack(b"PING"), timeout, wait=True)
            if isinstance(reply, ReplyError):
                raise BackendError(f"Redis Cluster node {address} refused PING: {reply}")

    def close(self) -> None:
        for link in self.links.values():
            link.close()

    def connected(self) -> list[str]:
        return [address for link in self.links.values() for address in link.connected()]


def _slot_map(reply: Any, asked: Address) -> list[Address]:
    """``CLUSTER SLOTS`` as the primary's address for each of the 16,384 slots."""
    if not isinstance(reply, list) or not reply:
        raise BackendError(f"Redis Cluster at {asked} has no slots assigned: {reply!r}")
    slots: list[Address] = [asked] * _SLOTS
    for start, end, primary, *_ in reply:
        host = primary[0].decode() if primary[0] else asked.host  # "": the node we asked
        slots[int(start) : int(end) + 1] = [asked.moved_to(host, int(primary[1]))] * (
            int(end) - int(start) + 1
        )
    return slots


class RedisBackend:
    """Rate limit state in Redis: one server, a Redis Cluster, or the master of a Sentinel set.

    Args:
        client: a redis-py client whose settings say where Redis is: ``redis.asyncio.Redis``
            (host and port or unix socket, TLS, username and password, database; one made by
            ``Sentinel.master_for`` for a Sentinel set) or ``redis.asyncio.RedisCluster``.
            Decisions use connections of their own (see the module docstring); the client is
            closed by ``aclose``. ``None``: Redis on 127.0.0.1:6379.
        prefix: prepended to every key.
        clock: seconds to use instead of Redis' clock (tests only).
        timeout: seconds Redis may stay silent while it owes an answer (the middleware's
            ``backend_timeout`` when it decides through this backend).

    Raises:
        ValueError: a client configured in a way these connections cannot follow (a
            credential provider), or a ``timeout`` that is not a positive number.
    """

    def __init__(
        self,
        client: Any = None,
        *,
        prefix: str = "asgi_resilience:rl:",
        clock: Callable[[], float] | None = None,
        timeout: float = 0.05,
    ) -> None:
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
            raise ValueError(f"timeout must be a number of seconds > 0, got {timeout!r}")
        if "{" in prefix or "}" in prefix:
            raise ValueError(
                f"prefix must not contain '{{' or '}}', got {prefix!r}: Redis Cluster would hash "
                "the braces' content instead of each key's own hash tag"
            )
        self.client = client
        self.prefix = prefix
        self.clock = clock
        self.timeout = float(timeout)
        self.servers: _Single | _Cluster = _servers_of(client)
        self._prefix = prefix.encode()
        self._arguments_cache: dict[tuple[str, tuple[Rate, ...], int], tuple[int, bytes]] = {}

    @classmethod
    def from_url(cls, url: str, **options: Any) -> RedisBackend:
        """A backend for ``url``: ``redis://[user:password@]host:6379/0`` (``rediss://`` for
        TLS, ``unix:///path/redis.sock?db=0``), ``redis+cluster://host:port[,host:port...]``,
        or ``redis+sentinel://[user:password@]host:26379[,host:port...]/<service>[/db]`` (the
        credentials are the master's; sentinels are asked without). ``options`` as for the
        constructor. Nothing connects until the first decision or ``ping``.

        Raises:
            ValueError: the URL cannot be read.
        """
        backend = cls(**options)
        backend.servers = _servers_from_url(url)
        return backend

    async def decide(
        self, strategy: Strategy, key: str, rates: Sequence[Rate], cost: int
    ) -> Decision:
        return await self.decide_within(self.timeout, strategy, key, rates, cost)

    async def decide_within(
        self, timeout: float, strategy: Strategy, key: str, rates: Sequence[Rate], cost: int
    ) -> Decision:
        """``decide`` with Redis allowed ``timeout`` seconds of silence (see the class)."""
        ordered = _canonical(rates)
        tag = self._tag(strategy, key, ordered)
        count, args = self._arguments(strategy, ordered, cost)
        redis_key = self._prefix + b"{" + tag + b"}"
        keyed = b"$1\r\n1\r\n$%d\r\n%s\r\n%s" % (len(redis_key), redis_key, args)
        command = b"*%d\r\n$7\r\nEVALSHA\r\n$40\r\n%s\r\n%s" % (count, _SHA[strategy.name], keyed)
        reply = None
        try:
            reply = await self.servers.call(tag, command, timeout)
            if isinstance(reply, ReplyError) and str(reply).startswith("NOSCRIPT"):
                # The server lost the script (SCRIPT FLUSH, a failover): EVAL runs and caches it.
                lua = strategy.lua.encode()
                command = b"*%d\r\n$4\r\nEVAL\r\n$%d\r\n%s\r\n%s" % (count, len(lua), lua, keyed)
                reply = await self.servers.call(tag, command, timeout)
            if isinstance(reply, ReplyError):
                raise BackendError(f"Redis refused a rate limit decision: {reply}")
            decision = _decision(reply, ordered)
        except (ValueError, IndexError, TypeError) as exc:
            raise BackendError(f"Redis answered a rate limit decision with {reply!r}") from exc
        return decision if ordered is rates else _reordered(decision, rates)

    def key_for(self, strategy: Strategy, key: str, rates: Sequence[Rate]) -> str:
        """The Redis key for a client ``key`` under ``strategy`` and ``rates`` (in any order)."""
        return f"{self.prefix}{{{self._tag(strategy, key, _canonical(rates)).decode()}}}"

    def _tag(self, strategy: Strategy, key: str, ordered: Sequence[Rate]) -> bytes:
        spec = ";".join(f"{r.amount}/{r.period!r}" for r in ordered)
        return hashlib.sha256(f"{strategy.name}|{spec}|{key}".encode()).hexdigest()[:40].encode()

    def _arguments(
        self, strategy: Strategy, rates: tuple[Rate, ...], cost: int
    ) -> tuple[int, bytes]:
        """The command's length and its arguments after the key, in RESP: built once per
        strategy, rates and cost when Redis keeps the time (with an injected clock, per call)."""
        cached = self._arguments_cache.get((strategy.name, rates, cost))
        if cached is not None:
            return cached
        now = b"" if self.clock is None else repr(self.clock()).encode()
        args = [now, b"%d" % cost, b"%d" % len(rates)]
        for rate in rates:
            args += [b"%d" % rate.amount, repr(rate.period).encode()]
        arguments = 4 + len(args), pack(*args)[len(b"*%d\r\n" % len(args)) :]
        if self.clock is None and len(self._arguments_cache) < 1024:
            self._arguments_cache[strategy.name, rates, cost] = arguments
        return arguments

    async def ping(self) -> None:
        """Check that Redis answers (the startup check ``resilient()`` registers); a plain URL
        at a Redis Cluster node fails here, naming ``redis+cluster://``."""
        try:
            await self.servers.ping(max(self.timeout, 1.0))
        except _WrongKind:
            raise
        except BackendError as exc:
            raise BackendError(f"Redis is not reachable: {exc}") from exc

    @property
    def connections(self) -> list[str]:
        """The servers this backend holds a connection to now (``host:port``): one per server
        whatever the number of concurrent decisions."""
        return self.servers.connected()

    async def aclose(self) -> None:
        self.servers.close()
        if self.client is not None:
            await self.client.aclose()


def _rate_order(rate: Rate) -> tuple[float, int, str]:
    return rate.period, rate.amount, rate.name


def _canonical(rates: Sequence[Rate]) -> tuple[Rate, ...]:
    """The rates in one order whatever order they were written in (the state is stored per
    rate, in this order, and the key names them in it): ``rates`` itself when already so."""
    if len(rates) < 2 and isinstance(rates, tuple):
        return rates
    ordered = tuple(sorted(rates, key=_rate_order))
    return rates if ordered == rates else ordered


def _reordered(decision: Decision, rates: Sequence[Rate]) -> Decision:
    """``decision`` (made for the canonical order) with its statuses in the order of ``rates``."""
    positions = sorted(range(len(rates)), key=lambda index: _rate_order(rates[index]))
    statuses: list[RateStatus] = list(decision.statuses)
    for canonical, original in enumerate(positions):
        statuses[original] = decision.statuses[canonical]
    return decision._replace(statuses=tuple(statuses))


def _decision(reply: Sequence[Any], rates: Sequence[Rate]) -> Decision:
    allowed = int(reply[0]) == 1
    retry_after = float(reply[1])
    statuses = tuple(
        RateStatus(rate, int(reply[2 + 2 * i]), float(reply[3 + 2 * i]))
        for i, rate in enumerate(rates)
    )
    if retry_after < 0:
        retry_after = math.inf  # the script's mark for "never": cost above the limit
    return Decision(allowed, statuses, 0.0 if allowed else retry_after)


# --- where Redis is: clients and URLs -------------------------------------------------------------


def _servers_of(client: Any) -> _Single | _Cluster:
    """The servers a redis-py client is configured for."""
    if client is None:
        return _Single(_Link(_fixed(Address()), role=True))
    from redis.asyncio.cluster import RedisCluster
    from redis.asyncio.sentinel import SentinelConnectionPool

    if isinstance(client, RedisCluster):
        nodes = client.nodes_manager.startup_nodes.values()
        return _Cluster([_address(n.connection_kwargs, host=n.host, port=n.port) for n in nodes])
    pool = client.connection_pool
    if isinstance(pool, SentinelConnectionPool):
        sentinels = [
            _address(s.connection_pool.connection_kwargs) for s in pool.sentinel_manager.sentinels
        ]
        master = _address(pool.connection_kwargs)
        return _Single(_Link(_sentinel_locator(sentinels, pool.service_name, master), role=True))
    kwargs = dict(pool.connection_kwargs)
    if "SSL" in pool.connection_class.__name__:
        kwargs["ssl"] = True
    return _Single(_Link(_fixed(_address(kwargs)), role=True))


def _servers_from_url(url: str) -> _Single | _Cluster:
    scheme, _, rest = url.partition("://")
    scheme = scheme.lower()
    if scheme in ("redis+cluster", "redis+sentinel"):
        userinfo, _, rest = rest.rpartition("@")
        hosts, _, path = rest.partition("/")
        username, _, password = userinfo.partition(":")
        login = {"username": unquote(username) or None, "password": unquote(password) or None}
        default_port = 26379 if scheme == "redis+sentinel" else 6379
        nodes = [_host_port(n, url, default_port) for n in hosts.split(",") if n.strip()]
        if not nodes:
            raise ValueError(f"no host in the Redis URL {url!r}: expected {scheme}://host:port")
        if scheme == "redis+cluster":
            return _Cluster([_address(login, host=h, port=p) for h, p in nodes])
        service, _, db = path.partition("?")[0].partition("/")
        if not service or not (db.strip("/").isdigit() or not db.strip("/")):
            raise ValueError(
                f"invalid Sentinel URL {url!r}: expected "
                "redis+sentinel://host:26379[,host:port...]/<service_name>[/db]"
            )
        master = _address({**login, "db": int(db.strip("/") or 0)})
        sentinels = [Address(h, p) for h, p in nodes]
        return _Single(_Link(_sentinel_locator(sentinels, service, master), role=True))
    if scheme not in ("redis", "rediss", "unix"):
        raise ValueError(
            f"unknown Redis URL scheme in {url!r}: expected redis://, rediss://, unix://, "
            "redis+cluster:// or redis+sentinel://"
        )
    kwargs: dict[str, Any] = dict(parse_url(url))
    kwargs["ssl"] = scheme == "rediss"
    return _Single(_Link(_fixed(_address(kwargs)), role=True))


def _host_port(node: str, url: str, default_port: int) -> tuple[str, int]:
    parts = urlsplit(f"//{node.strip()}")
    try:
        port = parts.port or default_port
    except ValueError:
        raise ValueError(f"invalid port in {node!r} of the Redis URL {url!r}") from None
    if not parts.hostname:
        raise ValueError(f"invalid host {node!r} in the Redis URL {url!r}")
    return parts.hostname, port


def _address(kwargs: Any, **where: Any) -> Address:
    """An ``Address`` from redis-py connection settings."""
    if kwargs.get("credential_provider") is not None:
        raise ValueError(
            "RedisBackend cannot use a credential_provider: give the client username and "
            "password, or use RedisBackend.from_url('redis://user:password@host:6379/0')"
        )
    settings = {**kwargs, **where}
    return Address(
        host=str(settings.get("host") or "127.0.0.1"),
        port=int(settings.get("port") or 6379),
        path=settings.get("path"),
        ssl=_ssl_context(settings) if settings.get("ssl") else None,
        username=settings.get("username"),
        password=settings.get("password"),
        db=int(settings.get("db") or 0),
    )


def _ssl_context(settings: Any) -> ssl.SSLContext:
    """TLS as redis-py would set it up from the same settings (``ssl_cert_reqs``,
    ``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile``, ``ssl_check_hostname``)."""
    context = ssl.create_default_context(cafile=settings.get("ssl_ca_certs"))
    requirement = settings.get("ssl_cert_reqs", "required")
    modes = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}
    mode = modes.get(requirement, requirement) if isinstance(requirement, str) else requirement
    if mode not in (ssl.CERT_NONE, ssl.CERT_OPTIONAL, ssl.CERT_REQUIRED):
        raise ValueError(
            f"ssl_cert_reqs must be 'none', 'optional' or 'required', got {requirement!r}"
        )
    check_hostname = settings.get("ssl_check_hostname", mode != ssl.CERT_NONE)
    context.check_hostname = (
        str(check_hostname).lower() not in ("false", "0", "no") and mode != ssl.CERT_NONE
    )
    context.verify_mode = mode
    if settings.get("ssl_certfile"):
        context.load_cert_chain(settings["ssl_certfile"], settings.get("ssl_keyfile"))
    return context


def _sentinel_locator(
    sentinels: Sequence[Address], service: str, master: Address
) -> Callable[[float], Awaitable[Address]]:
    """Ask the sentinels, in turn, where the master of ``service`` is now."""
    question = pack(b"SENTINEL", b"get-master-addr-by-name", service.encode())

    async def locate(timeout: float) -> Address:
        errors = []
        for sentinel in sentinels:
            try:
                pipe, _ = await open_pipe(sentinel, timeout)
                try:
                    reply = await pipe.call(question, timeout)
                finally:
                    pipe.close()
            except BackendError as exc:
                errors.append(str(exc))
                continue
            if isinstance(reply, list) and len(reply) == 2:
                return master.moved_to(reply[0].decode(), int(reply[1]))
            errors.append(f"the sentinel at {sentinel} knows no master named {service!r}")
        raise BackendError(f"no sentinel named the master of {service!r}: {'; '.join(errors)}")

    return locate
