"""A conformance suite any adapter can run against itself, in real worker processes.

From a pytest test (no pytest needed here)::

    from snakepool.testing import assert_conforms

    def test_my_adapter_conforms() -> None:
        assert_conforms(
            "myapp.adapters:Mine",
            examples={"add": {"a": 1, "b": 2}},
            session_example=("remember", {"key": "k", "value": 1}, "recall", {"key": "k"}),
        )

In an async test, ``report = await check_adapter(...)`` then
``report.raise_for_failures()``.

What is checked (each a named line of the report):

- ``start``: a pool of one worker starts; ``shutdown``: it closes and the
  worker process is gone.
- ``ping``, ``describe``, ``info``: the built-in commands answer as specified.
- ``parameters:CMD``: every described command lists its parameters (all
  passable by keyword, which is how calls send them) and has a docstring
  (a missing one fails only with ``strict_docs=True``).
- ``unknown-command``, ``unknown-argument:CMD``, ``missing-argument:CMD``,
  ``call-mode:CMD``: bad calls fail with ``RemoteError`` naming the problem,
  before the handler runs, and ``no-restart``: the worker survived them all.
- ``example:CMD``: each example call (in order, in one session) succeeds.
- ``session-restore``: with ``session_example``, state saved by one command
  is still there after the worker is SIGKILLed, rebuilt by
  ``Adapter.restore_session`` on the replacement worker.

For tests of a pool with ``session_store="redis://..."``: ``redis_server()``
starts a throwaway ``redis-server`` on loopback and yields its URL
(``start_redis_server``/``stop_redis_server`` for one to stop and restart).
"""

from __future__ import annotations

import contextlib
import functools
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, ParamSpec, TypeVar

import anyio
import psutil

from .errors import RemoteError, UnknownCommand
from .pool import Event, Pool

_P = ParamSpec("_P")
_T = TypeVar("_T")

__all__ = [
    "CheckResult",
    "ConformanceReport",
    "SessionExample",
    "assert_conforms",
    "check_adapter",
    "free_port",
    "redis_server",
    "run_conformance",
    "start_redis_server",
    "stop_redis_server",
]

Status = Literal["pass", "fail", "skip"]
#: An argument name no command has: sent to check that unknown arguments are refused.
BOGUS_ARGUMENT = "snakepool_conformance_bogus_argument"
_BUILTINS = ("ping", "describe", "info")
_KEYWORD_KINDS = ("positional_or_keyword", "keyword_only", "var_keyword")


@dataclass(frozen=True, slots=True)
class CheckResult:
    """One check of the report: its name, ``pass``/``fail``/``skip``, and what was seen."""

    name: str
    status: Status
    detail: str = ""

    @property
    def passed(self) -> bool:
        return self.status != "fail"

    def __str__(self) -> str:
        return f"[{self.status.upper():4}] {self.name}" + (
            f": {self.detail}" if self.detail else ""
        )


@dataclass
class ConformanceReport:
    """Every check run against ``adapter``, in order."""

    adapter: str
    checks: list[CheckResult] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def failures(self) -> list[CheckResult]:
        return [c for c in self.checks if not c.passed]

    def __getitem__(self, name: str) -> CheckResult:
        for check in self.checks:
            if check.name == name:
                return check
        raise KeyError(f"no check named {name!r} in this report")

    def names(self) -> list[str]:
        return [c.name for c in self.checks]

    def add(self, name: str, status: Status, detail: str = "") -> CheckResult:
        result = CheckResult(name, status, detail)
        self.checks.append(result)
        return result

    def raise_for_failures(self) -> None:
        """``AssertionError`` listing every failed check; nothing if all passed."""
        failures = self.failures
        if failures:
            lines = "\n".join(f"  {f}" for f in failures)
            raise AssertionError(
                f"adapter {self.adapter!r} failed {len(failures)} of {len(self.checks)} "
                f"conformance checks:\n{lines}"
            )

    def __str__(self) -> str:
        verdict = "conforms" if self.passed else f"{len(self.failures)} failure(s)"
        return "\n".join([f"conformance of {self.adapter!r}: {verdict}", *map(str, self.checks)])


