"""Building DSPy programs in a worker: signatures, host tools, module variants.

A program is a definition (plain data: signature, module, instructions,
tools, max_iters, bind) and the ``dspy.Module`` built from it. ``bind`` maps
a setting (``module``, or an LM setting such as ``temperature``) to the
session variable that holds it; a program whose ``module`` is bound runs,
per call, as the module the variable names: the other modules are built
once, on first use, and share what the program learned (demos, instructions).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ._lms import LM_VARIABLES
from ._values import IDENTIFIER, json_safe

__all__ = ["BINDABLE", "DEFINITION_KEYS", "DUMP_FORMAT", "MODULES", "Builder", "Program"]

#: The format tag of ``dump_program``'s result.
DUMP_FORMAT = "snakepool.dspy.program/1"
MODULES = ("Predict", "ChainOfThought", "ReAct")
DEFINITION_KEYS = frozenset({"signature", "module", "instructions", "tools", "max_iters", "bind"})
#: What ``bind`` may map to a session variable.
BINDABLE = ("module", *LM_VARIABLES)

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


@dataclass
class Program:
    program_id: str
    definition: dict[str, Any]  # DEFINITION_KEYS, plain data
    module: Any  # the dspy.Module of definition["module"]
    input_names: list[str]
    output_names: list[str]
    #: The same program as another module (a bound ``module`` variable), built on first use.
    variants: dict[str, Any] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def bind(self) -> dict[str, str]:
        return dict(self.definition.get("bind") or {})

    def module_name(self, variables: Mapping[str, Any]) -> str:
        """The module this call runs as: the bound variable's value, else the definition's."""
        variable = self.bind.get("module")
        if variable is None:
            return str(self.definition["module"])
        if variable not in variables:
            known = ", ".join(sorted(variables)) or "none"
            raise ValueError(
                f"program {self.program_id!r} takes its module from session variable "
                f"{variable!r}, which is not defined (defined: {known})"
            )
        value = variables[variable]
        if value not in MODULES:
            raise ValueError(
                f"program {self.program_id!r}: session variable {variable!r} is {value!r}, "
                f"not a module (use one of {', '.join(MODULES)})"
            )
        return str(value)


class Builder:
    """Makes ``Program``s from definitions (``dspy`` is the imported module)."""

    def __init__(self, dspy: Any, host_tool: Any) -> None:
        self.dspy = dspy
        #: ``host_tool(name) -> callable``: a function that calls the host tool ``name``.
        self._host_tool_caller = host_tool

    def build(self, program_id: str, definition: Mapping[str, Any]) -> Program:
        unknown = set(definition) - DEFINITION_KEYS
        if unknown:
            raise ValueError(f"program definition has unknown keys: {sorted(unknown)}")
        _check_bind(definition.get("bind"))
        instance, signature = self._module(definition)
        return Program(
            program_id=program_id,
            definition=json_safe(dict(definition)),
            module=instance,
            input_names=list(signature.input_fields),
            output_names=list(signature.output_fields),
        )

    def as_module(self, program: Program, name: str) -> Any:
        """``program`` running as module ``name`` (the program itself when it is its own)."""
        if name == program.definition["module"]:
            return program.module
        with program.lock:
            variant = program.variants.get(name)
            if variant is None:
                definition = {**program.definition, "module": name}
                if name != "ReAct":
                    definition.update(tools=None, max_iters=None)
                variant, _ = self._module(definition)
                _share_learning(program.module, variant)
                program.variants[name] = variant
            return variant

    def _module(self, definition: Mapping[str, Any]) -> tuple[Any, Any]:
        dspy = self.dspy
        module = definition.get("module", "Predict")
        if module not in MODULES:
            raise ValueError(f"unknown module {module!r}: use one of {', '.join(MODULES)}")
        instructions = definition.get("instructions")
        if instructions is not None and not isinstance(instructions, str):
            raise TypeError(f"instructions must be a str, got {type(instructions).__name__}")
        signature = self.signature(definition.get("signature"), instructions)
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
            return dspy.ReAct(signature, tools=host_tools, max_iters=max_iters or 5), signature
        if tools:
            raise ValueError(f"tools are only used by module 'ReAct', not {module!r}")
        if max_iters is not None:
            raise ValueError(f"max_iters is only used by module 'ReAct', not {module!r}")
        return getattr(dspy, module)(signature), signature

    def signature(self, spec: Any, instructions: str | None) -> Any:
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
            for name, entry in entries.items():
                if not isinstance(name, str) or not IDENTIFIER.match(name):
                    raise ValueError(f"signature field name {name!r} is not an identifier")
                if name in fields:
                    raise ValueError(f"signature field {name!r} is both an input and an output")
                spec_entry = _normalized_field(name, entry)
                fields[name] = (_annotation(name, spec_entry), _field_info(make, spec_entry))
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
        if not isinstance(name, str) or not IDENTIFIER.match(name):
            raise ValueError(f"tool name {name!r} must be an identifier (a registered host tool)")
        args = spec.get("args")
        if args is not None and not isinstance(args, Mapping):
            raise ValueError(f"tool {name!r}: 'args' must map argument names to JSON schemas")
        return self.dspy.Tool(
            self._host_tool_caller(name),
            name=name,
            desc=spec.get("desc") or f"The host tool {name}.",
            args=dict(args) if args is not None else {},
        )


def _check_bind(bind: Any) -> None:
    if bind is None:
        return
    if not isinstance(bind, Mapping):
        raise ValueError(f"bind must map settings to session variable names, got {bind!r}")
    for setting, variable in bind.items():
        if setting not in BINDABLE:
            raise ValueError(
                f"bind: {setting!r} is not a setting a variable can hold "
                f"(one of {', '.join(BINDABLE)})"
            )
        if not isinstance(variable, str) or not variable:
            raise ValueError(
                f"bind: {setting!r} must name a session variable (a non-empty str), "
                f"got {variable!r}"
            )


def _normalized_field(name: str, entry: Any) -> Mapping[str, Any]:
    if entry is None:
        return {}
    if isinstance(entry, str):
        return {"desc": entry}
    if not isinstance(entry, Mapping):
        raise ValueError(
            f"signature field {name!r}: expected a dict with 'desc' and 'type', got {entry!r}"
        )
    bad = set(entry) - {"desc", "description", "type"}
    if bad:
        raise ValueError(f"signature field {name!r} has unknown keys {sorted(bad)}")
    return entry


def _annotation(name: str, entry: Mapping[str, Any]) -> Any:
    type_name = entry.get("type", "str")
    annotation = _FIELD_TYPES.get(type_name) if isinstance(type_name, str) else None
    if annotation is None:
        raise ValueError(
            f"signature field {name!r}: unknown type {type_name!r} "
            f"(allowed: {', '.join(_FIELD_TYPES)})"
        )
    return annotation


def _field_info(make: Any, entry: Mapping[str, Any]) -> Any:
    desc = entry.get("desc", entry.get("description"))
    return make(desc=desc) if desc else make()


def _share_learning(source: Any, target: Any) -> None:
    """Give ``target`` what ``source`` learned (demos, instructions), predictor by predictor."""
    sources = [p for _, p in source.named_predictors()]
    targets = [p for _, p in target.named_predictors()]
    for giver, taker in zip(sources, targets, strict=False):
        taker.demos = list(giver.demos)
        taker.signature = taker.signature.with_instructions(giver.signature.instructions)
