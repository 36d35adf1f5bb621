"""The pool's worker slots: starting, replacing and health-checking the
workers, and the template that starts them.

A pool has ``config.worker_count`` slots; each holds one ``WorkerHandle`` at a
time. ``start_first`` fills a slot when the pool starts (a few attempts, then
the pool's start fails with the worker's error); ``keep_filled`` then waits
for the slot's worker to exit and starts a replacement, with exponential
backoff (tenacity) when starts fail or workers die young (a crash loop). A
replaced worker keeps its slot (its GPU, if any). Workers are started by a
*template* process where one can run (``start_template``): one that forks
warm workers from preloaded imports, or a *keeper* that execs fresh ones;
otherwise the host spawns them itself.
"""

from __future__ import annotations

import functools
import logging
import random
from collections.abc import Callable

import anyio
import tenacity

from .. import protocol as p
from ..adapters._loading import adapter_imports
from ..errors import ErrorCategory, PoolClosed, WorkerStartError
from ._calls import PendingCall
from ._isolation import prepare as prepare_isolation
from ._parts import PoolParts
from ._ray import RayCluster
from ._registry import RunRegistry, runtime_dir
from ._runner import BackgroundTasks
from ._template import TemplateStartError, TemplateUnavailable, WorkerTemplate
from ._worker import WorkerHandle, format_exit

__all__ = ["WorkerSlots"]

_log = logging.getLogger("snakepool.pool")
#: A worker that crashes younger than this counts as a failed start (crash loops back off).
_EARLY_DEATH = 5.0
#: Backoff between restarts: exponential with jitter, from 0.1 s up to 30 s.
_RESTART_BACKOFF = tenacity.wait_exponential(multiplier=0.1, max=30.0) + tenacity.wait_random(
    0, 0.1
)


def _restart_delay(failures: int) -> float:
    """Seconds to wait before restart number ``failures`` (tenacity's backoff)."""
    state = tenacity.RetryCallState(retry_object=None, fn=None, args=(), kwargs={})  # type: ignore[arg-type]
    state.attempt_number = failures
    return float(_RESTART_BACKOFF(state))


