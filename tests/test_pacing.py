"""Send-ahead pacing as a pure state machine (fake clock, no process): how many
calls a busy worker holds adapts to how quickly it answers."""

from __future__ import annotations

import pytest

from conftest import FakeClock
from snakepool.pool._pacing import _FIRST_AHEAD, AHEAD_HORIZON, Pacing

#: The answer gap of a quick worker: 50 answers in the pacing horizon.
QUICK = AHEAD_HORIZON / 50


def answer_at_pace(pacing: Pacing, clock: FakeClock, gap: float, answers: int) -> None:
    """The worker stays saturated (one call more than it runs) and answers one
    call every ``gap`` seconds."""
    for _ in range(answers):
        clock.now += gap
        pacing.answered(1, pacing.concurrency + 1)


def test_before_any_answer_it_holds_a_few(clock: FakeClock) -> None:
    assert Pacing(1, 64, clock).ahead == _FIRST_AHEAD
    assert Pacing(8, 64, clock).ahead == 8  # (never below what it runs)
    assert Pacing(8, 2, clock).ahead == 2  # (never beyond the limit)
    assert Pacing(1, 0, clock).ahead == 0


@pytest.mark.parametrize(
    ("concurrency", "limit", "message"), [(0, 64, "concurrency"), (1, -1, "limit")]
)
def test_refuses_nonsense(concurrency: int, limit: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Pacing(concurrency, limit)


@pytest.mark.parametrize("concurrency", [1, 8])
def test_quick_answers_let_a_worker_hold_up_to_the_limit(
    clock: FakeClock, concurrency: int
) -> None:
    pacing = Pacing(concurrency, 64, clock)
    assert concurrency <= pacing.ahead < 64  # before any answer was timed
    answer_at_pace(pacing, clock, gap=QUICK, answers=200)  # 50 per horizon
    assert pacing.ahead == 50
    assert pacing.answer_gap == pytest.approx(QUICK, rel=1e-3)
    answer_at_pace(pacing, clock, gap=5e-6, answers=200)
    assert pacing.ahead == 64  # (never beyond Pool.send_ahead)


@pytest.mark.parametrize("concurrency", [1, 8])
def test_slow_answers_keep_waiting_calls_in_the_pools_queue(
    clock: FakeClock, concurrency: int
) -> None:
    pacing = Pacing(concurrency, 64, clock)
    answer_at_pace(pacing, clock, gap=QUICK, answers=200)
    answer_at_pace(pacing, clock, gap=0.05, answers=200)
    assert pacing.ahead == concurrency  # (never below what it runs)


def test_answered_returns_the_new_depth(clock: FakeClock) -> None:
    pacing = Pacing(1, 64, clock)
    answer_at_pace(pacing, clock, gap=QUICK, answers=200)
    clock.now += 0.05
    assert pacing.answered(1, 2) == pacing.ahead < 50


def test_gaps_while_a_worker_idles_are_not_timed(clock: FakeClock) -> None:
    pacing = Pacing(1, 64, clock)
    answer_at_pace(pacing, clock, gap=QUICK, answers=200)
    paced = pacing.ahead
    clock.now += QUICK
    pacing.answered(1, 0)  # its last call answered at the same pace: idle now
    for _ in range(10):  # one call at a time, a second apart
        clock.now += 1.0
        pacing.answered(1, 0)
    assert pacing.ahead == paced


def test_answers_read_together_are_paced_by_their_mean_gap(clock: FakeClock) -> None:
    pacing = Pacing(1, 64, clock)
    pending = 2000
    pending -= 1
    pacing.answered(1, pending)  # the first answer: timing starts
    for _ in range(100):  # reads of 10 answers, 10 gaps apart: 50 answers per horizon
        pending -= 10
        clock.now += 10 * QUICK
        pacing.answered(10, pending)
    assert pacing.ahead in (49, 50)  # (float rounding of the horizon / QUICK)


@pytest.mark.parametrize("concurrency", [1, 8])
def test_a_worker_answering_quickly_holds_its_calls_briefly(
    clock: FakeClock, concurrency: int
) -> None:
    pacing = Pacing(concurrency, 64, clock)
    answer_at_pace(pacing, clock, gap=QUICK, answers=200)  # 50 per horizon
    assert pacing.holds_briefly(concurrency + 11)  # 11 waiting: about 0.2 of the horizon
    clock.now += 2 * AHEAD_HORIZON  # no answer since: it may be stuck in a call
    assert not pacing.holds_briefly(concurrency + 11)
    clock.now -= 2 * AHEAD_HORIZON
    assert not pacing.holds_briefly(concurrency + 71)  # 71 waiting: about 1.4 of the horizon


def test_without_a_limit_nothing_is_paced(clock: FakeClock) -> None:
    pacing = Pacing(1, 0, clock)
    answer_at_pace(pacing, clock, gap=QUICK, answers=200)
    assert pacing.ahead == 0 and pacing.answer_gap == 0.0
    assert not pacing.holds_briefly(2)  # (never timed: it counts as stalled)
