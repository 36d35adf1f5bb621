"""Language models in a worker: settings, per-call overrides, and fuses.

Per call, an LM is the session's (or the worker's) configured LM with the
settings its session variables hold applied (``model``, ``temperature``,
``max_tokens``, ``top_p``; a program's ``bind`` may name other variables
for them), all read from the one snapshot of the variables the call was
given.

A fuse is a circuit breaker per LM endpoint (model and api_base) in this
worker: snakepool's :class:`~snakepool.pool._breaker.CircuitBreaker`, fed
with LM calls instead of pool calls. After ``threshold`` consecutive
transient failures (transport errors, timeouts, 5xx, rate limits: what DSPy
itself would retry) the endpoint's calls fail at once with
:class:`LMFuseOpen`, without a request, until ``reset_timeout`` has passed;
then one probe call goes through, and its success closes the fuse. Other
endpoints are not affected. Transitions are reported (``report``) as
``dspy.fuse.opened``, ``dspy.fuse.half_open`` and ``dspy.fuse.closed``.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from . import LMFuseOpen

if TYPE_CHECKING:
    from ..pool._breaker import CircuitBreaker

__all__ = [
    "DEADLINE_MARGIN",
    "LM_VARIABLES",
    "Fuse",
    "Fuses",
    "call_lm",
    "fuse_options",
    "fused_lm_class",
    "lm_settings",
]

#: The LM settings a session variable can hold, and the type each is given as.
LM_VARIABLES: dict[str, type] = {
    "model": str,
    "temperature": float,
    "max_tokens": int,
    "top_p": float,
}
#: Seconds an LM request leaves between its own timeout and the call's deadline.
DEADLINE_MARGIN = 0.5
FUSE_DEFAULTS = {"threshold": 5, "reset_timeout": 30.0}
_LADDER_BASE, _LADDER_STEP = 0.05, 1.1

Report = Callable[[str, dict[str, Any]], None]


def lm_settings(**settings: Any) -> dict[str, Any]:
    """The LM's settings, as persisted: JSON-safe, without unset values."""
    cleaned = {k: v for k, v in settings.items() if v is not None}
    try:
        json.dumps(cleaned)
    except TypeError as exc:
        raise TypeError(f"configure_lm arguments must be plain data: {exc}") from None
    return cleaned


def call_lm(
    lm: Any, bind: Mapping[str, str], variables: Mapping[str, Any], time_left: float | None
) -> Any:
    """``lm`` as one call uses it: its variables' settings, a timeout inside the deadline."""
    overrides: dict[str, Any] = {}
    for setting, kind in LM_VARIABLES.items():
        name = bind.get(setting, setting)
        if name not in variables:
            if setting in bind:
                known = ", ".join(sorted(variables)) or "none"
                raise ValueError(
                    f"{setting} is bound to session variable {name!r}, which is not defined "
                    f"(defined: {known})"
                )
            continue
        value = variables[name]
        if value is None:
            continue
        try:
            overrides[setting] = kind(value)
        except (TypeError, ValueError):
            raise ValueError(
                f"session variable {name!r} holds {value!r}, not a {kind.__name__} for the "
                f"LM's {setting}"
            ) from None
    if time_left is not None:
        # Give up on the LM before the host gives up on the call: a request
        # that outlives its call would get the whole worker replaced.
        budget = _rung(max(_LADDER_BASE, time_left - DEADLINE_MARGIN))
        configured = lm.kwargs.get("timeout")
        if not isinstance(configured, int | float) or configured > budget:
            overrides["timeout"] = budget
    return lm.copy(**overrides) if overrides else lm


def _rung(seconds: float) -> float:
    """The highest rung of a fixed ladder (10% apart) at or under ``seconds``.

    DSPy keeps a connection pool per distinct LM timeout, for the LM's life:
    a timeout of its own per call (the time left varies) would open a pool
    and a connection per call and keep them all. On the ladder, calls share
    a few, and an LM request still gets over 90% of the time left.
    """
    return float(
        _LADDER_BASE * _LADDER_STEP ** math.floor(math.log(seconds / _LADDER_BASE, _LADDER_STEP))
    )


def fuse_options(config: Any) -> dict[str, Any] | None:
    """``adapter_config["fuse"]`` checked: ``None`` means fuses are off (``False``)."""
    if config is False:
        return None
    if config is None or config is True:
        return dict(FUSE_DEFAULTS)
    if not isinstance(config, Mapping):
        raise TypeError(
            "adapter_config['fuse'] must be a dict {'threshold', 'reset_timeout'} or False, "
            f"got {config!r}"
        )
    unknown = set(config) - set(FUSE_DEFAULTS)
    if unknown:
        raise ValueError(f"adapter_config['fuse'] has unknown keys {sorted(unknown)}")
    options = {**FUSE_DEFAULTS, **config}
    threshold, reset = options["threshold"], options["reset_timeout"]
    if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 1:
        raise ValueError(
            f"adapter_config['fuse']['threshold'] must be an int >= 1, got {threshold!r}"
        )
    if isinstance(reset, bool) or not isinstance(reset, int | float) or not reset > 0:
        raise ValueError(
            f"adapter_config['fuse']['reset_timeout'] must be a number > 0, got {reset!r}"
        )
    return {"threshold": threshold, "reset_timeout": float(reset)}


