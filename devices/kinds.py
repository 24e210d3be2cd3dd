"""Which model class serves a ``--device TYPE``: the one table of kinds.

``TYPE`` is either

* a **kind**: the name of an entry point in the group
  :data:`ENTRY_POINT_GROUP` (``splitvmm.devices``) whose value is
  ``module:Class``.  splitvmm registers its own models there
  (``pyproject.toml``), and any installed package may add kinds the same
  way::

      [project.entry-points."splitvmm.devices"]
      my-dev = "my_package.my_module:MyDevice"

* or ``MODULE:CLASS`` itself: any importable subclass of
  :class:`devices.base.Device`, with no registration.

The VMM resolves it before the guest starts (:func:`resolve`, which
raises :class:`ModelNotFound` with a one-line reason) and a device process
resolves the same text the same way, so a model runs the same inline and
isolated.  A ``MODULE:CLASS`` model is imported from wherever the VMM
imported it: :func:`import_root` says which directory to put on the
device process's path.
"""

from __future__ import annotations

import functools
import importlib
import os
import re
import sys

from devices.base import Device, DeviceError

#: The entry-point group of device kinds (name = kind, value = module:Class).
ENTRY_POINT_GROUP = "splitvmm.devices"

_DOTTED = r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*"
_QUALIFIED = re.compile(rf"^({_DOTTED}):({_DOTTED})$")


class ModelNotFound(DeviceError):
    """A ``--device TYPE`` that names no usable model class: an unknown
    kind, a module that cannot be imported, a name that is not a concrete
    subclass of :class:`devices.base.Device`."""


@functools.cache
def kinds() -> dict[str, str]:
    """Every registered kind: name -> ``module:Class`` (entry points of
    :data:`ENTRY_POINT_GROUP` of the installed distributions)."""
    found = _scan_entry_points(ENTRY_POINT_GROUP)
    if found is None:
        from importlib import metadata

        found = [(ep.name, ep.value) for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)]
    return dict(found)


_DIST_SUFFIXES = (".dist-info", ".egg-info")


def _scan_entry_points(group: str) -> list[tuple[str, str]] | None:
    """The entry points of ``group`` as :func:`importlib.metadata.entry_points`
    finds them, read straight from each distribution's ``entry_points.txt``:
    importing ``importlib.metadata`` (email, zipfile, csv) was ~10 ms of
    every VMM's and device process's start-up, for one small text file.

    Same search: the directories of ``sys.path`` in order, in each its
    ``*.dist-info`` and ``*.egg-info``, the first distribution of a
    (normalised) name wins; same parse (``[group]`` sections of ``name =
    value`` lines, ``#`` comments).  None where the answer could differ
    and importlib.metadata must be asked: a path entry that is a file (a
    zip) or an ``.egg``, another finder on ``sys.meta_path`` that lists
    distributions, a line this parse does not take."""
    from importlib.machinery import PathFinder

    if any(f is not PathFinder and hasattr(f, "find_distributions") for f in sys.meta_path):
        return None
    seen: set[str] = set()
    out: list[tuple[str, str]] = []
    for entry in sys.path:
        root = entry or "."
        if root.lower().endswith(".egg"):
            return None
        try:
            children = os.listdir(root)
        except NotADirectoryError:
            return None
        except OSError:
            continue
        for child in children:
            low = child.lower()
            if not low.endswith(_DIST_SUFFIXES):
                continue
            name = re.sub(r"[-_.]+", "_", low.rpartition(".")[0].partition("-")[0])
            if name in seen:
                continue
            seen.add(name)
            try:
                with open(os.path.join(root, child, "entry_points.txt"), encoding="utf-8") as f:
                    text = f.read()
            except OSError:     # none (most distributions), or an .egg-info that is a file
                continue
            section = None
            for line in map(str.strip, text.splitlines()):
                if not line or line.startswith("#"):
                    continue
                if line.startswith("[") and line.endswith("]"):
                    section = line.strip("[]")
                elif section is not None:
                    key, eq, value = line.partition("=")
                    if not eq:
                        return None
                    if section == group:
                        out.append((key.strip(), value.strip()))
    return out


def is_qualified(kind: str) -> bool:
    """True if ``kind`` is written ``MODULE:CLASS``."""
    return _QUALIFIED.match(kind) is not None


def resolve(kind: str) -> type[Device]:
    """The model class ``kind`` names (a registered kind or
    ``MODULE:CLASS``); raises :class:`ModelNotFound`."""
    target = kind if ":" in kind else kinds().get(kind)
    if target is None:
        known = ", ".join(sorted(kinds())) or "none: is splitvmm installed? (make install)"
        raise ModelNotFound(f"unknown device type {kind!r} (known: {known}; or MODULE:CLASS)")
    m = _QUALIFIED.match(target)
    if m is None:
        raise ModelNotFound(f"{target!r} is not MODULE:CLASS")
    module_name, attr = m.groups()
    try:
        obj: object = importlib.import_module(module_name)
    except Exception as e:      # a user's module may fail in any way while it is imported
        raise ModelNotFound(f"cannot import {module_name}: "
                            f"{type(e).__name__}: {e}") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ModelNotFound(f"module {module_name} has no {attr}") from None
    if not (isinstance(obj, type) and issubclass(obj, Device)):
        raise ModelNotFound(f"{module_name}:{attr} is not a subclass of "
                            "devices.base.Device")
    abstract = getattr(obj, "__abstractmethods__", ())   # what inspect.isabstract reads (abc sets it)
    if abstract:
        missing = ", ".join(sorted(abstract))
        raise ModelNotFound(f"{module_name}:{attr} is abstract (no {missing})")
    return obj


def import_root(cls: type) -> str | None:
    """The directory on ``sys.path`` that ``cls``'s module was imported
    from (None: not found on a path entry, e.g. a built-in module)."""
    module = sys.modules.get(cls.__module__)
    file = getattr(module, "__file__", None)
    if not file:
        return None
    from pathlib import Path     # here: `vmm run` without a device from a path imports no pathlib

    path = Path(file).resolve().parent
    depth = cls.__module__.count(".")
    if Path(file).name == "__init__.py":
        depth += 1
    for _ in range(depth):
        path = path.parent
    return str(path)
