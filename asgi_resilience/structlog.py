"""A structlog processor that puts the request id (and the trace) on every event.

structlog's own loggers never pass through a ``logging.Filter``, so ``RequestIdLogFilter`` cannot
reach them (only stdlib records that structlog renders through ``ProcessorFormatter`` and
``ExtraAdder`` get its fields). ``add_request_context`` does for structlog's events what the filter
does for records::

    import structlog
    from asgi_resilience.structlog import add_request_context

    structlog.configure(processors=[add_request_context, structlog.processors.JSONRenderer()])

It needs nothing from structlog itself (a processor is a plain callable), so this module imports
without it.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

from .request_id import current_span_ids, get_request_id

__all__ = ["add_request_context"]


def add_request_context(
    logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Add ``request_id`` (inside a request), ``trace_id`` and ``span_id`` (inside a valid
    OpenTelemetry span) to the event, as ``RequestIdLogFilter`` adds them to log records. Keys
    the event already has (bound with ``bind()``, or passed to the call) are left alone.

    Put it before the renderer, anywhere after ``merge_contextvars`` if you use that (a
    ``request_id`` bound in context variables then wins).
    """
    if "request_id" not in event_dict:
        request_id = get_request_id()
        if request_id is not None:
            event_dict["request_id"] = request_id
    if "trace_id" not in event_dict:
        ids = current_span_ids()
        if ids is not None:
            event_dict["trace_id"], event_dict["span_id"] = ids
    return event_dict
