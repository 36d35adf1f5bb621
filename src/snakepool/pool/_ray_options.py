"""The ``ray={...}`` option of a ``backend="ray"`` pool: its keys, checked.

Its own module, importing no Ray: ``PoolConfig`` checks these on any
machine, and only a pool that starts imports Ray (:mod:`._ray`).
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

__all__ = ["RAY_KEYS", "check_ray_options"]

#: Every key of ``ray={...}`` and what it must be (for errors).
RAY_KEYS: Mapping[str, str] = {
    "address": 'a Ray address ("auto", "ray://host:10001", "host:6379") or "local"',
    "num_cpus": "a number >= 0 (CPUs Ray reserves per worker)",
    "num_gpus": "a number >= 0, fractions allowed (GPUs Ray reserves per worker)",
    "resources": "a table of custom resource names to amounts per worker",
    "runtime_env": "a Ray runtime_env table (pip, env_vars, working_dir, ...)",
    "scheduling_strategy": '"DEFAULT", "SPREAD", or a Ray scheduling strategy object',
    "namespace": "the Ray namespace to connect in",
}


def check_ray_options(options: Mapping[str, Any]) -> None:
    """``ValueError``/``TypeError`` naming the key that is wrong."""
    if not isinstance(options, Mapping):
        raise TypeError(f"ray must be a dict of Ray options, got {type(options).__name__}")
    for key, value in options.items():
        if key not in RAY_KEYS:
            close = difflib.get_close_matches(str(key), list(RAY_KEYS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"ray has no option {key!r}{hint}; its options: {', '.join(RAY_KEYS)}")
        if not _valid(key, value):
            raise ValueError(f"ray[{key!r}] must be {RAY_KEYS[key]}; got {value!r}")


def _valid(key: str, value: Any) -> bool:
    match key:
        case "address" | "namespace":
            return value is None or (isinstance(value, str) and bool(value))
        case "num_cpus" | "num_gpus":
            return isinstance(value, int | float) and not isinstance(value, bool) and value >= 0
        case "resources":
            return isinstance(value, Mapping) and all(
                isinstance(name, str) and isinstance(amount, int | float) and amount >= 0
                for name, amount in value.items()
            )
        case "runtime_env":
            return isinstance(value, Mapping)
        case _:  # scheduling_strategy: Ray checks the objects it defines
            return not isinstance(value, str) or value in ("DEFAULT", "SPREAD")
