"""Seeing pools work, in process: running counts and per-worker statistics, event
subscriptions, worker logs, Prometheus metrics, OpenTelemetry spans, the socket
server's ``logs`` and ``subscribe`` requests. Real pools, real workers."""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

import anyio
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

import snakepool
from snakepool.observability import worker_logs
from snakepool.observability._metrics import registry_for
from snakepool.pool._counters import BUCKETS, CallCounts, quantile
from snakepool.server._server import SocketServer
from waiting import wait_until

pytestmark = pytest.mark.anyio

ADAPTER = "sp_observability:Observed"


def samples(pool: snakepool.Pool) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The pool's Prometheus exposition, parsed back: (name, labels) -> value."""
    text = generate_latest(registry_for(pool)).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


# --- counts --------------------------------------------------------------------------------


def test_counts_put_each_call_in_its_latency_bucket_and_estimate_percentiles() -> None:
    counts = CallCounts()
    now = time.perf_counter()
    for seconds in [0.0003] * 90 + [0.2] * 10:  # 90 fast calls, 10 slow ones
        counts.ok("work", 0, now - seconds)
    counts.failure("work", 1, now - 0.002, "application")
    cell = counts.by_command()["work"]
    assert sum(cell[:-1]) == 101
    assert cell[BUCKETS.index(0.0005)] == 90  # (0.00025, 0.0005]
    assert cell[BUCKETS.index(0.25)] == 10  # (0.1, 0.25]
    assert cell[-1] == pytest.approx(90 * 0.0003 + 10 * 0.2 + 0.002, rel=0.05)
    assert dict(((c, o), n) for c, o, n in counts.outcomes()) == {
        ("work", "ok"): 100,
        ("work", "application"): 1,
    }
    p50 = quantile(0.5, cell[:-1])
    p99 = quantile(0.99, cell[:-1])
    assert p50 is not None and 0.00025 < p50 <= 0.0005
    assert p99 is not None and 0.1 < p99 <= 0.25
    assert quantile(0.5, [0] * len(cell[:-1])) is None
    assert set(counts.by_slot()) == {0, 1}


async def test_statistics_give_each_worker_its_rate_latencies_and_uptime() -> None:
    async with snakepool.Pool(ADAPTER, size=2) as pool:
        async with anyio.create_task_group() as tg:
            for i in range(200):
                tg.start_soon(pool.call, "echo", {"value": i})
        workers = pool.statistics().workers
        assert sum(w.requests for w in workers) >= 200  # (and any health check)
        busy = [w for w in workers if w.requests]
        for w in busy:
            assert w.calls_per_s > 0
            assert w.p50_seconds is not None and w.p99_seconds is not None
            assert 0 < w.p50_seconds <= w.p99_seconds
        for w in workers:
            assert w.uptime_seconds is not None and w.uptime_seconds > 0


# --- events ------------------------------------------------------------------------------


async def test_events_are_delivered_filtered_and_keep_calls_on_their_fast_path() -> None:
    async with snakepool.Pool(ADAPTER, size=1) as pool:
        async with pool.events(["worker.*"]) as events:
            assert not pool._listeners.active  # (no call.* wanted: calls make no events)
            pid = pool.statistics().workers[0].pid
            assert pid is not None
            await pool.call("echo", {"value": 1})
            os.kill(pid, signal.SIGKILL)
            names = []
            with anyio.fail_after(30):
                async for event in events:
                    names.append(event.name)
                    if event.name == "worker.started":
                        break
            assert names == ["worker.exited", "worker.started"]
            assert events.dropped == 0
        assert not pool._listeners._listeners  # closed: no longer listening
        with pytest.raises(TypeError, match="names must be"):
            pool.events([1])  # type: ignore[list-item]
        with pytest.raises(ValueError, match="buffer must be"):
            pool.events(buffer=0)


async def test_a_subscriber_that_does_not_read_loses_the_oldest_events_not_the_pool_its_pace() -> (
    None
):
    async with snakepool.Pool(ADAPTER, size=1) as pool:
        events = pool.events(["call.*"], buffer=10)
        assert pool._listeners.active
        for i in range(50):
            await pool.call("echo", {"value": i})
        assert events.pending() == 10
        assert events.dropped == 40
        kept = [await events.__anext__() for _ in range(10)]
        assert [e.name for e in kept] == ["call.completed"] * 10
        events.close()
        with pytest.raises(StopAsyncIteration):
            await events.__anext__()
        assert not pool._listeners.active


