"""Session variables steer DSPy programs: the module a program runs as, and the LM's settings."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anyio
import pytest

pytest.importorskip("dspy")

import snakepool
from lm_server import LMServer, parse_fields
from snakepool import RemoteError
from snakepool.dspy import Program, configure_lm
from waiting import wait_until

pytestmark = pytest.mark.anyio

FAST = {"num_retries": 0}


@pytest.fixture
def server() -> Iterator[LMServer]:
    with LMServer() as lm_server:
        yield lm_server


def asked_for(request: dict[str, Any]) -> list[str]:
    """The output fields an LM request asks for."""
    return parse_fields(request).outputs


async def test_the_research_agent_switches_module_by_one_set(server: LMServer) -> None:
    async with snakepool.Pool("dspy", size=1, call_timeout=20.0) as pool, pool.session() as session:
        await configure_lm(session, **server.lm_args(**FAST))
        variables = session.variables
        await variables.define("temperature", "float", 0.7, {"min": 0.0, "max": 1.5})
        await variables.define(
            "reasoning_strategy",
            "module",
            "ChainOfThought",
            {"choices": ["Predict", "ChainOfThought"]},
        )
        agent = await Program.create(
            session, "question -> answer", bind={"module": "reasoning_strategy"}
        )
        assert await agent(question="What is Elixir?") == {
            "reasoning": "reasoning: What is Elixir?",
            "answer": "answer: What is Elixir?",
        }
        first = server.completions()[-1]
        assert asked_for(first) == ["reasoning", "answer"] and first["temperature"] == 0.7

        await variables.set("reasoning_strategy", "Predict")
        assert await agent(question="What is OTP?") == {"answer": "answer: What is OTP?"}
        assert asked_for(server.completions()[-1]) == ["answer"]

        # LM settings from variables: the model too, and under another name when bound.
        await variables.define("model", "str", "openai/another-model")
        await variables.define("agent_tokens", "int", 123)
        tuned = await Program.create(
            session, "question -> answer", bind={"max_tokens": "agent_tokens"}
        )
        await tuned(question="q")
        request = server.completions()[-1]
        assert request["model"] == "another-model"
        assert request.get("max_tokens", request.get("max_completion_tokens")) == 123
        listed = {p["program_id"]: p["bind"] for p in await session.call("list_programs")}
        assert listed == {
            agent.id: {"module": "reasoning_strategy"},
            tuned.id: {"max_tokens": "agent_tokens"},
        }


async def test_bad_bindings_are_clear_errors(
    server: LMServer,
) -> None:
    async with snakepool.Pool("dspy", size=1, call_timeout=20.0) as pool, pool.session() as session:
        await configure_lm(session, **server.lm_args(**FAST))
        await session.variables.define("style", "str", "ChainOfThought")
        agent = await Program.create(session, "question -> answer", bind={"module": "style"})
        assert "reasoning" in await agent(question="q")

        async def fails(match: str, **kwargs: Any) -> RemoteError:
            with pytest.raises(RemoteError, match=match) as info:
                await (await Program.create(session, "question -> answer", **kwargs))(question="q")
            return info.value

        await session.variables.set("style", "Telepathy")
        error = await fails(
            "session variable 'style' is 'Telepathy', not a module", bind={"module": "style"}
        )
        assert error.remote_type == "ValueError"
        await fails("'nowhere', which is not defined", bind={"module": "nowhere"})
        await fails(
            "temperature is bound to session variable 'heat', which is not defined",
            bind={"temperature": "heat"},
        )
        await session.variables.define("heat", "str", "very")
        await fails("'heat' holds 'very', not a float", bind={"temperature": "heat"})
        with pytest.raises(RemoteError, match="'colour' is not a setting a variable can hold"):
            await Program.create(session, "question -> answer", bind={"colour": "x"})


async def test_one_call_sees_one_snapshot_of_the_variables(server: LMServer) -> None:
    """Variables changed together (set_many) never reach one LM request half old, half new."""
    async with (
        snakepool.Pool("dspy", size=2, worker_concurrency=4, call_timeout=20.0) as pool,
        pool.session() as session,
    ):
        await configure_lm(session, **server.lm_args(**FAST))
        variables = session.variables
        await variables.define("temperature", "float", 0.0)
        await variables.define("max_tokens", "int", 100)
        await variables.define("strategy", "module", "Predict")
        agent = await Program.create(session, "question -> answer", bind={"module": "strategy"})
        done = 0
        setting = True

        async def setter() -> None:
            nonlocal setting
            for i in range(1, 21):
                await variables.set_many(
                    {
                        "temperature": i / 100,
                        "max_tokens": 100 + i,
                        "strategy": "ChainOfThought" if i % 2 else "Predict",
                    }
                )
                calls = done
                await wait_until(
                    lambda calls=calls: done >= calls + 2
                )  # (calls overlap the next set)
            setting = False

        async def caller() -> None:
            nonlocal done
            while setting:
                await agent(question="q")
                done += 1

        async with anyio.create_task_group() as group:
            group.start_soon(setter)
            for _ in range(6):
                group.start_soon(caller)

        requests = server.completions()
        versions = set()
        for request in requests:
            i = request.get("max_tokens", request.get("max_completion_tokens")) - 100
            versions.add(i)
            assert request["temperature"] == i / 100
            assert ("reasoning" in asked_for(request)) == (i % 2 == 1)
        assert len(versions) >= 15, (len(requests), versions)  # calls ran while they changed
