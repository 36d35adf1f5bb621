"""Validated pool settings and how a worker process is launched from them."""

from __future__ import annotations

import difflib
import json
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

from .. import protocol as p
from ..errors import ErrorCategory
from ._isolation import check_options as check_isolation_options
from ._isolation import inherited_env
from ._isolation import worker_env as isolation_env
from ._launch import WorkerLaunch
from ._ray_options import check_ray_options
from ._recovery import Recovery, recovery_table

__all__ = [
    "AFFINITY_MODES",
    "BACKENDS",
    "OPTIONS",
    "OPTION_ALIASES",
    "START_METHODS",
    "THREAD_ENV_VARS",
    "FromEnv",
    "Option",
    "PoolConfig",
    "did_you_mean",
    "discover_gpus",
    "options_docstring",
    "options_table",
    "suggest",
]

AFFINITY_MODES = ("hint", "strict_queue", "strict_fail_fast")
#: How workers start: "forkserver" forks them from a template process that
#: imported the adapter (and ``preload``) once; "spawn" starts a fresh
#: interpreter each; "auto" is forkserver where that is possible and safe.
START_METHODS = ("auto", "forkserver", "spawn")
#: Where the workers run: subprocesses of this host, or Ray actors (``_ray``).
BACKENDS = ("local", "ray")
#: Set to 1 in every worker unless the pool's env says otherwise:
#: N workers x N BLAS threads each would overload the machine.
THREAD_ENV_VARS = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
)
_SNAKEPOOL_SRC = str(Path(__file__).resolve().parents[2])

#: Names other pool libraries use for a snakepool option (concurrent.futures,
#: multiprocessing, loky, Celery, Ray, ...): a misspelt option suggests these
#: before close spellings (``max_workers`` is ``size``, not ``max_requests``).
OPTION_ALIASES: Mapping[str, str] = {
    "max_workers": "size",
    "processes": "size",
    "num_workers": "size",
    "n_workers": "size",
    "workers": "size",
    "pool_size": "size",
    "concurrency": "size",
    "timeout": "call_timeout",
    "task_timeout": "call_timeout",
    "max_tasks_per_child": "max_requests",
    "maxtasksperchild": "max_requests",
    "max_tasks_per_worker": "max_requests",
    "initializer": "adapter",
    "executable": "python",
    "max_queue_size": "queue_size",
}


def suggest(key: str, valid: Sequence[str]) -> str | None:
    """The option an unknown ``key`` probably meant, or ``None``.

    Known names from other libraries first (``OPTION_ALIASES``), then the
    closest spelling.
    """
    alias = OPTION_ALIASES.get(key)
    if alias is None:
        alias = OPTION_ALIASES.get(key.lower().replace("-", "_"))
    if alias is not None and alias in valid:
        return alias
    close = difflib.get_close_matches(key, list(valid), n=1)
    return close[0] if close else None


def did_you_mean(key: str, valid: Sequence[str]) -> str:
    """`` (did you mean 'size'?)`` for an unknown option, or ``""`` (see ``suggest``)."""
    found = suggest(key, valid)
    return f" (did you mean {found!r}?)" if found is not None else ""


# --- how an option is declared ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FromEnv:
    """How the text of a ``SNAKEPOOL_<POOL>_<OPTION>`` variable becomes an option's value."""

    #: What the text must be, for errors: "expected an int or 'none'".
    expected: str
    #: The same, for the README's table.
    shown: str
    #: Text -> value; ``ValueError`` when the text is not what ``expected`` says.
    parse: Callable[[str], object]


def _or_none(parse: Callable[[str], object]) -> Callable[[str], object]:
    return lambda text: None if text.lower() == "none" else parse(text)


def _number(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(text)
    return number


def _bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)


def _json(kind: type) -> Callable[[str], object]:
    def parse(text: str) -> object:
        value = json.loads(text)  # (json.JSONDecodeError is a ValueError)
        if not isinstance(value, kind):
            raise ValueError(text)
        return value

    return parse


def _list(separator: str) -> Callable[[str], object]:
    """``a<sep>b`` or a JSON list (``[]``: none)."""

    def parse(text: str) -> object:
        if text.startswith("["):
            return _json(list)(text)
        return [part.strip() for part in text.split(separator) if part.strip()]

    return parse


