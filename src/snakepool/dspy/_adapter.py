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
(``worker_concurrency > 1``) never see each other's LM. The session
variables ``temperature`` and ``max_tokens``, when defined, override the LM's
for every call of the session.

DSPy is imported in ``setup`` only, so snakepool itself does not need it
(``pip install 'snakepool[dspy]'`` for this adapter).

Note: the session's LM settings, API key included, are persisted in the
session store (memory, or Redis when configured) so that another worker can
rebuild the LM.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
import re
import threading
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from ..adapters import Adapter, CallContext, command
from ..errors import RemoteError, UnknownTool
from . import LMCallError, NoLMConfigured, UnknownProgram

__all__ = ["DSPyAdapter", "LMCallError", "NoLMConfigured", "UnknownProgram"]

#: The format tag of ``dump_program``'s result.
DUMP_FORMAT = "snakepool.dspy.program/1"
MODULES = ("Predict", "ChainOfThought", "ReAct")
OPTIMIZERS = ("BootstrapFewShot", "LabeledFewShot")
BUILTIN_METRICS = ("exact_match", "f1")
_PROGRAM_KEY = "program:"  # save_state key prefix, then the program id
_LM_KEY = "lm"
#: Seconds an LM request leaves between its own timeout and the call's deadline.
_DEADLINE_MARGIN = 0.5
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")

#: The context of the call executing a program right now (ReAct's host tools use it).
_current_call: contextvars.ContextVar[CallContext | None] = contextvars.ContextVar(
    "snakepool_dspy_call", default=None
)