@dataclass(frozen=True, slots=True)
class SessionExample:
    """``save_command(**save_args)`` keeps state; ``check_command(**check_args)`` reads it.

    The check's result (passed through ``project`` if given, e.g. to drop a
    pid) must be the same before and after the worker is killed. ``setup``:
    ``(command, args)`` calls made first, in the same session (e.g. creating
    what ``save_command`` then changes).
    """

    save_command: str
    save_args: Mapping[str, Any]
    check_command: str
    check_args: Mapping[str, Any]
    project: Callable[[Any], Any] | None = None
    setup: Sequence[tuple[str, Mapping[str, Any]]] = ()


async def check_adapter(
    adapter: str,
    *,
    adapter_config: Mapping[str, Any] | None = None,
    pythonpath: Sequence[str] = (),
    examples: Mapping[str, Mapping[str, Any]] | None = None,
    session_example: SessionExample
    | tuple[str, Mapping[str, Any], str, Mapping[str, Any]]
    | None = None,
    strict_docs: bool = False,
    startup_timeout: float = 60.0,
    call_timeout: float = 30.0,
) -> ConformanceReport:
    """Run the conformance checks against ``adapter`` in a real pool of one worker.

    ``examples`` maps command names to arguments that must succeed (run in
    order, in one session; streams are consumed). ``session_example`` is a
    :class:`SessionExample` or ``(save_command, save_args, check_command,
    check_args)``. Never raises for a failed check: read the report, or call
    ``report.raise_for_failures()``.
    """
    report = ConformanceReport(adapter)
    if isinstance(session_example, tuple):
        session_example = SessionExample(*session_example)
    pool = Pool(
        adapter,
        name="conformance",
        size=1,
        pythonpath=pythonpath,
        adapter_config=adapter_config,
        startup_timeout=startup_timeout,
        call_timeout=call_timeout,
    )
    try:
        await pool.start()
    except Exception as exc:
        report.add("start", "fail", f"the pool did not start: {type(exc).__name__}: {exc}")
        await pool.aclose()
        return report
    report.add("start", "pass", "a pool of one worker started")
    pid: int | None = None
    try:
        pid = _worker_pid(pool)
        described = await _check_builtins(pool, report, pid)
        if described is not None:
            _check_parameters(report, described, strict_docs)
            restarts = _restarts(pool)
            await _check_bad_calls(pool, report, described)
            _check_no_restart(pool, report, pid, restarts)
        await _check_examples(pool, report, examples or {}, described)
        if session_example is not None:
            await _check_session_restore(pool, report, session_example, call_timeout)
    except Exception as exc:  # a bug of ours or a pool failure: report it, never hide it
        report.add("internal", "fail", f"{type(exc).__name__}: {exc}")
    finally:
        last_pid = _worker_pid(pool)
        with anyio.move_on_after(60.0, shield=True) as scope:
            await pool.aclose()
        if scope.cancelled_caught:
            report.add("shutdown", "fail", "pool.aclose() took over 60 s")
        else:
            alive = [p for p in {pid, last_pid} if p is not None and _alive(p)]
            if alive:
                report.add("shutdown", "fail", f"worker process(es) {alive} still alive")
            else:
                report.add("shutdown", "pass", "closed; no worker process left")
    return report


