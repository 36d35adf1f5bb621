"""The public surface: errors (one base, one kind each), exports, a thin socket
client, the dspy package and its old module name, kinds on the socket wire."""

from __future__ import annotations

import inspect
import json
import shutil
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import anyio
import msgpack
import pytest

import snakepool
import snakepool.dspy
import snakepool.errors
from snakepool.errors import KINDS, ErrorCategory, SnakepoolError, error_class
from snakepool.server._wire import error_from_wire, error_to_wire

TESTS_DIR = Path(__file__).resolve().parent
HEAVY = ("tenacity", "psutil", "snakepool.pool", "snakepool._bench", "snakepool.server._server")


def _error_classes() -> list[type[BaseException]]:
    """Every exception class snakepool defines, wherever it lives (``ConfigError``
    of ``pool/_supervisor.py``: see test_config_error_is_the_one_in_errors)."""
    from snakepool.pool import _template

    found: dict[type[BaseException], None] = {}
    for module in (snakepool.errors, snakepool.dspy, _template):
        for value in vars(module).values():
            if (
                isinstance(value, type)
                and issubclass(value, BaseException)
                and value.__module__.startswith("snakepool")
                and not value.__name__.startswith("_")
            ):
                found[value] = None
    return list(found)


def test_every_error_is_a_snakepool_error_with_its_own_kind_and_a_category() -> None:
    classes = _error_classes()
    names = {cls.__name__ for cls in classes}
    assert {"UnknownProgram", "NoLMConfigured", "LMCallError"} <= names
    assert {"TemplateUnavailable", "TemplateStartError", "UnknownTool"} <= names
    kinds: dict[str, type[BaseException]] = {}
    for cls in classes:
        assert issubclass(cls, SnakepoolError), cls
        assert "kind" in vars(cls), f"{cls.__name__} has no kind of its own"
        assert isinstance(cls.kind, str) and cls.kind.isidentifier(), cls
        assert kinds.setdefault(cls.kind, cls) is cls, f"{cls.kind!r}: {cls} and {kinds[cls.kind]}"
        assert isinstance(cls.category, ErrorCategory), cls


def test_the_moved_errors_keep_their_other_bases_and_old_homes() -> None:
    from snakepool.adapters import dspy as old_dspy
    from snakepool.pool import _template

    assert issubclass(snakepool.dspy.UnknownProgram, LookupError)
    assert issubclass(snakepool.dspy.NoLMConfigured, RuntimeError)
    assert issubclass(snakepool.dspy.LMCallError, RuntimeError)
    assert issubclass(snakepool.errors.ConfigError, ValueError)
    assert issubclass(snakepool.UnknownTool, LookupError)
    assert _template.TemplateUnavailable is snakepool.errors.TemplateUnavailable
    assert _template.TemplateStartError is snakepool.errors.TemplateStartError
    assert old_dspy.UnknownProgram is snakepool.dspy.UnknownProgram
    error = snakepool.errors.TemplateStartError("x", module="m", traceback="tb")
    assert (error.module, error.traceback, str(error)) == ("m", "tb", "x")


def test_config_error_is_the_one_in_errors() -> None:
    assert snakepool.ConfigError is snakepool.errors.ConfigError
    from snakepool.pool import _supervisor

    assert _supervisor.ConfigError is snakepool.errors.ConfigError
    with pytest.raises(snakepool.errors.ConfigError) as info:
        snakepool.Supervisor({"general": {"adapter": "generic", "sise": 2}})
    assert info.value.kind == "config"


def test_kinds_map_to_their_classes() -> None:
    for kind, cls in KINDS.items():
        assert cls.kind == kind
        assert error_class(kind) is cls
        assert getattr(snakepool.errors, cls.__name__) is cls
    assert error_class("no such kind") is None
    assert error_class(None) is None
    # A RemoteError for a handler's ValueError is still a "remote_error".
    assert snakepool.RemoteError("ValueError", "bad").kind == "remote_error"


