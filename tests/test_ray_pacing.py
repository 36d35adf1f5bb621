"""Send-ahead pacing of Ray-backed workers (no cluster: ``Pacing`` with a clock).

A Ray worker's answers come back in batches a Ray round trip apart. Paced as
a local worker is (about as many calls as it answers in 2 ms), a worker that
answers its batch every 3 ms is paced down to one call per round trip and
stays there: each shallower pipeline answers fewer calls per round trip,
which looks slower still. A Ray worker's horizon covers the round trip
(``Pacing.latency``), so the same answers deepen its pipeline instead.
"""

from __future__ import annotations

from snakepool.pool._pacing import Pacing
from snakepool.pool._ray import RayCluster

ROUND_TRIP = 0.003  # one Ray round trip here, under load


def _paced(pacing: Pacing, clock: list[float], round_trips: int) -> int:
    """Callers keep the worker full; each round trip answers all it held."""
    for _ in range(round_trips):
        held = pacing.concurrency + pacing.ahead
        clock[0] += ROUND_TRIP
        pacing.answered(held, held)  # (the callers refill what was answered)
    return pacing.ahead


def test_a_ray_worker_keeps_a_deep_pipeline_where_a_local_one_would_not() -> None:
    clock = [0.0]
    local = Pacing(1, 64, clock=lambda: clock[0])
    assert _paced(local, clock, 100) <= 2  # (the trap: 2 calls per round trip)

    clock = [0.0]
    latency = RayCluster({}).pacing(1, 64).latency  # (what a Ray-backed pool's workers get)
    far = Pacing(1, 64, clock=lambda: clock[0], latency=latency)
    assert _paced(far, clock, 100) == 64  # as deep as send_ahead allows
