"""The fault points of the built-in devices: what an event is, which match
keys it has, which actions it takes and their parameters -- as one table.

:data:`POINTS` is data, not code: the plan parser (:mod:`devices.faults.plan`)
validates a plan against it and the engine (:mod:`devices.faults.engine`)
matches events with the keys it names; neither has a branch per point.  A
user's model declares points of its own in the same shape
(:class:`devices.faults.hook.FaultPoints`).

Each entry is a :class:`PointSpec`: ``match`` maps a key the event carries
to the kind of value a plan may give it, ``actions`` maps an action name to
an :class:`ActionSpec` (its parameters, each with its kind and default, and
``when``: match values the action implies, e.g. ``ones`` answers reads, so
it only counts reads).  Value kinds are :class:`Int`, :class:`Number`,
:class:`Choice` and :class:`Span` (an inclusive ``[lo, hi]`` pair; a plan may
write one integer ``n`` for ``[n, n]``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Union

from devices.record import record


class FaultError(Exception):
    """Base of the errors of :mod:`devices.faults`."""


class TableError(FaultError):
    """A point table (the built-in one or a model's own) is malformed."""


#: Marks a parameter the plan must give.
REQUIRED = None


@record
class Int:
    """An integer in ``lo..hi`` (a TOML/JSON boolean is not one)."""

    lo: int
    hi: int
    default: int | None = REQUIRED

    def check(self, value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"must be an integer in {self.lo}..{self.hi}, not {_show(value)}")
        if not self.lo <= value <= self.hi:
            raise ValueError(f"must be in {self.lo}..{self.hi}, not {value}")
        return value


@record
class Number:
    """A finite number (integer or float) in ``lo..hi``."""

    lo: float
    hi: float
    default: float | None = REQUIRED

    def check(self, value: object) -> float | int:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"must be a number in {self.lo:g}..{self.hi:g}, not {_show(value)}")
        if not (math.isfinite(value) and self.lo <= value <= self.hi):
            raise ValueError(f"must be in {self.lo:g}..{self.hi:g}, not {value!r}")
        return value


@record
class Choice:
    """One of ``values`` (strings).  ``codes``, when given, are the numbers
    a caller may pass instead at run time (``codes[i]`` stands for
    ``values[i]``; e.g. :class:`devices.base.Space` members for ``space``)."""

    values: tuple[str, ...]
    codes: tuple[int, ...] = ()
    default: str | None = REQUIRED

    def check(self, value: object) -> str:
        if not isinstance(value, str) or value not in self.values:
            raise ValueError(f"must be one of {', '.join(self.values)}, not {_show(value)}")
        return value

    def accepted(self, value: str) -> frozenset[object]:
        """What an event may carry for the plan's ``value`` to match."""
        i = self.values.index(value)
        return frozenset([value, self.codes[i]] if self.codes else [value])


@record
class Span:
    """An inclusive range ``[lo, hi]`` inside ``min..max``; canonical form a
    two-item list."""

    min: int
    max: int
    default: list[int] | None = REQUIRED

    def check(self, value: object) -> list[int]:
        if isinstance(value, int) and not isinstance(value, bool):
            value = [value, value]
        if (not isinstance(value, (list, tuple)) or len(value) != 2
                or any(isinstance(v, bool) or not isinstance(v, int) for v in value)):
            raise ValueError(f"must be [lo, hi] (integers in {self.min}..{self.max}) or one integer, "
                             f"not {_show(value)}")
        lo, hi = value
        if not self.min <= lo <= hi <= self.max:
            raise ValueError(f"must have {self.min} <= lo <= hi <= {self.max}, not [{lo}, {hi}]")
        return [lo, hi]


Kind = Union[Int, Number, Choice, Span]


@record
class ActionSpec:
    """One action of a point: what it does (``doc``), its parameters, and
    the match values it implies (``when``)."""

    doc: str
    params: Mapping[str, Kind] = dataclasses.field(default_factory=dict)
    when: Mapping[str, str] = dataclasses.field(default_factory=dict)


