"""The ``dspy`` adapter with real workers, against a loopback OpenAI-compatible server."""

from __future__ import annotations

import json
import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

import anyio
import pytest

dspy = pytest.importorskip("dspy")

import snakepool  # noqa: E402
from conftest import free_port  # noqa: E402
from lm_server import LMRequest, LMServer, default_answer  # noqa: E402
from snakepool import RemoteError  # noqa: E402
from snakepool.dspy import Program, configure_lm  # noqa: E402
from waiting import restarts, wait_until  # noqa: E402

pytestmark = pytest.mark.anyio

#: Fail fast: no retries with backoff on a 500 or a refused connection.
FAST = {"num_retries": 0}


@pytest.fixture
def server() -> Iterator[LMServer]:
    with LMServer() as lm_server:
        yield lm_server


def dspy_pool(**kwargs: Any) -> snakepool.Pool:
    kwargs.setdefault("size", 1)
    kwargs.setdefault("call_timeout", 20.0)
    kwargs.setdefault("health_interval", 60.0)
    return snakepool.Pool("dspy", **kwargs)


async def test_round_trip_with_string_and_dict_signatures(server: LMServer) -> None:
    async with dspy_pool() as pool, pool.session() as session:
        settings = await session.call("configure_lm", server.lm_args(**FAST))
        assert settings["scope"] == "session" and "api_key" not in settings

        qa = await session.call("create_program", {"signature": "question -> answer"})
        result = await session.call(
            "execute_program", {"program_id": qa, "inputs": {"question": "What is DSPy?"}}
        )
        assert result == {"answer": "answer: What is DSPy?"}

        typed = await session.call(
            "create_program",
            {
                "signature": {
                    "inputs": {"text": {"desc": "the text to measure"}},
                    "outputs": {
                        "length": {"desc": "how long it is", "type": "int"},
                        "words": {"type": "list[str]"},
                        "ok": {"type": "bool"},
                    },
                },
                "program_id": "measure",
                "instructions": "Measure the text carefully.",
            },
        )
        assert typed == "measure"
        result = await session.call(
            "execute_program", {"program_id": "measure", "inputs": {"text": "hello"}}
        )
        assert result == {"length": 42, "words": ["a", "b"], "ok": True}
        system = server.completions()[-1]["messages"][0]["content"]
        assert "the text to measure" in system and "how long it is" in system
        assert "Measure the text carefully." in system


async def test_chain_of_thought_returns_its_reasoning(server: LMServer) -> None:
    async with dspy_pool() as pool, pool.session() as session:
        await configure_lm(session, **server.lm_args(**FAST))
        cot = await Program.create(session, "question -> answer", module="ChainOfThought")
        assert await cot(question="why?") == {
            "reasoning": "reasoning: why?",
            "answer": "answer: why?",
        }


async def test_react_calls_a_host_tool(server: LMServer) -> None:
    def answer(request: LMRequest) -> dict[str, str]:
        if "next_tool_name" in request.outputs:
            if "observation_0" not in request.user:
                return {
                    "next_thought": "look it up",
                    "next_tool_name": "lookup",
                    "next_tool_args": json.dumps({"key": request.inputs["question"]}),
                }
            return {"next_thought": "done", "next_tool_name": "finish", "next_tool_args": "{}"}
        observation = request.user.split("[[ ## observation_0 ## ]]\n")[1].split("\n")[0]
        return {"reasoning": "found it", "answer": observation}

    server.answer = answer
    calls: list[dict[str, Any]] = []

    async def lookup(key: str) -> str:
        calls.append({"key": key})
        return f"value of {key}"

    async with dspy_pool(worker_concurrency=2) as pool, pool.session() as session:
        pool.register_tool("lookup", lookup)
        await configure_lm(session, **server.lm_args(**FAST))
        agent = await Program.create(
            session,
            "question -> answer",
            module="ReAct",
            tools=[
                {
                    "name": "lookup",
                    "desc": "Look a key up.",
                    "args": {"key": {"type": "string"}},
                }
            ],
            max_iters=3,
        )
        result = await agent(question="color")
        assert result["answer"] == "value of color"
        assert result["trajectory"]["observation_0"] == "value of color"
        assert calls == [{"key": "color"}]
        # The tool list reached the LM's prompt.
        assert "lookup" in server.completions()[0]["messages"][0]["content"]


