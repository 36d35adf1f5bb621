"""``Program.evaluate``: fanned out over the workers, bounded in flight, metrics, failures."""

from __future__ import annotations

import tracemalloc
from collections.abc import Iterator, Mapping
from typing import Any

import anyio
import pytest

pytest.importorskip("dspy")

import anyio.lowlevel

import snakepool
from lm_server import LMRequest, LMServer
from snakepool import RemoteError
from snakepool.dspy import EvaluationProgress, Program, configure_lm, monitor

pytestmark = pytest.mark.anyio

FAST = {"num_retries": 0}


@pytest.fixture
def server() -> Iterator[LMServer]:
    with LMServer() as lm_server:
        yield lm_server


def labelled(n: int) -> list[dict[str, str]]:
    """The server answers "answer: <question>": even examples are labelled so, odd ones not."""
    return [
        {"question": f"q{i}", "answer": f"answer: q{i}" if i % 2 == 0 else "something else"}
        for i in range(n)
    ]


async def test_evaluation_fans_out_with_bounded_work_in_flight(server: LMServer) -> None:
    server.latency = 0.05
    async with (
        snakepool.Pool("dspy", size=2, worker_concurrency=3, call_timeout=20.0) as pool,
        pool.session() as session,
    ):
        await configure_lm(session, **server.lm_args(**FAST))
        qa = await Program.create(session, "question -> answer")
        events: list[snakepool.Event] = []
        monitor(pool).add_listener(events.append)
        pulled = 0
        ahead: list[int] = []  # examples read from the devset but not finished, at each step

        def devset() -> Iterator[dict[str, str]]:
            nonlocal pulled
            for row in labelled(30):
                pulled += 1
                yield row

        def progress(update: EvaluationProgress) -> None:
            ahead.append(pulled - update.done)

        report = await qa.evaluate(devset(), "exact_match", progress=progress)

        assert (report.score, report.count, report.failed) == (0.5, 30, 0), [
            r.error for r in report.results if r.error
        ]
        assert [r.index for r in report.results] == list(range(30))
        assert [r.score for r in report.results] == [1.0, 0.0] * 15
        assert report.results[3].prediction == {"answer": "answer: q3"}
        assert report.results[3].example == {"question": "q3", "answer": "something else"}
        # Default concurrency: 2 workers x 3; both workers ran examples, never more at once.
        assert 3 < server.most_in_flight <= 6
        # Connections are reused, though each call has its own time left (call_timeout):
        # DSPy keeps a connection pool per LM timeout, and the adapter's are on a ladder.
        assert server.connections <= 2 * 6
        assert len(ahead) == 30 and max(ahead) <= 6 + 1
        assert report.elapsed >= 30 * 0.05 / 6  # (the total is unknown for a generator)
        progress_events = [e for e in events if e.name == "dspy.evaluate.progress"]
        assert [e.data["done"] for e in progress_events] == list(range(1, 31))
        assert {e.data["total"] for e in progress_events} == {None}
        assert progress_events[-1].data["program_id"] == qa.id


