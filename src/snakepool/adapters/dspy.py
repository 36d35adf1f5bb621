"""The ``dspy`` adapter under its old name: it lives in :mod:`snakepool.dspy`
now (with the host-side helpers); this module keeps ``snakepool.adapters.dspy``
and ``"snakepool.adapters.dspy:DSPyAdapter"`` working."""

from ..dspy import LMCallError as LMCallError
from ..dspy import LMFuseOpen as LMFuseOpen
from ..dspy import NoLMConfigured as NoLMConfigured
from ..dspy import UnknownProgram as UnknownProgram
from ..dspy._adapter import DSPyAdapter as DSPyAdapter

__all__ = ["DSPyAdapter", "LMCallError", "LMFuseOpen", "NoLMConfigured", "UnknownProgram"]
