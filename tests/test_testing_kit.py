"""``snakepool.testing``: the conformance suite passes good adapters and fails broken ones."""

from __future__ import annotations

import pytest

from conftest import TESTS_DIR
from snakepool.testing import SessionExample, assert_conforms, check_adapter

pytestmark = pytest.mark.anyio

PYTHONPATH = [str(TESTS_DIR)]


async def test_generic_conforms() -> None:
    report = await check_adapter(
        "generic",
        adapter_config={"allow": ["math"]},
        examples={
            "echo": {"value": {"a": [1, 2]}},
            "count": {"n": 3},
            "sleep": {"seconds": 0},
            "call": {"target": "math:sqrt", "args": [16]},
        },
        strict_docs=True,
    )
    report.raise_for_failures()
    names = report.names()
    for expected in (
        "start",
        "ping",
        "describe",
        "info",
        "unknown-command",
        "unknown-argument:echo",
        "missing-argument:count",
        "call-mode:count",  # a stream through call()
        "call-mode:echo",  # a plain command through stream()
        "no-restart",
        "example:count",
        "shutdown",
    ):
        assert report[expected].status == "pass", report[expected]
    assert "parameters:call" in names
    assert report["missing-argument:echo"].status == "skip"  # nothing is required
    assert report["example:count"].detail == "streamed [0, 1, 2]"


async def test_stateful_conforms_and_its_session_survives_a_killed_worker() -> None:
    report = await check_adapter(
        "sp_adapters:Stateful",
        pythonpath=PYTHONPATH,
        examples={"echo": {"value": 1}, "count_to": {"n": 2}},
        session_example=SessionExample(
            "remember",
            {"key": "k", "value": {"nested": [1, 2]}},
            "recall",
            {"key": "k"},
            project=lambda answer: answer["value"],  # pid and restored_on change on purpose
        ),
    )
    report.raise_for_failures()
    assert report["session-restore"].status == "pass"
    assert "killed" in report["session-restore"].detail
    # Stateful has no docstrings: reported, failing only with strict_docs.
    assert "no docstring" in report["parameters:remember"].detail


async def test_a_broken_adapter_fails_with_every_problem_listed() -> None:
    report = await check_adapter(
        "sp_broken_adapters:Forgetful",
        pythonpath=PYTHONPATH,
        examples={"remember": {"key": "a", "value": 1}, "explode": {}},
        session_example=("remember", {"key": "k", "value": 42}, "recall", {"key": "k"}),
    )
    assert not report.passed
    failed = {check.name for check in report.failures}
    assert {"session-restore", "example:explode", "parameters:positional"} <= failed
    assert "kaboom" in report["example:explode"].detail
    assert "42" in report["session-restore"].detail and "None" in report["session-restore"].detail
    assert "positional_only" in report["parameters:positional"].detail
    assert report["example:remember"].status == "pass"
    assert report["unknown-argument:lenient"].status == "skip"
    assert report["shutdown"].status == "pass"
    with pytest.raises(AssertionError, match="Forgetful") as raised:
        report.raise_for_failures()
    message = str(raised.value)
    for name in ("session-restore", "example:explode", "parameters:positional"):
        assert name in message
    assert "[PASS]" not in message  # only the failures are listed


async def test_strict_docs_fails_commands_without_a_docstring() -> None:
    report = await check_adapter("sp_adapters:Stateful", pythonpath=PYTHONPATH, strict_docs=True)
    assert report["parameters:remember"].status == "fail"
    assert report["parameters:ping"].status == "pass"


async def test_an_adapter_that_cannot_start_is_reported_not_raised() -> None:
    report = await check_adapter(
        "sp_broken_adapters:BrokenSetup", pythonpath=PYTHONPATH, startup_timeout=10
    )
    assert report.names() == ["start"]
    assert report["start"].status == "fail"
    assert "setup failed on purpose" in report["start"].detail
    with pytest.raises(AssertionError, match="start"):
        report.raise_for_failures()


def test_assert_conforms_from_sync_code() -> None:
    report = assert_conforms("generic", examples={"echo": {"value": "hi"}})
    assert report.passed
    with pytest.raises(AssertionError, match="parameters:positional"):
        assert_conforms("sp_broken_adapters:Forgetful", pythonpath=PYTHONPATH)
