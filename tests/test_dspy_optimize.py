"""COPRO in the ``optimizer`` pool, candidates reported as scored; DSPy steps in a pipeline."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

pytest.importorskip("dspy")

import snakepool
from lm_server import LMRequest, LMServer, default_answer
from snakepool import RemoteError
from snakepool.dspy import OptimizationProgress, Program, configure_lm, monitor
from snakepool.pipeline import Pipeline, program, task

pytestmark = pytest.mark.anyio

FAST = {"num_retries": 0}
BETTER = "Answer in capital letters."
#: Labels the server gets right only under the instruction COPRO proposes.
TRAINSET = [{"question": f"q{i}", "answer": f"Q{i}"} for i in range(3)]


def answer(request: LMRequest) -> dict[str, Any]:
    if "proposed_instruction" in request.outputs:  # COPRO asking for a candidate
        return {"proposed_instruction": BETTER, "proposed_prefix_for_output_field": "Answer:"}
    if BETTER in request.system:
        return {name: request.first_input.upper() for name in request.outputs}
    return default_answer(request)


@pytest.fixture
def server() -> Iterator[LMServer]:
    with LMServer(answer=answer) as lm_server:
        yield lm_server


@pytest.fixture
async def pools(server: LMServer) -> AsyncIterator[snakepool.Supervisor]:
    dspy_pool = {"adapter": "dspy", "size": 1, "call_timeout": 30.0, "health_interval": 60.0}
    async with snakepool.Supervisor({"general": dspy_pool, "optimizer": dspy_pool}) as supervisor:
        yield supervisor


async def test_copro_in_the_optimizer_pool_reports_each_candidate(
    server: LMServer, pools: snakepool.Supervisor, capfd: pytest.CaptureFixture[str]
) -> None:
    async with pools["general"].session() as session, pools["optimizer"].session() as tuning:
        await configure_lm(session, **server.lm_args(**FAST))
        await configure_lm(tuning, **server.lm_args(**FAST))
        qa = await Program.create(session, "question -> answer")
        assert (await qa.evaluate(TRAINSET)).score == 0.0
        events: list[snakepool.Event] = []
        monitor(pools["optimizer"]).add_listener(events.append)
        seen: list[OptimizationProgress] = []

        tuned = await qa.optimize(TRAINSET, "COPRO", progress=seen.append, session=tuning)

        # Two candidates (COPRO's breadth 2: the proposal and the original), each scored.
        assert sorted((c.score, c.instructions) for c in seen) == [
            (0.0, ("Given the fields `question`, produce the fields `answer`.",)),
            (1.0, (BETTER,)),
        ]
        assert [c.candidate for c in seen] == [1, 2] and seen[-1].best_score == 1.0
        candidates = [e for e in events if e.name == "dspy.optimize.candidate"]
        assert [e.data["score"] for e in candidates] == [c.score for c in seen]
        # A new program in the original session; the original is unchanged; nothing is left
        # behind in the optimizer's session.
        assert tuned.session is session and tuned.id != qa.id
        assert (await tuned.dump())["state"]["signature"]["instructions"] == BETTER
        assert await tuned(question="abc") == {"answer": "ABC"}
        assert (await tuned.evaluate(TRAINSET)).score == 1.0
        assert await qa(question="abc") == {"answer": "answer: abc"}
        assert await tuning.call("list_programs") == []

        # progress=True: a bar on the terminal, a tick per candidate.
        await qa.optimize(TRAINSET, "COPRO", progress=True)
        printed = capfd.readouterr().err
        assert "optimize" in printed and "2candidate" in printed.replace(" ", ""), printed

        # The plain command does the same, answering the new id only.
        new_id = await session.call(
            "optimize",
            {"program_id": qa.id, "trainset": TRAINSET, "optimizer": "COPRO", "metric": "f1"},
        )
        assert await Program(session, new_id)(question="x") == {"answer": "X"}
        with pytest.raises(RemoteError, match=r"unknown optimizer 'MIPRO'.*COPRO"):
            await qa.optimize(TRAINSET, "MIPRO")
        with pytest.raises(RemoteError, match="optimizer 'COPRO' rejects options"):
            await qa.optimize(TRAINSET, "COPRO", options={"breadth": 1})


async def test_a_pipeline_of_dspy_steps_across_two_pools(
    server: LMServer, pools: snakepool.Supervisor
) -> None:
    async with pools["general"].session() as session, pools["optimizer"].session() as tuning:
        await configure_lm(session, **server.lm_args(**FAST))
        await configure_lm(tuning, **server.lm_args(**FAST))
        qa = await Program.create(session, "question -> answer")

        async def tune(out: Any) -> Program:
            return await qa.optimize(TRAINSET, "COPRO", session=tuning)

        async def ask_tuned(out: Any) -> dict[str, Any]:
            result: dict[str, Any] = await out["tuned"](question=out["question"])
            return result

        pipe = Pipeline(
            program("before", qa, lambda out: {"question": out["question"]}),
            task("tuned", tune, timeout=30),
            task("after", ask_tuned),
        )
        result = await pipe.run({"question": "why"})
        assert result.outputs["before"] == {"answer": "answer: why"}
        assert result.outputs["after"] == {"answer": "WHY"}
        assert [s.status for s in result.steps.values()] == ["ok", "ok", "ok"]
        assert result.steps["tuned"].duration > 0