class _AbortOptimization(BaseException):
    """Stops an optimizer at once (it catches ``Exception`` per example)."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


@dataclass
class _Program:
    program_id: str
    definition: dict[str, Any]  # signature, module, instructions, tools, max_iters
    module: Any  # the dspy.Module
    input_names: list[str]
    output_names: list[str]


class _Scope:
    """Programs and LM of one session, or of the worker for session-less calls."""

    def __init__(self) -> None:
        self.programs: dict[str, _Program] = {}
        self.lm: Any = None
        self.lm_settings: dict[str, Any] | None = None
        self.restore_errors: dict[str, str] = {}
        self.lock = threading.Lock()


class DSPyAdapter(Adapter):
    """DSPy programs: create, execute, stream, optimize, dump and load them."""

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
        self._worker = _Scope()
        lm_config = config.get("lm")
        if lm_config is not None:
            if not isinstance(lm_config, Mapping) or "model" not in lm_config:
                raise TypeError(
                    "adapter_config['lm'] must be a dict of configure_lm arguments "
                    f"with at least 'model', got {lm_config!r}"
                )
            settings = _lm_settings(**dict(lm_config))
            self._worker.lm = self._make_lm(settings)
            self._worker.lm_settings = settings

    # --- sessions ------------------------------------------------------------------

    def restore_session(self, ctx: CallContext, state: dict[str, Any]) -> None:
        scope = self._scope(ctx)
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
                program = self._build(program_id, record["definition"])
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

    def _persist_program(self, ctx: CallContext, program: _Program) -> None:
        self._persist(
            ctx,
            _PROGRAM_KEY + program.program_id,
            {"definition": program.definition, "state": _json_safe(program.module.dump_state())},
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
        settings = _lm_settings(
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
            return self.dspy.LM(model, **settings)
        except TypeError as exc:
            raise TypeError(f"configure_lm: {exc}") from exc

    def _lm_for(self, ctx: CallContext) -> Any:
        lm = self._scope(ctx).lm if ctx.session_id is not None else None
        if lm is None:
            lm = self._worker.lm
        if lm is None:
            raise NoLMConfigured(
                "no LM configured: call configure_lm(model=...) first (in the session, "
                "or without one for the worker) or pass adapter_config={'lm': {...}}"
            )
        overrides: dict[str, Any] = {}
        for name, kind in (("temperature", float), ("max_tokens", int)):
            value = ctx.variables.get(name)
            if value is not None:
                overrides[name] = kind(value)
        left = ctx.time_left
        if left is not None:
            # Give up on the LM before the host gives up on the call: a request
            # that outlives its call would get the whole worker replaced.
            budget = max(0.05, left - _DEADLINE_MARGIN)
            configured = lm.kwargs.get("timeout")
            if not isinstance(configured, int | float) or configured > budget:
                overrides["timeout"] = budget
        return lm.copy(**overrides) if overrides else lm

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
    ) -> str:
        """Create a program; returns its id.

        ``signature``: ``"question -> answer"`` or ``{"inputs": {name: {"desc", "type"}},
        "outputs": {...}}`` (types: str, int, float, bool, list[str], dict...).
        ``module``: Predict, ChainOfThought or ReAct. ``tools`` (ReAct only): host
        tool names (``pool.register_tool``), or dicts ``{"name", "desc", "args"}``
        with ``args`` a JSON schema per argument.
        """
        program_id = _new_id(program_id)
        definition = {
            "signature": signature,
            "module": module,
            "instructions": instructions,
            "tools": tools,
            "max_iters": max_iters,
        }
        program = self._build(program_id, definition)
        self._add(ctx, program)
        return program_id

    def _add(self, ctx: CallContext, program: _Program) -> None:
        scope = self._scope(ctx)
        with scope.lock:
            if program.program_id in scope.programs:
                raise ValueError(
                    f"a program with id {program.program_id!r} already exists; "
                    "delete it first or choose another id"
                )
            scope.programs[program.program_id] = program
            scope.restore_errors.pop(program.program_id, None)
        try:
            self._persist_program(ctx, program)
        except BaseException:
            with scope.lock:
                scope.programs.pop(program.program_id, None)
            raise

    def _build(self, program_id: str, definition: Mapping[str, Any]) -> _Program:
        dspy = self.dspy
        unknown = set(definition) - {"signature", "module", "instructions", "tools", "max_iters"}
        if unknown:
            raise ValueError(f"program definition has unknown keys: {sorted(unknown)}")
        module = definition.get("module", "Predict")
        if module not in MODULES:
            raise ValueError(f"unknown module {module!r}: use one of {', '.join(MODULES)}")
        instructions = definition.get("instructions")
        if instructions is not None and not isinstance(instructions, str):
            raise TypeError(f"instructions must be a str, got {type(instructions).__name__}")
        signature = self._signature(definition.get("signature"), instructions)
        tools = definition.get("tools")
        max_iters = definition.get("max_iters")
        if module == "ReAct":
            if max_iters is not None and (
                isinstance(max_iters, bool) or not isinstance(max_iters, int) or max_iters < 1
            ):
                raise ValueError(f"max_iters must be an int >= 1, got {max_iters!r}")
            host_tools = [self._host_tool(spec) for spec in (tools or [])]
            names = [tool.name for tool in host_tools]
            if len(set(names)) != len(names) or "finish" in names:
                raise ValueError(f"tool names must be unique and not 'finish', got {names}")
            instance = dspy.ReAct(signature, tools=host_tools, max_iters=max_iters or 5)
        else:
            if tools:
                raise ValueError(f"tools are only used by module 'ReAct', not {module!r}")
            if max_iters is not None:
                raise ValueError(f"max_iters is only used by module 'ReAct', not {module!r}")
            instance = getattr(dspy, module)(signature)
        return _Program(
            program_id=program_id,
            definition=_json_safe(dict(definition)),
            module=instance,
            input_names=list(signature.input_fields),
            output_names=list(signature.output_fields),
        )

    def _signature(self, spec: Any, instructions: str | None) -> Any:
        dspy = self.dspy
        if isinstance(spec, str):
            try:
                signature = dspy.Signature(spec)
            except Exception as exc:
                raise ValueError(
                    f"cannot parse signature {spec!r}: {exc} "
                    "(expected e.g. 'question -> answer' or 'context, question -> answer: int')"
                ) from None
        elif isinstance(spec, Mapping):
            signature = dspy.make_signature(self._signature_fields(spec), "")
        else:
            raise TypeError(
                "signature must be a str like 'question -> answer' or a dict "
                f"{{'inputs': {{...}}, 'outputs': {{...}}}}, got {type(spec).__name__}"
            )
        if not signature.input_fields or not signature.output_fields:
            raise ValueError(
                f"signature {spec!r} needs at least one input and one output field "
                f"(inputs: {list(signature.input_fields)}, outputs: {list(signature.output_fields)})"
            )
        if instructions is not None:
            signature = signature.with_instructions(instructions)
        return signature

    def _signature_fields(self, spec: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
        dspy = self.dspy
        unknown = set(spec) - {"inputs", "outputs"}
        if unknown:
            raise ValueError(
                f"signature dict has unknown keys {sorted(unknown)}: use 'inputs' and 'outputs'"
            )
        fields: dict[str, tuple[Any, Any]] = {}
        for side, make in (("inputs", dspy.InputField), ("outputs", dspy.OutputField)):
            entries = spec.get(side)
            if not isinstance(entries, Mapping) or not entries:
                raise ValueError(
                    f"signature dict needs a non-empty {side!r} mapping of field name -> "
                    f"{{'desc': ..., 'type': ...}}, got {entries!r}"
                )
            for name, field in entries.items():
                if not isinstance(name, str) or not _IDENTIFIER.match(name):
                    raise ValueError(f"signature field name {name!r} is not an identifier")
                if name in fields:
                    raise ValueError(f"signature field {name!r} is both an input and an output")
                if field is None:
                    field = {}
                elif isinstance(field, str):
                    field = {"desc": field}
                if not isinstance(field, Mapping):
                    raise ValueError(
                        f"signature field {name!r}: expected a dict with 'desc' and 'type', "
                        f"got {field!r}"
                    )
                bad = set(field) - {"desc", "description", "type"}
                if bad:
                    raise ValueError(f"signature field {name!r} has unknown keys {sorted(bad)}")
                desc = field.get("desc", field.get("description"))
                type_name = field.get("type", "str")
                annotation = _FIELD_TYPES.get(type_name) if isinstance(type_name, str) else None
                if annotation is None:
                    raise ValueError(
                        f"signature field {name!r}: unknown type {type_name!r} "
                        f"(allowed: {', '.join(_FIELD_TYPES)})"
                    )
                info = make(desc=desc) if desc else make()
                fields[name] = (annotation, info)
        return fields

    def _host_tool(self, spec: Any) -> Any:
        if isinstance(spec, str):
            spec = {"name": spec}
        if not isinstance(spec, Mapping):
            raise ValueError(f"a tool is a host tool name or a dict with 'name', got {spec!r}")
        bad = set(spec) - {"name", "desc", "args"}
        if bad:
            raise ValueError(f"tool {spec!r} has unknown keys {sorted(bad)}")
        name = spec.get("name")
        if not isinstance(name, str) or not _IDENTIFIER.match(name):
            raise ValueError(f"tool name {name!r} must be an identifier (a registered host tool)")
        args = spec.get("args")
        if args is not None and not isinstance(args, Mapping):
            raise ValueError(f"tool {name!r}: 'args' must map argument names to JSON schemas")

        def call_host_tool(**kwargs: Any) -> Any:
            ctx = _current_call.get()
            if ctx is None:
                raise RuntimeError(f"host tool {name!r} called outside a snakepool call")
            return ctx.call_host(name, kwargs)

        call_host_tool.__name__ = name
        return self.dspy.Tool(
            call_host_tool,
            name=name,
            desc=spec.get("desc") or f"The host tool {name}.",
            args=dict(args) if args is not None else {},
        )

    def _program(self, ctx: CallContext, program_id: str) -> _Program:
        if not isinstance(program_id, str):
            raise TypeError(f"program_id must be a str, got {type(program_id).__name__}")
        scope = self._scope(ctx)
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

    def _inputs(self, program: _Program, inputs: Any) -> dict[str, Any]:
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
    def _running(self, ctx: CallContext, lm: Any) -> Iterator[None]:
        token = _current_call.set(ctx)
        try:
            with self.dspy.context(lm=lm):
                yield
        finally:
            _current_call.reset(token)

    def _lm_failure(self, program: _Program, lm: Any, exc: BaseException) -> LMCallError | None:
        if isinstance(exc, self.dspy.utils.exceptions.LMError):
            model = getattr(lm, "model", "?")
            return LMCallError(
                f"program {program.program_id!r}: the LM call to {model!r} failed "
                f"({type(exc).__name__}): {exc}"
            )
        return None

    @command
    def execute_program(self, program_id: str, inputs: dict[str, Any], ctx: CallContext) -> Any:
        """Run a program on ``inputs``; returns its prediction's fields as a dict."""
        program = self._program(ctx, program_id)
        kwargs = self._inputs(program, inputs)
        lm = self._lm_for(ctx)
        with self._running(ctx, lm):
            try:
                prediction = program.module(**kwargs)
            except Exception as exc:
                failure = self._lm_failure(program, lm, exc)
                if failure is not None:
                    raise failure from exc
                raise
        return _prediction_dict(prediction)

    @command
    def stream_program(
        self, program_id: str, inputs: dict[str, Any], ctx: CallContext
    ) -> Iterator[dict[str, Any]]:
        """Run a program, streaming its output fields as the LM writes them.

        Items: ``{"field": name, "chunk": text}`` as tokens arrive, ``{"status":
        text}`` for progress (tool calls...), then ``{"prediction": {...}}``.
        """
        dspy = self.dspy
        program = self._program(ctx, program_id)
        kwargs = self._inputs(program, inputs)
        lm = self._lm_for(ctx)
        listeners = [
            dspy.streaming.StreamListener(signature_field_name=name)
            for name in program.output_names
        ]
        try:
            streamer = dspy.streamify(
                program.module, stream_listeners=listeners, async_streaming=False
            )
        except Exception:  # a field name several predictors share: no per-field chunks
            streamer = dspy.streamify(program.module, async_streaming=False)
        stream_response = dspy.streaming.StreamResponse
        status_message = dspy.streaming.StatusMessage
        with self._running(ctx, lm):
            items = streamer(**kwargs)
            try:
                for item in items:
                    if isinstance(item, stream_response):
                        if item.chunk:
                            yield {"field": item.signature_field_name, "chunk": item.chunk}
                    elif isinstance(item, status_message):
                        yield {"status": item.message}
                    elif isinstance(item, dspy.Prediction):
                        yield {"prediction": _prediction_dict(item)}
            except Exception as exc:
                failure = self._lm_failure(program, lm, exc)
                if failure is not None:
                    raise failure from exc
                raise
            finally:
                items.close()

    @command
    def list_programs(self, ctx: CallContext) -> list[dict[str, Any]]:
        """The programs of this session (or worker): id, module, fields, demos."""
        scope = self._scope(ctx)
        return [
            {
                "program_id": program.program_id,
                "module": program.definition["module"],
                "inputs": program.input_names,
                "outputs": program.output_names,
                "demos": sum(len(p.demos) for _, p in program.module.named_predictors()),
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
            "state": _json_safe(program.module.dump_state()),
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
        program = self._build(_new_id(program_id), definition)
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
        BootstrapFewShot or LabeledFewShot, ``options`` passed through (plus
        ``threshold`` for the ``f1`` metric). ``metric``: ``exact_match`` (every
        labelled output field, case and whitespace ignored), ``f1`` (token F1
        over the first output field), or a host tool called with
        ``{"example", "prediction"}`` returning a bool or a score.
        """
        dspy = self.dspy
        program = self._program(ctx, program_id)
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {optimizer!r}: use one of {', '.join(OPTIMIZERS)}")
        options = dict(options or {})
        if not isinstance(metric, str) or not metric:
            raise ValueError(
                f"metric must be {', '.join(BUILTIN_METRICS)} or a host tool's name, got {metric!r}"
            )
        threshold = options.pop("threshold", 0.5)
        metric_fn = self._metric(ctx, program, metric, float(threshold))
        keys = list(input_keys) if input_keys is not None else program.input_names
        examples = self._trainset(program, trainset, keys)
        student = self._build(program.program_id, program.definition).module
        student.load_state(program.module.dump_state())
        make: Any = dspy.LabeledFewShot
        arguments = dict(options)
        if optimizer == "BootstrapFewShot":
            make, arguments = dspy.BootstrapFewShot, {"metric": metric_fn, **options}
        try:
            teleprompter = make(**arguments)
        except TypeError as exc:
            raise ValueError(f"optimizer {optimizer!r} rejects options {options}: {exc}") from None
        lm = self._lm_for(ctx)
        with self._running(ctx, lm):
            try:
                compiled = teleprompter.compile(student, trainset=examples)
            except _AbortOptimization as abort:
                raise abort.error from None
            except Exception as exc:
                failure = self._lm_failure(program, lm, exc)
                if failure is not None:
                    raise failure from exc
                raise
        new = _Program(
            program_id=_new_id(new_program_id),
            definition=program.definition,
            module=compiled,
            input_names=program.input_names,
            output_names=program.output_names,
        )
        self._add(ctx, new)
        return new.program_id

    def _trainset(self, program: _Program, trainset: Any, keys: list[str]) -> list[Any]:
        if not isinstance(trainset, list) or not trainset:
            raise ValueError("trainset must be a non-empty list of dicts (inputs and outputs)")
        unknown_keys = [k for k in keys if k not in program.input_names]
        if unknown_keys:
            raise ValueError(
                f"input_keys {unknown_keys} are not inputs of program {program.program_id!r} "
                f"(its inputs: {program.input_names})"
            )
        examples = []
        for index, row in enumerate(trainset):
            if not isinstance(row, Mapping):
                raise ValueError(f"trainset[{index}] must be a dict, got {type(row).__name__}")
            missing = [k for k in keys if k not in row]
            if missing:
                raise ValueError(f"trainset[{index}] is missing input field(s) {missing}")
            if not any(name in row for name in program.output_names):
                raise ValueError(
                    f"trainset[{index}] has none of the output fields {program.output_names}"
                )
            examples.append(self.dspy.Example(**row).with_inputs(*keys))
        return examples

    def _metric(self, ctx: CallContext, program: _Program, name: str, threshold: float) -> Any:
        outputs = program.output_names

        if name == "exact_match":

            def exact_match(example: Any, prediction: Any, trace: Any = None) -> bool:
                labelled = [field for field in outputs if field in example]
                return bool(labelled) and all(
                    _normalize(example[field]) == _normalize(prediction.get(field))
                    for field in labelled
                )

            return exact_match

        if name == "f1":

            def f1(example: Any, prediction: Any, trace: Any = None) -> float | bool:
                field = outputs[0]
                score = _token_f1(prediction.get(field), example.get(field))
                return score >= threshold if trace is not None else score

            return f1

        tool = name.removeprefix("tool:")

        def host_metric(example: Any, prediction: Any, trace: Any = None) -> Any:
            args = {
                "example": _json_safe(example.toDict()),
                "prediction": _prediction_dict(prediction),
            }
            try:
                value = ctx.call_host(tool, args)
            except RemoteError as exc:
                if exc.remote_kind == UnknownTool.kind:
                    raise _AbortOptimization(
                        ValueError(
                            f"unknown metric {name!r}: not one of {', '.join(BUILTIN_METRICS)} "
                            f"and not a registered host tool ({exc})"
                        )
                    ) from None
                raise
            if isinstance(value, bool):
                return value
            if isinstance(value, int | float):
                return float(value) >= threshold if trace is not None else float(value)
            raise _AbortOptimization(
                TypeError(
                    f"metric host tool {tool!r} must return a bool or a number, "
                    f"got {type(value).__name__}"
                )
            )

        return host_metric


# --- helpers -----------------------------------------------------------------------------

_FIELD_TYPES: dict[str, Any] = {
    "str": str,
    "int": int,
    "float": float,
    "bool": bool,
    "list": list,
    "list[str]": list[str],
    "list[int]": list[int],
    "list[float]": list[float],
    "dict": dict,
    "dict[str, str]": dict[str, str],
}


def _lm_settings(**settings: Any) -> dict[str, Any]:
    """The LM's settings, as persisted: JSON-safe, without unset values."""
    cleaned = {k: v for k, v in settings.items() if v is not None}
    try:
        json.dumps(cleaned)
    except TypeError as exc:
        raise TypeError(f"configure_lm arguments must be plain data: {exc}") from None
    return cleaned


def _new_id(program_id: str | None) -> str:
    if program_id is None:
        return uuid.uuid4().hex
    if not isinstance(program_id, str) or not program_id:
        raise ValueError(f"program_id must be a non-empty str, got {program_id!r}")
    return program_id


def _json_safe(value: Any) -> Any:
    """Plain data (MessagePack and JSON): containers, str, numbers, bools, None."""
    if value is None or isinstance(value, str | bool | int | float):
        return value
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_json_safe(v) for v in value]
    model_dump = getattr(value, "model_dump", None)
    if callable(model_dump):
        return _json_safe(model_dump(mode="json"))
    to_dict = getattr(value, "toDict", None)
    if callable(to_dict):
        return _json_safe(to_dict())
    return str(value)


def _prediction_dict(prediction: Any) -> dict[str, Any]:
    return {str(k): _json_safe(v) for k, v in prediction.toDict().items()}


def _normalize(value: Any) -> str:
    return " ".join(str(value).lower().split())


def _token_f1(predicted: Any, expected: Any) -> float:
    pred = _normalize(predicted).split() if predicted is not None else []
    gold = _normalize(expected).split() if expected is not None else []
    if not pred or not gold:
        return float(pred == gold)
    remaining = list(gold)
    common = 0
    for token in pred:
        if token in remaining:
            remaining.remove(token)
            common += 1
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)
