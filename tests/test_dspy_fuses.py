"""LM fuses: a failing endpoint fails fast, without requests, until a probe gets through."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

pytest.importorskip("dspy")

import snakepool
from lm_server import LMServer
from snakepool import RemoteError
from snakepool.dspy import LMFuseOpen, Program, configure_lm, monitor
from snakepool.dspy._lms import fuse_options
from waiting import wait_until

pytestmark = pytest.mark.anyio

FAST = {"num_retries": 0}


@pytest.fixture
def servers() -> Iterator[tuple[LMServer, LMServer]]:
    with LMServer() as failing, LMServer() as healthy:
        yield failing, healthy


async def test_a_fuse_opens_fails_fast_and_closes_after_a_good_probe(
    servers: tuple[LMServer, LMServer],
) -> None:
    failing, healthy = servers
    fuse = {"threshold": 2, "reset_timeout": 0.3}
    async with (
        snakepool.Pool("dspy", size=1, call_timeout=20.0, adapter_config={"fuse": fuse}) as pool,
        pool.session() as bad,
        pool.session() as good,
    ):
        events: list[snakepool.Event] = []
        monitor(pool).add_listener(events.append)
        await configure_lm(bad, **failing.lm_args(**FAST))
        await configure_lm(good, **healthy.lm_args(**FAST))
        qa = await Program.create(bad, "question -> answer")
        other = await Program.create(good, "question -> answer")
        # Three scripted failures: two open the fuse, the third fails its first probe.
        failing.fail_status, failing.fail_count = 503, 3

        for _ in range(2):
            with pytest.raises(RemoteError) as info:
                await qa(question="q")
            assert info.value.remote_kind == "dspy_lm_call_failed"
        assert [e.name for e in events] == ["dspy.fuse.opened"]
        assert events[0].data["model"] == "openai/test-model"
        assert events[0].data["api_base"] == failing.api_base

        # Open: at once, with its own kind, and no request reaches the endpoint.
        sent = len(failing.completions())
        with pytest.raises(RemoteError, match="fuse of LM endpoint openai/test-model at") as info:
            await qa(question="q")
        assert info.value.remote_kind == LMFuseOpen.kind == "dspy_lm_fuse_open"
        assert issubclass(LMFuseOpen, snakepool.dspy.LMCallError)
        assert len(failing.completions()) == sent
        # Another endpoint is not affected.
        assert await other(question="fine") == {"answer": "answer: fine"}
        states = {f["api_base"]: f for f in await good.call("fuses")}
        assert states[failing.api_base]["state"] == "open"
        assert states[failing.api_base]["consecutive_failures"] == 2
        assert states[healthy.api_base]["state"] == "closed"

        # After reset_timeout one probe goes: it fails (the third scripted failure), the
        # fuse opens again; the next probe succeeds and closes it.
        refusals: set[str | None] = set()

        async def answered() -> bool:
            try:
                return bool(await qa(question="back?"))
            except RemoteError as exc:
                refusals.add(exc.remote_kind)
                return False

        await wait_until(answered)
        assert refusals == {"dspy_lm_fuse_open", "dspy_lm_call_failed"}
        assert [e.name for e in events] == [
            "dspy.fuse.opened",
            "dspy.fuse.half_open",
            "dspy.fuse.opened",
            "dspy.fuse.half_open",
            "dspy.fuse.closed",
        ]
        assert len(failing.completions()) == sent + 2  # two probes, nothing else
        board = {f["api_base"]: f for f in monitor(pool).fuses()}
        assert board[failing.api_base]["state"] == "closed"
        assert board[failing.api_base]["worker"] == 0


async def test_fuses_can_be_turned_off_and_bad_settings_are_refused(
    servers: tuple[LMServer, LMServer],
) -> None:
    failing, _ = servers
    failing.fail_status = 500
    async with (
        snakepool.Pool("dspy", size=1, call_timeout=20.0, adapter_config={"fuse": False}) as pool,
        pool.session() as session,
    ):
        await configure_lm(session, **failing.lm_args(**FAST))
        qa = await Program.create(session, "question -> answer")
        for _ in range(7):  # past the default threshold (5): every call still tries
            with pytest.raises(RemoteError) as info:
                await qa(question="q")
            assert info.value.remote_kind == "dspy_lm_call_failed"
        assert len(failing.completions()) == 7
        assert await session.call("fuses") == []
    for bad, match in (
        ({"threshold": 0}, "threshold'\\] must be an int >= 1, got 0"),
        ({"reset_timeout": -1}, "reset_timeout'\\] must be a number > 0, got -1"),
        ({"treshold": 3}, "unknown keys \\['treshold'\\]"),
        ("on", "must be a dict"),
    ):
        with pytest.raises((TypeError, ValueError), match=match):
            fuse_options(bad)
    assert fuse_options(None) == {"threshold": 5, "reset_timeout": 30.0}
