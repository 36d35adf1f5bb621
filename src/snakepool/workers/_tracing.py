"""A traced call's handler runs in the context of the host's span.

The host sends a traced call's W3C ``traceparent`` (``Call.trace``); while
the handler runs, that context is current, so a span the handler opens (an
LM call, through OpenTelemetry's instrumentation) is a child of the call's
span. Without OpenTelemetry in the worker the handler runs as it is.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

__all__ = ["in_trace"]

_otel: tuple[Any, Any] | bool | None = False  # (context module, propagator); None: absent


def _opentelemetry() -> tuple[Any, Any] | None:
    global _otel
    if _otel is False:
        try:
            context = importlib.import_module("opentelemetry.context")
            tracecontext = importlib.import_module("opentelemetry.trace.propagation.tracecontext")
            _otel = (context, tracecontext.TraceContextTextMapPropagator())
        except ImportError:
            _otel = None
    return _otel  # type: ignore[return-value]


def in_trace(
    handler: Callable[..., Any], traceparent: str, *, is_async: bool, is_stream: bool
) -> Callable[..., Any]:
    """``handler``, run with ``traceparent``'s context current (as it is, when
    OpenTelemetry is not installed in the worker)."""
    otel = _opentelemetry()
    if otel is None:
        return handler
    context, propagator = otel
    parent = propagator.extract({"traceparent": traceparent})

    if is_async and is_stream:

        @functools.wraps(handler)
        async def traced_async_stream(**kwargs: Any) -> AsyncIterator[Any]:
            token = context.attach(parent)
            try:
                async for item in handler(**kwargs):
                    yield item
            finally:
                context.detach(token)

        return traced_async_stream
    if is_async:

        @functools.wraps(handler)
        async def traced_async(**kwargs: Any) -> Any:
            token = context.attach(parent)
            try:
                return await handler(**kwargs)
            finally:
                context.detach(token)

        return traced_async
    if is_stream:

        @functools.wraps(handler)
        def traced_stream(**kwargs: Any) -> Iterator[Any]:
            token = context.attach(parent)
            try:
                yield from handler(**kwargs)
            finally:
                context.detach(token)

        return traced_stream

    @functools.wraps(handler)
    def traced(**kwargs: Any) -> Any:
        token = context.attach(parent)
        try:
            return handler(**kwargs)
        finally:
            context.detach(token)

    return traced
