"""The circuit breaker and the recovery table, as pure state machines (fake clock)."""

from __future__ import annotations

import pytest

from conftest import FakeClock
from snakepool import CircuitOpen, ErrorCategory
from snakepool.pool._breaker import BreakerState, CircuitBreaker
from snakepool.pool._recovery import DEFAULT_RECOVERY, Recovery, recovery_table


@pytest.fixture
def changes() -> list[tuple[str, str]]:
    return []


@pytest.fixture
def breaker(clock: FakeClock, changes: list[tuple[str, str]]) -> CircuitBreaker:
    return CircuitBreaker(
        threshold=3,
        reset_timeout=10.0,
        pool="p",
        clock=clock,
        on_change=lambda old, new, _: changes.append((old.value, new.value)),
    )


def test_opens_after_threshold_consecutive_infrastructure_failures(breaker: CircuitBreaker) -> None:
    for _ in range(2):
        assert breaker.admit() is False
        breaker.failure(ErrorCategory.COMMUNICATION)
    assert breaker.state is BreakerState.CLOSED
    breaker.failure(ErrorCategory.TIMEOUT)
    assert breaker.state is BreakerState.OPEN
    with pytest.raises(CircuitOpen, match="after 3 consecutive"):
        breaker.admit()


def test_a_success_resets_the_count(breaker: CircuitBreaker) -> None:
    breaker.failure(ErrorCategory.PROTOCOL)
    breaker.failure(ErrorCategory.PROTOCOL)
    breaker.success()
    breaker.failure(ErrorCategory.PROTOCOL)
    breaker.failure(ErrorCategory.PROTOCOL)
    assert breaker.state is BreakerState.CLOSED
    assert breaker.consecutive_failures == 2


@pytest.mark.parametrize(
    "category",
    [
        ErrorCategory.APPLICATION,
        ErrorCategory.OVERLOAD,
        ErrorCategory.SESSION,
        ErrorCategory.RESOURCE,
    ],
)
def test_non_infrastructure_errors_never_count(
    breaker: CircuitBreaker, category: ErrorCategory
) -> None:
    for _ in range(10):
        breaker.failure(category)
    assert breaker.state is BreakerState.CLOSED
    assert breaker.consecutive_failures == 0


def test_half_open_lets_one_probe_through_and_its_success_closes(
    breaker: CircuitBreaker, clock: FakeClock, changes: list[tuple[str, str]]
) -> None:
    for _ in range(3):
        breaker.failure(ErrorCategory.INITIALIZATION)
    clock.now += 9.9
    with pytest.raises(CircuitOpen, match=r"retry in 0\.1s"):
        breaker.admit()
    clock.now += 0.1
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.admit() is True  # the probe
    with pytest.raises(CircuitOpen, match="probe call is in flight"):
        breaker.admit()
    breaker.success(probe=True)
    assert breaker.state is BreakerState.CLOSED
    assert breaker.admit() is False
    assert changes == [("closed", "open"), ("open", "half_open"), ("half_open", "closed")]


def test_a_failed_probe_opens_again_for_a_full_timeout(
    breaker: CircuitBreaker, clock: FakeClock
) -> None:
    for _ in range(3):
        breaker.failure(ErrorCategory.TIMEOUT)
    clock.now += 10
    assert breaker.admit() is True
    breaker.failure(ErrorCategory.TIMEOUT, probe=True)
    assert breaker.state is BreakerState.OPEN
    clock.now += 5
    with pytest.raises(CircuitOpen):
        breaker.admit()
    clock.now += 5
    assert breaker.admit() is True


def test_a_probe_that_meets_an_application_error_closes(
    breaker: CircuitBreaker, clock: FakeClock
) -> None:
    for _ in range(3):
        breaker.failure(ErrorCategory.TIMEOUT)
    clock.now += 10
    assert breaker.admit() is True
    breaker.failure(ErrorCategory.APPLICATION, probe=True)  # a worker answered: the pool works
    assert breaker.state is BreakerState.CLOSED


def test_a_cancelled_probe_lets_the_next_one_through(
    breaker: CircuitBreaker, clock: FakeClock
) -> None:
    for _ in range(3):
        breaker.failure(ErrorCategory.TIMEOUT)
    clock.now += 10
    assert breaker.admit() is True
    breaker.release_probe()
    assert breaker.admit() is True


def test_default_recovery_follows_the_contract() -> None:
    assert DEFAULT_RECOVERY[ErrorCategory.APPLICATION] is Recovery.NONE
    assert DEFAULT_RECOVERY[ErrorCategory.COMMUNICATION] is Recovery.RETRY
    assert DEFAULT_RECOVERY[ErrorCategory.RESOURCE] is Recovery.RECYCLE
    assert DEFAULT_RECOVERY[ErrorCategory.TIMEOUT] is Recovery.REPLACE
    assert set(DEFAULT_RECOVERY) == set(ErrorCategory)


def test_recovery_overrides_by_name_and_clear_errors() -> None:
    table = recovery_table({"application": "recycle", ErrorCategory.TIMEOUT: Recovery.NONE})
    assert table[ErrorCategory.APPLICATION] is Recovery.RECYCLE
    assert table[ErrorCategory.TIMEOUT] is Recovery.NONE
    assert table[ErrorCategory.PROTOCOL] is Recovery.REPLACE
    with pytest.raises(ValueError, match="unknown error category 'bogus'"):
        recovery_table({"bogus": "none"})
    with pytest.raises(ValueError, match="unknown action 'explode'"):
        recovery_table({"timeout": "explode"})


def test_steady_means_closed_with_nothing_counted(
    breaker: CircuitBreaker, clock: FakeClock
) -> None:
    # The pool skips success() per call while the breaker is steady: the flag
    # must never say steady while a failure is counted or the breaker is open.
    def check() -> None:
        expected = breaker._state is BreakerState.CLOSED and breaker.consecutive_failures == 0
        assert breaker.steady is expected

    check()
    breaker.failure(ErrorCategory.COMMUNICATION)
    check()
    breaker.failure(ErrorCategory.APPLICATION)  # not counted: no change
    check()
    breaker.success()
    check()
    for _ in range(3):
        breaker.failure(ErrorCategory.TIMEOUT)
        check()
    clock.now += 10
    assert breaker.admit() is True
    check()
    breaker.failure(ErrorCategory.TIMEOUT, probe=True)
    check()
    clock.now += 10
    assert breaker.admit() is True
    breaker.success(probe=True)
    check()
    assert breaker.steady