# --- worker logs ---------------------------------------------------------------------------


async def test_worker_output_and_log_records_are_kept_per_worker_and_followed() -> None:
    logs = worker_logs()
    async with snakepool.Pool(ADAPTER, size=1, name="logged") as pool:
        await pool.call("say", {"text": "first line"})
        await pool.call("warn", {"text": "a warning"})
        await wait_until(lambda: len(logs.lines("logged", 0)) >= 2)
        lines = logs.lines("logged", 0)
        assert [(line.level, line.line) for line in lines[-2:]] == [
            ("INFO", "first line"),
            ("WARNING", "a warning"),
        ]
        assert logs.workers("logged") == [0]
        follower = logs.follow("logged", last=1)
        try:
            assert (await follower.get()).line == "a warning"
            await pool.call("say", {"text": "a new line"})
            with anyio.fail_after(10):
                assert (await follower.get()).line == "a new line"
        finally:
            follower.close()


def test_keeping_worker_logs_leaves_what_the_host_sees_as_it_was(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A host that configured no logging still gets worker output echoed on stderr,
    and warnings through logging's last resort; INFO records are not shown."""
    logger = logging.getLogger("snakepool.worker")
    logs = worker_logs()
    assert logs in logger.handlers
    child = logging.getLogger("snakepool.worker.echoed.0")
    root_handlers = logging.getLogger().handlers[:]
    logging.getLogger().handlers.clear()  # (pytest's capture handler: a host with no logging)
    try:
        child.info("%s", "printed by a worker")
        child.warning("%s", "a worker warning")
    finally:
        logging.getLogger().handlers[:] = root_handlers
    err = capsys.readouterr().err
    if logs._took is not None:  # (logging would have dropped INFO: the handler took over)
        assert "[echoed/0] printed by a worker" in err
        assert "a worker warning" in err
    assert [line.line for line in logs.lines("echoed", 0)] == [
        "printed by a worker",
        "a worker warning",
    ]


# --- metrics ---------------------------------------------------------------------------------


async def test_metrics_count_calls_latencies_workers_and_restarts() -> None:
    async with snakepool.Pool(ADAPTER, size=2, name="m") as pool:
        for i in range(20):
            await pool.call("echo", {"value": i})
        with pytest.raises(snakepool.RemoteError):
            await pool.call("fail")
        before = samples(pool)
        assert (
            before[
                ("snakepool_calls_total", (("command", "echo"), ("outcome", "ok"), ("pool", "m")))
            ]
            == 20
        )
        assert (
            before[
                (
                    "snakepool_calls_total",
                    (("command", "fail"), ("outcome", "application"), ("pool", "m")),
                )
            ]
            == 1
        )
        count = before[
            ("snakepool_call_duration_seconds_count", (("command", "echo"), ("pool", "m")))
        ]
        inf = before[
            (
                "snakepool_call_duration_seconds_bucket",
                (("command", "echo"), ("le", "+Inf"), ("pool", "m")),
            )
        ]
        assert count == inf == 20
        assert (
            before[("snakepool_call_duration_seconds_sum", (("command", "echo"), ("pool", "m")))]
            > 0
        )
        assert before[("snakepool_workers", (("pool", "m"), ("state", "idle")))] == 2
        assert before[("snakepool_breaker_state", (("pool", "m"), ("state", "closed")))] == 1
        assert before[("snakepool_queue_depth", (("pool", "m"),))] == 0
        assert before[("snakepool_worker_rss_bytes", (("pool", "m"), ("worker", "0")))] > 1e6
        pid = pool.statistics().workers[0].pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        await wait_until(
            lambda: (
                pool.statistics().workers[0].restarts == 1
                and pool.statistics().workers[0].state == "idle"
            ),
            30,
        )
        after = samples(pool)
        assert (
            after[("snakepool_worker_restarts_total", (("pool", "m"), ("reason", "crashed")))] == 1
        )


async def test_recycling_is_counted_by_its_reason() -> None:
    async with snakepool.Pool(ADAPTER, size=1, name="r", max_requests=3) as pool:
        for i in range(8):
            await pool.call("echo", {"value": i})
        await wait_until(lambda: pool._counts()[1].counts[("recycled", "max_requests")] >= 1, 30)
        found = samples(pool)
        assert (
            found[("snakepool_worker_recycles_total", (("pool", "r"), ("reason", "max_requests")))]
            >= 1
        )


# --- traces ----------------------------------------------------------------------------------


async def test_without_a_tracer_provider_calls_carry_no_trace() -> None:
    from opentelemetry import trace

    if not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        pytest.skip("an earlier test set this process's tracer provider (set once per process)")
    async with snakepool.Pool(ADAPTER, size=1) as pool:
        assert pool._route.tracer is None
        assert (await pool.call("lm_call"))["parent_span_id"] is None


@pytest.fixture
def spans() -> object:
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    # (set once per process: OpenTelemetry refuses to replace a provider)
    trace.set_tracer_provider(provider)
    current = trace.get_tracer_provider()
    if current is not provider:  # an earlier test set it: use that one's exporter
        current.add_span_processor(SimpleSpanProcessor(exporter))  # type: ignore[attr-defined]
    return exporter


@pytest.mark.parametrize("command", ["lm_call", "lm_call_async"])
async def test_each_call_has_a_span_and_the_workers_spans_nest_under_it(
    spans: object, command: str
) -> None:
    from opentelemetry import trace

    async with snakepool.Pool(ADAPTER, size=1, name="traced") as pool:
        with trace.get_tracer("test").start_as_current_span("request"):
            inside = await pool.call(command)
            with pytest.raises(snakepool.RemoteError):
                await pool.call("fail")
    finished = {s.name: s for s in spans.get_finished_spans()}  # type: ignore[attr-defined]
    call = finished[f"snakepool.call {command}"]
    request = finished["request"]
    assert call.parent.span_id == request.context.span_id
    assert dict(call.attributes) == {
        "snakepool.pool": "traced",
        "snakepool.command": command,
        "snakepool.mode": "call",
        "snakepool.worker": 0,
        "snakepool.outcome": "ok",
    }
    # The worker's span: same trace, the call's span its parent.
    assert inside["trace_id"] == format(call.context.trace_id, "032x")
    assert inside["parent_span_id"] == format(call.context.span_id, "016x")
    failed = finished["snakepool.call fail"]
    assert failed.attributes["snakepool.outcome"] == "application"
    assert failed.status.status_code.name == "ERROR"


# --- the socket server's logs and subscribe ------------------------------------------------


async def test_logs_and_subscribe_over_the_socket(tmp_path: Path) -> None:
    worker_logs()
    async with snakepool.Pool(ADAPTER, size=1, name="s") as pool:
        server = SocketServer({"s": pool}, socket_path=tmp_path / "s.sock")
        async with anyio.create_task_group() as tg:
            await tg.start(server.serve)
            async with snakepool.connect(tmp_path / "s.sock") as client:
                await client["s"].call("say", {"text": "over the socket"})
                await wait_until(lambda: any(
                    line.line == "over the socket" for line in worker_logs().lines("s", 0)
                ))  # fmt: skip
                kept = [item async for item in client.logs("s", 0, last=1)]
                assert [(i["pool"], i["worker"], i["line"]) for i in kept] == [
                    ("s", 0, "over the socket")
                ]
                events = client.subscribe(["worker.*"], pools=["s"])
                follow = client.logs("s", follow=True, last=0)
                got: dict[str, dict[str, object]] = {}

                async def first(name: str, items: object) -> None:
                    got[name] = await anext(items)  # type: ignore[call-overload]

                async with anyio.create_task_group() as readers:
                    readers.start_soon(first, "event", events)
                    await wait_until(lambda: pool._listeners._listeners)  # (subscribed)
                    pid = pool.statistics().workers[0].pid
                    assert pid is not None
                    os.kill(pid, signal.SIGKILL)
                    await wait_until(lambda: "event" in got, 30)
                    await wait_until(lambda: pool.statistics().workers[0].state == "idle", 30)
                    readers.start_soon(first, "line", follow)
                    await wait_until(lambda: worker_logs()._followers)  # (following)
                    await client["s"].call("say", {"text": "followed"})
                    await wait_until(lambda: "line" in got, 10)
                event = got["event"]
                assert (event["name"], event["pool"], event["worker"]) == ("worker.exited", "s", 0)
                assert event["dropped"] == 0 and event["data"]["planned"] is False  # type: ignore[index]
                assert got["line"]["line"] == "followed"
                await events.aclose()  # type: ignore[attr-defined]
                await follow.aclose()  # type: ignore[attr-defined]
                with pytest.raises(KeyError, match="no pool named 'nope'"):
                    await anext(client.logs("nope"))
                with pytest.raises(ValueError, match="has no worker 5"):
                    await anext(client.logs("s", 5))
                with pytest.raises(KeyError, match="no pool named 'nope'"):
                    await anext(client.subscribe(pools=["nope"]))
                with pytest.raises(KeyError, match="no pool named 'nope'"):  # (a str: one name)
                    await anext(client.subscribe("worker.*", pools="nope"))
                with pytest.raises(TypeError, match="pools must be a list of pool names"):
                    await anext(client.subscribe(pools=[5]))  # type: ignore[list-item]
                assert await client["s"].call("echo", {"value": 2}) == 2  # the connection lives
            tg.cancel_scope.cancel()


# --- the dashboard's data ------------------------------------------------------------------


async def test_the_dashboard_hub_samples_calls_and_follows_dspy_runs() -> None:
    from snakepool.dspy import monitor
    from snakepool.observability.dashboard._hub import Hub

    async with snakepool.Pool(ADAPTER, size=1, name="h") as pool:
        hub = Hub(lambda: [pool])
        start = time.time()
        assert hub.refresh(start)
        assert not pool._listeners.active  # (the hub wants no per-call event)
        for i in range(30):
            await pool.call("echo", {"value": i})
        with pytest.raises(snakepool.RemoteError):
            await pool.call("fail")
        # What the DSPy layer reports while it evaluates and optimizes:
        dspy = monitor(pool)
        dspy.emit("dspy.evaluate.progress", None, {"program_id": "p1", "done": 4, "total": 10})
        dspy.emit(
            "dspy.evaluate.progress",
            None,
            {"program_id": "p1", "done": 10, "total": 10, "score": 0.8},
        )
        for score in (0.5, 0.7, 0.6):
            dspy.emit(
                "dspy.optimize.candidate",
                None,
                {"program_id": "p1", "score": score, "best_score": 0.7},
            )
        assert hub.refresh(start + 2.0)
        [point] = hub.history["h"]
        assert point[1] == pytest.approx(31 / 2.0)  # calls/s over the two seconds
        assert point[2] is not None and point[3] is not None and point[4] == pytest.approx(0.5)
        state = hub.state()
        [row] = state["pools"]
        assert row["completed"] == 30 and row["failed"] == {"application": 1}
        assert {c["command"]: c["calls"] for c in row["commands"]} == {"echo": 30, "fail": 1}
        runs = {(run["kind"], run["run"]): run for run in state["runs"]}
        evaluation = runs[("evaluate", "p1")]
        assert evaluation["fields"] == {"program_id": "p1", "done": 10, "total": 10, "score": 0.8}
        assert runs[("optimize", "p1")]["scores"] == [0.5, 0.7, 0.6]
        assert [e["name"] for e in hub.events_after(0)][-1] == "dspy.optimize.candidate"


def test_made_up_command_names_do_not_grow_the_counts_forever() -> None:
    from snakepool.pool._counters import MAX_COMMANDS, OTHER

    counts = CallCounts()
    now = time.perf_counter()
    for i in range(MAX_COMMANDS + 100):
        counts.failure(f"made-up-{i}", -1, now, "application")
    assert len(counts.by_command()) == MAX_COMMANDS + 1
    assert sum(counts.by_command()[OTHER][:-1]) == 100
    assert counts.failed[(OTHER, "application")] == 100


def test_a_host_without_a_tracer_provider_imports_no_opentelemetry(tmp_path: Path) -> None:
    import subprocess
    import sys

    script = (
        "import sys, anyio, snakepool\n"
        "async def main():\n"
        "    async with snakepool.Pool('generic', size=1) as pool:\n"
        "        assert await pool.call('echo', {'value': 1}) == 1\n"
        "        assert pool._route.tracer is None\n"
        "anyio.run(main)\n"
        "assert not [m for m in sys.modules if m.startswith('opentelemetry')], sys.modules\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
