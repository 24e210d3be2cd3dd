"""Names a package exports but imports from its modules only when first
asked for (PEP 562): :func:`lazy_exports`.

A package whose ``__init__`` imported every module to re-export their
names made each process pay for all of them at start-up, though a VMM run
with no device process needs only a few (issue 15).  :mod:`ipc`,
:mod:`vmm.remote` and :mod:`devices.faults` export this way.  This module
imports nothing of the tree, so every package may use it.
"""

from __future__ import annotations

TYPE_CHECKING = False       # mypy takes it as typing's; nothing imported at run time
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(namespace: dict[str, Any], module_of: dict[str, str]) -> tuple[
        Callable[[str], object], Callable[[], list[str]]]:
    """The ``__getattr__`` and ``__dir__`` of the package whose globals are
    ``namespace``: a name of ``module_of`` (name -> module of the package)
    is imported from that module when first asked for, and kept in the
    package; any other name is an AttributeError.  Use as
    ``__getattr__, __dir__ = lazy_exports(globals(), _MODULE_OF)``."""
    package = namespace["__name__"]

    def __getattr__(name: str) -> object:
        module = module_of.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        import importlib

        value = getattr(importlib.import_module(f"{package}.{module}"), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(namespace["__all__"]))

    return __getattr__, __dir__