async def test_session_variables_reach_the_lm_request(server: LMServer) -> None:
    async with dspy_pool() as pool, pool.session() as session:
        await configure_lm(session, **server.lm_args(temperature=0.1, **FAST))
        qa = await Program.create(session, "question -> answer")
        await qa(question="a")
        assert server.completions()[-1]["temperature"] == 0.1

        await session.variables.define("temperature", "float", 0.3, {"min": 0.0, "max": 2.0})
        await session.variables.define("max_tokens", "int", 77)
        await qa(question="b")
        assert server.completions()[-1]["temperature"] == 0.3
        request = server.completions()[-1]
        assert request.get("max_tokens", request.get("max_completion_tokens")) == 77
        await session.variables.set("temperature", 0.9)
        await qa(question="c")
        assert server.completions()[-1]["temperature"] == 0.9


async def test_sessions_in_one_worker_keep_their_own_lm(server: LMServer) -> None:
    server.answer = lambda request: {name: request.body["model"] for name in request.outputs}
    async with dspy_pool(worker_concurrency=8) as pool:
        sessions = [pool.session() for _ in range(4)]
        programs = []
        for i, session in enumerate(sessions):
            await configure_lm(
                session, f"openai/model-{i}", api_base=server.api_base, api_key="x", **FAST
            )
            programs.append(await Program.create(session, "question -> answer"))
        results: dict[int, set[str]] = {i: set() for i in range(4)}

        async def run(i: int) -> None:
            for _ in range(5):
                results[i].add((await programs[i](question="q"))["answer"])

        async with anyio.create_task_group() as tg:
            for i in range(4):
                tg.start_soon(run, i)
        assert results == {i: {f"model-{i}"} for i in range(4)}
        assert len({w.pid for w in pool.statistics().workers}) == 1
        for session in sessions:
            await session.close()


async def test_streaming_yields_field_chunks_then_the_prediction(server: LMServer) -> None:
    server.answer = lambda request: {
        "reasoning": "thinking it over",
        "answer": "a fairly long answer in pieces",
    }
    async with dspy_pool() as pool, pool.session() as session:
        await configure_lm(session, **server.lm_args(**FAST))
        cot = await Program.create(session, "question -> answer", module="ChainOfThought")
        items = [item async for item in cot.stream(question="q")]
        chunks = [item for item in items if "chunk" in item]
        assert len(chunks) > 3
        assert {item["field"] for item in chunks} == {"answer"}
        assert "".join(item["chunk"] for item in chunks) == "a fairly long answer in pieces"
        assert items[-1] == {
            "prediction": {
                "reasoning": "thinking it over",
                "answer": "a fairly long answer in pieces",
            }
        }
        assert server.completions()[-1]["stream"] is True

        # Leaving early is fine, and the session goes on.
        async for _item in cot.stream(question="again"):
            break
        assert (await cot(question="after"))["answer"] == "a fairly long answer in pieces"


async def test_dump_load_list_and_delete(server: LMServer) -> None:
    async with dspy_pool() as pool, pool.session() as session:
        await configure_lm(session, **server.lm_args(**FAST))
        qa = await Program.create(session, "question -> answer", instructions="Be brief.")
        trained = await qa.optimize(
            [{"question": "q1", "answer": "a1"}, {"question": "q2", "answer": "a2"}],
            optimizer="LabeledFewShot",
        )
        data = await trained.dump()
        json.dumps(data)  # JSON-safe, no pickle
        assert data["definition"]["module"] == "Predict"
        assert data["definition"]["instructions"] == "Be brief."
        assert len(data["state"]["demos"]) == 2

        copy = await Program.load(session, data, program_id="copy")
        assert copy.id == "copy"
        listed = {p["program_id"]: p for p in await session.call("list_programs")}
        assert set(listed) == {qa.id, trained.id, "copy"}
        assert listed["copy"]["demos"] == 2 and listed[qa.id]["demos"] == 0
        assert (await copy(question="x"))["answer"] == "answer: x"
        assert "q1" in json.dumps(server.completions()[-1]["messages"])  # demos in the prompt

        # Load into another session too: dumps travel.
        async with pool.session() as other:
            await configure_lm(other, **server.lm_args(**FAST))
            moved = await Program.load(other, data)
            assert (await moved(question="y"))["answer"] == "answer: y"

        await copy.delete()
        await qa.delete()
        assert [p["program_id"] for p in await session.call("list_programs")] == [trained.id]
        with pytest.raises(RemoteError, match="unknown program id 'copy'") as info:
            await copy(question="x")
        assert info.value.remote_type == "snakepool.dspy.UnknownProgram"
        assert info.value.remote_kind == "dspy_unknown_program"