def _from_sync_code(check: Callable[_P, Awaitable[_T]]) -> Callable[_P, _T]:
    """``check`` (a coroutine function) for synchronous code: same parameters,
    run in a fresh event loop (so not from inside one)."""

    @functools.wraps(check)
    def run(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        return anyio.run(functools.partial(check, *args, **kwargs))

    return run


run_conformance = _from_sync_code(check_adapter)
run_conformance.__name__ = run_conformance.__qualname__ = "run_conformance"
run_conformance.__doc__ = (
    ":func:`check_adapter` from synchronous code (not from inside an event loop)."
)


def assert_conforms(adapter: str, **options: Any) -> ConformanceReport:
    """:func:`run_conformance`, then ``raise_for_failures()``; returns the report."""
    report = run_conformance(adapter, **options)
    report.raise_for_failures()
    return report


# --- the checks ------------------------------------------------------------------------------


async def _check_builtins(
    pool: Pool, report: ConformanceReport, pid: int | None
) -> dict[str, Any] | None:
    try:
        answer = await pool.call("ping")
        ok = answer == "pong"
        report.add("ping", "pass" if ok else "fail", f"answered {answer!r}")
    except Exception as exc:
        report.add("ping", "fail", _error_text(exc))

    described: dict[str, Any] | None = None
    try:
        answer = await pool.call("describe")
        problems = _describe_problems(answer)
        if problems:
            report.add("describe", "fail", "; ".join(problems))
        else:
            described = answer
            report.add("describe", "pass", f"{len(answer)} commands: {', '.join(sorted(answer))}")
    except Exception as exc:
        report.add("describe", "fail", _error_text(exc))

    try:
        info = await pool.call("info")
        problems = []
        if not isinstance(info, dict):
            problems.append(f"not a dict: {info!r}")
        else:
            expected = {"pid": int, "adapter": str, "python": str, "rss": int}
            for key, kind in expected.items():
                if not isinstance(info.get(key), kind):
                    problems.append(f"{key!r} should be a {kind.__name__}, got {info.get(key)!r}")
            if pid is not None and info.get("pid") != pid:
                problems.append(f"pid {info.get('pid')!r} is not the worker's pid {pid}")
        report.add(
            "info", "fail" if problems else "pass", "; ".join(problems) or f"pid {pid}, {info}"
        )
    except Exception as exc:
        report.add("info", "fail", _error_text(exc))
    return described


def _describe_problems(answer: Any) -> list[str]:
    if not isinstance(answer, dict):
        return [f"describe returned {type(answer).__name__}, not a dict of commands"]
    problems = [f"built-in {name!r} missing" for name in _BUILTINS if name not in answer]
    for name, entry in answer.items():
        if not isinstance(entry, dict):
            problems.append(f"{name!r}: entry is not a dict")
            continue
        if not isinstance(entry.get("parameters"), list):
            problems.append(f"{name!r}: no 'parameters' list")
        if not isinstance(entry.get("doc"), str):
            problems.append(f"{name!r}: no 'doc' string")
        if not isinstance(entry.get("stream"), bool):
            problems.append(f"{name!r}: no 'stream' flag")
    return problems


def _check_parameters(
    report: ConformanceReport, described: Mapping[str, Any], strict_docs: bool
) -> None:
    for name, entry in sorted(described.items()):
        problems: list[str] = []
        for param in entry["parameters"]:
            if not isinstance(param, dict) or not isinstance(param.get("name"), str):
                problems.append(f"parameter entry without a name: {param!r}")
            elif param.get("kind") not in _KEYWORD_KINDS:
                problems.append(
                    f"parameter {param['name']!r} is {param.get('kind')}: calls send "
                    f"keyword arguments only, so it can never be passed"
                )
        if problems:
            report.add(f"parameters:{name}", "fail", "; ".join(problems))
        elif not entry["doc"].strip():
            report.add(
                f"parameters:{name}",
                "fail" if strict_docs else "pass",
                f"{_signature_text(entry)}; no docstring (describe() shows users nothing)",
            )
        else:
            report.add(f"parameters:{name}", "pass", _signature_text(entry))


async def _check_bad_calls(
    pool: Pool, report: ConformanceReport, described: Mapping[str, Any]
) -> None:
    try:
        await pool.call("snakepool_conformance_no_such_command")
        report.add("unknown-command", "fail", "an unknown command succeeded")
    except UnknownCommand as exc:
        report.add("unknown-command", "pass", exc.remote_message)
    except Exception as exc:
        report.add("unknown-command", "fail", f"expected UnknownCommand, got {_error_text(exc)}")

    for name, entry in sorted(described.items()):
        params = entry["parameters"]
        stream = bool(entry["stream"])
        required = [
            p["name"]
            for p in params
            if "default" not in p and p.get("kind") in ("positional_or_keyword", "keyword_only")
        ]

        # Unknown argument: with every required one present (as None: binding
        # fails before the handler could ever see them).
        check = f"unknown-argument:{name}"
        if any(p.get("kind") == "var_keyword" for p in params):
            report.add(check, "skip", "takes **kwargs: every argument name is accepted")
        else:
            args = {**dict.fromkeys(required), BOGUS_ARGUMENT: 1}
            error = await _expect_remote_error(pool, name, args, stream)
            if isinstance(error, RemoteError) and BOGUS_ARGUMENT in error.remote_message:
                report.add(check, "pass", error.remote_message)
            else:
                report.add(check, "fail", f"expected a RemoteError naming it: {_outcome(error)}")

        check = f"missing-argument:{name}"
        if not required:
            report.add(check, "skip", "no required parameters")
        else:
            error = await _expect_remote_error(pool, name, {}, stream)
            if isinstance(error, RemoteError) and required[0] in error.remote_message:
                report.add(check, "pass", error.remote_message)
            else:
                report.add(
                    check,
                    "fail",
                    f"expected a RemoteError naming {required[0]!r}: {_outcome(error)}",
                )

        # The wrong call mode: a stream through call(), a plain command through stream().
        check = f"call-mode:{name}"
        error = await _expect_remote_error(pool, name, {}, not stream)
        if isinstance(error, RemoteError) and ("stream" in error.remote_message):
            report.add(check, "pass", error.remote_message)
        else:
            wrong = "pool.call()" if stream else "pool.stream()"
            report.add(check, "fail", f"expected a RemoteError from {wrong}: {_outcome(error)}")


def _check_no_restart(
    pool: Pool, report: ConformanceReport, pid: int | None, restarts: int
) -> None:
    now_pid, now_restarts = _worker_pid(pool), _restarts(pool)
    if now_pid == pid and now_restarts == restarts:
        report.add("no-restart", "pass", f"worker {pid} survived every bad call")
    else:
        report.add(
            "no-restart",
            "fail",
            f"bad calls cost a worker: pid {pid} -> {now_pid}, restarts {restarts} -> {now_restarts}",
        )


async def _check_examples(
    pool: Pool,
    report: ConformanceReport,
    examples: Mapping[str, Mapping[str, Any]],
    described: Mapping[str, Any] | None,
) -> None:
    if not examples:
        return
    async with pool.session() as session:
        for name, args in examples.items():
            check = f"example:{name}"
            if described is not None and name not in described:
                report.add(check, "fail", f"{name!r} is not a described command")
                continue
            stream = bool(described[name]["stream"]) if described is not None else False
            try:
                if stream:
                    items = [item async for item in session.stream(name, args)]
                    report.add(check, "pass", f"streamed {_short(items)}")
                else:
                    result = await session.call(name, args)
                    report.add(check, "pass", f"returned {_short(result)}")
            except Exception as exc:
                report.add(check, "fail", f"{name}({_short(args)}) raised {_error_text(exc)}")


async def _check_session_restore(
    pool: Pool, report: ConformanceReport, example: SessionExample, timeout: float
) -> None:
    check = "session-restore"
    project = example.project or (lambda value: value)
    async with pool.session() as session:
        try:
            for command, args in example.setup:
                await session.call(command, args)
            await session.call(example.save_command, example.save_args)
            before = project(await session.call(example.check_command, example.check_args))
        except Exception as exc:
            report.add(check, "fail", f"the example failed before any kill: {_error_text(exc)}")
            return
        pid = _worker_pid(pool)
        if pid is None:
            report.add(check, "fail", "no worker pid to kill")
            return
        replaced = anyio.Event()

        def on_event(event: Event) -> None:
            if event.name == "worker.started" and event.data.get("pid") != pid:
                replaced.set()

        pool.add_listener(on_event)
        try:
            try:
                _kill_on_purpose(pool, pid)  # SIGKILL: no teardown, no goodbye
            except psutil.Error as exc:
                report.add(check, "fail", f"could not kill worker {pid}: {exc}")
                return
            with anyio.move_on_after(timeout) as scope:
                await replaced.wait()
        finally:
            pool.remove_listener(on_event)
        if scope.cancelled_caught:
            report.add(check, "fail", f"no replacement for killed worker {pid} within {timeout} s")
            return
        try:
            after = project(await session.call(example.check_command, example.check_args))
        except Exception as exc:
            report.add(
                check, "fail", f"after killing worker {pid}: {_error_text(exc)} (restore_session?)"
            )
            return
        if after == before:
            report.add(check, "pass", f"same answer after worker {pid} was killed: {_short(after)}")
        else:
            report.add(
                check,
                "fail",
                f"{example.check_command} answered {_short(before)} before worker {pid} was "
                f"killed and {_short(after)} after: restore_session did not rebuild the state "
                f"saved with ctx.save_state",
            )


# --- helpers ----------------------------------------------------------------------------


async def _expect_remote_error(
    pool: Pool, command: str, args: Mapping[str, Any], stream: bool
) -> BaseException | Any:
    """The exception the call raised, or (wrapped in a tuple) what it returned."""
    try:
        if stream:
            items = pool.stream(command, args)
            try:
                async for _ in items:
                    break
            finally:
                await items.aclose()
            return ("streamed",)
        return ("returned", await pool.call(command, args))
    except Exception as exc:
        return exc


def _outcome(outcome: BaseException | Any) -> str:
    if isinstance(outcome, BaseException):
        return f"got {_error_text(outcome)}"
    if isinstance(outcome, tuple) and outcome and outcome[0] == "streamed":
        return "it streamed without an error"
    return f"it succeeded with {_short(outcome[1] if isinstance(outcome, tuple) else outcome)}"


#: Why the ``session-restore`` check kills its worker: the pool logs it as the
#: reason of the worker's exit ("killed by the pool: ..."), not "crashed".
PLANNED_KILL_REASON = (
    "the conformance check 'session-restore' SIGKILLs it on purpose, "
    "to test that restore_session rebuilds the session on its replacement"
)


def _kill_on_purpose(pool: Pool, pid: int) -> None:
    """SIGKILL worker ``pid`` (its process group), announced as planned.

    Through the pool's handle, so that the pool reports the exit as this
    planned kill; the worker gets no more warning than from any SIGKILL.
    """
    for worker in pool._workers:
        if worker.pid == pid and worker.exit_info is None:
            worker.kill(PLANNED_KILL_REASON)
            return
    psutil.Process(pid).kill()  # (not a worker of this pool any more: just make sure)


def _worker_pid(pool: Pool) -> int | None:
    workers = pool.statistics().workers
    return workers[0].pid if workers else None


def _restarts(pool: Pool) -> int:
    return sum(w.restarts for w in pool.statistics().workers)


def _alive(pid: int) -> bool:
    try:
        status: str = psutil.Process(pid).status()
    except psutil.Error:
        return False
    return bool(status != psutil.STATUS_ZOMBIE)


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, RemoteError):
        text = f"{type(exc).__name__} ({exc.remote_type}): {exc.remote_message}"
    else:
        text = f"{type(exc).__name__}: {exc}"
    return _short(text, 300)


