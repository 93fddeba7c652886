"""One pass for the concerns that observe a request: request ids, tracing, metrics, access log.

Each of those middlewares is an ``Observer``: two plain calls, ``enter`` before the application
runs and ``exit`` once it returned or raised, around one recording ``send``
(``RequestContext.record``). Used alone, a middleware runs its own steps; ``Observers`` runs the
steps of several around one application in one coroutine frame, with one path test per
distinct set of excluded paths, instead of a frame, a ``scope`` check, an exclusion test and a
``try`` per layer. ``resilient()`` builds one ``Observers`` from those it was asked for, in the
order nesting them would have: the first observer's ``enter`` runs first, its ``exit`` last.

Nothing here is a stand-in for the nesting's behaviour: an exception the application raises is
kept on the context (``keep_exception``) before any ``exit`` runs; a cancellation marks the
request ``disconnected`` (the server gave up on it); every ``exit`` of an observer the request
reached runs even when another one raised, and the first such error propagates afterwards (an
``enter`` that raises: the observers after it are not reached, its own ``exit`` does not run,
and its exception propagates). An ``exit`` that raises is not kept as the request's exception:
the response the client got is what the others record.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from .context import CONTEXT_KEY, PathSet, RequestContext, _current, route_path
from .types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["REPLY", "Observer", "Observers"]


class _Reply:
    def __repr__(self) -> str:
        return "REPLY"


# What ``enter`` returns to answer the request itself (``reply``) instead of the application;
# the observers after it still enter, so the answer is traced, measured and logged too.
REPLY: Any = _Reply()


class _Pass:
    """The one-pass driver: ``__call__`` runs the steps of the observers ``_plan`` picks for the
    request's path. Shared by a lone ``Observer`` (its plan: itself, or nothing on an excluded
    path) and ``Observers``; one coroutine frame, the request context found or made inline."""

    app: ASGIApp

    def _plan(self, path: str) -> _Plan:
        raise NotImplementedError  # pragma: no cover - both subclasses implement it

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # The call only behind a root path: one dict lookup otherwise, on every request.
        plan = self._plan(route_path(scope) if scope.get("root_path") else scope["path"])
        if plan is _NOTHING:
            await self.app(scope, receive, send)
            return
        context = scope.get(CONTEXT_KEY)
        token = None
        if context is None:
            context = scope[CONTEXT_KEY] = RequestContext(scope)
            token = _current.set(context)
        # Only the observers that have a step there are called: one list of states, kept for
        # those with an exit (``None`` for those without an enter).
        enters, exits = plan
        states: list[Any] = []
        replier: Observer | None = None
        recorded_outside = context.recording
        try:
            for observer in enters:
                state = observer.enter(context, scope)
                if state is REPLY and replier is None:
                    replier = observer
                states.append(state)
            send = context.record(send)
            if recorded_outside and context.before_last_body is not None:
                # The recording send is a layer (an instrumentation, say) further out: the
                # hook must run here, before the message passes that layer.
                send = _with_last_body_hook(context, send)
            if replier is None:
                await self.app(scope, receive, send)
            else:
                await replier.reply(context, scope, send)
        except BaseException as exc:
            context.keep_exception(exc)
            if not isinstance(exc, Exception):
                context.mark_disconnected()  # cancelled: the server gave up on the request
            raise
        finally:
            # Innermost first, each whatever the others do; the first error raised after all.
            # Only the observers the request reached: an enter that raised stops the ones after
            # it, and neither it nor they exit, as nested layers never entered would not.
            entered = len(states)
            error: BaseException | None = None
            for observer, index, needed in exits:
                if needed > entered:
                    continue
                try:
                    observer.exit(context, scope, states[index] if index >= 0 else None)
                except BaseException as exc:
                    if error is None:
                        error = exc
            if token is not None:
                _current.reset(token)
            if error is not None:
                raise error


# A plan: the observers to enter (in order), and those to exit (innermost first), each with the
# index of its state among the entered ones' (-1: no enter step, its state is None) and how
# many enters must have run for the request to have reached it.
_Plan = tuple[tuple["Observer", ...], tuple[tuple["Observer", int, int], ...]]
_NOTHING: _Plan = ((), ())


def _plan_of(observers: Iterable[Observer]) -> _Plan:
    enters: list[Observer] = []
    exits: list[tuple[Observer, int, int]] = []
    for observer in observers:
        entering = type(observer).enter is not Observer.enter
        if entering:
            enters.append(observer)
        if type(observer).exit is not Observer.exit:
            index = len(enters) - 1 if entering else -1
            exits.append((observer, index, len(enters)))
    return tuple(enters), tuple(reversed(exits))


class Observer(_Pass):
    """A middleware whose work is a step before the application and a step after it.

    Subclasses set ``app`` and ``excluded`` (the paths they leave alone, ``None``: none) and
    implement ``enter`` (its result is handed to ``exit``) and ``exit``. ``exit`` runs whatever
    happened: the response's facts are on the context (``status``, ``exception``...).
    """

    excluded: PathSet | None = None

    def enter(self, context: RequestContext, scope: Scope) -> Any:
        """Before the application runs; returns what ``exit`` gets (``REPLY``: see ``reply``)."""
        return None

    def exit(self, context: RequestContext, scope: Scope, state: Any) -> None:
        """After the application returned or raised (or ``reply`` answered)."""

    async def reply(self, context: RequestContext, scope: Scope, send: Send) -> None:
        """Answer the request instead of the application (``enter`` returned ``REPLY``)."""
        raise NotImplementedError  # pragma: no cover - only observers returning REPLY are asked

    def _plan(self, path: str) -> _Plan:
        if self.excluded is not None and path in self.excluded:
            return _NOTHING
        plan: _Plan | None = self.__dict__.get("_own_plan")
        if plan is None:
            plan = self.__dict__["_own_plan"] = _plan_of((self,))
        return plan


class Observers(_Pass):
    """Run several observers' steps around ``app`` in one pass (see the module docstring).

    Args:
        app: the application the observers watch (their own ``app`` is not called).
        observers: outermost first, as they would be nested.
    """

    def __init__(self, app: ASGIApp, observers: Sequence[Observer]) -> None:
        if not observers:
            raise ValueError("observers must name at least one Observer")
        for observer in observers:
            if not isinstance(observer, Observer):
                raise ValueError(f"observers must be Observer instances, got {observer!r}")
        self.app = app
        self.observers = tuple(observers)
        # The distinct sets of excluded paths, tested once each per request, and the observers
        # that run for each combination of outcomes (known in advance for one set, the usual
        # case: the probes and scrapes; found as they occur for more).
        self._exclusions = _distinct(o.excluded for o in self.observers)
        self._plans: dict[tuple[bool, ...], _Plan] = {}
        self._only: PathSet | None = None
        if len(self._exclusions) == 1:
            self._only = self._exclusions[0]
            self._inside = self._plan_for((False,))
            self._outside = self._plan_for((True,))

    def _plan(self, path: str) -> _Plan:
        if self._only is not None:
            return self._outside if path in self._only else self._inside
        outcome = tuple([path in paths for paths in self._exclusions])
        plan = self._plans.get(outcome)
        if plan is None:
            plan = self._plans[outcome] = self._plan_for(outcome)
        return plan

    def _plan_for(self, outcome: tuple[bool, ...]) -> _Plan:
        excluded = {_key(p) for p, out in zip(self._exclusions, outcome, strict=True) if out}
        running = [
            o for o in self.observers if o.excluded is None or _key(o.excluded) not in excluded
        ]
        return _plan_of(running) if running else _NOTHING


def _key(paths: PathSet) -> tuple[frozenset[str], tuple[str, ...]]:
    return paths.exact, paths.prefixes


def _distinct(sets: Iterable[PathSet | None]) -> tuple[PathSet, ...]:
    """Each set of paths once (two ``PathSet`` of the same paths are one test)."""
    found: dict[tuple[frozenset[str], tuple[str, ...]], PathSet] = {}
    for paths in sets:
        if paths is not None:
            found.setdefault(_key(paths), paths)
    return tuple(found.values())


def _with_last_body_hook(context: RequestContext, send: Send) -> Send:
    async def send_after_hook(message: Message) -> None:
        if context.before_last_body is not None:
            context.last_body_hook(message)
        await send(message)

    return send_after_hook
