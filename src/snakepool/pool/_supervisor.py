"""``Supervisor``: several named pools from one config, started and closed together.

A config maps pool names to ``Pool`` keyword arguments::

    session_store = "memory"          # default for pools that set none

    [pools.general]
    adapter = "generic"
    size = 8

Everything is checked when the ``Supervisor`` is built (every ``Pool`` is
constructed, which validates its arguments and starts nothing), so a bad config
fails before any process exists, with a ``ConfigError`` naming the file, the
line, the pool and the key.

The keys of a pool's table are ``PoolConfig``'s options (but ``name``, the
table's name). Environment variables ``SNAKEPOOL_<POOL>_<OPTION>`` override
any of them (``SNAKEPOOL_GENERAL_SIZE=4``, ``SNAKEPOOL_GENERAL_CALL_TIMEOUT=none``),
read as ``PoolConfig`` says (``OPTIONS[...].env``), for the pools a config
defines; ``<POOL>`` is the pool's name upper-cased, with every
character other than a letter or digit (``-``, ``.``) replaced by ``_``.
A misspelt override is never silently ignored: an unknown knob of a pool
the config defines, or a pool name that is a near miss of one, is a
``ConfigError`` naming the variable (with a did-you-mean); an override for a
pool this config does not have at all (maybe meant for another config) is
logged as a warning.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
import tomllib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Self

import anyio

from ..errors import ConfigError as ConfigError
from ._config import OPTIONS, THREAD_ENV_VARS, did_you_mean, suggest
from ._events import PoolStatistics
from ._lifecycle import Lifecycle, LifecycleOwner
from ._pool import Pool
from ._store import SessionStore

__all__ = ["DEFAULT_CONFIG_TOML", "ConfigError", "Supervisor", "SupervisorStatistics"]

_log = logging.getLogger("snakepool.supervisor")

#: Keys a pool's table may hold: every ``PoolConfig`` option but ``name``
#: (a pool's name is its table's name).
POOL_KEYS: tuple[str, ...] = tuple(sorted(name for name in OPTIONS if name != "name"))
#: Top-level keys of a config file.
TOP_LEVEL_KEYS: tuple[str, ...] = ("pools", "session_store")

#: ``SNAKEPOOL_<POOL>_<KNOB>`` overrides: knob (``CALL_TIMEOUT``) -> option (``call_timeout``);
#: every option that ``PoolConfig`` lets the environment set (how: ``OPTIONS[option].env``).
ENV_OVERRIDES: Mapping[str, str] = {
    name.upper(): name for name, option in OPTIONS.items() if option.env is not None
}
#: ``SNAKEPOOL_*`` variables that are not pool overrides: read by other parts of
#: snakepool (the CLI's socket, the runtime directory) or set for workers.
OTHER_VARIABLES: frozenset[str] = frozenset(
    {
        "SNAKEPOOL_SOCKET",
        "SNAKEPOOL_RUNTIME_DIR",
        "SNAKEPOOL_HOST_PID",
        "SNAKEPOOL_POOL",
        "SNAKEPOOL_WORKER_ID",
    }
)

_DEFAULT_TEMPLATE = """\
# snakepool's embedded default configuration (what `snakepool up` runs without --config).
# Every key of a [pools.NAME] table is a Pool option (name: the table's name); the
# environment variable SNAKEPOOL_<POOL>_<OPTION> overrides any of them, e.g.
# SNAKEPOOL_GENERAL_SIZE=4 or SNAKEPOOL_OPTIMIZER_CALL_TIMEOUT=none.

# Where sessions live, for pools that set none: "memory" or a redis:// URL.
session_store = "memory"

# Short general-purpose calls: one single-threaded worker per CPU.
[pools.general]
adapter = "generic"
size = {cpus}  # os.cpu_count() on this machine

# Long, heavy jobs (optimizers, compilers): one worker that may use every CPU.
[pools.optimizer]
adapter = "generic"
size = 1
call_timeout = 3600
max_memory_mb = 8192
# Its only worker may use every CPU (workers of other pools get 1 thread each).
env = {{ {thread_env} }}

