"""One config: ``PoolConfig`` declares every option once; ``Pool(...)``, ``pools.toml``
tables, ``SNAKEPOOL_<POOL>_<OPTION>`` overrides, the README's table and ``Pool``'s
docstring all follow it (issue 17, item 3)."""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from snakepool import Pool
from snakepool.pool import ConfigError, PoolConfig, Supervisor
from snakepool.pool._config import BOOL, OPTIONS, options_table
from snakepool.pool._supervisor import ENV_OVERRIDES, POOL_KEYS

README = Path(__file__).resolve().parents[1] / "README.md"

#: A value other than the default for every option but ``name``: (Python value, the
#: same as ``SNAKEPOOL_<POOL>_<OPTION>`` text). A new option needs a row here.
SAMPLES: dict[str, tuple[Any, str]] = {
    "adapter": ("sp_adapters:Basic", "sp_adapters:Basic"),
    "size": (3, "3"),
    "python": (sys.executable, sys.executable),
    "env": ({"HF_HOME": "/data", "A": "1"}, '{"HF_HOME": "/data", "A": "1"}'),
    "cwd": ("/tmp", "/tmp"),
    "pythonpath": (["/opt/a", "/opt/b"], os.pathsep.join(["/opt/a", "/opt/b"])),
    "adapter_config": ({"model": "m", "n": 2}, '{"model": "m", "n": 2}'),
    "worker_concurrency": (4, "4"),
    "startup_timeout": (12.5, "12.5"),
    "call_timeout": (7.5, "7.5"),
    "queue_size": (5, "5"),
    "max_requests": (100, "100"),
    "max_memory_mb": (512.5, "512.5"),
    "worker_ttl": (60.0, "60"),
    "health_interval": (2.0, "2"),
    "health_timeout": (1.5, "1.5"),
    "affinity": ("strict_queue", "strict_queue"),
    "session_ttl": (60.0, "60"),
    "max_sessions": (10, "10"),
    "breaker_threshold": (2, "2"),
    "breaker_reset_timeout": (9.0, "9"),
    "max_frame_bytes": (2**20, str(2**20)),
    "gpus": ([0, 1], "0,1"),
    "workers_per_gpu": (2, "2"),
    "preload": (["json", "math"], "json,math"),
    "start_method": ("spawn", "spawn"),
    "session_store": ("redis://localhost:6379/0", "redis://localhost:6379/0"),
    "backend": ("ray", "ray"),
    "ray": ({"address": "local", "num_cpus": 0.5}, '{"address": "local", "num_cpus": 0.5}'),
    "recovery": ({"application": "recycle"}, '{"application": "recycle"}'),
    "send_ahead": (0, "0"),
    "drain_grace": (1.5, "1.5"),
    "stop_grace": (0.5, "0.5"),
    "cancel_grace": (0.25, "0.25"),
    "limits": ({"memory_mb": 512, "open_files": 64}, '{"memory_mb": 512, "open_files": 64}'),
    "user": ("nobody", "nobody"),
    "network": (False, "false"),
    "writable_paths": (["/tmp/a", "/tmp/b"], os.pathsep.join(["/tmp/a", "/tmp/b"])),
    "sandbox": (True, "true"),
}
SETTABLE = [name for name in OPTIONS if name != "name"]
#: Options that only apply beside another one (``ray={...}`` needs ``backend="ray"``).
COMPANIONS: dict[str, tuple[str, Any, str]] = {"ray": ("backend", "ray", "ray")}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in list(os.environ):
        if var.startswith("SNAKEPOOL_"):
            monkeypatch.delenv(var)


