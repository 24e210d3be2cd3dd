"""Frozen dataclasses that cost no compilation: :func:`record`.

``@dataclasses.dataclass(frozen=True)`` writes six methods for each class
(``__init__``, ``__repr__``, ``__eq__``, ``__hash__``, ``__setattr__``,
``__delattr__``) as source text and compiles each with ``exec``: ~0.3 ms a
class, paid at every import by every process.  The VMM's start path has a
few dozen such classes (~8 ms of its ~25 ms of imports, issue 15).  A
``@record`` class is a dataclass all the same -- :func:`dataclasses.fields`,
``replace``, ``asdict``, ``astuple`` and ``is_dataclass`` work on it, mypy
reads it as a frozen dataclass -- but its six methods are the ones of
:class:`Record`, written once here and shared by every record.

What a record does as ``dataclass(frozen=True)`` would: fields by position
or keyword, their defaults and ``default_factory``, ``__post_init__``
(which may set fields with ``object.__setattr__``), equality of the same
class by fields, a hash of the fields, the same ``repr``, and
``dataclasses.FrozenInstanceError`` on assignment or deletion.  Fields with
other ``dataclasses.field`` options (``init``, ``repr``, ``compare``,
``hash``, ``kw_only``), ``InitVar`` and ``slots`` are refused when the
class is made: use ``dataclasses.dataclass`` for those.  Construction runs
a loop instead of straight-line code (a few microseconds): not for a class
made on a hot path.

The wire messages of :mod:`ipc.protocol` are records too (this module
imports nothing of the tree, so :mod:`ipc` may use it).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

__all__ = ["Record", "record"]

_C = TypeVar("_C", bound=type)
_MISSING = dataclasses.MISSING


class Record:
    """The methods every :func:`record` class shares (it gets them from
    :func:`record`; it need not derive from this class)."""

    #: Field names in order, defaults, default factories: set by :func:`record`.
    _record_fields: ClassVar[tuple[str, ...]] = ()
    _record_defaults: ClassVar[dict[str, Any]] = {}
    _record_factories: ClassVar[dict[str, Any]] = {}

    def __init__(self, *args: Any, **kw: Any) -> None:
        cls = type(self)
        names = cls._record_fields
        if len(args) > len(names):
            raise TypeError(f"{cls.__qualname__}.__init__() takes {len(names) + 1} positional arguments "
                            f"but {len(args) + 1} were given")
        for name, value in zip(names, args, strict=False):
            if name in kw:
                raise TypeError(f"{cls.__qualname__}.__init__() got multiple values for argument {name!r}")
            kw[name] = value
        for name in names:
            if name in kw:
                value = kw.pop(name)
            elif name in cls._record_defaults:
                value = cls._record_defaults[name]
            elif name in cls._record_factories:
                value = cls._record_factories[name]()
            else:
                raise TypeError(f"{cls.__qualname__}.__init__() missing required argument: {name!r}")
            object.__setattr__(self, name, value)
        if kw:
            raise TypeError(f"{cls.__qualname__}.__init__() got an unexpected keyword argument "
                            f"{next(iter(kw))!r}")
        post_init = getattr(self, "__post_init__", None)
        if post_init is not None:
            post_init()

    def _record_values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self._record_fields)

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._record_fields)
        return f"{type(self).__qualname__}({fields})"

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self._record_values() == other._record_values()     # (the same class: a record's)

    def __hash__(self) -> int:
        return hash(self._record_values())

    def __setattr__(self, name: str, value: Any) -> None:
        raise dataclasses.FrozenInstanceError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise dataclasses.FrozenInstanceError(f"cannot delete field {name!r}")


_SHARED = ("__init__", "__repr__", "__eq__", "__hash__", "__setattr__", "__delattr__", "_record_values")
# dataclass() with nothing to write: it only builds the field table (no exec).
_FIELDS_ONLY = dataclasses.dataclass(init=False, repr=False, eq=False)


def _record(cls: Any) -> Any:
    for name in _SHARED[:-1]:
        if name in cls.__dict__ and not (name == "__hash__" and cls.__dict__[name] is None):
            raise TypeError(f"{cls.__qualname__}: a record writes {name} itself (use dataclasses.dataclass)")
    cls = _FIELDS_ONLY(cls)
    fields = dataclasses.fields(cls)
    initvar = dataclasses._FIELD_INITVAR     # type: ignore[attr-defined]  # (how it marks one: not public)
    if any(f._field_type is initvar for f in cls.__dataclass_fields__.values()):
        raise TypeError(f"{cls.__qualname__}: a record takes no InitVar")
    for f in fields:
        if not (f.init and f.repr and f.compare and f.hash is None and f.kw_only is False):
            raise TypeError(f"{cls.__qualname__}.{f.name}: a record's fields take only a default "
                            "or a default_factory (use dataclasses.dataclass)")
    for name in _SHARED:
        setattr(cls, name, Record.__dict__[name])
    cls._record_fields = tuple(f.name for f in fields)
    cls._record_defaults = {f.name: f.default for f in fields if f.default is not _MISSING}
    cls._record_factories = {f.name: f.default_factory for f in fields if f.default_factory is not _MISSING}
    return cls


if TYPE_CHECKING:
    from typing import dataclass_transform

    @dataclass_transform(frozen_default=True, field_specifiers=(dataclasses.field,))
    def record(cls: _C) -> _C:
        """``cls`` made a frozen dataclass whose methods are :class:`Record`'s."""
        ...
else:
    def record(cls):
        """``cls`` made a frozen dataclass whose methods are :class:`Record`'s."""
        return _record(cls)