# One worker per visible GPU, pinned with CUDA_VISIBLE_DEVICES; without a GPU
# this pool exists but is disabled (its calls raise PoolDisabled).
[pools.gpu]
adapter = "generic"
gpus = "auto"
workers_per_gpu = 1
"""


def _render_default(cpus: int) -> str:
    thread_env = ", ".join(f'{var} = "{cpus}"' for var in THREAD_ENV_VARS)
    return _DEFAULT_TEMPLATE.format(cpus=cpus, thread_env=thread_env)


#: The default config as TOML (CPU counts filled in for this machine);
#: ``Supervisor.default()`` loads exactly this text.
DEFAULT_CONFIG_TOML: str = _render_default(os.cpu_count() or 1)


@dataclass(frozen=True, slots=True)
class SupervisorStatistics:
    """A snapshot of every pool of a supervisor, by name."""

    pools: Mapping[str, PoolStatistics]


class _Source:
    """Where a config came from: locates keys in a file's text for error messages."""

    def __init__(self, path: str | None = None, text: str | None = None) -> None:
        self.path = path
        self.lines = text.splitlines() if text is not None else []

    def error(
        self,
        problem: str,
        *,
        pool: str | None = None,
        key: str | None = None,
        line: int | None = None,
        top_level: bool = False,
    ) -> ConfigError:
        if line is None and self.path is not None:
            line = self._top_level_line(key) if top_level else self._pool_line(pool, key)
        where = ""
        if self.path is not None:
            where = f"{self.path}:{line}: " if line is not None else f"{self.path}: "
        subject = ""
        if pool is not None:
            subject = f"pool {pool!r}, key {key!r}: " if key is not None else f"pool {pool!r}: "
        return ConfigError(
            f"{where}{subject}{problem}", path=self.path, line=line, pool=pool, key=key
        )

    # --- finding lines (tomllib gives none) --------------------------------------

    def _first(self, pattern: re.Pattern[str], start: int = 0, stop: int | None = None) -> int:
        """0-based index of the first matching line in [start, stop), or -1."""
        for index in range(start, len(self.lines) if stop is None else stop):
            if pattern.match(self.lines[index]):
                return index
        return -1

    def _top_level_line(self, key: str | None) -> int | None:
        if key is None:
            return None
        k = _key_pattern(key)
        found = self._first(re.compile(rf"\s*(?:{k}\s*[=.]|\[\[?\s*{k}\s*[.\]])"))
        return found + 1 if found >= 0 else None

    def _pool_line(self, pool: str | None, key: str | None) -> int | None:
        if pool is None:
            return self._top_level_line(key)
        name = _key_pattern(pool)
        header = self._first(re.compile(rf"\s*\[\s*pools\s*\.\s*{name}\s*\]"))
        if header < 0:  # dotted keys (pools.NAME.key = ...) or an inline table in [pools]
            found = self._first(re.compile(rf"\s*(?:pools\s*\.\s*{name}\s*[.=]|{name}\s*=\s*\{{)"))
            return found + 1 if found >= 0 else None
        if key is None:
            return header + 1
        k = _key_pattern(key)
        section_end = self._first(re.compile(r"\s*\["), header + 1)
        found = self._first(
            re.compile(rf"\s*{k}\s*[=.]"), header + 1, section_end if section_end >= 0 else None
        )
        if found < 0:  # a sub-table: [pools.NAME.env]
            found = self._first(re.compile(rf"\s*\[\s*pools\s*\.\s*{name}\s*\.\s*{k}\s*\]"))
        return (found if found >= 0 else header) + 1


def _key_pattern(key: str) -> str:
    """A TOML key as written: bare, "double-quoted" or 'single-quoted'."""
    escaped = re.escape(key)
    return rf"(?:{escaped}(?![\w-])|\"{escaped}\"|'{escaped}')"


def _env_prefix(pool: str) -> str:
    return "SNAKEPOOL_" + re.sub(r"[^A-Za-z0-9]", "_", pool).upper() + "_"


def _offending_key(message: str, keys: tuple[str, ...]) -> str | None:
    """The argument a Pool/PoolConfig error is about (their messages start with it)."""
    candidates = set(keys)
    first = re.match(r"\s*(\w+)", message)
    if first and first.group(1) in candidates:
        return first.group(1)
    positions = {
        key: match.start()
        for key in candidates
        if (match := re.search(rf"(?<![\w.]){re.escape(key)}(?!\w)", message))
    }
    return min(positions, key=positions.__getitem__) if positions else None


