"""Plain-data helpers shared by the worker side and the host side (no DSPy, no I/O)."""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from typing import Any

__all__ = [
    "BUILTIN_METRICS",
    "IDENTIFIER",
    "json_safe",
    "new_id",
    "normalize",
    "prediction_dict",
    "token_f1",
]

#: The metrics the workers compute themselves; any other name is a host tool.
BUILTIN_METRICS = ("exact_match", "f1")
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def json_safe(value: Any) -> Any:
    """Plain data (MessagePack and JSON): containers, str, numbers, bools, None."""
    if value is None or isinstance(value, str | bool | int | float):
        return value
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [json_safe(v) for v in value]
    model_dump = getattr(value, "model_dump", None)
    if callable(model_dump):
        return json_safe(model_dump(mode="json"))
    to_dict = getattr(value, "toDict", None)
    if callable(to_dict):
        return json_safe(to_dict())
    return str(value)


def prediction_dict(prediction: Any) -> dict[str, Any]:
    """A ``dspy.Prediction`` as a dict of plain data."""
    return {str(k): json_safe(v) for k, v in prediction.toDict().items()}


def new_id(program_id: str | None) -> str:
    if program_id is None:
        return uuid.uuid4().hex
    if not isinstance(program_id, str) or not program_id:
        raise ValueError(f"program_id must be a non-empty str, got {program_id!r}")
    return program_id


def normalize(value: Any) -> str:
    """Lower case, whitespace collapsed: what ``exact_match`` compares."""
    return " ".join(str(value).lower().split())


def token_f1(predicted: Any, expected: Any) -> float:
    """SQuAD-style token F1 of two texts (normalized first)."""
    pred = normalize(predicted).split() if predicted is not None else []
    gold = normalize(expected).split() if expected is not None else []
    if not pred or not gold:
        return float(pred == gold)
    remaining = list(gold)
    common = 0
    for token in pred:
        if token in remaining:
            remaining.remove(token)
            common += 1
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)
