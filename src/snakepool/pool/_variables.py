"""Typed session variables: specs, constraints and validation (pure, no I/O).

A variable has a type (``float``, ``int``, ``str``, ``bool``, ``choice``,
``module``, ``json``), optional constraints (``min``, ``max``, ``choices``,
``max_length``, ``pattern``), a value, a version (1 when defined, +1 on every
set) and metadata. An invalid value is a ``ValueError`` naming the variable
and the rule it broke.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["VARIABLE_TYPES", "VariableSpec", "VariableUpdate"]

VARIABLE_TYPES = ("float", "int", "str", "bool", "choice", "module", "json")
_ALLOWED_CONSTRAINTS: dict[str, frozenset[str]] = {
    "float": frozenset({"min", "max"}),
    "int": frozenset({"min", "max"}),
    "str": frozenset({"max_length", "pattern", "choices"}),
    "bool": frozenset(),
    "choice": frozenset({"choices"}),
    "module": frozenset({"choices", "pattern"}),  # e.g. a DSPy module name
    "json": frozenset({"max_length"}),  # max_length: of the JSON text
}


@dataclass(frozen=True, slots=True)
class VariableUpdate:
    """One change of one variable, as ``watch()`` delivers it."""

    name: str
    value: Any
    version: int
    metadata: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class VariableSpec:
    """A variable's type and constraints."""

    name: str
    type: str
    constraints: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # One canonical form, so a spec compares equal after a trip through any store.
        normalized = {
            k: list(v) if isinstance(v, tuple | set | frozenset) else v
            for k, v in self.constraints.items()
        }
        object.__setattr__(self, "constraints", normalized)
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"variable name must be a non-empty str, got {self.name!r}")
        if self.type not in VARIABLE_TYPES:
            raise ValueError(
                f"variable {self.name!r}: unknown type {self.type!r}; one of {', '.join(VARIABLE_TYPES)}"
            )
        unknown = set(self.constraints) - _ALLOWED_CONSTRAINTS[self.type]
        if unknown:
            allowed = ", ".join(sorted(_ALLOWED_CONSTRAINTS[self.type])) or "none"
            raise ValueError(
                f"variable {self.name!r}: constraint(s) {', '.join(sorted(unknown))} do not apply "
                f"to type {self.type!r} (allowed: {allowed})"
            )
        if self.type == "choice" and not self.constraints.get("choices"):
            raise ValueError(
                f"variable {self.name!r}: type 'choice' needs constraints={{'choices': [...]}}"
            )
        pattern = self.constraints.get("pattern")
        if pattern is not None:
            try:
                re.compile(pattern)
            except (re.error, TypeError) as exc:
                raise ValueError(
                    f"variable {self.name!r}: invalid pattern {pattern!r}: {exc}"
                ) from None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "type": self.type, "constraints": dict(self.constraints)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> VariableSpec:
        return cls(
            name=data["name"], type=data["type"], constraints=dict(data.get("constraints") or {})
        )

    def validate(self, value: Any) -> Any:
        """The value as stored (ints become floats for ``float``), or ``ValueError``."""
        checked = getattr(self, f"_check_{self.type}")(value)
        self._check_constraints(checked)
        return checked

    # --- per type ------------------------------------------------------------------

    def _fail(self, value: Any, rule: str) -> ValueError:
        return ValueError(f"variable {self.name!r}: {value!r} {rule}")

    def _check_float(self, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self._fail(value, f"is not a float (type {type(value).__name__})")
        if not math.isfinite(value):
            raise self._fail(value, "is not a finite number")
        return float(value)

    def _check_int(self, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._fail(value, f"is not an int (type {type(value).__name__})")
        return value

    def _check_str(self, value: Any) -> str:
        if not isinstance(value, str):
            raise self._fail(value, f"is not a str (type {type(value).__name__})")
        return value

    def _check_bool(self, value: Any) -> bool:
        if not isinstance(value, bool):
            raise self._fail(value, f"is not a bool (type {type(value).__name__})")
        return value

    def _check_choice(self, value: Any) -> Any:
        return value  # the 'choices' constraint does the work

    def _check_module(self, value: Any) -> str:
        if not isinstance(value, str) or not value:
            raise self._fail(value, "is not a module name (a non-empty str)")
        return value

    def _check_json(self, value: Any) -> Any:
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise self._fail(value, f"is not JSON-serializable ({exc})") from None
        return value

    def _check_constraints(self, value: Any) -> None:
        c = self.constraints
        if "min" in c and value < c["min"]:
            raise self._fail(value, f"is below min={c['min']!r}")
        if "max" in c and value > c["max"]:
            raise self._fail(value, f"is above max={c['max']!r}")
        if "choices" in c and value not in c["choices"]:
            raise self._fail(value, f"is not one of choices={list(c['choices'])!r}")
        if "max_length" in c:
            length = len(json.dumps(value)) if self.type == "json" else len(value)
            if length > c["max_length"]:
                raise self._fail(value, f"is longer than max_length={c['max_length']!r} ({length})")
        if "pattern" in c and not re.fullmatch(c["pattern"], value):
            raise self._fail(value, f"does not match pattern={c['pattern']!r}")
