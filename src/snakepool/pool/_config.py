"""Validated pool settings and how a worker process is launched from them."""

from __future__ import annotations

import difflib
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import protocol as p
from ._worker import WorkerLaunch

__all__ = [
    "AFFINITY_MODES",
    "OPTION_ALIASES",
    "START_METHODS",
    "THREAD_ENV_VARS",
    "PoolConfig",
    "did_you_mean",
    "discover_gpus",
]

AFFINITY_MODES = ("hint", "strict_queue", "strict_fail_fast")
#: How workers start: "forkserver" forks them from a template process that
#: imported the adapter (and ``preload``) once; "spawn" starts a fresh
#: interpreter each; "auto" is forkserver where that is possible and safe.
START_METHODS = ("auto", "forkserver", "spawn")
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


def did_you_mean(key: str, valid: Sequence[str]) -> str:
    """`` (did you mean 'size'?)`` for an unknown option, or ``""``.

    Known names from other libraries first (``OPTION_ALIASES``), then the
    closest spelling.
    """
    alias = OPTION_ALIASES.get(key)
    if alias is None:
        alias = OPTION_ALIASES.get(key.lower().replace("-", "_"))
    if alias is not None and alias in valid:
        return f" (did you mean {alias!r}?)"
    close = difflib.get_close_matches(key, list(valid), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


@dataclass(frozen=True)
class PoolConfig:
    """Every ``Pool`` argument, checked once; errors name the argument."""

    adapter: str
    name: str = "default"
    size: int | None = None
    python: str | None = None
    env: Mapping[str, str] | None = None
    cwd: str | os.PathLike[str] | None = None
    pythonpath: Sequence[str | os.PathLike[str]] = ()
    adapter_config: Mapping[str, Any] | None = None
    worker_concurrency: int = 1
    startup_timeout: float = 30.0
    #: Seconds a call may take, queueing included; ``None``: no limit (like
    #: concurrent.futures, Ray and Celery). A call's ``timeout=`` overrides it.
    call_timeout: float | None = None
    queue_size: int = 1000
    max_requests: int | None = None
    max_memory_mb: float | None = None
    worker_ttl: float | None = None
    health_interval: float = 5.0
    health_timeout: float = 5.0
    affinity: str = "hint"
    session_ttl: float = 3600.0
    max_sessions: int = 10_000
    breaker_threshold: int = 5
    breaker_reset_timeout: float = 30.0
    max_frame_bytes: int = p.DEFAULT_MAX_FRAME_BYTES
    gpus: str | Sequence[int] | None = None
    workers_per_gpu: int = 1
    preload: Sequence[str] = ()
    start_method: str = "auto"
    session_store: str = "memory"
    #: The most calls a busy worker holds beyond those it runs (0: none).
    send_ahead: int = 64
    #: Seconds ``aclose()`` waits for calls in flight.
    drain_grace: float = 10.0
    #: Seconds between closing a worker's stdin, SIGTERM and SIGKILL.
    stop_grace: float = 3.0
    #: Seconds a cancelled (or timed-out) call may take to stop before its worker is killed.
    cancel_grace: float = 2.0
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
        object.__setattr__(self, "gpu_slots", self._gpu_slots())

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
        env = dict(os.environ)
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
