"""The worker-side API: subclass :class:`Adapter`, mark methods with :func:`command`."""

from ._base import Adapter as Adapter
from ._command import CommandSpec as CommandSpec
from ._command import command as command
from ._context import CallContext as CallContext
from ._context import SessionVariables as SessionVariables
from ._loading import ENTRY_POINT_GROUP as ENTRY_POINT_GROUP
from ._loading import load_adapter_class as load_adapter_class

__all__ = [
    "ENTRY_POINT_GROUP",
    "Adapter",
    "CallContext",
    "CommandSpec",
    "SessionVariables",
    "command",
    "load_adapter_class",
]