class Supervisor(LifecycleOwner):
    """Named pools started and closed together.

    ``Supervisor({"general": {"adapter": "generic", "size": 4}})``, or
    ``Supervisor.from_file(path)`` (TOML), or ``Supervisor.default()``; then
    ``async with sup:`` and ``sup["general"]`` is a started ``Pool``.
    """

    def __init__(
        self,
        pools: Mapping[str, Mapping[str, Any]],
        *,
        session_store: str | None = None,
    ) -> None:
        self._build(pools, session_store, _Source())

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Self:
        """Load a TOML config: ``session_store`` and ``[pools.NAME]`` tables."""
        where = os.fspath(path)
        try:
            with open(where, "rb") as file:
                raw = file.read()
        except OSError as exc:
            raise ConfigError(
                f"{where}: cannot read the config file: {exc.strerror or exc}", path=where
            ) from exc
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{where}: not UTF-8 text: {exc}", path=where) from exc
        return cls._from_text(text, _Source(where, text))

    @classmethod
    def default(cls) -> Self:
        """The embedded default config (``DEFAULT_CONFIG_TOML``): general, optimizer, gpu."""
        return cls._from_text(DEFAULT_CONFIG_TOML, _Source("<default config>", DEFAULT_CONFIG_TOML))

    @classmethod
    def _from_text(cls, text: str, source: _Source) -> Self:
        try:
            document = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            found = re.search(r"at line (\d+)", str(exc))
            raise ConfigError(
                f"{source.path}: invalid TOML: {exc}",
                path=source.path,
                line=int(found.group(1)) if found else None,
            ) from exc
        for key in document:
            if key not in TOP_LEVEL_KEYS:
                raise source.error(
                    f"unknown top-level key {key!r}{did_you_mean(key, TOP_LEVEL_KEYS)}; "
                    f"valid keys: {', '.join(TOP_LEVEL_KEYS)} (pools go in [pools.NAME] tables)",
                    key=key,
                    top_level=True,
                )
        pools = document.get("pools", {})
        if not isinstance(pools, dict):
            raise source.error(
                "'pools' must be a table of [pools.NAME] tables", key="pools", top_level=True
            )
        session_store = document.get("session_store")
        if session_store is not None and not isinstance(session_store, str):
            raise source.error(
                f"session_store must be a string ('memory' or a redis:// URL), "
                f"got {type(session_store).__name__}",
                key="session_store",
                top_level=True,
            )
        supervisor = cls.__new__(cls)
        supervisor._build(pools, session_store, source)
        return supervisor

    def _build(
        self,
        pools: Mapping[str, Mapping[str, Any]],
        session_store: str | None,
        source: _Source,
    ) -> None:
        self.source: str | None = source.path
        self._lifecycle = Lifecycle("the supervisor", "Supervisor")
        if not isinstance(pools, Mapping):
            raise ConfigError(f"pools must be a mapping of name -> Pool arguments, got {pools!r}")
        if not pools:
            raise source.error("no pools configured (add a [pools.NAME] table)")
        if session_store is not None and not isinstance(session_store, str):
            raise source.error(
                f"session_store must be a string ('memory' or a redis:// URL), got {session_store!r}",
                key="session_store",
                top_level=True,
            )
        for name in pools:
            if not isinstance(name, str):
                raise ConfigError(f"pool names must be strings, got {name!r}")
        _check_env_variables(list(pools), os.environ)
        built: dict[str, Pool] = {}
        for name, settings in pools.items():
            built[name] = self._build_pool(name, settings, session_store, source)
        self._pools = built
        self._pools_view: Mapping[str, Pool] = MappingProxyType(built)

    @staticmethod
    def _build_pool(
        name: str, settings: object, session_store: str | None, source: _Source
    ) -> Pool:
        if not isinstance(settings, Mapping):
            raise source.error(
                f"must be a table of Pool arguments, got {type(settings).__name__}", pool=name
            )
        kwargs: dict[str, Any] = dict(settings)
        for key in kwargs:
            if not isinstance(key, str) or key not in POOL_KEYS:
                why = (
                    "the pool's name is its table's name; drop 'name'"
                    if key == "name"
                    else f"unknown key {key!r}{did_you_mean(str(key), POOL_KEYS)}"
                )
                raise source.error(
                    f"{why}; valid keys: {', '.join(POOL_KEYS)}", pool=name, key=str(key)
                )
        overridden = _apply_env_overrides(name, kwargs)
        if session_store is not None:
            kwargs.setdefault("session_store", session_store)
        if "adapter" not in kwargs:
            raise source.error(
                "'adapter' is required ('module:Class' or an entry-point name such as 'generic')",
                pool=name,
            )
        _check_extra_types(kwargs, lambda key, problem: source.error(problem, pool=name, key=key))
        try:
            return Pool(name=name, **kwargs)
        except Exception as exc:
            culprit = _offending_key(str(exc), (*kwargs, "name"))
            if culprit in overridden:
                variable = overridden[culprit]
                raise ConfigError(
                    f"environment variable {variable}={os.environ.get(variable)!r} "
                    f"(pool {name!r}, key {culprit!r}): {exc}",
                    pool=name,
                    key=culprit,
                    variable=variable,
                ) from exc
            raise source.error(str(exc), pool=name, key=culprit) from exc

    # --- lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        """Start every pool in parallel; if one fails, close the others and raise its error."""
        lifecycle = self._lifecycle
        lifecycle.begin_start()  # (PoolClosed once closed: it runs once)
        errors: list[BaseException] = []
        try:
            async with anyio.create_task_group() as tg:

                async def start_one(pool: Pool) -> None:
                    try:
                        await pool.start()
                    except Exception as exc:
                        if not errors:
                            _log.error(
                                "pool %s failed to start: %s",
                                pool.name,
                                (str(exc).splitlines() or [repr(exc)])[0],
                            )
                        errors.append(exc)
                        tg.cancel_scope.cancel()  # the others stop starting; closed below

                for pool in self._pools.values():
                    tg.start_soon(start_one, pool)
            if errors:
                raise errors[0]
            lifecycle.started()
        except BaseException:
            lifecycle.start_failed()
            try:
                with anyio.CancelScope(shield=True):
                    await self._close_pools()
            finally:
                lifecycle.closed(broken=True)
            raise

    async def aclose(self) -> None:
        """Close every pool in parallel (draining in-flight calls); idempotent."""
        with anyio.CancelScope(shield=True):
            if await self._lifecycle.begin_close() is None:  # closed already, or by another task
                return
            try:
                await self._close_pools()  # (never started: each pool closes its store)
            finally:
                self._lifecycle.closed()

    async def _close_pools(self) -> None:
        errors: list[Exception] = []

        async def close_one(pool: Pool) -> None:
            try:
                await pool.aclose()
            except Exception as exc:
                _log.exception("closing pool %s failed", pool.name)
                errors.append(exc)

        async with anyio.create_task_group() as tg:
            for pool in self._pools.values():
                tg.start_soon(close_one, pool)
        if errors:
            raise errors[0]

    # --- the pools -------------------------------------------------------------------

    @property
    def pools(self) -> Mapping[str, Pool]:
        """Name -> ``Pool`` (read-only)."""
        return self._pools_view

    def __getitem__(self, name: str) -> Pool:
        try:
            return self._pools[name]
        except KeyError:
            raise KeyError(
                f"no pool named {name!r}; this supervisor has: {', '.join(self._pools)}"
            ) from None

    def __contains__(self, name: object) -> bool:
        return name in self._pools

    def __iter__(self) -> Iterator[str]:
        return iter(self._pools)

    def __len__(self) -> int:
        return len(self._pools)

    def statistics(self) -> SupervisorStatistics:
        """A frozen snapshot of every pool."""
        return SupervisorStatistics(
            pools=MappingProxyType({name: pool.statistics() for name, pool in self._pools.items()})
        )

    def __repr__(self) -> str:
        return f"<Supervisor {self._lifecycle} pools={list(self._pools)}>"