def _short(value: Any, limit: int = 120) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _signature_text(entry: Mapping[str, Any]) -> str:
    parts = []
    for p in entry["parameters"]:
        text = p["name"]
        if p.get("kind") == "var_keyword":
            text = "**" + text
        if "default" in p:
            text += f"={p['default']!r}"
        parts.append(text)
    kind = "stream" if entry.get("stream") else "call"
    return f"({', '.join(parts)}) [{kind}]"


# --- a redis-server of the test's own ------------------------------------------------------


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _redis_answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def start_redis_server(
    port: int, *, timeout: float = 10.0, directory: str | None = None
) -> subprocess.Popen[bytes]:
    """A throwaway ``redis-server`` on 127.0.0.1:``port`` (no persistence), once it
    answers PING. ``FileNotFoundError`` if none is installed, ``RuntimeError`` if it
    does not start. ``directory``: its working directory (default: the current one)."""
    executable = shutil.which("redis-server")
    if executable is None:
        raise FileNotFoundError("redis-server is not installed (apt-get install redis-server)")
    command = [executable, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    command += ["--appendonly", "no", *(["--dir", directory] if directory else [])]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while not _redis_answers(port):
        if process.poll() is not None or time.monotonic() > deadline:
            stop_redis_server(process)
            raise RuntimeError(f"redis-server on port {port} did not start within {timeout}s")
        time.sleep(0.02)
    return process


def stop_redis_server(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextlib.contextmanager
def redis_server(*, timeout: float = 10.0) -> Iterator[str]:
    """A throwaway ``redis-server`` on loopback, in a directory of its own; yields its URL."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="snakepool-redis-") as directory:
        process = start_redis_server(port, timeout=timeout, directory=directory)
        try:
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            stop_redis_server(process)
