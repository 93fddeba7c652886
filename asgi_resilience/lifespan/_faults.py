"""Process faults: exceptions nobody handled, in asyncio tasks and in threads.

While a lifespan runs it puts its own hooks in front of ``threading.excepthook`` and of the
running asyncio loop's exception handler, and gives each back at shutdown (unless something
else replaced ours meanwhile: then it is left alone). Each exception is logged once, as one
structured record on the lifespan's logger (``source``, ``task`` or ``thread`` name,
``request_id`` when it was raised inside a request, the traceback), and counted in
``asgi_resilience_unhandled_exceptions_total{source}``. Other loop errors (a callback that
raised, a socket error) go to the handler that was there before.

The request id of a task: the task's own context on Python 3.12+ (``Task.get_context``); before
3.12 a task factory notes the id of the request that created each task (one dictionary entry
per task created inside a request). Trio has no unretrieved task exceptions (a nursery
re-raises them), so there only threads are watched.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading
import weakref
from collections.abc import Callable
from typing import Any, Literal, Protocol

from ..calls import describe_error
from ..request_id import get_request_id

__all__ = ["FaultWatch", "OnUnhandled"]

OnUnhandled = Literal["log", "shutdown"]


class _Owner(Protocol):
    logger: logging.Logger
    on_unhandled: OnUnhandled

    @property
    def ready(self) -> bool: ...

    @property
    def watching_sigterm(self) -> bool: ...

    def begin_drain(self) -> None: ...


class FaultWatch:
    """The hooks one running lifespan installs; ``install()`` in the loop, ``restore()`` after."""

    def __init__(self, owner: _Owner, counter: Callable[[], Any]) -> None:
        self.owner = owner
        self.counter = counter  # -> the unhandled exceptions Counter
        self._installed = False
        self._previous_thread_hook: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._previous_loop_handler: Any = None
        self._previous_factory: Any = None
        self._factory_installed = False
        self._request_ids: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()
        self._shutting_down = False

    def install(self) -> None:
        if self._installed:
            return
        self._installed = True
        self._shutting_down = False
        self._previous_thread_hook = threading.excepthook
        threading.excepthook = self._thread_hook
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # trio: threads only
        self._loop = loop
        self._previous_loop_handler = loop.get_exception_handler()
        loop.set_exception_handler(self._loop_hook)
        if sys.version_info < (3, 12):  # pragma: no branch - the task factory before 3.12
            self._previous_factory = loop.get_task_factory()
            loop.set_task_factory(self._task_factory)
            self._factory_installed = True

    def restore(self) -> None:
        if not self._installed:
            return
        self._installed = False
        if threading.excepthook == self._thread_hook:
            threading.excepthook = self._previous_thread_hook
        loop, self._loop = self._loop, None
        if loop is None:
            return
        if loop.get_exception_handler() == self._loop_hook:
            loop.set_exception_handler(self._previous_loop_handler)
        if self._factory_installed and loop.get_task_factory() == self._task_factory:
            loop.set_task_factory(self._previous_factory)
        self._factory_installed = False

    # -- the hooks -------------------------------------------------------------------------

    def _thread_hook(self, args: threading.ExceptHookArgs) -> None:
        if not self._installed:  # restored, but another hook put back over ours: pass it on
            self._previous_thread_hook(args)
            return
        if args.exc_type is SystemExit or args.exc_value is None:
            return  # how a thread asks to end, as the default hook sees it
        name = args.thread.name if args.thread is not None else "?"
        # The hook runs in the thread that died, in the thread's own context: before Python
        # 3.14 a thread does not inherit the request's, so this is seldom a request id.
        self._report("thread", name, args.exc_value, get_request_id())

    def _loop_hook(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exception = context.get("exception")
        task = context.get("future") or context.get("task")
        if (
            not self._installed
            or not isinstance(exception, BaseException)
            or not isinstance(task, asyncio.Task)
        ):
            previous = self._previous_loop_handler
            if previous is not None:
                previous(loop, context)
            else:
                loop.default_exception_handler(context)
            return
        self._report("task", task.get_name(), exception, self._request_id_of(task))

    def _task_factory(
        self, loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any
    ) -> asyncio.Future[Any]:
        previous = self._previous_factory
        task = (
            previous(loop, coro, **kwargs) if previous else asyncio.Task(coro, loop=loop, **kwargs)
        )
        request_id = get_request_id()
        if request_id is not None:
            self._request_ids[task] = request_id
        return task

    def _request_id_of(self, task: asyncio.Task[Any]) -> str | None:
        get_context = getattr(task, "get_context", None)  # Python 3.12+
        if get_context is not None:
            request_id: str | None = get_context().run(get_request_id)
            return request_id
        return self._request_ids.get(task)

    def _report(
        self, source: str, name: str, exception: BaseException, request_id: str | None
    ) -> None:
        owner = self.owner
        self.counter().labels(source).inc()
        shutdown = owner.on_unhandled == "shutdown"
        owner.logger.error(
            "Unhandled exception in %s %r: %s%s",
            source,
            name,
            describe_error(exception),
            "; shutting down (on_unhandled='shutdown')" if shutdown else "",
            exc_info=(type(exception), exception, exception.__traceback__),
            extra={"source": source, "origin": name, "request_id": request_id},
        )
        if shutdown and not self._shutting_down:
            self._shutting_down = True
            if owner.watching_sigterm and owner.ready:
                # What the orchestrator would send: our SIGTERM handler drains, then the
                # server shuts down as it always does. From any thread: the signal goes to
                # the main one.
                os.kill(os.getpid(), signal.SIGTERM)
            else:
                # No handler of ours in front of the server's (the loop runs outside the main
                # thread, or the shutdown began): a SIGTERM would end the process at once.
                owner.begin_drain()
                owner.logger.warning(
                    "on_unhandled='shutdown': no SIGTERM handler of ours here; readiness "
                    "fails from now on, the orchestrator will replace this process"
                )