def test_remote_kind_names_a_known_snakepool_error_only() -> None:
    assert snakepool.RemoteError("snakepool.errors.UnknownTool", "x").remote_kind == "unknown_tool"
    assert (
        snakepool.RemoteError("snakepool.dspy.UnknownProgram", "x").remote_kind
        == "dspy_unknown_program"
    )
    assert snakepool.RemoteError("ValueError", "x").remote_kind is None
    assert snakepool.RemoteError("no_such_module.Error", "x").remote_kind is None


def test_exports() -> None:
    from snakepool.pool import _config, _recovery, _session, _store

    assert snakepool.Recovery is _recovery.Recovery
    assert snakepool.SessionStore is _store.SessionStore
    assert snakepool.PoolConfig is _config.PoolConfig
    assert snakepool.Session is _session.Session
    for name in ("Recovery", "SessionStore", "PoolConfig", "Session", "UnknownTool"):
        assert name in snakepool.__all__
    for name in snakepool.__all__:
        assert getattr(snakepool, name) is not None, name
    for name in snakepool.errors.__all__:
        assert hasattr(snakepool.errors, name), name
    # every error class is exported from snakepool.errors
    for cls in KINDS.values():
        assert cls.__name__ in snakepool.errors.__all__


def _loaded_after(code: str) -> set[str]:
    """The modules a fresh interpreter has loaded after running ``code``."""
    probe = f"{code}\nimport sys, json\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    return set(json.loads(out.strip().splitlines()[-1]))


def _heavy(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if any(m == h or m.startswith(h + ".") for h in HEAVY))


@pytest.mark.parametrize(
    "code",
    [
        "import snakepool.server._client",
        "import snakepool.server",
        "import snakepool; snakepool.connect",
        "import snakepool.cli",
        "import snakepool.dspy",
        "import snakepool.adapters.dspy",
    ],
)
def test_the_client_side_imports_no_pool_machinery(code: str) -> None:
    assert _heavy(_loaded_after(code)) == []


def test_snakepool_call_and_status_load_no_pool(tmp_path: Path) -> None:
    socket = tmp_path / "none.sock"
    code = (
        "from snakepool.cli import main\n"
        f"assert main(['call', '--socket', {str(socket)!r}, 'general', 'echo', '{{}}']) == 1\n"
        f"assert main(['status', '--socket', {str(socket)!r}]) == 1\n"
    )
    assert _heavy(_loaded_after(code)) == []


def test_importing_snakepool_leaves_the_benchmark_out() -> None:
    loaded = _loaded_after("import snakepool, snakepool.cli; snakepool.cli._parser()")
    assert "snakepool._bench" not in loaded


def test_snakepool_bench_still_parses_its_options() -> None:
    from snakepool import _bench, cli

    args = cli._parser().parse_args(["bench", "--quick", "--workers", "3"])
    assert (args.command, args.quick, args.workers) == ("bench", True, 3)
    assert _bench.add_arguments is not None  # (stress/bench.py's import)


def test_dspy_lives_in_one_package_and_keeps_its_old_name() -> None:
    from snakepool.adapters import dspy as old
    from snakepool.adapters import load_adapter_class
    from snakepool.dspy import _adapter

    assert old.DSPyAdapter is _adapter.DSPyAdapter is snakepool.dspy.DSPyAdapter
    assert load_adapter_class("dspy") is _adapter.DSPyAdapter
    assert load_adapter_class("snakepool.adapters.dspy:DSPyAdapter") is _adapter.DSPyAdapter
    assert inspect.isclass(snakepool.dspy.Program)