class WorkerSlots:
    """The workers of one pool, slot by slot (see above)."""

    #: Start attempts per worker when the pool starts.
    start_attempts: int = 3

    def __init__(
        self,
        parts: PoolParts,
        *,
        registry: RunRegistry,
        closed: Callable[[], bool],
        on_capacity: Callable[[WorkerHandle], None],
        on_exit: Callable[[WorkerHandle], None],
        on_host_call: Callable[[WorkerHandle, p.HostCall], None],
        on_unstarted: Callable[[PendingCall], None],
        check_memory: Callable[[WorkerHandle, float], None],
    ) -> None:
        """The callbacks are the pool's: what happens when a worker has a free
        slot, exited, calls a host tool, gives a call back unstarted, or is due
        a memory check."""
        self.name = parts.name
        self.config = config = parts.config
        self._parts = parts
        self._registry = registry
        self._closed = closed
        self._on_capacity, self._on_exit = on_capacity, on_exit
        self._on_host_call, self._on_unstarted = on_host_call, on_unstarted
        self._check_memory = check_memory
        self.send_ahead = config.send_ahead
        self.stop_grace = float(config.stop_grace)
        self.template: WorkerTemplate | None = None  # forks (or execs) the workers
        self.start_method = "spawn"  # what start() chose, and why (statistics)
        self.ray: RayCluster | None = None  # backend="ray": the cluster the workers run on
        self._random = random.Random()

    async def start_all(self, background: BackgroundTasks) -> None:
        """Start the template and every slot's first worker (in parallel); then
        keep each slot filled and check the workers' health, in ``background``.
        ``WorkerStartError`` if a slot's worker cannot start."""
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self._registry.reap_leftovers)
        await background.start()
        await anyio.to_thread.run_sync(prepare_isolation, self.config)  # (or refuse)
        if self.config.backend == "ray":
            await self._connect_ray()
        else:
            await self.start_template()
        errors: list[WorkerStartError] = []
        async with anyio.create_task_group() as starters:
            for slot in range(len(self._parts.workers)):
                starters.start_soon(self.start_first, slot, errors)
        if errors:
            raise errors[0]
        for slot in range(len(self._parts.workers)):
            background.group.start_soon(self.keep_filled, slot)
        background.group.start_soon(self.check_health_forever)

    async def _connect_ray(self) -> None:
        """Workers are Ray actors: no template, no local processes to register."""
        self.ray = cluster = RayCluster(self.config.ray or {})
        await anyio.to_thread.run_sync(cluster.connect)
        cluster.on_gone = self._cluster_gone
        self.start_method = f"ray ({cluster.describe_placement()})"

    def _cluster_gone(self, why: str) -> None:
        """The workers' Ray cluster went away: no worker can be replaced, so the
        pool is broken (not closed: its owner did not close it)."""
        if self._closed():
            return
        reason = f"{why}; aclose() it and start a new pool once the cluster is back"
        _log.error("pool %s is broken: %s", self.name, reason)
        self._parts.lifecycle.broke(reason)
        self._parts.dispatcher.fail_all(PoolClosed(f"pool {self.name!r} is broken: {reason}"))

    def new_handle(self, slot: int, restarts: int) -> WorkerHandle:
        concurrency = self.config.worker_concurrency
        ahead = max(concurrency, self.send_ahead) if self.send_ahead else 0
        return WorkerHandle(
            pool=self.name,
            slot=slot,
            restarts=restarts,
            concurrency=concurrency,
            gpu=self.config.gpu_slots[slot],
            on_capacity=self._on_capacity,
            on_host_call=self._on_host_call,
            on_exit=self._on_worker_exit,
            on_unstarted=self._on_unstarted,
            template=self.template,
            ahead=ahead,
            pacing=self.ray.pacing(concurrency, ahead) if self.ray is not None else None,
            transport=self.ray.transport if self.ray is not None else None,
        )

    async def start_template(self) -> None:
        """Start the template that starts this pool's workers (``start_method``).

        "auto" forks warm workers where it can: Linux, asyncio, no GPU pinning
        unless ``preload`` asks for it, and a template whose imports started
        no threads; otherwise it spawns and says why (``statistics().start_method``,
        and a warning when ``preload`` was asked for). "forkserver" insists:
        ``start()`` fails when forking is not possible. A ``preload`` module
        that fails to import always fails ``start()``. Spawned workers are
        started by a template too, one that imports nothing and execs them:
        it keeps what they start from outliving them (the worker side's
        ``_descendants``).
        """
        config = self.config
        preload = list(config.preload)
        wanted = config.start_method
        if wanted == "spawn":
            self.start_method = "spawn (start_method='spawn')"
        elif wanted == "auto" and not preload and any(g is not None for g in config.gpu_slots):
            self.start_method = "spawn (GPU workers: pass preload=[...] to fork them)"
        else:
            await self._start_warm_template(preload)
        if self.template is None:
            await self._start_keeper()

    async def _start_warm_template(self, preload: list[str]) -> None:
        config = self.config
        launch = config.launch(0)
        env = dict(launch.env)
        if any(name.split(".")[0] in ("dspy", "litellm") for name in preload):
            # Read when dspy/litellm are imported, which now happens in the template.
            env.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
            env.setdefault("DSPY_CACHEDIR", str(runtime_dir() / "dspy-cache" / self.name))
        # (and what loading the adapter imports, so that no worker imports it again)
        modules = list(dict.fromkeys([*preload, *adapter_imports(config.adapter)]))
        try:
            template = await WorkerTemplate.start(
                python=config.interpreter,
                env=env,
                cwd=launch.cwd,
                preload=modules,
                sys_path=launch.init.sys_path,
                timeout=config.startup_timeout,
            )
        except (TemplateUnavailable, TemplateStartError) as exc:
            self._template_failed(exc, asked=bool(preload))
            return
        self._adopt_template(template)
        self.start_method = (
            f"forkserver (template pid {template.pid} imported {', '.join(modules)} "
            f"in {template.import_seconds:.2f}s)"
        )

    async def _start_keeper(self) -> None:
        """A template that execs fresh workers (where it cannot run, the host spawns them)."""
        launch = self.config.launch(0)
        try:
            keeper = await WorkerTemplate.start(
                python=self.config.interpreter,
                env=launch.env,
                cwd=launch.cwd,
                preload=(),
                sys_path=(),
                timeout=self.config.startup_timeout,
            )
        except (TemplateUnavailable, TemplateStartError) as exc:
            _log.info("pool %s: workers are spawned by the host itself: %s", self.name, exc)
            return
        keeper.warm = False
        self._adopt_template(keeper)

    def _adopt_template(self, template: WorkerTemplate) -> None:
        self.template = template
        self._registry.add(template.pid)

    def _template_failed(self, exc: Exception, *, asked: bool) -> None:
        """Spawn instead, or fail start() when the user asked for what failed."""
        if isinstance(exc, TemplateStartError) and asked:
            raise WorkerStartError(f"pool {self.name!r}: preload failed: {exc}") from None
        if self.config.start_method == "forkserver":
            raise WorkerStartError(
                f"pool {self.name!r}: start_method='forkserver' is not possible here: {exc}"
            ) from None
        # (auto without preload: the adapter import failed in the template; the
        # workers, spawned, report that failure the usual way.)
        self.start_method = f"spawn (cannot fork workers from a template here: {exc})"
        log = _log.warning if asked else _log.info
        log("pool %s: %s", self.name, self.start_method)

    async def close_template(self) -> None:
        """The template (or the Ray connection) goes, once the workers have."""
        template, self.template = self.template, None
        if template is not None:
            await template.aclose()
        cluster, self.ray = self.ray, None
        if cluster is not None:
            await anyio.to_thread.run_sync(cluster.disconnect)

    async def _spawn(self, slot: int, restarts: int) -> WorkerHandle:
        """Start a worker in ``slot`` and wait for its handshake."""
        try:
            launch = self.config.launch(slot)
        except Exception as exc:  # e.g. the host's cwd was deleted
            raise WorkerStartError(f"cannot prepare worker {self.name}/{slot}: {exc!r}") from exc
        worker = self.new_handle(slot, restarts)
        self._parts.workers[slot] = worker
        await self._parts.background.group.start(worker.run, launch)
        if worker.pid is not None and self.ray is None:  # (a Ray worker's pid is its node's)
            self._registry.add(worker.pid)
        await worker.wait_ready(self.config.startup_timeout)
        self._set_recycling_limits(worker)
        self._parts.listeners.emit("worker.started", slot, pid=worker.pid, restarts=restarts)
        self._on_capacity(worker)
        return worker

    def _set_recycling_limits(self, worker: WorkerHandle) -> None:
        # Jitter, so that workers started together do not all recycle together.
        max_requests, ttl = self.config.max_requests, self.config.worker_ttl
        if max_requests is not None:
            worker.request_limit = max_requests - self._random.randint(0, max_requests // 10)
        if ttl is not None:
            worker.ttl_limit = ttl * (1.0 - self._random.uniform(0.0, 0.1))

    async def check_health_forever(self) -> None:
        """Every ``health_interval``: ping each ready worker, check its TTL and memory."""
        while True:
            await anyio.sleep(self.config.health_interval)
            async with anyio.create_task_group() as tg:
                for worker in self._parts.workers:
                    if worker.is_ready:
                        tg.start_soon(self._check_worker, worker)

    async def _check_worker(self, worker: WorkerHandle) -> None:
        timeout = self.config.health_timeout
        if not await worker.ping(timeout):
            if worker.is_ready:
                _log.warning("pool %s: %s missed its health check", self.name, worker.describe())
                worker.kill(f"missed its health check (no pong within {timeout:g}s)")
            return
        if worker.ttl_limit is not None and worker.age >= worker.ttl_limit:
            worker.retire(f"reached worker_ttl ({worker.age:.1f}s old)")
        elif self.config.max_memory_mb is not None:
            self._check_memory(worker, self.config.max_memory_mb)

    async def start_first(self, slot: int, errors: list[WorkerStartError]) -> None:
        retrying = tenacity.AsyncRetrying(
            stop=tenacity.stop_after_attempt(self.start_attempts),
            wait=tenacity.wait_exponential(multiplier=0.05, max=1.0)
            + tenacity.wait_random(0, 0.05),
            retry=tenacity.retry_if_exception_type(WorkerStartError),
            sleep=anyio.sleep,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    if errors:  # another slot already failed for good: stop trying
                        raise errors[0]
                    await self._spawn(slot, restarts=attempt.retry_state.attempt_number - 1)
        except WorkerStartError as exc:
            if exc not in errors:
                errors.append(exc)

    async def keep_filled(self, slot: int) -> None:
        """Replace the slot's worker whenever it exits, with backoff on failures.

        A worker that crashes soon after starting counts as a failed start, so
        a crash loop backs off exponentially like failing starts do.
        """
        early_deaths = 0
        while True:
            worker = self._parts.workers[slot]
            await worker.exited.wait()
            if self._closed():
                return
            info = worker.exit_info
            # A crash loop is a worker dying soon after starting without having
            # served anything; one killed after serving calls is replaced at once.
            died_early = (
                info is not None
                and not info.planned
                and info.lifetime < _EARLY_DEATH
                and worker.requests == 0
            )
            early_deaths = early_deaths + 1 if died_early else 0
            if early_deaths:  # (the breaker counted this death through the calls it failed)
                await anyio.sleep(_restart_delay(early_deaths))
            try:
                await self._replace(slot, worker.restarts)
            except WorkerStartError:
                return  # only when the pool closed meanwhile

    async def _replace(self, slot: int, restarts: int) -> None:
        """Start a new worker in ``slot``, retrying failed starts with backoff."""
        retrying = tenacity.AsyncRetrying(
            wait=_RESTART_BACKOFF,
            retry=tenacity.retry_if_exception_type(WorkerStartError),
            sleep=anyio.sleep,
            before_sleep=functools.partial(self._replacement_failed, slot),
        )
        async for attempt in retrying:
            with attempt:
                if self._closed():
                    return
                await self._spawn(slot, restarts=restarts + attempt.retry_state.attempt_number)

    def _replacement_failed(self, slot: int, state: tenacity.RetryCallState) -> None:
        if self._closed():
            return
        error = state.outcome.exception() if state.outcome else None
        _log.warning(
            "pool %s: replacing worker %d failed (attempt %d): %s",
            self.name, slot, state.attempt_number, error,
        )  # fmt: skip
        self._parts.breaker.failure(ErrorCategory.INITIALIZATION)  # a failed (re)start counts once

    def _on_worker_exit(self, worker: WorkerHandle) -> None:
        info = worker.exit_info
        if worker.pid is not None and self.ray is None:
            self._registry.remove(worker.pid)
        if info is not None and not info.planned and not self._closed():
            # (one that never said hello is reported by its start's error instead)
            log = _log.warning if worker.hello is not None else _log.debug
            log("pool %s: %s exited: %s", self.name, worker.describe(), info.reason)
        if worker.retiring is not None:
            self._parts.listeners.emit(
                "worker.recycled", worker.slot, pid=worker.pid, reason=worker.retiring
            )
        self._parts.listeners.emit(
            "worker.exited", worker.slot, pid=worker.pid, **format_exit(info)
        )
        self._on_exit(worker)

    async def stop_all(self) -> None:
        async with anyio.create_task_group() as tg:
            for worker in self._parts.workers:
                tg.start_soon(worker.stop, self.stop_grace)