def plain(value: object) -> object:
    """Compare sequences as lists and mappings as dicts (TOML gives lists, Pool keeps tuples)."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [plain(v) for v in value]
    return value


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # (a TOML basic string, for these)
    if isinstance(value, Mapping):
        return (
            "{ " + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + " }"
        )
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(value)


def test_every_option_has_a_sample_and_a_doc() -> None:
    assert set(SAMPLES) == set(SETTABLE)
    for name, (value, _) in SAMPLES.items():
        assert plain(value) != plain(OPTIONS[name].default), name
    for option in OPTIONS.values():
        assert option.doc and "\n" not in option.doc, option.name
    # gpu_slots is derived, not an option
    init_fields = [f.name for f in dataclasses.fields(PoolConfig) if f.init]
    assert list(OPTIONS) == init_fields and "gpu_slots" not in OPTIONS


@pytest.mark.parametrize("option", SETTABLE)
def test_pool_accepts_every_option(option: str) -> None:
    value, _ = SAMPLES[option]
    kwargs = {"adapter": "generic", option: value}
    if option in COMPANIONS:
        other, other_value, _ = COMPANIONS[option]
        kwargs[other] = other_value
    pool = Pool(**kwargs)
    assert plain(getattr(pool.config, option)) == plain(value)


@pytest.mark.parametrize("option", SETTABLE)
def test_pools_toml_accepts_every_option(option: str, tmp_path: Path) -> None:
    value, _ = SAMPLES[option]
    lines = ["[pools.general]"]
    if option != "adapter":
        lines.append('adapter = "generic"')
    if option in COMPANIONS:
        other, other_value, _ = COMPANIONS[option]
        lines.append(f"{other} = {toml_value(other_value)}")
    lines.append(f"{option} = {toml_value(value)}")
    path = tmp_path / "pools.toml"
    path.write_text("\n".join(lines) + "\n")
    config = Supervisor.from_file(path)["general"].config
    assert plain(getattr(config, option)) == plain(value)


@pytest.mark.parametrize("option", SETTABLE)
def test_environment_overrides_every_option(option: str, monkeypatch: pytest.MonkeyPatch) -> None:
    value, text = SAMPLES[option]
    monkeypatch.setenv(f"SNAKEPOOL_GENERAL_{option.upper()}", text)
    if option in COMPANIONS:
        other, _, other_text = COMPANIONS[option]
        monkeypatch.setenv(f"SNAKEPOOL_GENERAL_{other.upper()}", other_text)
    config = Supervisor({"general": {"adapter": "generic"}})["general"].config
    assert plain(getattr(config, option)) == plain(value)


def test_name_is_a_pool_argument_and_a_table_name_only(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Pool("generic", name="billing").config.name == "billing"
    assert Supervisor({"billing": {"adapter": "generic"}})["billing"].config.name == "billing"
    with pytest.raises(ConfigError, match="the pool's name is its table's name"):
        Supervisor({"billing": {"adapter": "generic", "name": "other"}})
    monkeypatch.setenv("SNAKEPOOL_BILLING_NAME", "other")
    with pytest.raises(ConfigError, match=r"'name' cannot be set from the environment"):
        Supervisor({"billing": {"adapter": "generic"}})


def test_derived_tables_follow_pool_config() -> None:
    assert set(POOL_KEYS) == set(OPTIONS) - {"name"}
    assert dict(ENV_OVERRIDES) == {name.upper(): name for name in SETTABLE}


def test_new_environment_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "pools.toml"
    path.write_text('[pools.general]\nadapter = "generic"\ncall_timeout = 5\nsend_ahead = 8\n')
    monkeypatch.setenv("SNAKEPOOL_GENERAL_DRAIN_GRACE", "1.5")
    monkeypatch.setenv("SNAKEPOOL_GENERAL_SEND_AHEAD", "0")
    monkeypatch.setenv("SNAKEPOOL_GENERAL_CALL_TIMEOUT", "none")
    pool = Supervisor.from_file(path)["general"]
    assert (pool.config.drain_grace, pool.config.send_ahead, pool.config.call_timeout) == (
        1.5,
        0,
        None,
    )
    assert (pool.drain_grace, pool.send_ahead) == (1.5, 0)  # the attributes follow

    monkeypatch.setenv("SNAKEPOOL_GENERAL_DRAIN_GRACE", "-1")  # parses; PoolConfig refuses it
    with pytest.raises(
        ConfigError, match=r"SNAKEPOOL_GENERAL_DRAIN_GRACE='-1'.*drain_grace"
    ) as info:
        Supervisor.from_file(path)
    assert (info.value.variable, info.value.key) == ("SNAKEPOOL_GENERAL_DRAIN_GRACE", "drain_grace")
    monkeypatch.delenv("SNAKEPOOL_GENERAL_DRAIN_GRACE")

    monkeypatch.setenv("SNAKEPOOL_GENERAL_ENV", "HF_HOME=/data")  # not JSON
    with pytest.raises(
        ConfigError,
        match=r"SNAKEPOOL_GENERAL_ENV='HF_HOME=/data'.*expected a JSON object or 'none'",
    ):
        Supervisor.from_file(path)
    monkeypatch.delenv("SNAKEPOOL_GENERAL_ENV")

    monkeypatch.setenv("SNAKEPOOL_GENERAL_GPUS", "auto")
    assert Supervisor.from_file(path)["general"].config.gpus == "auto"
    monkeypatch.setenv("SNAKEPOOL_GENERAL_GPUS", "first")
    with pytest.raises(ConfigError, match=r"SNAKEPOOL_GENERAL_GPUS='first'.*expected 'auto'"):
        Supervisor.from_file(path)
    monkeypatch.delenv("SNAKEPOOL_GENERAL_GPUS")

    monkeypatch.setenv("SNAKEPOOL_GENERAL_PRELOAD", "[]")  # a JSON list: here, none
    assert list(Supervisor.from_file(path)["general"].config.preload) == []
    monkeypatch.delenv("SNAKEPOOL_GENERAL_PRELOAD")

    monkeypatch.setenv("SNAKEPOOL_GENERAL_MAX_WORKERS", "4")  # another library's name
    with pytest.raises(ConfigError, match=r"unknown knob 'MAX_WORKERS' \(did you mean 'SIZE'\?\)"):
        Supervisor.from_file(path)


def test_bool_overrides_parse() -> None:
    # (network= and sandbox= read these)
    assert [BOOL.parse(t) for t in ("1", "true", "Yes", "off", "0", "False")] == [
        True,
        True,
        True,
        False,
        False,
        False,
    ]
    with pytest.raises(ValueError, match="maybe"):
        BOOL.parse("maybe")
    assert OPTIONS["network"].env is BOOL and OPTIONS["sandbox"].env is BOOL


def test_readme_table_is_pool_configs() -> None:
    """The README's options table is ``options_table()``: every option, its default, its doc."""
    readme = README.read_text()
    table = options_table()
    assert table in readme, (
        "README.md's options table differs from PoolConfig; replace it with:\n\n" + table
    )
    start = readme.index(table.splitlines()[0])
    rows = [line for line in readme[start:].splitlines() if line.startswith("| `")]
    rows = rows[: len(OPTIONS)]
    assert [row.split("`")[1] for row in rows] == list(OPTIONS)


