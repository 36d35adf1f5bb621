"""docs/dspy.md runs: its python blocks, in order, against the loopback LM server."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

pytest.importorskip("dspy")

from lm_server import LMServer

GUIDE = Path(__file__).resolve().parent.parent / "docs" / "dspy.md"


def test_the_dspy_guide_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    text = GUIDE.read_text()
    blocks = [
        (text.count("\n", 0, match.start(1)), match.group(1))
        for match in re.finditer(r"```python\n(.*?)```", text, re.S)
    ]
    assert len(blocks) == 6  # setup, variables, evaluation, fuses, optimization, pipelines
    with LMServer() as server:
        monkeypatch.setenv("SNAKEPOOL_DSPY_LM", json.dumps(server.lm_args(num_retries=0)))
        namespace: dict[str, object] = {"__name__": "dspy_guide"}
        for line, block in blocks:
            # (padded so that a traceback names the guide's own line)
            exec(compile("\n" * line + block, str(GUIDE), "exec"), namespace)
        assert len(server.completions()) > 200  # the examples did reach the LM