@record
class PointSpec:
    """One fault point: what one of its events is, the keys an event carries
    for matching, and the actions the point takes."""

    events: str
    match: Mapping[str, Kind]
    actions: Mapping[str, ActionSpec]


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# Value kinds used more than once.
_MS = Number(0, 3_600_000)                 # a delay: up to an hour; `hang` is forever
_SECTOR = Span(0, 2**64 - 1)
_VECTOR = Int(0, 2047)                     # an MSI-X table has at most 2048 entries (PCIe 6.0 7.7.2)
_QUEUE = Int(0, 65535)

#: The fault points of the built-in devices (issue 12 §1).  The only place
#: that says which point takes which action; keep it one literal.
POINTS: Mapping[str, PointSpec] = {
    "access": PointSpec(
        events="each guest access the device serves",
        match={"space": Choice(("pio", "mmio", "pci"), codes=(0, 1, 2)),
               "offset": Span(0, 2**64 - 1),
               "dir": Choice(("read", "write"))},
        actions={
            "delay": ActionSpec("the access is answered ms milliseconds late", {"ms": _MS}),
            "ones": ActionSpec("a read answers all ones", when={"dir": "read"}),
            "value": ActionSpec("a read answers value", {"value": Int(0, 2**64 - 1)}, when={"dir": "read"}),
            "garbage": ActionSpec("a read answers random bytes", when={"dir": "read"}),
            "drop": ActionSpec("a write is ignored", when={"dir": "write"}),
            "irq": ActionSpec("the access is served and interrupt vector is raised too (a spurious one)",
                              {"vector": _VECTOR}),
        }),
    "blk.read": PointSpec(
        events="each virtio-blk read request (VIRTIO_BLK_T_IN), matched by its first sector",
        match={"sector": _SECTOR},
        actions={
            "ioerr": ActionSpec("the request completes with VIRTIO_BLK_S_IOERR"),
            "unsupp": ActionSpec("the request completes with VIRTIO_BLK_S_UNSUPP"),
            "delay": ActionSpec("the request completes ms milliseconds late", {"ms": _MS}),
            "hang": ActionSpec("the request never completes"),
            "corrupt": ActionSpec("the data read has bits bits flipped", {"bits": Int(1, 4096, default=1)}),
        }),
    "blk.write": PointSpec(
        events="each virtio-blk write request (VIRTIO_BLK_T_OUT), matched by its first sector",
        match={"sector": _SECTOR},
        actions={
            "ioerr": ActionSpec("the request completes with VIRTIO_BLK_S_IOERR"),
            "unsupp": ActionSpec("the request completes with VIRTIO_BLK_S_UNSUPP"),
            "delay": ActionSpec("the request completes ms milliseconds late", {"ms": _MS}),
            "hang": ActionSpec("the request never completes"),
            "lose": ActionSpec("the write is acknowledged but not written"),
            "torn": ActionSpec("only the first sectors sectors are written; acknowledged",
                               {"sectors": Int(0, 2**32 - 1)}),
        }),
    "blk.flush": PointSpec(
        events="each virtio-blk flush request (VIRTIO_BLK_T_FLUSH)",
        match={},
        actions={
            "ioerr": ActionSpec("the request completes with VIRTIO_BLK_S_IOERR"),
            "unsupp": ActionSpec("the request completes with VIRTIO_BLK_S_UNSUPP"),
            "delay": ActionSpec("the request completes ms milliseconds late", {"ms": _MS}),
            "hang": ActionSpec("the request never completes"),
        }),
    "rng.request": PointSpec(
        events="each virtio-rng request",
        match={},
        actions={
            "zeros": ActionSpec("the buffer is filled with zeros"),
            "repeat": ActionSpec("the previous request's bytes again"),
            "short": ActionSpec("only bytes bytes are returned", {"bytes": Int(0, 2**32 - 1)}),
        }),
    "console.tx": PointSpec(
        events="each byte the virtio-console device sends to the host",
        match={},
        actions={"drop": ActionSpec("the byte is lost"),
                 "duplicate": ActionSpec("the byte is sent twice"),
                 "garbage": ActionSpec("a random byte is sent instead")}),
    "console.rx": PointSpec(
        events="each byte the virtio-console device hands the guest",
        match={},
        actions={"drop": ActionSpec("the byte is lost"),
                 "duplicate": ActionSpec("the byte arrives twice"),
                 "garbage": ActionSpec("a random byte arrives instead")}),
    "serial.tx": PointSpec(
        events="each byte the UART transmits",
        match={},
        actions={"drop": ActionSpec("the byte is lost"),
                 "duplicate": ActionSpec("the byte is sent twice"),
                 "garbage": ActionSpec("a random byte is sent instead")}),
    "serial.rx": PointSpec(
        events="each byte the UART receives",
        match={},
        actions={"drop": ActionSpec("the byte is lost"),
                 "duplicate": ActionSpec("the byte arrives twice"),
                 "garbage": ActionSpec("a random byte arrives instead")}),
    "irq": PointSpec(
        events="each interrupt the device raises (vector: the MSI-X entry, or 0 for INTx)",
        match={"vector": _VECTOR},
        actions={"lose": ActionSpec("the interrupt is not delivered"),
                 "duplicate": ActionSpec("the interrupt is delivered twice"),
                 "delay": ActionSpec("the interrupt is delivered ms milliseconds late", {"ms": _MS})}),
    "queue.complete": PointSpec(
        events="each used-ring completion of a virtio device",
        match={"queue": _QUEUE},
        actions={"bad_id": ActionSpec("the used element names a descriptor that is not the chain's head"),
                 "bad_len": ActionSpec("the used element reports more bytes than the chain can hold"),
                 "duplicate": ActionSpec("the completion is put in the used ring twice")}),
    "process": PointSpec(
        events="each guest access the device process serves",
        match={},
        actions={"crash": ActionSpec("the process SIGKILLs itself inside the access"),
                 "hang": ActionSpec("the process stops answering and stays alive"),
                 "exit": ActionSpec("the process exits (status 1) inside the access"),
                 "hold_lock": ActionSpec("the process takes the registry lock and keeps it"),
                 "die_holding_lock": ActionSpec("the process takes the registry lock and SIGKILLs itself")}),
}