def test_pool_signature_is_pool_configs() -> None:
    """``Pool.__init__`` spells out PoolConfig's fields (for IDEs): same names, order,
    defaults and annotations; ``adapter`` and ``session_store`` also take an object."""
    params = [
        param
        for name, param in inspect.signature(Pool.__init__).parameters.items()
        if name != "self" and param.kind is not inspect.Parameter.VAR_KEYWORD
    ]
    fields = {f.name: f for f in dataclasses.fields(PoolConfig) if f.init}
    assert [param.name for param in params] == list(fields)
    wider = {"adapter": "str | type[Adapter]", "session_store": "str | SessionStore"}
    for param in params:
        field = fields[param.name]
        assert param.annotation == wider.get(param.name, field.type), param.name
        if field.default is dataclasses.MISSING:
            assert param.default is inspect.Parameter.empty, param.name
        else:
            assert param.default == field.default, param.name
            assert type(param.default) is type(field.default), param.name
        expected_kind = (
            inspect.Parameter.POSITIONAL_OR_KEYWORD
            if param.name == "adapter"
            else inspect.Parameter.KEYWORD_ONLY
        )
        assert param.kind is expected_kind, param.name


def test_pool_docstring_documents_every_option() -> None:
    doc = Pool.__init__.__doc__
    assert doc is not None
    for option in OPTIONS.values():
        assert f"\n{option.name} (" in doc, option.name
    assert "size (None = os.cpu_count()): worker processes" in doc
    assert "cancel_grace (2.0 s): " in doc