def test_the_dspy_adapter_without_dspy_says_how_to_install_it() -> None:
    code = (
        "import sys; sys.modules['dspy'] = None\n"  # (as if not installed)
        "from snakepool.dspy import DSPyAdapter, Program\n"
        "try:\n"
        "    DSPyAdapter().setup({'cache_dir': '/nonexistent-sp-cache'})\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert "pip install 'snakepool[dspy]'" in out


# --- kinds on the socket wire ---------------------------------------------------------------


def test_failure_frames_carry_the_kind() -> None:
    for kind, cls in KINDS.items():
        if issubclass(cls, snakepool.RemoteError):
            exc: BaseException = cls("ValueError", "bad", "")
        else:
            exc = cls("it broke")
        wire = error_to_wire(7, exc)
        assert wire["k"] == kind
        back = error_from_wire(msgpack.unpackb(msgpack.packb(wire)))
        assert type(back) is cls or (
            isinstance(back, snakepool.RemoteError) and back.kind == kind
        ), (kind, back)
    assert "k" not in error_to_wire(1, ValueError("plain"))
    # the kind decides, not the class name
    back = error_from_wire({"t": "failure", "i": 1, "y": "Renamed", "k": "pool_overloaded"})
    assert type(back) is snakepool.PoolOverloaded
    # an older server (no k): the class name still works
    assert type(error_from_wire({"y": "CircuitOpen", "e": "x"})) is snakepool.CircuitOpen


@pytest.fixture
def socket_path() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="sp-"))
    yield directory / "s.sock"
    shutil.rmtree(directory, ignore_errors=True)


def _frame(message: dict[str, object]) -> bytes:
    body = msgpack.packb(message, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


async def _reply(stream: anyio.abc.SocketStream) -> dict[str, object]:
    data = b""
    while len(data) < 4 or len(data) < 4 + struct.unpack(">I", data[:4])[0]:
        data += await stream.receive()
    reply: dict[str, object] = msgpack.unpackb(data[4:], raw=False)
    return reply


@pytest.mark.anyio
async def test_the_socket_server_sends_kinds(socket_path: Path) -> None:
    from snakepool.server import SocketServer

    async with snakepool.Pool("sp_adapters:Stateful", size=1, name="general") as pool:
        server = SocketServer({"general": pool}, socket_path=socket_path)
        async with anyio.create_task_group() as tg:
            await tg.start(server.serve)
            stream = await anyio.connect_unix(socket_path)
            async with stream:
                await stream.send(_frame({"t": "hello", "v": 1}))
                assert (await _reply(stream))["t"] == "welcome"
                await stream.send(_frame({"t": "call", "i": 1, "p": "general", "c": "nope"}))
                failure = await _reply(stream)
                assert (failure["t"], failure["k"], failure["y"]) == (
                    "failure",
                    "unknown_command",
                    "UnknownCommand",
                )
                await stream.send(_frame({"t": "call", "i": 2, "p": "general", "c": "var"}))
                failure = await _reply(stream)  # (var's argument missing: a kind of its own)
                assert (failure["k"], failure["y"]) == ("bad_arguments", "BadArguments")
            async with snakepool.connect(socket_path) as client:
                with pytest.raises(snakepool.UnknownCommand) as info:
                    await client["general"].call("nope")
                assert info.value.kind == "unknown_command"
            tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_an_unknown_host_tool_reaches_the_worker_as_a_kind() -> None:
    async with snakepool.Pool("sp_surface_adapters:ToolKinds", size=1) as pool:
        answer = await pool.call("tool_failure", {"name": "nope"})
        assert (answer["type"], answer["kind"]) == ("snakepool.errors.UnknownTool", "unknown_tool")
        assert answer["message"].startswith("no host tool named 'nope' is registered")

        def broken() -> None:
            raise ValueError("tool exploded")

        def says_serializable() -> None:  # (its own TypeError: told apart by where, not text)
            raise TypeError("this is not JSON serializable")

        def unpackable() -> set[int]:
            return {1, 2}

        pool.register_tool("broken", broken)
        pool.register_tool("says_serializable", says_serializable)
        pool.register_tool("unpackable", unpackable)
        answer = await pool.call("tool_failure", {"name": "broken"})
        assert answer == {"type": "ValueError", "kind": None, "message": "tool exploded"}
        answer = await pool.call("tool_failure", {"name": "says_serializable"})
        assert answer == {
            "type": "TypeError",
            "kind": None,
            "message": "this is not JSON serializable",
        }
        answer = await pool.call("tool_failure", {"name": "unpackable"})
        assert answer["type"] == "TypeError"
        assert answer["message"].startswith(
            "result of host tool 'unpackable' is not MessagePack-serializable"
        ), answer