def _gpus(text: str) -> object:
    if text.lower() in ("none", "auto"):
        return None if text.lower() == "none" else "auto"
    entries = _list(",")(text)
    assert isinstance(entries, list)
    return [entry if isinstance(entry, int) else int(entry) for entry in entries]


INT = FromEnv("an int", "int", int)
INT_OR_NONE = FromEnv("an int or 'none'", "int or `none`", _or_none(int))
FLOAT = FromEnv("a number", "number", _number)
FLOAT_OR_NONE = FromEnv("a number or 'none'", "number or `none`", _or_none(_number))
STR = FromEnv("a string", "text", str)
STR_OR_NONE = FromEnv("a string or 'none'", "text or `none`", _or_none(str))
BOOL = FromEnv("true or false", "`true` or `false`", _bool)
JSON_OBJECT_OR_NONE = FromEnv(
    "a JSON object or 'none'", "JSON object or `none`", _or_none(_json(dict))
)
PATHS = FromEnv(
    f"directories separated by {os.pathsep!r}, or a JSON list",
    "like `PYTHONPATH`, or JSON list",
    _list(os.pathsep),
)
PATHS_OR_NONE = FromEnv(
    f"'none', or paths separated by {os.pathsep!r}, or a JSON list",
    "`none`, like `PYTHONPATH`, or JSON list",
    _or_none(_list(os.pathsep)),
)
NAMES = FromEnv("names separated by ',', or a JSON list", "`name,name` or JSON list", _list(","))
GPUS = FromEnv(
    "'auto', 'none', or device indices separated by ','", "`auto`, `none` or `0,1`", _gpus
)

_T = TypeVar("_T")
_META = "snakepool.option"


@dataclass(frozen=True, slots=True)
class _About:
    doc: str
    env: FromEnv | None
    note: str


def option(default: _T, doc: str, *, env: FromEnv | None, note: str = "") -> _T:
    """A ``PoolConfig`` field: its default, a one-line ``doc``, how ``SNAKEPOOL_<POOL>_<OPTION>``
    text is read (``env=None``: it cannot be set from the environment), and a ``note`` shown
    after the default in the docs (``"s"``, ``"= os.cpu_count()"``)."""
    return field(default=default, metadata=_about(doc, env=env, note=note))


def _about(doc: str, *, env: FromEnv | None, note: str = "") -> dict[str, _About]:
    """The metadata of a required field (``field(metadata=_about(...))``)."""
    return {_META: _About(doc, env, note)}


