"""Access log: one structured record per HTTP request, and a JSON formatter for any record."""

from __future__ import annotations

import atexit
import json
import logging
import re
import sys
import weakref
from collections.abc import Callable, Iterable, Mapping
from json.encoder import c_make_encoder, encode_basestring  # type: ignore[attr-defined]
from time import monotonic, perf_counter, time
from types import MappingProxyType
from typing import Any, TextIO

from ._checks import check_bool, check_logger, check_seconds
from .context import PROBE_PATHS, PathSet, RequestContext, format_timestamp
from .observe import Observer
from .proxies import TrustedProxies
from .types import ASGIApp, Scope

__all__ = ["DEFAULT_EXCLUDE_PATHS", "AccessLogMiddleware", "JsonFormatter", "JsonLinesSink"]

DEFAULT_EXCLUDE_PATHS = PROBE_PATHS

_logger = logging.getLogger("asgi_resilience.access")
_MESSAGE = "%s %s %s %.1fms"


class AccessLogMiddleware(Observer):
    """Log one record per HTTP request when it is over, on the ``asgi_resilience.access`` logger.

    Handles ``http`` scopes; others pass through. The record's message reads
    ``GET /items/1 200 3.1ms``; its ``extra`` fields are ``request_id, method, path, route,
    status, duration_ms, ttfb_ms, bytes_sent, client, user_agent, http_version``, plus
    ``trace_id`` (a span is active), ``rate_limited`` (a rate limiter decided: ``true``,
    ``false``, or ``"error"`` when its backend failed), ``error`` (the exception type, when one
    was raised), ``disconnected`` (the response never completed: the
    client went away; ``status`` is then only what was really sent, or ``None``) and ``query``
    (only with ``include_query``, the query string may carry personal data).

    Level: ``ERROR`` for 5xx, ``WARNING`` for 4xx, disconnects and requests slower than
    ``slow_threshold`` seconds, ``INFO`` otherwise. ``duration_ms`` runs from the first layer
    seeing the request to the last body byte sent (or the application returning), so background
    tasks run after the response are not counted. Reads no headers but ``User-Agent``; writes
    none. Place it inside the request id, tracing and metrics layers, outside ``ErrorMiddleware``
    (so it logs the status the client really got).

    Args:
        app: the ASGI application.
        logger: the logger records go to.
        exclude_paths: paths (and their subpaths) not logged; probes and scrapes by default.
        slow_threshold: seconds after which a successful request is logged as a warning.
        include_query: add the raw query string as ``query``.
        trusted_proxies: proxies whose forwarding header names the ``client`` (a list, or a
            ``TrustedProxies``; resolved once per request, shared with the rate limiter).
        sink: write each record's JSON line here instead of going through ``logging``: the
            same line ``JsonFormatter`` makes, for less. The ``logger``'s
            level still decides which records are written; its handlers and filters are not
            consulted.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        logger: logging.Logger | None = None,
        exclude_paths: Iterable[str] = DEFAULT_EXCLUDE_PATHS,
        slow_threshold: float = 1.0,
        include_query: bool = False,
        trusted_proxies: Iterable[str] | TrustedProxies = (),
        sink: JsonLinesSink | None = None,
    ) -> None:
        if sink is not None and not isinstance(sink, JsonLinesSink):
            raise ValueError(f"sink must be a JsonLinesSink or None, got {sink!r}")
        self.sink = sink
        check_seconds("slow_threshold", slow_threshold)
        check_logger("logger", logger, adapters=False)  # records go to its handle()
        check_bool("include_query", include_query)
        self.app = app
        self.excluded = PathSet(exclude_paths, option="exclude_paths")
        self.logger = logger if logger is not None else _logger
        self.slow_threshold = slow_threshold
        self.include_query = include_query
        self.proxies = TrustedProxies.of(trusted_proxies)

    def exit(self, context: RequestContext, scope: Scope, state: None) -> None:
        self._log(context, scope)

    def _log(self, context: RequestContext, scope: Scope) -> None:
        now = perf_counter()
        ended = context.response_ended
        status = context.status
        disconnected = context.disconnected or (ended is None and context.exception is None)
        if status is None and context.exception is not None and not disconnected:
            status = 500  # what every ASGI server answers for an exception before any response
        duration = (ended if ended is not None else now) - context.start
        if (status is not None and status >= 500) or (
            context.exception is not None and ended is None and not disconnected
        ):
            level = logging.ERROR  # a 5xx, or a response cut short by an exception
        elif disconnected or (status is not None and status >= 400):
            level = logging.WARNING
        elif duration > self.slow_threshold:
            level = logging.WARNING
        else:
            level = logging.INFO
        if not self.logger.isEnabledFor(level):
            return
        started = context.response_started
        method = scope["method"]
        path = scope["path"]
        args = (method, path, status if status is not None else "-", duration * 1000)
        fields: dict[str, Any] = {  # one literal: cheaper than eleven stores
            "request_id": context.request_id,
            "method": method,
            "path": path,
            "route": context.route(scope),
            "status": status,
            "duration_ms": round(duration * 1_000_000) / 1000,  # to the microsecond
            "ttfb_ms": round((started - context.start) * 1_000_000) / 1000 if started else None,
            "bytes_sent": context.bytes_sent,
            "client": self.proxies.apply(context, scope) if self.proxies else context.client,
            "user_agent": _user_agent(scope),
            "http_version": scope.get("http_version"),
        }
        trace_id = context.current_trace_id()
        if trace_id is not None:
            fields["trace_id"] = trace_id
        if context.rate_limited is not None:
            fields["rate_limited"] = context.rate_limited
        if context.exception is not None:
            fields["error"] = type(context.exception).__name__
        if disconnected:
            fields["disconnected"] = True
        if self.include_query:
            fields["query"] = scope.get("query_string", b"").decode("latin-1")
        sink = self.sink
        if sink is not None:
            sink.emit(level, self.logger.name, _MESSAGE % args, fields)
            return
        # What Logger.log does, minus findCaller's walk up the stack (the caller is always this
        # line) and makeRecord's check of each extra key against the record (ours never clash):
        # together they were half the cost of a record. The fields go straight into the record;
        # ``_MESSAGE`` as its ``msg`` tells ``JsonFormatter`` it may take its fast path.
        record = logging.getLogRecordFactory()(
            self.logger.name, level, __file__, 0, _MESSAGE, args, None
        )
        record.__dict__.update(fields)
        self.logger.handle(record)


def _user_agent(scope: Scope) -> str | None:
    # first_header(), inline: every logged request passes here.
    for name, value in scope["headers"]:
        if name == b"user-agent":
            return str(value.decode("latin-1"))
    return None


# Attributes every LogRecord has; anything else on a record came from ``extra`` or a filter.
# uvicorn's ``color_message`` is its message again with terminal colours: noise in JSON.
_RECORD_ATTRIBUTES = frozenset(logging.makeLogRecord({}).__dict__) | {
    "message",
    "asctime",
    "color_message",
}


class JsonFormatter(logging.Formatter):
    """Render any log record as one JSON line, with every ``extra`` field as a member.

    Members: ``timestamp`` (UTC, ISO 8601, milliseconds), ``level``, ``logger``, ``message``,
    then the record's extra fields (``request_id``, ``route``, ...), then ``exc_info`` and
    ``stack_info`` as text when present. Values JSON cannot encode are written with ``str()``.
    The library never installs it; attach it to your own handler, or name it in a logging
    configuration: ``{"class": "asgi_resilience.JsonFormatter"}`` in ``dictConfig`` (static
    fields through ``{"()": "asgi_resilience.JsonFormatter", "static_fields": {...}}``), or
    ``class=asgi_resilience.JsonFormatter`` in a ``fileConfig`` INI file.

    Args:
        fmt, datefmt, style, validate, defaults: what ``logging.config`` hands every formatter
            class; accepted and unused (the line's shape is fixed), except ``defaults``, which
            become static fields.
        static_fields: members added to every line (``service``, ``version``).
    """

    def __init__(
        self,
        fmt: str | None = None,
        datefmt: str | None = None,
        style: str = "%",
        validate: bool = True,
        *,
        defaults: Mapping[str, Any] | None = None,
        static_fields: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if defaults:
            static_fields = {**defaults, **(static_fields or {})}
        self.static_fields = static_fields  # the setter checks, copies and encodes them

    @property
    def static_fields(self) -> Mapping[str, Any]:
        """The members added to every line (read-only; assign a new mapping to change them)."""
        return self._static.fields

    @static_fields.setter
    def static_fields(self, fields: Mapping[str, Any] | None) -> None:
        self._static = _StaticFields(fields)

    def format(self, record: logging.LogRecord) -> str:
        static = self._static  # one read: another thread may assign static_fields meanwhile
        if record.msg is _MESSAGE and static.fast:
            line = _access_line_of(record, static)
            if line is not None:
                return line
        payload: dict[str, Any] = {
            "timestamp": format_timestamp(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if static.fields:
            payload.update(static.fields)
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRIBUTES:
                payload[key] = value
        if record.exc_info:
            payload["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            payload["stack_info"] = self.formatStack(record.stack_info)
        return _encode_line(payload)


def _encode_line(payload: dict[str, Any]) -> str:
    try:
        return _encode(payload)
    except (TypeError, ValueError, RecursionError):
        # Non-string dict keys, circular references: keep the line, lose only the detail.
        return _encode({key: _encodable(value) for key, value in payload.items()})


def _encodable(value: Any) -> Any:
    try:
        _encode(value)
    except (TypeError, ValueError, RecursionError):
        return str(value)
    return value


def _make_encoder() -> Callable[[Any], str]:
    """One encoder for every line. ``json.dumps()`` with options builds an encoder per call,
    and ``JSONEncoder.encode`` still builds its C encoder per call: build that once (where the
    C accelerator exists). No circular-reference check; a cycle raises ``RecursionError``,
    which ``format`` handles like any value JSON cannot take."""
    if c_make_encoder is None:  # pragma: no cover - CPython always has the accelerator
        return json.JSONEncoder(ensure_ascii=False, default=str).encode
    encoder = c_make_encoder(None, str, encode_basestring, None, ": ", ", ", False, False, True)
    return lambda value: "".join(encoder(value, 0))


_encode = _make_encoder()


# The access record's fields, in the order ``AccessLogMiddleware`` writes them; any others
# (``trace_id``, ``rate_limited``, ``error``, ``disconnected``, ``query``) follow them.
_CORE_FIELDS = (
    "request_id",
    "method",
    "path",
    "route",
    "status",
    "duration_ms",
    "ttfb_ms",
    "bytes_sent",
    "client",
    "user_agent",
    "http_version",
)
_HEAD_FIELDS = frozenset({"timestamp", "level", "logger", "message"})
# The attributes a record has before its extra fields (the default factory's).
_RECORD_SIZE = len(logging.LogRecord("", 0, "", 0, "", (), None).__dict__)
_CORE_COUNT = len(_CORE_FIELDS)
_EXTRA_START = _RECORD_SIZE + _CORE_COUNT  # where a record's fields after the core ones start
_NO_KEYS: frozenset[str] = frozenset()
_IMMUTABLE = (str, int, float, bool, type(None))
_quote = encode_basestring  # a str as a JSON string, exactly as the encoder writes one (C)


class _StaticFields:
    """``static_fields`` as given, and as the JSON members every line carries (encoded once)."""

    __slots__ = ("fast", "fields", "keys", "members")

    def __init__(self, fields: Mapping[str, Any] | None) -> None:
        try:
            copied = dict(fields or {})  # a mapping, or (name, value) pairs
        except (TypeError, ValueError):
            raise ValueError(
                f"static_fields must be a mapping of member names to values, got {fields!r}"
            ) from None
        self.fields: Mapping[str, Any] = MappingProxyType(copied)
        self.keys = frozenset(copied)
        self.members = ", " + _encode_line(copied)[1:-1] if copied else ""
        # A static member named like a head member or an access field takes that member's
        # place in the line: only the general path writes that. So does a value that may
        # change after this (a list the caller keeps, an object whose str() changes): the
        # general path encodes it for each line, and so must every line.
        self.fast = not (self.keys & _HEAD_FIELDS or self.keys.intersection(_CORE_FIELDS)) and all(
            type(value) in _IMMUTABLE for value in copied.values()
        )


def _access_members(
    d: Mapping[str, Any], extra: tuple[Any, ...], skip: frozenset[str], static: _StaticFields
) -> str | None:
    """The members ``_encode`` writes for the access fields in ``d`` (``_CORE_FIELDS``, then the
    keys ``extra``, minus those in ``skip``), without braces; ``None`` when a value or key is not
    of the plain kind the access log writes (a filter changed it): encode it the general way.

    Written out rather than left to the json encoder, which costs twice as much here: this is
    most of what one access-log line costs."""
    request_id = d["request_id"]
    method = d["method"]
    path = d["path"]
    route = d["route"]
    status = d["status"]
    duration = d["duration_ms"]
    ttfb = d["ttfb_ms"]
    sent = d["bytes_sent"]
    client = d["client"]
    agent = d["user_agent"]
    version = d["http_version"]
    if not (
        type(method) is str
        and type(path) is str
        and type(route) is str
        and type(sent) is int
        and type(duration) is float
        and duration - duration == 0.0  # finite: NaN and infinities are written differently
        and (status is None or type(status) is int)
        and (ttfb is None or (type(ttfb) is float and ttfb - ttfb == 0.0))
        and (request_id is None or type(request_id) is str)
        and (client is None or type(client) is str)
        and (agent is None or type(agent) is str)
        and (version is None or type(version) is str)
    ):
        return None
    members = (
        f'"request_id": {"null" if request_id is None else _quote(request_id)}, '
        f'"method": {_quote(method)}, "path": {_quote(path)}, "route": {_quote(route)}, '
        f'"status": {"null" if status is None else status}, "duration_ms": {duration}, '
        f'"ttfb_ms": {"null" if ttfb is None else ttfb}, "bytes_sent": {sent}, '
        f'"client": {"null" if client is None else _quote(client)}, '
        f'"user_agent": {"null" if agent is None else _quote(agent)}, '
        f'"http_version": {"null" if version is None else _quote(version)}'
    )
    for key in extra:
        if key in skip:
            continue
        if type(key) is not str or key in static.keys or key in _HEAD_FIELDS:
            return None
        value = d[key]
        cls = type(value)
        if cls is str:
            members += f", {_quote(key)}: {_quote(value)}"
        elif cls is bool:
            members += f", {_quote(key)}: {'true' if value else 'false'}"
        elif value is None:
            members += f", {_quote(key)}: null"
        elif cls is int:
            members += f", {_quote(key)}: {value}"
        else:
            return None
    return members


def _access_line_of(record: logging.LogRecord, static: _StaticFields) -> str | None:
    """``JsonFormatter``'s line for an access record, written out; ``None``: not one as the
    middleware made it (a filter or factory added, removed or retyped something)."""
    d = record.__dict__
    keys = tuple(d)
    if (
        keys[_RECORD_SIZE:_EXTRA_START] != _CORE_FIELDS
        or d.get("exc_info")
        or d.get("stack_info")
        or not _RECORD_ATTRIBUTES.issuperset(keys[:_RECORD_SIZE])
    ):
        return None
    members = _access_members(d, keys[_EXTRA_START:], _RECORD_ATTRIBUTES, static)
    level, name = record.levelname, record.name
    if members is None or type(level) is not str or type(name) is not str:
        return None
    return (
        f'{{"timestamp": "{format_timestamp(record.created)}", "level": {_quote(level)}, '
        f'"logger": {_quote(name)}, "message": {_quote(record.getMessage())}'
        f"{static.members}, {members}}}"
    )


_reporter = logging.getLogger("asgi_resilience")
# POSIX guarantees a pipe write of at most PIPE_BUF bytes (4096 on Linux) is never interleaved
# with another process's; characters, not bytes, are counted here: non-ASCII lines may pass it.
_ATOMIC_WRITE = 4096
_SINKS: weakref.WeakSet[JsonLinesSink] = weakref.WeakSet()
# Outside strings a JSON line is ASCII, so each non-ASCII character can become its \u escape.
_NON_ASCII = re.compile(r"[^\x00-\x7f]")


def _json_escape(match: re.Match[str]) -> str:
    return json.dumps(match[0])[1:-1]  # "\u00e9", a surrogate pair beyond the BMP


@atexit.register
def _flush_sinks() -> None:
    for sink in list(_SINKS):
        sink.flush()


class JsonLinesSink:
    """Access-log lines written straight to a stream, buffered, bypassing ``logging``.

    Each line is byte for byte what ``JsonFormatter`` (with the same ``static_fields``) makes of
    the access record when no filter changes it, for about 40% less in the request pipeline: no
    record object, no handler lock, no formatter walk over the record's attributes. Filters and
    record factories (``RequestIdLogFilter``'s ``"-"`` for a missing id, OpenTelemetry's logging
    fields) are not applied; the logger's level is. Lines are kept in memory and written when
    ``buffer_size`` characters are waiting, ``flush_interval`` seconds after the first line
    waited (a timer on the running event loop, asyncio or trio), on ``flush()``, and at
    interpreter exit. They go out in writes of whole lines of at most 4 KiB each (then
    ``flush``), the size a pipe never splices with another process's writes, so worker processes
    can share one stdout. ``resilient()`` registers the flush with its lifespan's resources, so
    a clean shutdown or SIGTERM loses nothing; a hard kill loses at most the last
    ``flush_interval`` seconds. Lines reach the stream up to ``flush_interval`` later than lines
    written through ``logging``.

    A stream that is gone (a closed pipe, a closed file) is reported once on the
    ``asgi_resilience`` logger and its lines are dropped from then on; a write that fails
    otherwise (a full disk) drops that write's lines and is reported at most once a minute.
    Dropped lines are counted in ``dropped``; no request ever fails for them. A character the
    stream's encoding lacks is written as its JSON ``\\u`` escape. A write blocks the event loop
    while the stream takes the bytes, as any logging handler does.

    Written here rather than taken from a library: the stdlib's ``QueueHandler`` and
    ``MemoryHandler`` still build a ``LogRecord`` per line and format it, which is the cost
    this sink exists to avoid.

    Args:
        stream: a text stream (``sys.stdout`` by default, looked up when a line is written).
        buffer_size: characters buffered before they are written.
        flush_interval: seconds a line may wait in the buffer.
        static_fields: members added to every line after ``message`` (``service``, ``version``).
    """

    def __init__(
        self,
        stream: TextIO | None = None,
        *,
        buffer_size: int = 65_536,
        flush_interval: float = 1.0,
        static_fields: dict[str, Any] | None = None,
    ) -> None:
        if isinstance(buffer_size, bool) or not isinstance(buffer_size, int) or buffer_size < 0:
            raise ValueError(
                f"buffer_size must be a whole number of characters >= 0 (0: write every line "
                f"at once), got {buffer_size!r}"
            )
        check_seconds("flush_interval", flush_interval)
        if stream is not None and not callable(getattr(stream, "write", None)):
            raise ValueError(f"stream must be a text stream with write(), got {stream!r}")
        self._stream = stream
        self.buffer_size = buffer_size
        self.flush_interval = float(flush_interval)
        self._static = _StaticFields(static_fields)
        self.dropped = 0
        self._lines: list[str] = []
        self._size = 0
        self._flush_due = 0.0  # monotonic time of the timed flush scheduled (0: none)
        self._broken = False
        self._report_after = 0.0  # monotonic time before which write errors are not reported
        _SINKS.add(self)  # flushed at exit (held weakly: a sink nobody uses can go)

    @property
    def static_fields(self) -> Mapping[str, Any]:
        """The members added to every line (read-only; given at construction)."""
        return self._static.fields

    @property
    def stream(self) -> TextIO:
        return self._stream if self._stream is not None else sys.stdout

    def emit(self, level: int, logger: str, message: str, fields: dict[str, Any]) -> None:
        """Add one line: the members ``JsonFormatter`` writes for such a record."""
        if self._broken:
            self.dropped += 1
            return
        level_name = logging.getLevelName(level)  # as the record's, names added later included
        static = self._static
        keys = tuple(fields)
        members = (
            _access_members(fields, keys[_CORE_COUNT:], _NO_KEYS, static)
            if keys[:_CORE_COUNT] == _CORE_FIELDS and static.fast and type(level_name) is str
            else None
        )
        if members is not None and type(logger) is str and type(message) is str:
            line = (
                f'{{"timestamp": "{format_timestamp(time())}", "level": {_quote(level_name)}, '
                f'"logger": {_quote(logger)}, "message": {_quote(message)}'
                f"{static.members}, {members}}}"
            )
        else:
            line = _encode_line(
                {
                    "timestamp": format_timestamp(time()),
                    "level": level_name,
                    "logger": logger,
                    "message": message,
                    **static.fields,
                    **fields,
                }
            )
        self._lines.append(line)
        self._size += len(line) + 1
        if self._size > self.buffer_size:
            self.flush()
        elif monotonic() > self._flush_due:  # none scheduled, or its loop has gone
            self._schedule()

    def flush(self) -> None:
        """Write what is buffered: in writes of whole lines, each at most ``PIPE_BUF`` (4 KiB)
        where the lines allow, so that workers sharing one pipe (``--workers``, a container's
        stdout) never splice each other's lines."""
        if not self._lines:
            return
        lines, self._lines, self._size = self._lines, [], 0
        if self._broken:
            self.dropped += len(lines)
            return
        chunk: list[str] = []
        size = 0
        for line in lines:
            if chunk and size + len(line) + 1 > _ATOMIC_WRITE:
                self._write(chunk)
                chunk, size = [], 0
            chunk.append(line)
            size += len(line) + 1
        self._write(chunk)

    def _write(self, lines: list[str]) -> None:
        if self._broken:
            self.dropped += len(lines)
            return
        text = "\n".join(lines) + "\n"
        stream = self.stream
        try:
            try:
                stream.write(text)
            except UnicodeEncodeError:  # the stream's encoding lacks a character: escape it
                stream.write(_NON_ASCII.sub(_json_escape, text))
            stream.flush()
        except (BrokenPipeError, ValueError) as exc:  # the reader went away, or closed stream
            self._broken = True
            self.dropped += len(lines)
            _reporter.error(
                "The access log sink cannot write to %r (%s: %s); its lines are dropped from "
                "now on",
                getattr(stream, "name", stream),
                type(exc).__name__,
                exc,
            )
        except OSError as exc:  # a full disk, a non-blocking stream that is full: try again later
            self.dropped += len(lines)
            now = monotonic()
            if now >= self._report_after:
                self._report_after = now + 60
                _reporter.error(
                    "The access log sink could not write %d lines to %r (%s: %s); they are "
                    "dropped (%d so far), the next ones will be tried",
                    len(lines),
                    getattr(stream, "name", stream),
                    type(exc).__name__,
                    exc,
                    self.dropped,
                )

    async def aflush(self) -> None:
        """``flush()`` on the event loop: what the lifespan runs at shutdown, so no thread
        writes while a request's line is added."""
        self.flush()

    def _schedule(self) -> None:
        """Flush ``flush_interval`` from now on the running loop; no loop: at the next line."""
        import asyncio

        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            try:
                import trio

                trio.lowlevel.spawn_system_task(self._trio_flush)
            except (ImportError, RuntimeError):
                pass  # no event loop: flushed by size, by flush() or at exit (looked for again
                # after flush_interval)
        else:
            loop.call_later(self.flush_interval, self._timed_flush)
        self._flush_due = monotonic() + self.flush_interval

    def _timed_flush(self) -> None:
        self._flush_due = 0.0
        self.flush()

    async def _trio_flush(self) -> None:
        import trio

        try:
            await trio.sleep(self.flush_interval)
        finally:
            self._flush_due = 0.0  # cancelled with its run: the next line schedules again
        self.flush()
