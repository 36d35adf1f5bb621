"""Pipelines across the pools of a Supervisor: sequence, parallel, conditions, failures."""

from __future__ import annotations

import pickle
from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import snakepool
from snakepool import RemoteError
from snakepool.errors import KINDS, PipelineStepFailed
from snakepool.pipeline import Pipeline, call, parallel, task, when

pytestmark = pytest.mark.anyio


@pytest.fixture
async def pools() -> AsyncIterator[snakepool.Supervisor]:
    config = {
        "adapter": "generic",
        "size": 1,
        "worker_concurrency": 4,
        "adapter_config": {"allow": ["math"]},
    }
    async with snakepool.Supervisor({"general": config, "optimizer": config}) as supervisor:
        yield supervisor


async def test_steps_in_sequence_parallel_and_on_conditions_pass_outputs_on(
    pools: snakepool.Supervisor,
) -> None:
    async with pools["optimizer"].session() as session:
        pipe = Pipeline(
            call("clean", "general", "echo", lambda out: {"value": out["question"].strip()}),
            parallel(
                call("root", "general", "call", {"target": "math:sqrt", "args": [16]}),
                call("slow", "optimizer", "sleep", {"seconds": 0.2}),
                call("shout", session, "echo", lambda out: {"value": out["clean"].upper()}),
            ),
            when(
                lambda out: out["root"] > 3,
                call("big", "general", "echo", lambda out: {"value": f"{out['shout']}!"}),
                otherwise=call("small", "general", "echo", {"value": "small"}),
            ),
            task("total", lambda out: out["root"] + out["slow"]),
        )
        result = await pipe.run({"question": "  why?  "}, pools=pools)

    assert result.ok
    assert dict(result.outputs) == {
        "question": "  why?  ",
        "clean": "why?",
        "root": 4.0,
        "slow": 0.2,
        "shout": "WHY?",
        "big": "WHY?!",
        "total": 4.2,
    }
    steps = result.steps
    assert list(steps) == ["clean", "root", "slow", "shout", "big", "small", "total"]
    assert [s.status for s in steps.values()] == ["ok"] * 5 + ["skipped", "ok"]
    # Timings: the parallel steps started together, after "clean"; "slow" took its 0.2 s.
    assert steps["slow"].duration >= 0.2
    assert steps["root"].started >= steps["clean"].started + steps["clean"].duration
    assert abs(steps["slow"].started - steps["root"].started) < 0.1
    assert steps["total"].started >= steps["slow"].started + steps["slow"].duration
    assert result.duration >= steps["slow"].duration


async def test_failures_name_the_step_timeouts_and_continue_on_error(
    pools: snakepool.Supervisor,
) -> None:
    refused = call("refused", "general", "call", {"target": "os:getcwd"})
    pipe = Pipeline(
        call("first", "general", "echo", {"value": 1}),
        parallel(
            call("tolerated", "general", "call", {"target": "os:getcwd"}, continue_on_error=True),
            call("late", "optimizer", "sleep", {"seconds": 5}, timeout=0.2, continue_on_error=True),
        ),
        task("after", lambda out: [out["tolerated"], out["late"]]),
        parallel(refused, call("sibling", "optimizer", "sleep", {"seconds": 5})),
        call("never", "general", "echo", {"value": "never"}),
    )
    with pytest.raises(PipelineStepFailed) as info:
        await pipe.run(pools=pools)
    failure = info.value
    assert (
        failure.kind == "pipeline_step_failed"
        and KINDS["pipeline_step_failed"] is PipelineStepFailed
    )
    assert failure.step == "refused" and "pipeline step 'refused' failed" in str(failure)
    assert isinstance(failure.error, RemoteError) and failure.__cause__ is failure.error
    assert failure.error_kind == "remote_error"
    steps = failure.result.steps
    assert {name: s.status for name, s in steps.items()} == {
        "first": "ok",
        "tolerated": "failed",
        "late": "failed",
        "after": "ok",
        "refused": "failed",
        "sibling": "cancelled",
    }
    assert steps["late"].error_kind == "call_timeout"
    assert "longer than its timeout (0.2s)" in str(steps["late"].error)
    assert steps["late"].duration < 2
    assert failure.result.outputs["after"] == [None, None]
    assert not failure.result.ok
    # The pools are fine after it: the cancelled sleep and the timed-out one ended in the worker.
    assert await pools["optimizer"].call("echo", {"value": "ok"}) == "ok"
    copy = pickle.loads(pickle.dumps(failure))
    assert (copy.step, copy.kind) == ("refused", "pipeline_step_failed")


async def test_bad_pipelines_are_refused_before_anything_runs(
    pools: snakepool.Supervisor,
) -> None:
    ran: list[str] = []
    with pytest.raises(ValueError, match="two pipeline steps are named 'a'"):
        Pipeline(task("a", ran.append), parallel(task("a", ran.append)))
    with pytest.raises(TypeError, match="not a pipeline step: 42"):
        Pipeline(42)
    with pytest.raises(ValueError, match="step 'b': timeout must be a number > 0"):
        Pipeline(task("b", ran.append, timeout=0))
    pipe = Pipeline(task("a", ran.append), call("b", "gpu", "echo"))
    with pytest.raises(
        ValueError, match="step 'b': no pool named 'gpu' \\(pools: general, optimizer\\)"
    ):
        await pipe.run(pools=pools)
    with pytest.raises(ValueError, match="step 'a' has the name of an input"):
        await Pipeline(task("a", ran.append)).run({"a": 1})
    assert ran == []
    # A pipeline is a step of another, and conditions may be async.

    async def yes(out: Any) -> bool:
        await anyio.lowlevel.checkpoint()
        return True

    inner = Pipeline(call("echo", pools["general"], "echo", {"value": 7}))
    outer = Pipeline(when(yes, inner))
    assert (await outer.run()).outputs["echo"] == 7
    # A condition that raises names its when(...).
    broken = Pipeline(
        task("a", lambda out: 1), when(lambda out: out["nope"], task("b", ran.append))
    )
    with pytest.raises(PipelineStepFailed, match="pipeline step 'when:b' failed: KeyError") as info:
        await broken.run()
    assert info.value.step == "when:b" and list(info.value.result.steps) == ["a"]