#: The points every model has, whatever it declares (issue 12 §1).
COMMON_POINTS = ("access", "process")

#: Keys of a fault that are not match keys or action parameters.
FAULT_KEYS = ("name", "device", "point", "action", "times")
#: The trigger keys; a fault has exactly one.
TRIGGERS = ("nth", "every", "after", "probability")
#: Every key a fault may have besides its point's match keys and its action's
#: parameters.
RESERVED = FAULT_KEYS + TRIGGERS


def check_points(points: Mapping[str, PointSpec]) -> None:
    """Raise :class:`TableError` unless ``points`` is a well-formed table:
    string names, no match key or parameter named like a fault key, no
    parameter named like a match key of its point (a plan's keys share one
    namespace), ``when`` values among their match key's choices, defaults
    that pass their own check."""
    for name, spec in points.items():
        if not isinstance(name, str) or not name or not isinstance(spec, PointSpec):
            raise TableError(f"point {name!r}: not a name and a PointSpec")
        for key, kind in spec.match.items():
            if key in RESERVED:
                raise TableError(f"point {name!r}: match key {key!r} is a fault key")
            if not isinstance(kind, (Int, Number, Choice, Span)):
                raise TableError(f"point {name!r}: match key {key!r} has no value kind")
        if not spec.actions:
            raise TableError(f"point {name!r}: no actions")
        for action, aspec in spec.actions.items():
            if not isinstance(aspec, ActionSpec):
                raise TableError(f"point {name!r}: action {action!r} is not an ActionSpec")
            for key, kind in aspec.params.items():
                if key in RESERVED or key in spec.match:
                    raise TableError(f"point {name!r}: parameter {key!r} of {action!r} clashes with a "
                                     f"{'fault' if key in RESERVED else 'match'} key")
                if not isinstance(kind, (Int, Number, Choice, Span)):
                    raise TableError(f"point {name!r}: parameter {key!r} of {action!r} has no value kind")
                if kind.default is not None:
                    try:
                        kind.check(kind.default)
                    except ValueError as e:
                        raise TableError(f"point {name!r}: default of {key!r} of {action!r} {e}") from None
            for key, value in aspec.when.items():
                implied = spec.match.get(key)
                if not isinstance(implied, Choice) or value not in implied.values:
                    raise TableError(f"point {name!r}: action {action!r} implies {key}={value!r}, "
                                     "not a choice of a match key")