@dataclass(frozen=True)
class PoolConfig:
    """Every ``Pool`` option, declared once here, checked once; errors name the option.

    Each field is an option: its default, its doc and how an environment
    override reads it. ``Pool(...)`` takes them as keyword arguments, a
    ``[pools.NAME]`` table of ``pools.toml`` as keys (but ``name``: the
    table's name) and ``SNAKEPOOL_<POOL>_<OPTION>`` variables override them;
    ``OPTIONS`` lists them and ``options_table()`` is the README's table.
    """

    adapter: str = field(
        metadata=_about(
            '`"module:Class"`, an entry-point name (`generic`, `dspy`, `sklearn`), or the '
            "class itself (defined in an importable module, not in `__main__`)",
            env=STR,
        )
    )
    name: str = option(
        "default",
        "the pool's name (logs, events, Redis keys); in `pools.toml`, its table's name",
        env=None,
    )
    size: int | None = option(None, "worker processes", env=INT_OR_NONE, note="= `os.cpu_count()`")
    python: str | None = option(
        None,
        "the workers' interpreter (another venv is fine)",
        env=STR_OR_NONE,
        note="= this interpreter",
    )
    env: Mapping[str, str] | None = option(
        None,
        "extra environment variables for the workers (`OMP_NUM_THREADS` and friends default to 1)",
        env=JSON_OBJECT_OR_NONE,
    )
    cwd: str | os.PathLike[str] | None = option(  # noqa: RUF009 (option() is a field())
        None, "the workers' working directory", env=STR_OR_NONE, note="= the host's"
    )
    pythonpath: Sequence[str | os.PathLike[str]] = option(
        (), "directories prepended to the workers' `sys.path`", env=PATHS
    )
    adapter_config: Mapping[str, Any] | None = option(
        None, "the dict `Adapter.setup(config)` receives", env=JSON_OBJECT_OR_NONE, note="= `{}`"
    )
    worker_concurrency: int = option(
        1,
        "calls one worker runs at once (threads for sync handlers, tasks for async ones)",
        env=INT,
    )
    startup_timeout: float = option(
        30.0, "for a worker to start and answer its handshake", env=FLOAT, note="s"
    )
    call_timeout: float | None = option(
        None,
        "seconds a call may take, queueing included (a call's `timeout=` overrides it); like "
        "`concurrent.futures`, Ray and Celery, no limit unless you set one",
        env=FLOAT_OR_NONE,
        note="= no limit",
    )
    queue_size: int = option(
        1000,
        "calls that may *wait* for a worker: those in the pool's queue and those sent ahead to "
        "a busy worker that has not started them; one more is refused at once with "
        "`PoolOverloaded`",
        env=INT,
    )
    max_requests: int | None = option(
        None, "recycle a worker after this many calls (with jitter)", env=INT_OR_NONE
    )
    max_memory_mb: float | None = option(
        None, "recycle a worker whose process tree's RSS goes over this", env=FLOAT_OR_NONE
    )
    worker_ttl: float | None = option(
        None, "recycle a worker after this many seconds (with jitter)", env=FLOAT_OR_NONE
    )
    health_interval: float = option(
        5.0,
        "how often each worker is pinged (and its TTL and memory checked)",
        env=FLOAT,
        note="s",
    )
    health_timeout: float = option(
        5.0,
        "a worker that does not answer a ping within this is killed and replaced",
        env=FLOAT,
        note="s",
    )
    affinity: str = option(
        "hint",
        'sessions: `"hint"`, `"strict_queue"` or `"strict_fail_fast"` (see Sessions)',
        env=STR,
    )
    session_ttl: float = option(
        3600.0, "a session expires after this long unused (sliding)", env=FLOAT, note="s"
    )
    max_sessions: int = option(
        10_000, "live sessions; creating one more raises `PoolOverloaded`", env=INT
    )
    breaker_threshold: int = option(
        5, "consecutive infrastructure failures that open the circuit breaker", env=INT
    )
    breaker_reset_timeout: float = option(
        30.0, "how long the breaker stays open before one probe call", env=FLOAT, note="s"
    )
    max_frame_bytes: int = option(
        p.DEFAULT_MAX_FRAME_BYTES,
        "the largest frame (arguments or result) either side accepts",
        env=INT,
        note="(64 MiB)",
    )
    gpus: str | Sequence[int] | None = option(
        None, '`None` (no pinning), `"auto"` or a list of device indices', env=GPUS
    )
    workers_per_gpu: int = option(1, "workers per GPU when `gpus` is set", env=INT)
    preload: Sequence[str] = option(
        (), "modules the template imports once before forking workers", env=NAMES
    )
    session_store: str = option(
        "memory", '`"memory"` or a `redis://` URL (or a `SessionStore`)', env=STR
    )
    backend: str = option(
        "local",
        '`"local"`: worker subprocesses on this machine; `"ray"`: each worker a Ray actor '
        "placed across a cluster (see docs/scaling.md)",
        env=STR,
    )
    ray: Mapping[str, Any] | None = option(
        None,
        'with `backend="ray"`: `address`, `num_cpus`, `num_gpus`, `resources`, '
        "`runtime_env`, `scheduling_strategy`, `namespace` (see docs/scaling.md)",
        env=JSON_OBJECT_OR_NONE,
    )
    start_method: str = option(
        "auto", '`"auto"`, `"forkserver"` or `"spawn"` (see Warm starts)', env=STR
    )
    recovery: Mapping[ErrorCategory | str, Recovery | str] | None = option(
        None,
        "what happens to a worker after each `ErrorCategory` of failure (see Recovery policy), e.g. "
        '`{"application": "recycle"}`',
        env=JSON_OBJECT_OR_NONE,
        note="= the default table",
    )
    send_ahead: int = option(
        64,
        "the most calls a busy worker holds beyond those it runs (see Dispatch); `0`: none",
        env=INT,
    )
    drain_grace: float = option(
        10.0, "`aclose()` waits this long for calls in flight", env=FLOAT, note="s"
    )
    stop_grace: float = option(
        3.0, "between closing a worker's stdin, SIGTERM and SIGKILL", env=FLOAT, note="s"
    )
    cancel_grace: float = option(
        2.0,
        "a cancelled or timed-out call may take this long to stop before its worker is killed",
        env=FLOAT,
        note="s",
    )
    limits: Mapping[str, float | None] | None = option(
        None,
        "per-worker limits the kernel enforces: `memory_mb`, `cpu_seconds`, `open_files`, "
        "`processes`, `file_size_mb`; crossing one is `ResourceExceeded` (see Isolation)",
        env=JSON_OBJECT_OR_NONE,
    )
    user: str | int | None = option(
        None, "run the workers as this user, a name or uid (the host must be root)", env=STR_OR_NONE
    )
    network: bool = option(
        True, "`False`: each worker has a network namespace of its own, loopback only", env=BOOL
    )
    writable_paths: Sequence[str | os.PathLike[str]] | None = option(
        None,
        "workers may write only beneath these paths (Landlock); `None`: anywhere",
        env=PATHS_OR_NONE,
    )
    sandbox: bool = option(
        False,
        'for untrusted code: every limit, `user="nobody"` (on a root host), no network, '
        "writes only to a private scratch directory (see Isolation)",
        env=BOOL,
    )
    # (not an option: derived from gpus, workers_per_gpu and size)
    gpu_slots: tuple[int | None, ...] = field(default=(), init=False)

    def __post_init__(self) -> None:
        _check_type("adapter", self.adapter, str)
        _check_type("name", self.name, str)
        if not self.adapter:
            raise ValueError("adapter must name an adapter ('module:Class' or an entry point)")
        if not self.name or "/" in self.name:
            raise ValueError(f"name {self.name!r} must be non-empty and contain no '/'")
        _check_optional_positive_int("size", self.size)
        _check_positive_int("worker_concurrency", self.worker_concurrency)
        _check_positive_int("max_sessions", self.max_sessions)
        _check_positive_int("breaker_threshold", self.breaker_threshold)
        _check_positive_int("workers_per_gpu", self.workers_per_gpu)
        _check_optional_positive_int("max_requests", self.max_requests)
        for name in (
            "startup_timeout",
            "health_interval",
            "health_timeout",
            "session_ttl",
            "breaker_reset_timeout",
        ):
            _check_positive_number(name, getattr(self, name))
        for name in ("call_timeout", "max_memory_mb", "worker_ttl"):
            if getattr(self, name) is not None:
                _check_positive_number(name, getattr(self, name), optional=True)
        if (
            not isinstance(self.queue_size, int)
            or isinstance(self.queue_size, bool)
            or self.queue_size < 0
        ):
            raise ValueError(f"queue_size must be an int >= 0, got {self.queue_size!r}")
        if not isinstance(self.max_frame_bytes, int) or not 1024 <= self.max_frame_bytes < 2**32:
            raise ValueError(
                f"max_frame_bytes must be an int in 1024..2**32-1, got {self.max_frame_bytes!r}"
            )
        if (
            not isinstance(self.send_ahead, int)
            or isinstance(self.send_ahead, bool)
            or self.send_ahead < 0
        ):
            raise ValueError(f"send_ahead must be an int >= 0, got {self.send_ahead!r}")
        for name in ("drain_grace", "stop_grace", "cancel_grace"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool) or not value >= 0:
                raise ValueError(f"{name} must be a number of seconds >= 0, got {value!r}")
        if self.affinity not in AFFINITY_MODES:
            raise ValueError(
                f"affinity must be one of {', '.join(AFFINITY_MODES)}; got {self.affinity!r}"
            )
        if self.adapter_config is not None and not isinstance(self.adapter_config, Mapping):
            raise TypeError(
                f"adapter_config must be a dict, got {type(self.adapter_config).__name__}"
            )
        if self.env is not None:
            _check_type("env", self.env, Mapping)
            for key, value in self.env.items():
                if not isinstance(key, str) or not isinstance(value, str):
                    raise TypeError(f"env must map str to str; {key!r}: {value!r} does not")
        if isinstance(self.pythonpath, str | bytes):
            raise TypeError("pythonpath must be a list of directories, not one string")
        if isinstance(self.preload, str | bytes):
            raise TypeError("preload must be a list of module names, not one string")
        if self.start_method not in START_METHODS:
            raise ValueError(
                f"start_method must be one of {', '.join(START_METHODS)}; got {self.start_method!r}"
            )
        if self.recovery is not None:
            _check_type("recovery", self.recovery, Mapping)
            recovery_table(self.recovery)
        check_isolation_options(
            self.limits, self.user, self.network, self.writable_paths, self.sandbox
        )
        self._check_backend()
        object.__setattr__(self, "gpu_slots", self._gpu_slots())

    def _check_backend(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {self.backend!r}")
        if self.backend == "local":
            if self.ray is not None:
                raise ValueError('ray={...} is for backend="ray"; this pool\'s backend is "local"')
            return
        check_ray_options(self.ray or {})
        if self.gpus is not None:
            raise ValueError(
                'gpus lists local device indices; with backend="ray", GPUs come from Ray: '
                'set ray={"num_gpus": 1} (fractions allowed) and Ray sets CUDA_VISIBLE_DEVICES'
            )
        local_only = [
            name for name in ("limits", "user", "writable_paths", "preload") if getattr(self, name)
        ]
        local_only += [name for name in ("sandbox",) if self.sandbox]
        local_only += [] if self.network else ["network"]
        if local_only:
            raise ValueError(
                f'{", ".join(local_only)} cannot be used with backend="ray" (they apply to '
                "worker processes this host starts; a Ray worker's node starts it)"
            )

    @property
    def disabled_reason(self) -> str | None:
        """Why this pool has no workers, or ``None``."""
        if self.gpu_slots:
            return None
        if self.gpus == "auto":
            return (
                "no GPU found (CUDA_VISIBLE_DEVICES lists none, or nvidia-smi -L found none "
                "or is not installed)"
            )
        return "gpus lists no device"

    def _gpu_slots(self) -> tuple[int | None, ...]:
        if self.gpus is None:
            count = self.size if self.size is not None else (os.cpu_count() or 1)
            return (None,) * count
        if self.gpus == "auto":
            devices = discover_gpus()
        elif isinstance(self.gpus, str):
            raise ValueError(
                f"gpus must be None, 'auto' or a list of device indices; got {self.gpus!r}"
            )
        else:
            devices = list(self.gpus)
            for device in devices:
                if not isinstance(device, int) or isinstance(device, bool) or device < 0:
                    raise ValueError(f"gpus entries must be device indices >= 0; got {device!r}")
        return tuple(d for d in devices for _ in range(self.workers_per_gpu))

    @property
    def worker_count(self) -> int:
        return len(self.gpu_slots)

    @property
    def interpreter(self) -> str:
        return self.python or sys.executable

    def launch(self, slot: int) -> WorkerLaunch:
        """How to start the worker for ``slot``."""
        interpreter = self.interpreter
        same_python = os.path.realpath(interpreter) == os.path.realpath(sys.executable)
        env = inherited_env(self)  # (the host's; a sandbox's: only what is safe to show)
        for var in THREAD_ENV_VARS:
            env.setdefault(var, "1")
        env.update(self.env or {})
        env["PYTHONUNBUFFERED"] = "1"
        env["SNAKEPOOL_HOST_PID"] = str(os.getpid())
        env["SNAKEPOOL_POOL"] = self.name
        env["SNAKEPOOL_WORKER_ID"] = str(slot)
        gpu = self.gpu_slots[slot]
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(gpu)
        env.update(isolation_env(self))  # (limits, user, network, ...: none asked, none set)
        if not same_python:
            # Another interpreter still needs to find this snakepool (and msgpack there).
            env["PYTHONPATH"] = os.pathsep.join(
                filter(None, [_SNAKEPOOL_SRC, env.get("PYTHONPATH")])
            )
        sys_path = [os.path.abspath(entry) for entry in self.pythonpath]
        if same_python:  # like multiprocessing's spawn: the worker sees what the host sees
            sys_path += [os.path.abspath(entry) if entry else os.getcwd() for entry in sys.path]
        init = p.Init(
            version=p.PROTOCOL_VERSION,
            worker_id=slot,
            pool=self.name,
            adapter=self.adapter,
            config=dict(self.adapter_config or {}),
            concurrency=self.worker_concurrency,
            max_frame_bytes=self.max_frame_bytes,
            sys_path=list(dict.fromkeys(sys_path)),
        )
        return WorkerLaunch(
            argv=(interpreter, "-m", "snakepool.workers"),
            env=env,
            cwd=os.fspath(self.cwd) if self.cwd is not None else None,
            init=init,
            max_frame_bytes=self.max_frame_bytes,
            startup_timeout=self.startup_timeout,
        )


def discover_gpus() -> list[int]:
    """Visible GPU indices: ``CUDA_VISIBLE_DEVICES`` if set, else ``nvidia-smi -L``."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        entries = [e.strip() for e in visible.split(",") if e.strip() and e.strip() != "-1"]
        return [int(e) if e.isdigit() else i for i, e in enumerate(entries)]
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return []
    gpu_lines = [line for line in out.stdout.splitlines() if line.strip().startswith("GPU ")]
    return list(range(len(gpu_lines)))


@dataclass(frozen=True, slots=True)
class Option:
    """One ``PoolConfig`` option, as ``OPTIONS`` lists it."""

    name: str
    #: ``dataclasses.MISSING`` for the one required option, ``adapter``.
    default: object
    doc: str
    #: How a ``SNAKEPOOL_<POOL>_<OPTION>`` override reads it; ``None``: it cannot be set so.
    env: FromEnv | None
    note: str

    @property
    def required(self) -> bool:
        return self.default is MISSING

    @property
    def shown_default(self) -> str:
        """The default as the docs show it: ``"`30.0` s"``, ``"`None` = `os.cpu_count()`"``."""
        if self.required:
            return "(required)"
        value = self.default
        shown = json.dumps(value) if isinstance(value, str) else repr(value)
        return f"`{shown}`" + (f" {self.note}" if self.note else "")


#: Every option, in ``PoolConfig``'s (and ``Pool``'s) order, by name.
OPTIONS: Mapping[str, Option] = {
    f.name: Option(
        name=f.name,
        default=f.default,
        doc=f.metadata[_META].doc,
        env=f.metadata[_META].env,
        note=f.metadata[_META].note,
    )
    for f in fields(PoolConfig)
    if f.init
}


def options_table() -> str:
    """The README's table of options (Markdown), made from ``OPTIONS``."""
    rows = [
        "| option | default | `SNAKEPOOL_<POOL>_<OPTION>` | meaning |",
        "| --- | --- | --- | --- |",
    ]
    for opt in OPTIONS.values():
        env = opt.env.shown if opt.env is not None else "(no)"
        rows.append(f"| `{opt.name}` | {opt.shown_default} | {env} | {opt.doc} |")
    return "\n".join(rows) + "\n"


def options_docstring() -> str:
    """``Pool.__init__``'s documentation of its options, made from ``OPTIONS``."""
    lines = [
        "Create a pool (nothing starts until ``start()``). Its options, each also a key",
        "of a ``[pools.NAME]`` table in pools.toml (but ``name``) and a",
        "``SNAKEPOOL_<POOL>_<OPTION>`` override (see ``PoolConfig``):",
        "",
    ]
    for opt in OPTIONS.values():
        default = "required" if opt.required else opt.shown_default.replace("`", "")
        lines.append(f"{opt.name} ({default}): {opt.doc.replace('`', '')}")
    lines += [
        "",
        "``adapter`` may also be the adapter class, ``session_store`` a ``SessionStore``.",
    ]
    return "\n".join(lines)


def _check_type(name: str, value: object, kind: type | tuple[type, ...]) -> None:
    if not isinstance(value, kind):
        raise TypeError(
            f"{name} must be {getattr(kind, '__name__', kind)}, got {type(value).__name__}"
        )


def _check_positive_int(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def _check_optional_positive_int(name: str, value: object) -> None:
    if value is not None:
        _check_positive_int(name, value)


def _check_positive_number(name: str, value: object, *, optional: bool = False) -> None:
    if not isinstance(value, int | float) or isinstance(value, bool) or not value > 0:
        none = " or None (no limit)" if optional else ""
        raise ValueError(f"{name} must be a number > 0{none}, got {value!r}")