async def test_optimizers_make_new_programs_that_run(server: LMServer) -> None:
    # The server answers "answer: <question>"; these labels match for q1 and q3 only.
    trainset = [
        {"question": "q1", "answer": "Answer:  q1"},
        {"question": "q2", "answer": "something else"},
        {"question": "q3", "answer": "answer: q3"},
    ]
    judged: list[dict[str, Any]] = []

    def judge(example: dict[str, Any], prediction: dict[str, Any]) -> bool:
        judged.append(example)
        return example["question"] == "q2"

    async with dspy_pool() as pool, pool.session() as session:
        pool.register_tool("judge", judge)
        await configure_lm(session, **server.lm_args(**FAST))
        qa = await Program.create(session, "question -> answer")

        labeled = await qa.optimize(trainset, optimizer="LabeledFewShot", options={"k": 2})
        boot = await qa.optimize(trainset, options={"max_bootstrapped_demos": 3})
        f1 = await qa.optimize(trainset, metric="f1", options={"threshold": 0.9})
        tool = await qa.optimize(trainset, metric="judge", options={"max_labeled_demos": 0})
        assert len({qa.id, labeled.id, boot.id, f1.id, tool.id}) == 5

        demos = {p["program_id"]: p["demos"] for p in await session.call("list_programs")}
        assert demos[qa.id] == 0  # the original is unchanged
        assert demos[labeled.id] == 2
        state = (await boot.dump())["state"]["demos"]
        bootstrapped = [d for d in state if d.get("augmented")]
        assert {d["question"] for d in bootstrapped} == {"q1", "q3"}  # exact_match passed
        f1_state = (await f1.dump())["state"]["demos"]
        assert {d["question"] for d in f1_state if d.get("augmented")} == {"q1", "q3"}
        assert [d["question"] for d in (await tool.dump())["state"]["demos"]] == ["q2"]
        assert len(judged) == 3
        for program in (labeled, boot, f1, tool):
            assert (await program(question="new"))["answer"] == "answer: new"


async def test_programs_and_lm_survive_the_workers_death(server: LMServer) -> None:
    async with dspy_pool(size=2) as pool, pool.session() as session:
        await configure_lm(session, **server.lm_args(temperature=0.4, **FAST))
        qa = await Program.create(session, "question -> answer", program_id="qa")
        trained = await qa.optimize(
            [{"question": "q1", "answer": "a1"}], optimizer="LabeledFewShot"
        )
        gone = await Program.create(session, "question -> answer")
        await gone.delete()
        before = await session.call("info")
        os.kill(before["pid"], signal.SIGKILL)
        await wait_until(
            lambda: (
                before["pid"] not in {w.pid for w in pool.statistics().workers}
                and all(w.state == "idle" for w in pool.statistics().workers)
            )
        )

        server.reset()
        assert (await trained(question="x"))["answer"] == "answer: x"
        after = await session.call("info")
        assert after["pid"] != before["pid"]
        request = server.completions()[-1]
        assert request["temperature"] == 0.4  # the session's LM was rebuilt
        assert "q1" in json.dumps(request["messages"])  # and the learned demos
        listed = {p["program_id"]: p["demos"] for p in await session.call("list_programs")}
        assert listed == {"qa": 0, trained.id: 1}


