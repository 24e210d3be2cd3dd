"""Modules of the standard library that the ``vmm`` command imports only
when something uses them, and imports without collections
(:func:`import_uncollected`): start-up and memory, issue 15.

``dataclasses`` imports ``inspect`` at its top, but uses it only to write
the docstring of a dataclass that has none (``inspect.signature``), and
every dataclass on the VMM's path has one.  ``inspect`` (with ``ast``,
``dis``, ``tokenize``, ``linecache``) is ~4 ms of every ``vmm`` start and
~1 MB of the VMM's private memory.  :func:`defer_imports` puts a stand-in
in ``sys.modules`` whose first attribute access imports the real module
(and replaces the stand-in there, so later imports get the real one).

Only the ``vmm`` command's own process calls it (:mod:`vmm.entry`); a
program that imports :mod:`vmm` as a library gets the standard library
as it is, and so do the fork server and the device processes (their own
interpreters).
"""

from __future__ import annotations

import sys
import threading
from types import ModuleType

#: What :func:`defer_imports` defers.
DEFERRED = ("inspect",)

_lock = threading.Lock()


class Deferred(ModuleType):
    """The stand-in of a module not imported yet: every attribute access
    goes to the real module, imported by the first one."""

    def __getattr__(self, attr: str) -> object:
        return getattr(self.real(), attr)

    def real(self) -> ModuleType:
        """The real module, imported now if it is not yet."""
        name = self.__name__
        with _lock:     # one thread imports it; the others wait, then find it
            if sys.modules.get(name) is self:
                del sys.modules[name]
            __import__(name)
            return sys.modules[name]


def defer_imports() -> None:
    """Put a :class:`Deferred` stand-in in ``sys.modules`` for each module
    of :data:`DEFERRED` not imported yet."""
    for name in DEFERRED:
        if name not in sys.modules:
            sys.modules[name] = Deferred(name)


def import_uncollected(name: str) -> ModuleType:
    """Import module ``name`` (and what it imports) with the cyclic
    collector off: a module's classes and functions are no garbage, and
    the collections their allocations trigger were ~5% of the import
    time (``vmm.cli``; the device-process stack, ~45 modules, ~2 ms)."""
    import gc
    import importlib

    collecting = gc.isenabled()
    gc.disable()
    try:
        return importlib.import_module(name)
    finally:
        if collecting:
            gc.enable()
