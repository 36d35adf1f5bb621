"""Prometheus metrics: a collector reading the pools when scraped.

Calls are counted on their path into plain in-process counts (see
``snakepool.pool._counters``); this collector turns those, and each pool's
``statistics()``, into metric families only when Prometheus asks. Nothing is
done per call for metrics.

Mount the exposition in your own app with :func:`metrics_app` (ASGI) or
:func:`metrics_wsgi_app` (WSGI), or let ``snakepool up --metrics HOST:PORT``
serve it. Needs ``prometheus-client`` (``pip install 'snakepool[metrics]'``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, make_asgi_app, make_wsgi_app
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from ..pool import Pool
from ..pool._counters import BUCKETS

if TYPE_CHECKING:
    from ..server._server import SocketServer

__all__ = ["PoolCollector", "Pools", "metrics_app", "metrics_wsgi_app", "pools_of"]

#: Pools to observe: one, several, a name -> pool mapping (``Supervisor.pools``,
#: read again at each look), or a function returning them.
Pools = Pool | Iterable[Pool] | Mapping[str, Pool] | Callable[[], Iterable[Pool]]

_WORKER_STATES = ("starting", "idle", "busy", "stopping", "exited")
_BREAKER_STATES = ("closed", "open", "half_open")
_LE = (*(f"{bound:g}" for bound in BUCKETS), "+Inf")


def pools_of(pools: Pools) -> Callable[[], list[Pool]]:
    """A function returning the pools ``pools`` stands for, now."""
    if isinstance(pools, Pool):
        return lambda: [pools]
    if isinstance(pools, Mapping):
        return lambda: list(pools.values())
    if callable(pools):
        return lambda: list(pools())
    if isinstance(pools, Iterable):
        fixed = list(pools)
        if not all(isinstance(pool, Pool) for pool in fixed):
            raise TypeError(f"pools must be Pool objects, got {fixed!r}")
        return lambda: fixed
    raise TypeError(f"pools must be a Pool, pools, or a mapping of pools, got {pools!r}")


class PoolCollector(Collector):
    """A Prometheus collector for ``pools`` (and a socket ``server``'s connections)."""

    def __init__(self, pools: Pools, *, server: SocketServer | None = None) -> None:
        self._pools = pools_of(pools)
        self._server = server

    def collect(self) -> Iterator[Metric]:
        families = _families()
        for pool in self._pools():
            _collect_pool(pool, families)
        yield from families.values()
        if self._server is not None:
            yield from _server_metrics(self._server)


def _families() -> dict[str, Metric]:
    """The metric families of pools, empty, by a short name."""
    return {
        "calls": CounterMetricFamily(
            "snakepool_calls",
            "Calls finished, by pool, command and outcome (ok, or the error category).",
            labels=["pool", "command", "outcome"],
        ),
        "durations": HistogramMetricFamily(
            "snakepool_call_duration_seconds",
            "Call latency from the caller's call to its outcome, every outcome.",
            labels=["pool", "command"],
        ),
        "queued": _gauge("snakepool_queue_depth", "Calls waiting for a worker.", ["pool"]),
        "workers": _gauge("snakepool_workers", "Worker slots by state.", ["pool", "state"]),
        "inflight": _gauge(
            "snakepool_worker_inflight_calls", "Calls a worker holds.", ["pool", "worker"]
        ),
        "rss": _gauge(
            "snakepool_worker_rss_bytes",
            "Resident memory of a worker and its children.",
            ["pool", "worker"],
        ),
        "restarts": CounterMetricFamily(
            "snakepool_worker_restarts",
            "Workers that exited unplanned and were replaced, by reason (crashed, limit).",
            labels=["pool", "reason"],
        ),
        "recycles": CounterMetricFamily(
            "snakepool_worker_recycles",
            "Workers replaced on purpose, by reason (max_requests, worker_ttl, recovery).",
            labels=["pool", "reason"],
        ),
        "breaker": _gauge(
            "snakepool_breaker_state",
            "The circuit breaker's state (1 for the current one).",
            ["pool", "state"],
        ),
        "sessions": _gauge("snakepool_sessions", "Live sessions (an estimate).", ["pool"]),
        "size": _gauge("snakepool_pool_size", "Worker slots a pool has.", ["pool"]),
    }


def _gauge(name: str, documentation: str, labels: list[str]) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, labels=labels)


def _collect_pool(pool: Pool, families: dict[str, Any]) -> None:
    """Add ``pool``'s samples to ``families``."""
    name = pool.name
    stats = pool.statistics()
    counts, exits = pool._counts()
    for command, outcome, value in counts.outcomes():
        families["calls"].add_metric([name, command, outcome], value)
    for command, cell in counts.by_command().items():
        cumulative, running = [], 0
        for le, count in zip(_LE, cell[: len(_LE)], strict=True):
            running += count
            cumulative.append((le, running))
        families["durations"].add_metric([name, command], cumulative, sum_value=cell[len(_LE)])
    families["queued"].add_metric([name], stats.queued)
    by_state = dict.fromkeys(_WORKER_STATES, 0)
    for worker in stats.workers:
        by_state[worker.state] = by_state.get(worker.state, 0) + 1
        slot = str(worker.id)
        families["inflight"].add_metric([name, slot], worker.inflight)
        if worker.rss_bytes is not None:
            families["rss"].add_metric([name, slot], worker.rss_bytes)
    for state, value in by_state.items():
        families["workers"].add_metric([name, state], value)
    for (kind, reason), value in sorted(exits.counts.items()):
        families["restarts" if kind == "restarted" else "recycles"].add_metric(
            [name, reason], value
        )
    for state in _BREAKER_STATES:
        families["breaker"].add_metric([name, state], 1 if stats.breaker_state == state else 0)
    families["sessions"].add_metric([name], stats.sessions)
    families["size"].add_metric([name], stats.size)


def _server_metrics(server: SocketServer) -> Iterator[Metric]:
    stats = server.statistics()
    yield GaugeMetricFamily(
        "snakepool_socket_connections", "Client connections open now.", value=stats.clients
    )
    for name, documentation, value in (
        ("accepted", "Client connections accepted.", stats.accepted),
        ("dropped", "Client connections dropped for breaking the rules.", stats.dropped),
    ):
        yield CounterMetricFamily(
            f"snakepool_socket_connections_{name}", documentation, value=value
        )


def registry_for(pools: Pools, *, server: SocketServer | None = None) -> CollectorRegistry:
    """A registry of its own holding a :class:`PoolCollector` (not the global one)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PoolCollector(pools, server=server))
    return registry


def metrics_app(pools: Pools, *, server: SocketServer | None = None) -> Any:
    """An ASGI app serving the Prometheus exposition of ``pools``; mount it in
    your app (e.g. Starlette's ``Mount("/metrics", metrics_app(pool))``). It
    reads the pools on the event loop that serves it: the pools' own."""
    return make_asgi_app(registry_for(pools, server=server))


def metrics_wsgi_app(pools: Pools, *, server: SocketServer | None = None) -> Any:
    """A WSGI app serving the same (e.g. Flask's ``DispatcherMiddleware``). A WSGI
    server reads the pools from its own thread: the numbers are then read
    without the pools' event loop, each one right but not all from one instant."""
    return make_wsgi_app(registry_for(pools, server=server))
