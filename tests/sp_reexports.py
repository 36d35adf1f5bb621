"""A module the generic adapter's tests allow-list, which holds names it did not define.

Everything here but ``double`` and ``count_up`` came from somewhere else: an
allow-listed module's imports must never be callable through it.
"""

from __future__ import annotations

import functools
import os
from os import system as shell  # noqa: F401 - re-exported under another name on purpose
from subprocess import Popen as Runner  # noqa: F401 - a class defined elsewhere

HELPERS = {"os": os, "run": os.system}
get_helper = HELPERS.get  # a built-in method of a dict
quiet_shell = functools.partial(os.system)


def double(x: int) -> int:
    """Defined here: callable when this module is allowed."""
    return 2 * x


class Counter:
    def __call__(self, n: int) -> int:
        return n + 1


count_up = Counter()  # an instance of a class defined here: callable
