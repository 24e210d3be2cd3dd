"""Checking a snapshot as untrusted input (:meth:`devices.base.Device.restore`).

A snapshot comes back from a state segment a dead -- maybe compromised --
process wrote, so a model reads it the way it reads a guest's ring: every
value is checked for its exact type (``type(v) is int``: ``True`` is not
a 1 here), its range and its length before anything is changed, and
every refusal is one :class:`devices.base.BadState` naming the field.

:class:`Fields` is one dict of a snapshot: it refuses a non-dict, a
missing key and an unknown one, and hands out typed, range-checked values.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from devices.base import BadState

T = TypeVar("T")

U8, U16, U32, U64 = 0xFF, 0xFFFF, 0xFFFF_FFFF, (1 << 64) - 1
#: Longest text a snapshot may hold (a reason string, an id).
MAX_TEXT = 1024


class Fields:
    """The dict ``state`` at ``where`` (a name for messages), which must
    have exactly the keys ``keys``."""

    def __init__(self, state: object, where: str, keys: tuple[str, ...] | frozenset[str]):
        if type(state) is not dict:
            raise BadState(f"{where}: a dict expected, not {type(state).__name__}")
        got = set(state)
        want = set(keys)
        if got != want:
            missing, extra = sorted(want - got), sorted(map(repr, got - want))
            parts = ([f"missing {', '.join(missing)}"] if missing else []) + \
                    ([f"unknown {', '.join(extra)}"] if extra else [])
            raise BadState(f"{where}: {'; '.join(parts)}")
        self.state: dict[str, Any] = state
        self.where = where

    def name(self, key: str) -> str:
        return f"{self.where}.{key}"

    def integer(self, key: str, lo: int = 0, hi: int = U64) -> int:
        return check_int(self.state[key], self.name(key), lo, hi)

    def flag(self, key: str) -> bool:
        v = self.state[key]
        if type(v) is not bool:
            raise BadState(f"{self.name(key)}: a bool expected, not {type(v).__name__}")
        return v

    def blob(self, key: str, length: int | None = None, max_length: int | None = None) -> bytes:
        v = self.state[key]
        if type(v) is not bytes:
            raise BadState(f"{self.name(key)}: bytes expected, not {type(v).__name__}")
        if length is not None and len(v) != length:
            raise BadState(f"{self.name(key)}: {len(v)} bytes, {length} expected")
        if max_length is not None and len(v) > max_length:
            raise BadState(f"{self.name(key)}: {len(v)} bytes, at most {max_length}")
        return v

    def text(self, key: str, max_length: int = MAX_TEXT) -> str:
        v = self.state[key]
        if type(v) is not str:
            raise BadState(f"{self.name(key)}: a str expected, not {type(v).__name__}")
        if len(v) > max_length:
            raise BadState(f"{self.name(key)}: {len(v)} characters, at most {max_length}")
        return v

    def optional(self, key: str, read: Callable[[str], T]) -> T | None:
        """``None``, or what ``read(key)`` (e.g. ``self.integer``) accepts."""
        return None if self.state[key] is None else read(key)

    def items(self, key: str, length: int | None = None, max_length: int | None = None) -> list:
        v = self.state[key]
        if type(v) is not list:
            raise BadState(f"{self.name(key)}: a list expected, not {type(v).__name__}")
        if length is not None and len(v) != length:
            raise BadState(f"{self.name(key)}: {len(v)} entries, {length} expected")
        if max_length is not None and len(v) > max_length:
            raise BadState(f"{self.name(key)}: {len(v)} entries, at most {max_length}")
        return v

    def sub(self, key: str, keys: tuple[str, ...] | frozenset[str]) -> Fields:
        return Fields(self.state[key], self.name(key), keys)


def check_int(v: object, where: str, lo: int = 0, hi: int = U64) -> int:
    if type(v) is not int:
        raise BadState(f"{where}: an int expected, not {type(v).__name__}")
    if not lo <= v <= hi:
        raise BadState(f"{where}: {v:#x} outside {lo:#x}-{hi:#x}")
    return v


def require(ok: bool, where: str, why: str) -> None:
    """A consistency rule between fields: BadState unless ``ok``."""
    if not ok:
        raise BadState(f"{where}: {why}")
