"""The ``dspy`` built-in adapter: DSPy programs in the workers.

(The worker side of :mod:`snakepool.dspy`; ``snakepool.adapters.dspy`` is an
alias of this module's public names.)

``Pool("dspy", adapter_config={"lm": {"model": ..., "api_key": ...}})`` gives
every worker a default LM; ``configure_lm`` inside a session gives that
session its own. Programs (``Predict``, ``ChainOfThought``, ``ReAct``) live per
session (or worker-wide for calls made without one); their definitions, their
learned state (``dump_state()``, JSON) and the session's LM settings are kept
on the host with ``ctx.save_state``, so ``restore_session`` rebuilds them on
another worker when the session's worker dies.

LM calls never touch DSPy's global settings: each call runs inside
``dspy.context(lm=...)``, so sessions sharing one worker
(``worker_concurrency > 1``) never see each other's LM. Session variables
steer each call (see ``_lms`` and ``_programs``): LM settings (``model``,
``temperature``, ``max_tokens``, ``top_p``) and, for a program whose
``module`` is bound to a variable, the module it runs as. A call reads them
from one snapshot of the session's variables, taken when it starts.

LM endpoints have fuses (``adapter_config={"fuse": {"threshold": 5,
"reset_timeout": 30.0}}``, or ``False``): see ``_lms``.

DSPy is imported in ``setup`` only, so snakepool itself does not need it
(``pip install 'snakepool[dspy]'`` for this adapter).

Note: the session's LM settings, API key included, are persisted in the
session store (memory, or Redis when configured) so that another worker can
rebuild the LM.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from ..adapters import Adapter, CallContext, command
from ..errors import RemoteError
from . import EVENT_TOOL, LMCallError, LMFuseOpen, NoLMConfigured, UnknownProgram
from ._lms import Fuses, call_lm, fuse_options, fused_lm_class, lm_settings
from ._optimize import AbortOptimization, Candidates, examples, make_metric, teleprompter
from ._programs import DUMP_FORMAT, Builder, Program
from ._values import json_safe, new_id, prediction_dict

__all__ = [
    "DSPyAdapter",
    "LMCallError",
    "LMFuseOpen",
    "NoLMConfigured",
    "UnknownProgram",
]

_PROGRAM_KEY = "program:"  # save_state key prefix, then the program id
_LM_KEY = "lm"
#: Where a running call keeps its context in DSPy's settings (they follow DSPy's threads).
_CALL_SETTING = "snakepool_call"
#: Seconds a call that finds its session's scope empty waits for a restore to begin.
_RESTORE_GRACE = 0.1


class _Scope:
    """Programs and LM of one session, or of the worker for session-less calls."""

    def __init__(self) -> None:
        self.programs: dict[str, Program] = {}
        self.lm: Any = None
        self.lm_settings: dict[str, Any] | None = None
        self.restore_errors: dict[str, str] = {}
        self.lock = threading.Lock()
        #: Set once the scope holds what it should: restored, or written to here.
        self.settled = threading.Event()
        self.restoring = False

    def wait_settled(self, time_left: float | None) -> None:
        """Wait for a restore another call of the session is running here.

        The worker runtime hands a moved session's state to the first of its
        calls to arrive and lets the others run at once, before that call's
        ``restore_session`` has finished (or started): a call that finds the
        scope empty waits for it (briefly, when no restore has begun).
        """
        if self.settled.wait(_RESTORE_GRACE):  # (a restore under way, or about to begin)
            return
        if self.restoring:  # begun, and slow: it has programs to rebuild
            self.settled.wait(time_left)


@dataclass(frozen=True)
class _Plan:
    """What one call runs, decided from one snapshot of the session's variables."""

    program: Program
    module_name: str
    module: Any
    lm: Any


