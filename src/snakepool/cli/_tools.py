"""``snakepool doctor``, ``snakepool bench`` and ``snakepool new-adapter``."""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import keyword
import platform
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

from ..errors import SnakepoolError
from ..server._client import connect
from ._common import _OPTIONAL, _PACKAGES, _socket

if TYPE_CHECKING:
    pass


def _doctor(args: argparse.Namespace) -> int:
    from ..pool import discover_gpus

    problems = 0
    print(f"python      {platform.python_version()} ({sys.executable})")
    for name in _PACKAGES + _OPTIONAL:
        try:
            print(f"{name:<11} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            required = name in _PACKAGES
            problems += required
            hint = (
                "required: pip install snakepool"
                if required
                else f"optional: pip install 'snakepool[{name}]'"
            )
            print(f"{name:<11} missing ({hint})")
    gpus = discover_gpus()
    print(
        f"gpus        {', '.join(map(str, gpus)) if gpus else 'none (the gpu pool will be disabled)'}"
    )
    _doctor_isolation()
    socket_path = _socket(args)
    print(f"socket      {socket_path}: {anyio.run(_probe_socket, socket_path)}")
    for spec in ["generic", *args.adapter]:
        ok, detail = anyio.run(_round_trip, spec)
        problems += not ok
        print(f"adapter     {spec}: {detail}")
    print("ok" if not problems else f"{problems} problem(s) found")
    return 0 if not problems else 1


def _doctor_isolation() -> None:
    """What the pools' isolation options can have here (optional: never a problem)."""
    from ..pool._isolation import describe_support

    for feature, support in describe_support().items():
        print(f"isolation   {feature}: {support}")


async def _probe_socket(path: Path) -> str:
    if not path.exists():
        return "no server running (start one with 'snakepool up')"
    try:
        async with connect(path) as client:
            return f"a server answers, pools: {', '.join(client.pools)}"
    except (ConnectionError, SnakepoolError) as exc:
        return f"a stale socket, or not a snakepool server ({exc}); remove it or run 'snakepool up'"


async def _round_trip(spec: str) -> tuple[bool, str]:
    from ..pool import Pool

    try:
        async with Pool(spec, name="doctor", size=1, startup_timeout=60) as pool:
            answer = await pool.call("ping", timeout=30)
            pid = pool.statistics().workers[0].pid
    except Exception as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return False, f"FAILED: {first_line}"
    return answer == "pong", f"worker pid {pid} answered {answer!r}"


# --- bench --------------------------------------------------------------------------------


def _bench(args: argparse.Namespace) -> int:
    from .._bench import run_from_args

    return run_from_args(args, prog="snakepool bench")


# --- new-adapter --------------------------------------------------------------------------


#: The longest package name ``new-adapter`` writes.
ADAPTER_NAME_MAX_LENGTH = 64


#: Taken even where no module of that name is installed.
_RESERVED_ADAPTER_NAMES = {
    "test": "the standard library's regression tests ('test', absent from some builds)",
    "tests": "the generated package's own tests directory",
}


def _adapter_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a Python package name at all, or ``None``."""
    if len(name) > ADAPTER_NAME_MAX_LENGTH:
        return f"{name[:20]!r}... is {len(name)} characters long; at most {ADAPTER_NAME_MAX_LENGTH}"
    if not name.isascii() or not name.isidentifier() or name != name.lower():
        return f"{name!r} must be a lower-case ASCII Python identifier (a-z, 0-9, _)"
    if keyword.iskeyword(name):
        return f"{name!r} is a Python keyword"
    return None


def _adapter_name_shadows(name: str) -> str | None:
    """What an adapter package called ``name`` would shadow, or ``None``.

    A package named like a module that already exists (``json``, ``os``, ``site``,
    ``test``, ``snakepool``, anything installed or on the path, a built-in adapter's
    entry point) would hide it from every program run next to it: the generated
    package's own test would import the wrong module, or hang.
    """
    if name in sys.stdlib_module_names or name in sys.builtin_module_names:
        return f"{name!r} would shadow the standard library module {name!r}"
    if name == "snakepool":
        return "'snakepool' would shadow snakepool itself"
    if name in _RESERVED_ADAPTER_NAMES:
        return f"{name!r} would shadow {_RESERVED_ADAPTER_NAMES[name]}"
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError) as exc:  # a broken module of that name: still taken
        return f"{name!r} would shadow an importable module of that name ({exc})"
    if spec is not None:
        where = spec.origin or ", ".join(spec.submodule_search_locations or ()) or "?"
        return f"{name!r} would shadow the importable module {name!r} ({where})"
    if any(ep.name == name for ep in importlib.metadata.entry_points(group="snakepool.adapters")):
        return f"{name!r} is already an adapter's name (entry point group snakepool.adapters)"
    return None


def _new_adapter(args: argparse.Namespace) -> int:
    name = args.name
    problem = _adapter_name_problem(name)
    if problem is not None:
        print(f"snakepool new-adapter: {problem}; choose another name", file=sys.stderr)
        return 2
    root = Path(args.directory) / name
    if root.exists():
        print(f"snakepool new-adapter: {root} already exists; nothing was written", file=sys.stderr)
        return 1
    problem = _adapter_name_shadows(name)
    if problem is not None:
        print(f"snakepool new-adapter: {problem}; choose another name", file=sys.stderr)
        return 2
    class_name = "".join(part.capitalize() for part in name.split("_")) + "Adapter"
    for relative, text in _scaffold(name, class_name).items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    print(f"created {root}: cd {root} && pip install -e . && python -m pytest")
    return 0


def _scaffold(name: str, class_name: str) -> dict[str, str]:
    return {
        "pyproject.toml": textwrap.dedent(f"""\
            [build-system]
            requires = ["setuptools>=77"]
            build-backend = "setuptools.build_meta"

            [project]
            name = "{name}"
            version = "0.1.0"
            requires-python = ">=3.11"
            dependencies = ["snakepool"]

            [project.optional-dependencies]
            test = ["pytest"]

            [project.entry-points."snakepool.adapters"]
            {name} = "{name}.adapter:{class_name}"

            [tool.setuptools.packages.find]
            include = ["{name}*"]
            """),
        f"{name}/__init__.py": f'"""The {name} snakepool adapter."""\n\nfrom .adapter import {class_name} as {class_name}\n\n__all__ = ["{class_name}"]\n',
        f"{name}/adapter.py": textwrap.dedent(f'''\
            """Worker-side code: one instance of {class_name} lives in each worker process."""

            from __future__ import annotations

            from collections.abc import Iterator
            from typing import Any

            from snakepool.adapters import Adapter, CallContext, command


            class {class_name}(Adapter):
                def setup(self, config: dict[str, Any]) -> None:
                    """Once per worker; ``config`` is the pool's adapter_config."""
                    self.greeting = config.get("greeting", "hello")

                @command
                def greet(self, name: str) -> str:
                    """Greet ``name``."""
                    return f"{{self.greeting}}, {{name}}"

                @command
                def count(self, n: int) -> Iterator[int]:
                    """Stream 0..n-1."""
                    yield from range(n)

                @command
                def remember(self, key: str, value: Any, ctx: CallContext) -> None:
                    """Keep ``value`` in the session (it survives this worker)."""
                    ctx.session_state[key] = value
                    ctx.save_state(key, value)

                @command
                def recall(self, key: str, ctx: CallContext) -> Any:
                    return ctx.session_state.get(key)

                def restore_session(self, ctx: CallContext, state: dict[str, Any]) -> None:
                    ctx.session_state.update(state)
            '''),
        "tests/test_adapter.py": textwrap.dedent(f'''\
            """Runs the adapter in real worker processes."""

            import anyio

            import snakepool


            def test_greet_count_and_session() -> None:
                async def main() -> None:
                    async with snakepool.Pool("{name}", size=1, adapter_config={{"greeting": "hi"}}) as pool:
                        assert await pool.call("greet", {{"name": "Ada"}}) == "hi, Ada"
                        assert [i async for i in pool.stream("count", {{"n": 3}})] == [0, 1, 2]
                        async with pool.session() as session:
                            await session.call("remember", {{"key": "k", "value": 42}})
                            assert await session.call("recall", {{"key": "k"}}) == 42

                anyio.run(main)
            '''),
        "README.md": f"# {name}\n\nA snakepool adapter. `pip install -e .` registers it as `{name}`:\n\n"
        f'```python\nasync with snakepool.Pool("{name}") as pool:\n    await pool.call("greet", {{"name": "Ada"}})\n```\n',
    }
