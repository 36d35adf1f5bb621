"""CPython's own ``concurrent.futures`` tests, run against ``snakepool.Executor`` (issue 25).

Debian's ``libpython3.11-testsuite`` installs ``test_concurrent_futures.py`` in
the system Python's ``test`` directory (``.ci/run`` installs it); the Python
that runs these tests may be another build, so the file is loaded by path,
under its own name, and its executor test classes are subclassed here with
a mixin that makes ``snakepool.Executor`` the executor under test: nothing of
their code is copied. The workers import the same file (its functions travel
by reference), from a directory holding only a link to it.

Outside CI a machine without the file skips this module; in CI
(``CI=true``) a missing file is an error.

What runs, and what does not and why (``EXCLUDED`` says it per test):

* ``ExecutorTest`` via ``ProcessPoolExecutorTest`` (so ``test_map_chunksize``
  runs too): all but the tests of ``ProcessPoolExecutor`` internals
  (``_processes``, ``mp_context``, ``max_tasks_per_child``), the one that
  wants a killed worker to break the pool (snakepool's design is the
  opposite) and the one that wants the remote traceback as ``__cause__``.
* ``WaitTests``, ``AsCompletedTests``: all.
* ``ExecutorShutdownTest``: all but the three that run a script importing
  the executor class from ``concurrent.futures`` by name (they cannot name
  ours); tests/test_executor.py checks the same interpreter-exit behaviour.
* ``InitializerMixin`` and ``FailingInitializerMixin``: all.

Not subclassed: the thread-pool and process-pool specific classes
(``ThreadPool*``, ``ProcessPoolShutdownTest``, ``ExecutorDeadlockTest``: they
build those executors themselves or test their pickling-crash recovery, which
``BrokenProcessPool`` ends) and ``FutureTests`` (the ``Future`` class alone).
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
import sys
import tempfile
import unittest
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import snakepool

NAME = "test_concurrent_futures"
FILE = Path(f"/usr/lib/python{sys.version_info[0]}.{sys.version_info[1]}/test/{NAME}.py")


def _load() -> ModuleType:
    """The stdlib test module, loaded by path, and a directory the workers import it from."""
    if not FILE.is_file():
        message = (
            f"{FILE} is missing: install it with 'apt-get install "
            f"libpython{sys.version_info[0]}.{sys.version_info[1]}-testsuite'"
        )
        if os.environ.get("CI") == "true":  # (CI installs it: never skip there)
            raise RuntimeError(message)
        pytest.skip(message, allow_module_level=True)
    spec = importlib.util.spec_from_file_location(NAME, FILE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[NAME] = module  # (its functions pickle by reference to this name)
    spec.loader.exec_module(module)
    return module


stdlib = _load()
#: (about 45 s here: most of it the stdlib tests' own sleeps, 1.5 to 6 s each)
pytestmark = pytest.mark.slow
LINK_DIR = tempfile.mkdtemp(prefix="sp-stdlib-")
os.symlink(FILE, os.path.join(LINK_DIR, FILE.name))
atexit.register(shutil.rmtree, LINK_DIR, True)


class SnakepoolExecutor(snakepool.Executor):
    """``snakepool.Executor`` whose workers can import the stdlib test module."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, pythonpath=[LINK_DIR], **kwargs)


class SnakepoolMixin(stdlib.ExecutorMixin):  # type: ignore[name-defined,misc]
    executor_type = SnakepoolExecutor
    worker_count = 2  # (ExecutorMixin's 5: the module takes half again as long on 2 CPUs)


EXCLUDED = {
    "test_killed_child": "wants a killed worker to break the pool (BrokenProcessPool); "
    "snakepool fails that worker's call alone (tests/test_executor.py)",
    "test_traceback": "wants type(exc) is RuntimeError with the traceback as __cause__; "
    "snakepool raises a RuntimeError that is also a RemoteError holding remote_traceback",
    "test_ressources_gced_in_workers": "needs a multiprocessing context (mp_context)",
    "test_saturation": "counts ProcessPoolExecutor._processes",
    "test_idle_process_reuse_one": "counts ProcessPoolExecutor._processes",
    "test_idle_process_reuse_multiple": "counts ProcessPoolExecutor._processes",
    "test_max_tasks_per_child": "ProcessPoolExecutor's max_tasks_per_child and _processes "
    "(snakepool's is the max_requests pool option)",
    "test_max_tasks_per_child_defaults_to_spawn_context": "ProcessPoolExecutor's mp_context",
    "test_max_tasks_early_shutdown": "ProcessPoolExecutor's max_tasks_per_child",
    "test_max_workers_too_large": "a Windows-only ProcessPoolExecutor limit",
    "test_interpreter_shutdown": "its script imports the executor class from "
    "concurrent.futures by name (tests/test_executor.py checks the same exit)",
    "test_submit_after_interpreter_shutdown": "its script imports the executor class from "
    "concurrent.futures by name (tests/test_executor.py checks the same exit)",
    "test_hang_gh83386": "its script imports the executor class from concurrent.futures "
    "by name (tests/test_executor.py checks the same exit)",
}


def _tests(*bases: type) -> type:
    """A TestCase running ``bases``' tests against snakepool.Executor, minus EXCLUDED."""
    excluded = {
        name: unittest.skip(f"does not apply to snakepool.Executor: {why}")(lambda self: None)
        for name, why in EXCLUDED.items()
        if any(hasattr(base, name) for base in bases)
    }
    return type("", (*bases, SnakepoolMixin, stdlib.BaseTestCase), excluded)


class TestExecutor(_tests(stdlib.ProcessPoolExecutorTest)):  # type: ignore[misc]
    pass


class TestWait(_tests(stdlib.WaitTests)):  # type: ignore[misc]
    pass


class TestAsCompleted(_tests(stdlib.AsCompletedTests)):  # type: ignore[misc]
    pass


class TestShutdown(_tests(stdlib.ExecutorShutdownTest)):  # type: ignore[misc]
    pass


class TestInitializer(_tests(stdlib.InitializerMixin)):  # type: ignore[misc]
    pass


class TestFailingInitializer(_tests(stdlib.FailingInitializerMixin)):  # type: ignore[misc]
    pass