async def test_bad_inputs_are_clear_errors_and_the_worker_stays_healthy(
    server: LMServer,
) -> None:
    async with dspy_pool() as pool, pool.session() as session:
        pid = (await session.call("info"))["pid"]

        async def fails(command: str, args: dict[str, Any], match: str) -> RemoteError:
            with pytest.raises(RemoteError, match=match) as info:
                await session.call(command, args)
            return info.value

        await fails(
            "execute_program", {"program_id": "nope", "inputs": {}}, "unknown program id 'nope'"
        )
        qa = await session.call("create_program", {"signature": "question -> answer"})
        no_lm = await fails(
            "execute_program", {"program_id": qa, "inputs": {"question": "q"}}, "no LM configured"
        )
        assert no_lm.remote_type.endswith("NoLMConfigured")
        assert no_lm.remote_kind == "dspy_no_lm"
        await session.call("configure_lm", server.lm_args(**FAST))

        await fails("create_program", {"signature": "question answer"}, "cannot parse signature")
        await fails("create_program", {"signature": "a b -> c"}, "cannot parse signature")
        await fails(
            "create_program",
            {"signature": "question -> answer", "module": "Telepathy"},
            "unknown module 'Telepathy'",
        )
        await fails(
            "create_program",
            {"signature": {"inputs": {"q": {"type": "complex"}}, "outputs": {"a": {}}}},
            "unknown type 'complex'",
        )
        await fails("create_program", {"signature": {"inputs": {"q": {}}}}, "'outputs'")
        await fails(
            "create_program",
            {"signature": "question -> answer", "tools": ["lookup"]},
            "only used by module 'ReAct'",
        )
        await fails(
            "execute_program",
            {"program_id": qa, "inputs": {"query": "q"}},
            r"missing field\(s\) \['question'\]",
        )
        await fails(
            "optimize",
            {"program_id": qa, "trainset": [{"question": "q", "answer": "a"}], "optimizer": "X"},
            "unknown optimizer 'X'",
        )
        unknown_metric = await fails(
            "optimize",
            {"program_id": qa, "trainset": [{"question": "q", "answer": "a"}], "metric": "nah"},
            "unknown metric 'nah'",
        )
        assert unknown_metric.remote_type == "ValueError"
        await fails(
            "optimize",
            {"program_id": qa, "trainset": [{"answer": "a"}]},
            r"trainset\[0\] is missing input field\(s\) \['question'\]",
        )
        await fails("load_program", {"data": {"state": {}}}, "format")
        await fails(
            "optimize",
            {
                "program_id": qa,
                "trainset": [{"question": "q", "answer": "a"}],
                "optimizer": "LabeledFewShot",
                "options": {"bogus": 1},
            },
            r"optimizer 'LabeledFewShot' rejects options \{'bogus': 1\}",
        )

        server.fail_status = 500
        error = await fails(
            "execute_program", {"program_id": qa, "inputs": {"question": "q"}}, "LM call"
        )
        assert error.remote_type.endswith("LMCallError") and "LMServerError" in error.remote_message
        with pytest.raises(RemoteError, match="LM call"):
            async for _ in session.stream(
                "stream_program", {"program_id": qa, "inputs": {"question": "q"}}
            ):
                pass
        server.fail_status = None

        await session.call(
            "configure_lm",
            {
                "model": "openai/test-model",
                "api_base": f"http://127.0.0.1:{free_port()}/v1",  # nothing listens there
                "api_key": "x",
                **FAST,
            },
        )
        refused = await fails(
            "execute_program", {"program_id": qa, "inputs": {"question": "q"}}, "LM call"
        )
        assert "LMTransportError" in refused.remote_message
        assert "refused" in refused.remote_message.lower()

        # Still the same healthy worker, with nothing restarted.
        await session.call("configure_lm", server.lm_args(**FAST))
        result = await session.call(
            "execute_program", {"program_id": qa, "inputs": {"question": "fine"}}
        )
        assert result == {"answer": "answer: fine"}
        assert (await session.call("info"))["pid"] == pid
        assert await pool.call("ping") == "pong"
        assert restarts(pool) == 0


async def test_a_slow_lm_fails_the_call_before_its_deadline(server: LMServer) -> None:
    release = threading.Event()

    def stuck(request: LMRequest) -> str:
        release.wait(10)
        return "too late"

    async with dspy_pool() as pool, pool.session() as session:
        await configure_lm(session, **server.lm_args(**FAST))
        qa = await Program.create(session, "question -> answer")
        # The adapter cuts the LM off 0.5 s before the call's deadline, whatever
        # the timeout; a warm-up request keeps the first request's one-time set-up
        # out of that margin, and 3 s leaves room for a worker that is slow to get
        # to the request (with less than 0.55 s left the margin would shrink).
        assert await qa(question="warm-up") == {"answer": "answer: warm-up"}
        server.answer = stuck
        try:
            with pytest.raises(RemoteError, match="timed out") as info:
                await qa(question="q", timeout=3.0)
        finally:
            release.set()
        assert info.value.remote_type.endswith("LMCallError")
        assert info.value.remote_kind == "dspy_lm_call_failed"
        server.answer = default_answer
        assert await qa(question="q") == {"answer": "answer: q"}
        assert restarts(pool) == 0


async def test_worker_wide_lm_and_programs_without_a_session(server: LMServer) -> None:
    async with dspy_pool(adapter_config={"lm": server.lm_args(**FAST)}) as pool:
        qa = await Program.create(pool, "question -> answer")
        assert await qa(question="q") == {"answer": "answer: q"}
        await configure_lm(pool, **server.lm_args(temperature=0.7, **FAST))
        await qa(question="q2")
        assert server.completions()[-1]["temperature"] == 0.7
        async with pool.session() as session:  # sessions do not see worker-wide programs
            with pytest.raises(RemoteError, match="unknown program id"):
                await Program(session, qa.id)(question="q")
            # but they use the worker's LM until they configure their own
            other = await Program.create(session, "question -> answer")
            assert await other(question="s") == {"answer": "answer: s"}
