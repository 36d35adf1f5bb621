"""Seeing pools work: metrics, traces, event subscriptions, worker logs, a dashboard.

Each part needs only its own optional extra and imports it when first used:

- ``pool.events(...)`` / :class:`Subscription`: events, bounded per subscriber (core).
- :func:`worker_logs`: the last lines each worker wrote, and following them (core).
- :func:`metrics_app`, :func:`metrics_wsgi_app`, :class:`PoolCollector`:
  Prometheus exposition (``pip install 'snakepool[metrics]'``).
- Tracing: with ``opentelemetry-api`` and a tracer provider set, one span per
  call, its context carried into the worker (``pip install 'snakepool[tracing]'``).
- :func:`dashboard_app`: a live web dashboard (``pip install 'snakepool[dashboard]'``).

See docs/observability.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

if TYPE_CHECKING:
    from ._logs import LogLine as LogLine
    from ._logs import WorkerLogs as WorkerLogs
    from ._logs import worker_logs as worker_logs
    from ._metrics import PoolCollector as PoolCollector
    from ._metrics import metrics_app as metrics_app
    from ._metrics import metrics_wsgi_app as metrics_wsgi_app
    from ._stream import Subscription as Subscription
    from .dashboard import dashboard_app as dashboard_app

__all__ = [
    "LogLine",
    "PoolCollector",
    "Subscription",
    "WorkerLogs",
    "dashboard_app",
    "metrics_app",
    "metrics_wsgi_app",
    "worker_logs",
]

_LAZY = {
    "LogLine": "._logs",
    "WorkerLogs": "._logs",
    "worker_logs": "._logs",
    "PoolCollector": "._metrics",
    "metrics_app": "._metrics",
    "metrics_wsgi_app": "._metrics",
    "Subscription": "._stream",
    "dashboard_app": ".dashboard",
}


__getattr__ = lazy_exports(__name__, _LAZY)
