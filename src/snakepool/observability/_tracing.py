"""OpenTelemetry: one span per call, its context carried into the worker.

A pool traces its calls when, as it starts, OpenTelemetry is already imported
by the host and a tracer provider is set (``trace.set_tracer_provider``, or
the ``OTEL_PYTHON_TRACER_PROVIDER`` variable): otherwise nothing here is
imported, and a call does nothing for tracing (one attribute read).

Each call gets a span ``snakepool.call <command>`` (kind CLIENT), a child of
whatever span is current where the call is made, with the attributes
``snakepool.pool``, ``snakepool.command``, ``snakepool.mode``,
``snakepool.session``, ``snakepool.worker`` and ``snakepool.outcome`` (``ok``,
``cancelled``, or the error category); a failed call's span has status
ERROR and the exception recorded. The span's W3C ``traceparent`` travels in
the call's message (the ``trace`` field), and the worker makes it the current
context while the handler runs, so spans the handler opens (an LM call's)
are children of the call's span in the same trace.
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["CallTracer", "tracer_for"]

_TRACER_NAME = "snakepool"


def tracer_for(pool: str) -> CallTracer | None:
    """A :class:`CallTracer` for the calls of ``pool``, or None when the host
    has no OpenTelemetry tracer provider set (nothing is imported then)."""
    if "opentelemetry.trace" not in sys.modules:
        return None  # (a host that set a provider has imported it)
    from opentelemetry import trace

    provider = trace.get_tracer_provider()
    if isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider):
        return None
    return CallTracer(pool, provider.get_tracer(_TRACER_NAME))


class CallTracer:
    """Starts and ends the spans of one pool's calls."""

    def __init__(self, pool: str, tracer: Any) -> None:
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.pool = pool
        self._tracer = tracer
        self._trace = trace
        self._propagator = TraceContextTextMapPropagator()

    def start(self, command: str, mode: str, session: str | None) -> tuple[Any, str | None]:
        """A new span for a call and the ``traceparent`` that carries it."""
        attributes: dict[str, Any] = {
            "snakepool.pool": self.pool,
            "snakepool.command": command,
            "snakepool.mode": mode,
        }
        if session is not None:
            attributes["snakepool.session"] = session
        span = self._tracer.start_span(
            f"snakepool.call {command}", kind=self._trace.SpanKind.CLIENT, attributes=attributes
        )
        carrier: dict[str, str] = {}
        self._propagator.inject(carrier, context=self._trace.set_span_in_context(span))
        return span, carrier.get("traceparent")

    def end(self, span: Any, worker: int | None, outcome: str, error: BaseException | None) -> None:
        if worker is not None:
            span.set_attribute("snakepool.worker", worker)
        span.set_attribute("snakepool.outcome", outcome)
        if error is not None:
            span.record_exception(error)
            span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, type(error).__name__))
        span.end()