async def test_metrics_f1_host_tools_and_host_functions(
    server: LMServer, capfd: pytest.CaptureFixture[str]
) -> None:
    def answer(request: LMRequest) -> dict[str, str]:
        return {"answer": "the quick brown fox"}

    server.answer = answer
    devset = [
        {"question": "a", "answer": "the quick brown fox"},  # f1 1.0
        {"question": "b", "answer": "quick brown"},  # f1 2/3 (precision 1/2, recall 1)
        {"question": "c", "answer": "nothing alike"},  # f1 0.0
    ]
    judged: list[dict[str, Any]] = []

    async def judge(example: dict[str, Any], prediction: dict[str, Any]) -> float:
        judged.append(example)
        return 0.25 if example["question"] == "b" else 1.0

    async def on_host(example: Mapping[str, Any], prediction: Mapping[str, Any]) -> bool:
        await anyio.lowlevel.checkpoint()
        return example["question"] != "c"

    async with snakepool.Pool(
        "dspy",
        size=1,
        worker_concurrency=4,
        call_timeout=20.0,
        adapter_config={"lm": server.lm_args(**FAST)},
    ) as pool:
        pool.register_tool("judge", judge)
        async with pool.session() as session:
            qa = await Program.create(session, "question -> answer")
            updates: list[EvaluationProgress] = []
            f1 = await qa.evaluate(devset, "f1", progress=updates.append)
            assert [(u.done, u.total) for u in updates] == [(1, 3), (2, 3), (3, 3)]
            assert [round(r.score, 3) for r in f1.results] == [1.0, 0.667, 0.0]
            assert f1.score == pytest.approx((1 + 2 / 3) / 3)
            bar = await qa.evaluate(devset, "f1", progress=True)  # a bar on the terminal
            assert bar.score == f1.score
            printed = capfd.readouterr().err
            assert "evaluate" in printed and "3/3" in printed, printed
            tool = await qa.evaluate(devset, "judge", concurrency=2)
            assert tool.score == pytest.approx(2.25 / 3)
            assert sorted(e["question"] for e in judged) == ["a", "b", "c"]
            host = await qa.evaluate(devset, on_host)
            assert [r.score for r in host.results] == [1.0, 1.0, 0.0]
            with pytest.raises(RemoteError, match="unknown metric 'nobody'"):
                await qa.evaluate(devset, "nobody", max_errors=0)
        # A program made without a session is evaluated in a session of its own.
        loose = await Program.create(pool, "question -> answer")
        assert (await loose.evaluate(devset[:1], "exact_match")).score == 1.0
        with pytest.raises(ValueError, match="concurrency must be an int >= 1"):
            await loose.evaluate(devset, concurrency=0)
        with pytest.raises(TypeError, match="devset must be an iterable"):
            await qa.evaluate(42)  # type: ignore[arg-type]


async def test_failed_examples_score_zero_until_max_errors(server: LMServer) -> None:
    async with snakepool.Pool("dspy", size=1, call_timeout=20.0) as pool, pool.session() as session:
        await configure_lm(session, **server.lm_args(**FAST))
        qa = await Program.create(session, "question -> answer")
        server.fail_status, server.fail_count = 500, 2
        report = await qa.evaluate(labelled(6), concurrency=1)
        assert (report.count, report.failed) == (6, 2)
        failed = [r for r in report.results if r.error is not None]
        assert [r.index for r in failed] == [0, 1]
        assert {r.error_kind for r in failed} == {"dspy_lm_call_failed"}
        assert report.score == pytest.approx(2 / 6)  # q2 and q4 match; the failures count 0

        server.fail_status = 500
        with pytest.raises(RemoteError) as info:
            await qa.evaluate(labelled(50), concurrency=2, max_errors=3)
        assert info.value.remote_kind == "dspy_lm_call_failed"
        assert len(server.completions()) < 6 + 50  # it stopped early


class _InstantSession:
    """A session whose calls answer at once: the host side of evaluate, alone."""

    async def call(self, command: str, args: Mapping[str, Any] | None = None, **_: Any) -> Any:
        await anyio.lowlevel.checkpoint()
        return {"prediction": {"answer": "x"}, "score": 1.0}

    def stream(self, command: str, args: Mapping[str, Any] | None = None, **_: Any) -> Any:
        raise NotImplementedError


async def test_a_long_lazy_devset_keeps_host_memory_flat() -> None:
    """Back-pressure, not a list of futures: the devset is read as examples finish."""

    def devset(n: int) -> Iterator[dict[str, str]]:
        for i in range(n):
            yield {"question": f"{i:08d}" * 128, "answer": "x"}  # ~1 KiB each

    qa = Program(_InstantSession(), "qa")
    await qa.evaluate(devset(100), concurrency=16, keep_results=False)  # (warm)
    tracemalloc.start()
    try:
        report = await qa.evaluate(devset(5_000), concurrency=16, keep_results=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (report.count, report.score, report.results) == (5_000, 1.0, ())
    assert peak < 1 * 2**20  # holding the examples would take over 5 MiB