def _apply_env_overrides(pool: str, kwargs: dict[str, Any]) -> dict[str, str]:
    """Apply ``SNAKEPOOL_<POOL>_<KNOB>`` to ``kwargs``; returns key -> variable applied."""
    prefix = _env_prefix(pool)
    applied: dict[str, str] = {}
    for knob, key in ENV_OVERRIDES.items():
        variable = prefix + knob
        raw = os.environ.get(variable)
        if raw is None or not raw.strip():
            continue
        how = OPTIONS[key].env
        assert how is not None
        try:
            kwargs[key] = how.parse(raw.strip())
        except ValueError:
            raise ConfigError(
                f"environment variable {variable}={raw!r} (pool {pool!r}, key {key!r}): "
                f"expected {how.expected}",
                pool=pool,
                key=key,
                variable=variable,
            ) from None
        applied[key] = variable
    return applied


def _check_env_variables(pools: list[str], environ: Mapping[str, str]) -> None:
    """Refuse ``SNAKEPOOL_<POOL>_<KNOB>`` variables that look like misspelt overrides.

    Applied overrides and snakepool's other variables pass. An unknown knob
    of one of ``pools``, or a pool name close to one of theirs, is a
    ``ConfigError`` (a silently ignored override is a production footgun:
    the pool runs with settings nobody asked for). A variable shaped like an
    override of a pool that is nowhere near these (another config's pool)
    is only logged.
    """
    prefixes = {_env_prefix(pool): pool for pool in pools}
    for variable in sorted(environ):
        if not variable.startswith("SNAKEPOOL_") or variable in OTHER_VARIABLES:
            continue
        if not environ[variable].strip():  # (empty: ignored, as an unset override)
            continue
        ours = [prefix for prefix in prefixes if variable.startswith(prefix)]
        if any(variable[len(prefix) :] in ENV_OVERRIDES for prefix in ours):
            continue  # an override, applied
        shaped = [k for k in ENV_OVERRIDES if variable.endswith("_" + k)]
        if ours:
            prefix = max(ours, key=len)
            pool, rest = prefixes[prefix], variable[len(prefix) :]
            why = None
            if rest.lower() in OPTIONS:  # (one the environment cannot set)
                why = f"{rest.lower()!r} cannot be set from the environment" + (
                    " (a pool's name is its table's name)" if rest == "NAME" else ""
                )
            elif not shaped:  # (SNAKEPOOL_MY_POOL_SIZE may be pool my-pool's, not my's)
                meant = suggest(rest.lower(), tuple(ENV_OVERRIDES.values()))
                why = f"unknown knob {rest!r}" + (
                    f" (did you mean {meant.upper()!r}?)" if meant is not None else ""
                )
            if why is not None:
                raise ConfigError(
                    f"environment variable {variable} (pool {pool!r}): {why}; "
                    f"{prefix}<OPTION> overrides any option of the pool but NAME "
                    f"({prefix}SIZE, {prefix}CALL_TIMEOUT, ...: see PoolConfig)",
                    pool=pool,
                    variable=variable,
                )
        if not shaped:
            continue  # not shaped like an override: not ours to judge
        knob = max(shaped, key=len)  # (WORKERS_PER_GPU, not a shorter knob it ends with)
        written = variable[len("SNAKEPOOL_") : -len(knob) - 1]
        names = {prefix[len("SNAKEPOOL_") : -1]: pool for prefix, pool in prefixes.items()}
        close = difflib.get_close_matches(written, list(names), n=1)
        listing = ", ".join(f"{pool!r} ({prefix}<KNOB>)" for prefix, pool in prefixes.items())
        if close:
            raise ConfigError(
                f"environment variable {variable}: this config has no pool named like "
                f"{written!r} (did you mean SNAKEPOOL_{close[0]}_{knob}, for pool "
                f"{names[close[0]]!r}?); its pools: {listing}",
                variable=variable,
            )
        _log.warning(
            "environment variable %s is ignored: it sets %s of a pool spelled %r, and this "
            "config has none; its pools: %s",
            variable,
            knob,
            written,
            listing,
        )


def _check_extra_types(kwargs: Mapping[str, Any], error: Callable[[str, str], ConfigError]) -> None:
    """Types PoolConfig leaves to the worker launch; a config file must get them right now."""
    for key in ("python", "cwd"):
        value = kwargs.get(key)
        if value is not None and not isinstance(value, str | os.PathLike):
            raise error(key, f"{key} must be a string (a path), got {type(value).__name__}")
    if "session_store" in kwargs and not isinstance(kwargs["session_store"], str):
        value = kwargs["session_store"]
        if not isinstance(value, SessionStore):
            raise error(
                "session_store",
                f"session_store must be 'memory' or a redis:// URL, got {type(value).__name__}",
            )
    for key in ("pythonpath", "preload"):
        value = kwargs.get(key)
        if (
            value is not None
            and not isinstance(value, str | bytes)
            and (
                not isinstance(value, list | tuple)
                or not all(isinstance(v, str | os.PathLike) for v in value)
            )
        ):
            raise error(key, f"{key} must be a list of strings, got {value!r}")