class Fuse:
    """One endpoint's breaker, safe to share between the worker's threads."""

    def __init__(
        self,
        model: str,
        api_base: str | None,
        *,
        threshold: int,
        reset_timeout: float,
        is_transient: Callable[[BaseException], bool],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        from ..pool._breaker import CircuitBreaker  # (the first LM call pays for it, not start-up)

        self.model = model
        self.api_base = api_base
        self._is_transient = is_transient
        self._clock = clock
        self._lock = threading.Lock()
        self._changes: list[str] = []
        self._opened_at = 0.0
        self.last_error: str | None = None
        self.breaker: CircuitBreaker = CircuitBreaker(
            threshold=threshold,
            reset_timeout=reset_timeout,
            pool=self.endpoint,
            clock=clock,
            on_change=self._changed,
        )

    @property
    def endpoint(self) -> str:
        return f"{self.model} at {self.api_base}" if self.api_base else self.model

    def admit(self) -> tuple[bool, list[str]]:
        """``(is_probe, transitions)``; :class:`LMFuseOpen` when the call must not go out."""
        from ..errors import CircuitOpen

        with self._lock:
            try:
                probe = self.breaker.admit()
            except CircuitOpen:
                raise self._open_error() from None
            return probe, self._take_changes()

    def record(self, error: BaseException | None, probe: bool) -> list[str]:
        """The outcome of an admitted call; returns the transitions it caused."""
        from ..errors import ErrorCategory

        with self._lock:
            if error is None or not isinstance(error, Exception):
                if error is None:
                    self.breaker.success(probe=probe)
                elif probe:  # cancelled: no outcome, let another probe through
                    self.breaker.release_probe()
            elif self._is_transient(error):
                self.last_error = f"{type(error).__name__}: {error}"
                self.breaker.failure(ErrorCategory.COMMUNICATION, probe=probe)
            else:  # the endpoint answered (a bad request, say): it is up
                self.breaker.success(probe=probe)
            return self._take_changes()

    def describe(self) -> dict[str, Any]:
        with self._lock:
            breaker = self.breaker
            state = breaker.state.value
            retry_in = None
            if state == "open":
                retry_in = max(0.0, breaker.reset_timeout - (self._clock() - self._opened_at))
            return {
                "model": self.model,
                "api_base": self.api_base,
                "state": state,
                "consecutive_failures": breaker.consecutive_failures,
                "threshold": breaker.threshold,
                "reset_timeout": breaker.reset_timeout,
                "retry_in": retry_in,
                "last_error": self.last_error,
                "pid": os.getpid(),
            }

    def _changed(self, old: Any, new: Any, failures: int) -> None:
        if new.value == "open":
            self._opened_at = self._clock()
        self._changes.append(new.value)

    def _take_changes(self) -> list[str]:
        changes, self._changes = self._changes, []
        return changes

    def _open_error(self) -> LMFuseOpen:
        breaker = self.breaker
        wait = max(0.0, breaker.reset_timeout - (self._clock() - self._opened_at))
        when = "a probe call is in flight" if wait == 0 else f"a probe may go in {wait:.1f}s"
        return LMFuseOpen(
            f"the fuse of LM endpoint {self.endpoint} is open after "
            f"{breaker.consecutive_failures} consecutive transient failures "
            f"(last: {self.last_error}); failing fast without calling it ({when})"
        )


class Fuses:
    """The fuses of this worker, one per endpoint, made on first use."""

    def __init__(
        self, options: dict[str, Any] | None, is_transient: Callable[[BaseException], bool]
    ) -> None:
        self.options = options
        self._is_transient = is_transient
        self._fuses: dict[tuple[str, str | None], Fuse] = {}
        self._lock = threading.Lock()
        #: Called with ``(event name, data)`` for every transition (set by the adapter).
        self.report: Report = lambda name, data: None

    def for_lm(self, lm: Any) -> Fuse | None:
        if self.options is None:
            return None
        key = (str(lm.model), lm.kwargs.get("api_base"))
        fuse = self._fuses.get(key)
        if fuse is None:
            with self._lock:
                fuse = self._fuses.get(key)
                if fuse is None:
                    fuse = Fuse(*key, is_transient=self._is_transient, **self.options)
                    self._fuses[key] = fuse
        return fuse

    def describe(self) -> list[dict[str, Any]]:
        with self._lock:
            fuses = list(self._fuses.values())
        return [fuse.describe() for fuse in fuses]

    def announce(self, fuse: Fuse, changes: list[str]) -> None:
        for state in changes:
            data = fuse.describe()
            self.report(f"dspy.fuse.{'opened' if state == 'open' else state}", data)


def fused_lm_class(dspy: Any, fuses: Fuses) -> Any:
    """A ``dspy.LM`` whose calls go through the fuse of their endpoint."""

    class FusedLM(dspy.LM):  # type: ignore[misc]
        """``dspy.LM`` behind a fuse: an endpoint that keeps failing fails fast."""

        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            fuse = fuses.for_lm(self)
            if fuse is None:
                return super().__call__(*args, **kwargs)
            probe = _admit(fuse)
            try:
                result = super().__call__(*args, **kwargs)
            except BaseException as exc:
                fuses.announce(fuse, fuse.record(exc, probe))
                raise
            fuses.announce(fuse, fuse.record(None, probe))
            return result

        async def acall(self, *args: Any, **kwargs: Any) -> Any:
            fuse = fuses.for_lm(self)
            if fuse is None:
                return await super().acall(*args, **kwargs)
            probe = _admit(fuse)
            try:
                result = await super().acall(*args, **kwargs)
            except BaseException as exc:
                fuses.announce(fuse, fuse.record(exc, probe))
                raise
            fuses.announce(fuse, fuse.record(None, probe))
            return result

    def _admit(fuse: Fuse) -> bool:
        probe, changes = fuse.admit()
        fuses.announce(fuse, changes)
        return probe

    return FusedLM