class DSPyAdapter(Adapter):
    """DSPy programs: create, execute, stream, evaluate, optimize, dump and load them."""

    dspy: Any = None

    def setup(self, config: dict[str, Any]) -> None:
        # Both before the import: litellm reads the first when it is imported,
        # DSPy creates its disk cache under the second.
        os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        cache_dir = config.get("cache_dir")
        if cache_dir is not None:
            os.environ["DSPY_CACHEDIR"] = str(cache_dir)
        elif "DSPY_CACHEDIR" not in os.environ:
            # Under the pool's runtime directory (the host sets SNAKEPOOL_POOL).
            from .._paths import ensure_private_dir, runtime_dir

            pool = os.environ.get("SNAKEPOOL_POOL", "default")
            with contextlib.suppress(OSError):  # private first: DSPy makes the rest 0755
                ensure_private_dir(runtime_dir())
            os.environ["DSPY_CACHEDIR"] = str(runtime_dir() / "dspy-cache" / pool)
        try:
            import dspy
        except ImportError as exc:
            raise ImportError(
                "the 'dspy' adapter needs DSPy in the worker's Python: "
                "pip install 'snakepool[dspy]'"
            ) from exc
        self.dspy = dspy
        self._fuses = Fuses(
            fuse_options(config.get("fuse")), dspy.utils.exceptions.is_retryable_lm_error
        )
        self._fuses.report = self._report
        self._lm_class = fused_lm_class(dspy, self._fuses)
        self.builder = Builder(dspy, self._host_tool_caller)
        self._worker = _Scope()
        lm_config = config.get("lm")
        if lm_config is not None:
            if not isinstance(lm_config, Mapping) or "model" not in lm_config:
                raise TypeError(
                    "adapter_config['lm'] must be a dict of configure_lm arguments "
                    f"with at least 'model', got {lm_config!r}"
                )
            settings = lm_settings(**{"cache": False, **dict(lm_config)})  # (as configure_lm)
            self._worker.lm = self._make_lm(settings)
            self._worker.lm_settings = settings

    # --- sessions ------------------------------------------------------------------

    def restore_session(self, ctx: CallContext, state: dict[str, Any]) -> None:
        scope = self._scope(ctx)
        scope.restoring = True
        try:
            self._restore(ctx, scope, state)
        finally:
            scope.restoring = False
            scope.settled.set()

    def _restore(self, ctx: CallContext, scope: _Scope, state: dict[str, Any]) -> None:
        settings = state.get(_LM_KEY)
        if settings:
            try:
                scope.lm = self._make_lm(dict(settings))
                scope.lm_settings = ctx.session_state["lm"] = dict(settings)
            except Exception as exc:  # the next call reports the missing LM
                ctx.log.warning("session %s: could not rebuild its LM: %s", ctx.session_id, exc)
        for key, record in state.items():
            if not key.startswith(_PROGRAM_KEY) or record is None:
                continue
            program_id = key[len(_PROGRAM_KEY) :]
            try:
                program = self.builder.build(program_id, record["definition"])
                program.module.load_state(record["state"])
            except Exception as exc:
                scope.restore_errors[program_id] = f"{type(exc).__name__}: {exc}"
                ctx.log.warning(
                    "session %s: could not rebuild program %s: %s", ctx.session_id, program_id, exc
                )
                continue
            scope.programs[program_id] = program

    def _scope(self, ctx: CallContext) -> _Scope:
        if ctx.session_id is None:
            return self._worker
        scope = ctx.session_state.get("dspy")
        if scope is None:
            scope = ctx.session_state.setdefault("dspy", _Scope())
            # The names the design documents, as views of the same objects.
            ctx.session_state.setdefault("programs", scope.programs)
        assert isinstance(scope, _Scope)
        return scope

    def _persist(self, ctx: CallContext, key: str, value: Any) -> None:
        if ctx.session_id is not None:
            ctx.save_state(key, value)

    def _persist_program(self, ctx: CallContext, program: Program) -> None:
        self._persist(
            ctx,
            _PROGRAM_KEY + program.program_id,
            {"definition": program.definition, "state": json_safe(program.module.dump_state())},
        )

    # --- language models ---------------------------------------------------------------

    @command
    def configure_lm(
        self,
        model: str,
        api_key: str | None = None,
        api_base: str | None = None,
        temperature: float | None = None,
        max_tokens: int | None = None,
        cache: bool = False,
        *,
        ctx: CallContext,
        **extra: Any,
    ) -> dict[str, Any]:
        """Set the LM: the session's inside a session, else this worker's default.

        Arguments go to ``dspy.LM`` (``extra`` too: ``num_retries``, ``timeout``...).
        Returns the settings, without the API key, and the scope they apply to.
        """
        settings = lm_settings(
            model=model,
            api_key=api_key,
            api_base=api_base,
            temperature=temperature,
            max_tokens=max_tokens,
            cache=cache,
            **extra,
        )
        lm = self._make_lm(settings)
        scope = self._scope(ctx)
        scope.lm, scope.lm_settings = lm, settings
        scope.settled.set()
        if ctx.session_id is not None:
            ctx.session_state["lm"] = settings
        self._persist(ctx, _LM_KEY, settings)
        public = {k: v for k, v in settings.items() if k != "api_key"}
        return {**public, "scope": "session" if ctx.session_id is not None else "worker"}

    def _make_lm(self, settings: dict[str, Any]) -> Any:
        settings = dict(settings)
        model = settings.pop("model")
        if not isinstance(model, str) or not model:
            raise ValueError(f"model must be a non-empty str like 'openai/gpt-4o', got {model!r}")
        try:
            return self._lm_class(model, **settings)
        except TypeError as exc:
            raise TypeError(f"configure_lm: {exc}") from exc

    def _configured_lm(self, ctx: CallContext) -> Any:
        lm = self._scope(ctx).lm if ctx.session_id is not None else None
        if lm is None:
            lm = self._worker.lm
        if lm is None:
            raise NoLMConfigured(
                "no LM configured: call configure_lm(model=...) first (in the session, "
                "or without one for the worker) or pass adapter_config={'lm': {...}}"
            )
        return lm

    @command
    def fuses(self) -> list[dict[str, Any]]:
        """This worker's LM fuses: endpoint, state, consecutive failures, settings."""
        return self._fuses.describe()

    def _report(self, name: str, data: dict[str, Any]) -> None:
        """Tell the host (its ``snakepool.dspy`` monitor, if any) about a fuse's change."""
        ctx = self.dspy.settings.get(_CALL_SETTING)
        if ctx is None:
            return
        try:
            ctx.call_host(EVENT_TOOL, {"name": name, "worker": ctx.worker_id, "data": data})
        except RemoteError:
            pass  # nobody on the host listens (no such tool): nothing to tell
        except Exception as exc:  # (the call's deadline, say): an event is never worth a call
            ctx.log.debug("could not report %s to the host: %s", name, exc)

    # --- programs --------------------------------------------------------------------

    @command
    def create_program(
        self,
        signature: str | dict[str, Any],
        ctx: CallContext,
        module: str = "Predict",
        program_id: str | None = None,
        instructions: str | None = None,
        tools: list[Any] | None = None,
        max_iters: int | None = None,
        bind: dict[str, str] | None = None,
    ) -> str:
        """Create a program; returns its id.

        ``signature``: ``"question -> answer"`` or ``{"inputs": {name: {"desc", "type"}},
        "outputs": {...}}`` (types: str, int, float, bool, list[str], dict...).
        ``module``: Predict, ChainOfThought or ReAct. ``tools`` (ReAct only): host
        tool names (``pool.register_tool``), or dicts ``{"name", "desc", "args"}``
        with ``args`` a JSON schema per argument. ``bind``: settings read from
        session variables per call, ``{"module": "reasoning_strategy",
        "temperature": "agent_temperature"}`` (LM settings default to the
        variables of their own name).
        """
        program_id = new_id(program_id)
        definition = {
            "signature": signature,
            "module": module,
            "instructions": instructions,
            "tools": tools,
            "max_iters": max_iters,
            "bind": bind,
        }
        program = self.builder.build(program_id, definition)
        self._add(ctx, program)
        return program_id

    def _add(self, ctx: CallContext, program: Program) -> None:
        scope = self._scope(ctx)
        with scope.lock:
            if program.program_id in scope.programs:
                raise ValueError(
                    f"a program with id {program.program_id!r} already exists; "
                    "delete it first or choose another id"
                )
            scope.programs[program.program_id] = program
            scope.restore_errors.pop(program.program_id, None)
        scope.settled.set()
        try:
            self._persist_program(ctx, program)
        except BaseException:
            with scope.lock:
                scope.programs.pop(program.program_id, None)
            raise

    def _host_tool_caller(self, name: str) -> Callable[..., Any]:
        def call_host_tool(**kwargs: Any) -> Any:
            ctx = self.dspy.settings.get(_CALL_SETTING)
            if ctx is None:
                raise RuntimeError(f"host tool {name!r} called outside a snakepool call")
            return ctx.call_host(name, kwargs)

        call_host_tool.__name__ = name
        return call_host_tool

    def _program(self, ctx: CallContext, program_id: str) -> Program:
        if not isinstance(program_id, str):
            raise TypeError(f"program_id must be a str, got {type(program_id).__name__}")
        scope = self._scope(ctx)
        program = scope.programs.get(program_id)
        if program is None and ctx.session_id is not None and not scope.settled.is_set():
            scope.wait_settled(ctx.time_left)
            program = scope.programs.get(program_id)
        if program is None:
            where = "this session" if ctx.session_id is not None else "this worker (no session)"
            known = ", ".join(sorted(scope.programs)) or "none"
            reason = scope.restore_errors.get(program_id)
            detail = f"; rebuilding it failed: {reason}" if reason else ""
            raise UnknownProgram(
                f"unknown program id {program_id!r} in {where} (known: {known}){detail}"
            )
        return program

    def _run(self, ctx: CallContext, program_id: str) -> _Plan:
        """The module and LM of this call, from one snapshot of the session's variables."""
        program = self._program(ctx, program_id)
        variables = dict(ctx.variables)  # (the worker never changes a call's view: one copy)
        name = program.module_name(variables)
        lm = call_lm(self._configured_lm(ctx), program.bind, variables, ctx.time_left)
        return _Plan(program, name, self.builder.as_module(program, name), lm)

    def _inputs(self, program: Program, inputs: Any) -> dict[str, Any]:
        if not isinstance(inputs, Mapping):
            raise TypeError(f"inputs must be a dict of input fields, got {type(inputs).__name__}")
        missing = [name for name in program.input_names if name not in inputs]
        if missing:
            raise ValueError(
                f"program {program.program_id!r}: inputs missing field(s) {missing} "
                f"(the signature's inputs are {program.input_names})"
            )
        extra = [name for name in inputs if name not in program.input_names]
        if extra:
            raise ValueError(
                f"program {program.program_id!r}: unknown input field(s) {extra} "
                f"(the signature's inputs are {program.input_names})"
            )
        return dict(inputs)

    @contextlib.contextmanager
    def _running(self, ctx: CallContext, run: _Plan) -> Iterator[None]:
        """DSPy's settings for this call; an LM failure becomes ``LMCallError``."""
        with self.dspy.context(lm=run.lm, **{_CALL_SETTING: ctx}):
            try:
                yield
            except AbortOptimization as abort:
                raise abort.error from None
            except self.dspy.utils.exceptions.LMError as exc:
                raise LMCallError(
                    f"program {run.program.program_id!r}: the LM call to "
                    f"{getattr(run.lm, 'model', '?')!r} failed ({type(exc).__name__}): {exc}"
                ) from exc

    @command
    def execute_program(self, program_id: str, inputs: dict[str, Any], ctx: CallContext) -> Any:
        """Run a program on ``inputs``; returns its prediction's fields as a dict."""
        run = self._run(ctx, program_id)
        kwargs = self._inputs(run.program, inputs)
        with self._running(ctx, run):
            prediction = run.module(**kwargs)
        return prediction_dict(prediction)

    @command
    def stream_program(
        self, program_id: str, inputs: dict[str, Any], ctx: CallContext
    ) -> Iterator[dict[str, Any]]:
        """Run a program, streaming its output fields as the LM writes them.

        Items: ``{"field": name, "chunk": text}`` as tokens arrive, ``{"status":
        text}`` for progress (tool calls...), then ``{"prediction": {...}}``.
        """
        dspy = self.dspy
        run = self._run(ctx, program_id)
        kwargs = self._inputs(run.program, inputs)
        listeners = [
            dspy.streaming.StreamListener(signature_field_name=name)
            for name in run.program.output_names
        ]
        try:
            streamer = dspy.streamify(run.module, stream_listeners=listeners, async_streaming=False)
        except Exception:  # a field name several predictors share: no per-field chunks
            streamer = dspy.streamify(run.module, async_streaming=False)
        stream_response = dspy.streaming.StreamResponse
        status_message = dspy.streaming.StatusMessage
        with self._running(ctx, run):
            items = streamer(**kwargs)
            try:
                for item in items:
                    if isinstance(item, stream_response):
                        if item.chunk:
                            yield {"field": item.signature_field_name, "chunk": item.chunk}
                    elif isinstance(item, status_message):
                        yield {"status": item.message}
                    elif isinstance(item, dspy.Prediction):
                        yield {"prediction": prediction_dict(item)}
            finally:
                items.close()

    @command
    def evaluate_example(
        self,
        program_id: str,
        example: dict[str, Any],
        ctx: CallContext,
        metric: str | None = "exact_match",
        input_keys: list[str] | None = None,
    ) -> dict[str, Any]:
        """Run a program on one example and score it: ``{"prediction", "score"}``.

        ``example``: inputs and labelled outputs. ``metric``: ``exact_match``,
        ``f1``, a host tool's name, or ``None`` (no score: the host scores).
        """
        run = self._run(ctx, program_id)
        (item,) = examples(
            self.dspy, run.program, [example], input_keys, what="example", labelled=False
        )
        scorer = make_metric(ctx, run.program, metric, 0.5) if metric is not None else None
        with self._running(ctx, run):
            prediction = run.module(**item.inputs())
            score = None if scorer is None else float(scorer(item, prediction))
        return {"prediction": prediction_dict(prediction), "score": score}

    @command
    def list_programs(self, ctx: CallContext) -> list[dict[str, Any]]:
        """The programs of this session (or worker): id, module, fields, demos, bindings."""
        scope = self._scope(ctx)
        return [
            {
                "program_id": program.program_id,
                "module": program.definition["module"],
                "inputs": program.input_names,
                "outputs": program.output_names,
                "demos": sum(len(p.demos) for _, p in program.module.named_predictors()),
                "bind": program.bind,
            }
            for program in list(scope.programs.values())
        ]

    @command
    def delete_program(self, program_id: str, ctx: CallContext) -> bool:
        """Forget a program (here and in the session's persisted state)."""
        scope = self._scope(ctx)
        self._program(ctx, program_id)
        with scope.lock:
            scope.programs.pop(program_id, None)
        self._persist(ctx, _PROGRAM_KEY + program_id, None)
        return True

    @command
    def dump_program(self, program_id: str, ctx: CallContext) -> dict[str, Any]:
        """A program as JSON-safe data: its definition and learned state (demos...)."""
        program = self._program(ctx, program_id)
        return {
            "format": DUMP_FORMAT,
            "program_id": program.program_id,
            "definition": program.definition,
            "state": json_safe(program.module.dump_state()),
        }

    @command
    def load_program(
        self, data: dict[str, Any], ctx: CallContext, program_id: str | None = None
    ) -> str:
        """Rebuild a program from ``dump_program``'s data; returns its (new) id."""
        if not isinstance(data, Mapping) or data.get("format") != DUMP_FORMAT:
            raise ValueError(
                f"load_program needs the dict dump_program returns (format {DUMP_FORMAT!r})"
            )
        definition, state = data.get("definition"), data.get("state")
        if not isinstance(definition, Mapping) or not isinstance(state, Mapping):
            raise ValueError("load_program: data needs a 'definition' and a 'state' dict")
        program = self.builder.build(new_id(program_id), definition)
        try:
            program.module.load_state(dict(state))
        except Exception as exc:
            raise ValueError(
                f"load_program: the state does not fit the definition: {type(exc).__name__}: {exc}"
            ) from None
        self._add(ctx, program)
        return program.program_id

    # --- optimization ------------------------------------------------------------------

    @command
    def optimize(
        self,
        program_id: str,
        trainset: list[dict[str, Any]],
        ctx: CallContext,
        optimizer: str = "BootstrapFewShot",
        metric: str = "exact_match",
        input_keys: list[str] | None = None,
        options: dict[str, Any] | None = None,
        new_program_id: str | None = None,
    ) -> str:
        """Compile a program with an optimizer; returns the new program's id.

        ``trainset``: dicts of inputs and labelled outputs. ``optimizer``:
        BootstrapFewShot, LabeledFewShot or COPRO, ``options`` passed through
        (plus ``threshold`` for a scoring metric while bootstrapping, and
        ``num_threads`` for COPRO's evaluations). ``metric``: ``exact_match``,
        ``f1``, or a host tool called with ``{"example", "prediction"}``
        returning a bool or a score. ``optimize_stream`` reports each scored
        candidate as it goes.
        """
        items = self.optimize_stream(
            program_id, trainset, ctx, optimizer, metric, input_keys, options, new_program_id
        )
        with contextlib.closing(items):
            for item in items:
                if "program_id" in item:
                    return str(item["program_id"])
        raise RuntimeError("the optimization was cancelled before it made a program")

    @command
    def optimize_stream(
        self,
        program_id: str,
        trainset: list[dict[str, Any]],
        ctx: CallContext,
        optimizer: str = "BootstrapFewShot",
        metric: str = "exact_match",
        input_keys: list[str] | None = None,
        options: dict[str, Any] | None = None,
        new_program_id: str | None = None,
    ) -> Iterator[dict[str, Any]]:
        """``optimize``, streamed: ``{"candidate", "score", "best_score", "instructions"}``
        for each candidate an optimizer scores (COPRO), then ``{"program_id", "candidates",
        "best_score"}``."""
        dspy = self.dspy
        run = self._run(ctx, program_id)
        options = dict(options or {})
        threshold = float(options.pop("threshold", 0.5))
        metric_fn = make_metric(ctx, run.program, metric, threshold)
        trainset_examples = examples(dspy, run.program, trainset, input_keys)
        # The student: the program as the module this call runs it as, learned state included.
        definition = {**run.program.definition, "module": run.module_name}
        if run.module_name != "ReAct":
            definition.update(tools=None, max_iters=None)
        student = self.builder.build(run.program.program_id, definition)
        student.module.load_state(run.module.dump_state())
        items: queue.Queue[dict[str, Any] | BaseException] = queue.Queue()
        candidates = Candidates(dspy, items.put)
        prompter, compile_args = teleprompter(dspy, optimizer, metric_fn, options)

        def compile_program() -> None:
            try:
                with self._running(ctx, run), dspy.context(callbacks=[candidates.callback]):
                    compiled = prompter.compile(
                        student.module, trainset=trainset_examples, **compile_args
                    )
                new = Program(
                    program_id=new_id(new_program_id),
                    definition=definition,
                    module=compiled,
                    input_names=run.program.input_names,
                    output_names=run.program.output_names,
                )
                self._add(ctx, new)
                items.put(
                    {
                        "program_id": new.program_id,
                        "candidates": candidates.count,
                        "best_score": candidates.best,
                    }
                )
            except BaseException as exc:
                items.put(exc)

        threading.Thread(
            target=compile_program, name="snakepool-dspy-optimize", daemon=True
        ).start()
        try:
            while True:
                try:
                    item = items.get(timeout=0.1)
                except queue.Empty:
                    if ctx.cancelled:
                        return
                    continue
                if isinstance(item, BaseException):
                    if isinstance(item, AbortOptimization):
                        raise item.error from None
                    raise item
                yield item
                if "program_id" in item:
                    return
        finally:
            candidates.stop.set()  # (an optimization left early stops at its next candidate)
