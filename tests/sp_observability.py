"""The adapter of the observability tests: output, log records, and a span of its own."""

from __future__ import annotations

import logging
import sys
from typing import Any

from snakepool.adapters import Adapter, command


class Observed(Adapter):
    def setup(self, config: dict[str, Any]) -> None:
        self._tracer: Any = None

    @command
    def echo(self, value: Any = None) -> Any:
        return value

    @command
    def say(self, text: str) -> None:
        """A line on stdout (which the worker sends to the host as output)."""
        print(text)
        sys.stdout.flush()

    @command
    def warn(self, text: str) -> None:
        """A log record (forwarded to the host's logging)."""
        logging.getLogger("sp_observability").warning("%s", text)

    @command
    def fail(self) -> None:
        raise ValueError("on purpose")

    @command
    def lm_call(self) -> dict[str, Any]:
        """Open a span as an LM client would; say which span it is a child of."""
        from opentelemetry import trace

        if self._tracer is None:
            from opentelemetry.sdk.trace import TracerProvider

            self._tracer = TracerProvider().get_tracer("sp_observability")
        with self._tracer.start_as_current_span("lm.call") as span:
            parent = span.parent
            current = trace.get_current_span().get_span_context()
            return {
                "trace_id": format(current.trace_id, "032x"),
                "parent_span_id": format(parent.span_id, "016x") if parent else None,
            }

    @command
    async def lm_call_async(self) -> dict[str, Any]:
        return self.lm_call()
