"""Fault traces: JSON Lines of what fired, for reading, merging and replay.

The first line is the header, then one line per record::

    {"type":"header","format":"splitvmm-fault-trace","version":1,"plan":"<sha256>","seed":1234,"devices":["blk"]}
    {"type":"fire","seq":1,"t":81234,"device":"blk","fault":"third-write-fails","point":"blk.write",
     "event":3,"action":"ioerr","params":{},"detail":"request failed with IOERR"}
    {"type":"arm","t":...,"device":"blk","fault":"f","point":"blk.read","event":17,"plan":{...}}
    {"type":"disarm","t":...,"device":"blk","fault":"f","point":"blk.read","event":40}

``plan`` is :attr:`devices.faults.plan.Plan.digest`; ``seq`` counts one
device's firings from 1; ``t`` is ``time.monotonic_ns()`` (one clock for
all processes of a host: it orders a merge for display, replay never looks
at it); ``event`` is the point's event number on that device, the replay
key.  ``arm``/``disarm`` lines (faults armed over QMP while running) are
informational.

A trace is input: :func:`read_trace` checks every line (a device process
wrote it, or sent its records) and refuses a bad one with the line number.
:func:`trace_digest` hashes what a run's faults did -- header plan and seed,
and the firings ordered by (device, point, event), without ``seq`` and
``t`` -- so two runs of one plan and seed compare by one string however
their threads interleaved.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import threading
from collections.abc import Iterable, Mapping
from typing import IO, Any

from devices.faults.plan import NAME_RE, canonical_json
from devices.faults.table import FaultError

FORMAT = "splitvmm-fault-trace"
VERSION = 1
#: A device id or point name in a trace: printable, bounded.
_MAX_TEXT = 256
_MAX_DETAIL = 4096


class TraceError(FaultError):
    """A trace cannot be read, merged or written."""


def header(plan: str, seed: int, devices: Iterable[str] = ()) -> dict[str, Any]:
    """A trace header for plan digest ``plan`` and ``seed``."""
    return {"type": "header", "format": FORMAT, "version": VERSION, "plan": plan, "seed": seed,
            "devices": list(devices)}


class TraceWriter:
    """Writes a trace: the header at once, then each record given to it (it
    is an engine :data:`~devices.faults.engine.Sink`), one flushed line
    each, so a process that kills itself right after loses nothing.
    Thread-safe.  ``out`` is a path, a file descriptor (taken over: closed
    by :meth:`close`) or a text stream (left open)."""

    def __init__(self, out: str | os.PathLike[str] | int | IO[str], *, plan: str, seed: int,
                 devices: Iterable[str] = ()):
        self._own = not isinstance(out, io.TextIOBase)
        if isinstance(out, int):
            self._out: IO[str] = open(out, "w", encoding="ascii", closefd=True)
        elif isinstance(out, (str, os.PathLike)):
            try:
                self._out = open(out, "w", encoding="ascii")
            except OSError as e:
                raise TraceError(f"{os.fspath(out)}: cannot write the trace: {e.strerror}") from None
        else:
            self._out = out
        self._lock = threading.Lock()
        self.header = header(plan, seed, devices)
        self._write(self.header)

    def __call__(self, record: dict[str, Any]) -> None:
        self._write(record)

    def _write(self, record: Mapping[str, Any]) -> None:
        line = json.dumps(record, separators=(",", ":"), ensure_ascii=True, allow_nan=False) + "\n"
        with self._lock:
            try:
                self._out.write(line)
                self._out.flush()
            except (OSError, ValueError) as e:
                raise TraceError(f"cannot write the trace: {e}") from None

    def close(self) -> None:
        with self._lock:
            if self._own:
                self._out.close()

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclasses.dataclass
class Trace:
    """A read (or merged) trace: its header fields and records in file
    order.  ``firings`` are the ``fire`` records, ``marks`` the ``arm``
    and ``disarm`` ones."""

    plan: str
    seed: int
    devices: list[str]
    firings: list[dict[str, Any]]
    marks: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def for_device(self, device: str) -> list[dict[str, Any]]:
        """The firings of ``device`` in its sequence (a ReplayEngine's script)."""
        return sorted((f for f in self.firings if f["device"] == device), key=lambda f: f["seq"])

    def summary(self) -> dict[str, int]:
        """Firings per fault (``vmm run``'s closing summary), by device/fault."""
        out: dict[str, int] = {}
        for f in self.firings:
            key = f"{f['device']}/{f['fault']}"
            out[key] = out.get(key, 0) + 1
        return out

    def header_record(self) -> dict[str, Any]:
        return header(self.plan, self.seed, self.devices)

    def write(self, out: IO[str]) -> None:
        """The trace as JSON Lines: header, then records by (t, device, seq)."""
        out.write(json.dumps(self.header_record(), separators=(",", ":")) + "\n")
        for record in _ordered(self.firings + self.marks):
            out.write(json.dumps(record, separators=(",", ":"), ensure_ascii=True) + "\n")


def _ordered(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(records, key=lambda r: (r["t"], r["device"], r.get("seq", 0)))


def trace_digest(trace: Trace) -> str:
    """SHA-256 (hex) of what the trace's faults did (see the module doc)."""
    firings = sorted(({k: f[k] for k in ("device", "point", "event", "fault", "action", "params", "detail")}
                      for f in trace.firings), key=lambda f: (f["device"], f["point"], f["event"]))
    body = {"plan": trace.plan, "seed": trace.seed, "firings": firings}
    try:        # CPython's own SHA-256: hashlib would load OpenSSL (~4 MB of each process, issue 15)
        from _sha256 import sha256
    except ImportError:
        from hashlib import sha256

    return sha256(canonical_json(body).encode()).hexdigest()


def read_trace(source: str | os.PathLike[str] | Iterable[str], *, name: str | None = None) -> Trace:
    """Read and check a trace from a path or from lines."""
    if isinstance(source, (str, os.PathLike)):
        label = name or os.fspath(source)
        try:
            with open(source, encoding="ascii") as f:
                return _parse(f, label)
        except OSError as e:
            raise TraceError(f"{label}: cannot read: {e.strerror}") from None
        except UnicodeDecodeError:
            raise TraceError(f"{label}: not ASCII JSON Lines") from None
    return _parse(source, name or "trace")


def _parse(lines: Iterable[str], label: str) -> Trace:
    trace: Trace | None = None
    fired: set[tuple[str, str, int]] = set()
    seqs: set[tuple[str, int]] = set()
    for lineno, line in enumerate(lines, 1):
        where = f"{label}:{lineno}"
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:
            raise TraceError(f"{where}: not JSON: {e}") from None
        if not isinstance(record, dict):
            raise TraceError(f"{where}: a line is a JSON object")
        if trace is None:
            trace = _check_header(record, where)
            continue
        kind = record.get("type")
        if kind == "fire":
            f = _check_fire(record, where)
            key = (f["device"], f["point"], f["event"])
            if key in fired:
                raise TraceError(f"{where}: a second firing at {key[0]}/{key[1]} event {key[2]}")
            if (f["device"], f["seq"]) in seqs:
                raise TraceError(f"{where}: a second firing with seq {f['seq']} on {f['device']}")
            fired.add(key)
            seqs.add((f["device"], f["seq"]))
            trace.firings.append(f)
        elif kind in ("arm", "disarm"):
            trace.marks.append(_check_mark(record, where))
        else:
            raise TraceError(f"{where}: unknown record type {kind!r}")
    if trace is None:
        raise TraceError(f"{label}: empty (no header)")
    return trace


def _check_header(record: dict[str, Any], where: str) -> Trace:
    if record.get("type") != "header" or record.get("format") != FORMAT:
        raise TraceError(f"{where}: not a {FORMAT} header")
    if record.get("version") != VERSION:
        raise TraceError(f"{where}: trace version {record.get('version')!r}; this reads {VERSION}")
    plan, seed, devices = record.get("plan"), record.get("seed"), record.get("devices", [])
    if not isinstance(plan, str) or len(plan) != 64 or any(c not in "0123456789abcdef" for c in plan):
        raise TraceError(f"{where}: plan must be a SHA-256 hex digest")
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**64:
        raise TraceError(f"{where}: seed must be an integer in 0..2**64-1")
    if not isinstance(devices, list) or not all(_is_text(d) for d in devices):
        raise TraceError(f"{where}: devices must be a list of ids")
    return Trace(plan=plan, seed=seed, devices=list(devices), firings=[])


_FIRE_KEYS = {"type", "seq", "t", "device", "fault", "point", "event", "action", "params", "detail"}
_MARK_KEYS = {"type", "t", "device", "fault", "point", "event", "plan"}


def _check_common(record: dict[str, Any], where: str, keys: set[str]) -> None:
    extra = set(record) - keys
    if extra:
        raise TraceError(f"{where}: unknown key(s) {', '.join(sorted(extra))}")
    for key in ("device", "point"):
        if not _is_text(record.get(key)):
            raise TraceError(f"{where}: {key} must be a non-empty string of at most {_MAX_TEXT} characters")
    if not isinstance(record.get("fault"), str) or not NAME_RE.fullmatch(record["fault"]):
        raise TraceError(f"{where}: fault must be a fault name")
    if not _is_int(record.get("t")) or record["t"] < 0:
        raise TraceError(f"{where}: t must be a nonnegative integer")


def _check_fire(record: dict[str, Any], where: str) -> dict[str, Any]:
    _check_common(record, where, _FIRE_KEYS)
    for key in ("seq", "event"):
        if not _is_int(record.get(key)) or not 1 <= record[key] < 2**63:
            raise TraceError(f"{where}: {key} must be a positive integer")
    if not _is_text(record.get("action")):
        raise TraceError(f"{where}: action must be an action name")
    params = record.get("params")
    if not isinstance(params, dict) or not all(_is_param(v) for v in params.values()):
        raise TraceError(f"{where}: params must be an object of numbers, strings and [lo, hi] pairs")
    detail = record.get("detail", "")
    if not isinstance(detail, str) or len(detail) > _MAX_DETAIL:
        raise TraceError(f"{where}: detail must be a string of at most {_MAX_DETAIL} characters")
    record["detail"] = detail
    return record


def check_record(record: object, where: str = "record") -> dict[str, Any]:
    """Check one trace record that came from a device process (a ``fire``,
    ``arm`` or ``disarm`` line); the record, or :class:`TraceError`."""
    if not isinstance(record, dict):
        raise TraceError(f"{where}: a record is a JSON object")
    kind = record.get("type")
    if kind == "fire":
        return _check_fire(record, where)
    if kind in ("arm", "disarm"):
        return _check_mark(record, where)
    raise TraceError(f"{where}: unknown record type {kind!r}")


def _check_mark(record: dict[str, Any], where: str) -> dict[str, Any]:
    _check_common(record, where, _MARK_KEYS)
    if not _is_int(record.get("event")) or record["event"] < 0:
        raise TraceError(f"{where}: event must be a nonnegative integer")
    if record["type"] == "arm" and not isinstance(record.get("plan"), dict):
        raise TraceError(f"{where}: an arm record carries the fault (plan)")
    return record


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_text(v: object) -> bool:
    return isinstance(v, str) and 0 < len(v) <= _MAX_TEXT


def _is_param(v: object) -> bool:
    if isinstance(v, list):
        return len(v) == 2 and all(_is_int(x) for x in v)
    return isinstance(v, (int, float, str)) and not isinstance(v, bool)


def merge_traces(traces: Iterable[Trace]) -> Trace:
    """One trace of several (one per device process): the same plan digest
    and seed in every header, no device in two of them; records ordered by
    (t, device, seq), each device's sequence kept."""
    traces = list(traces)
    if not traces:
        raise TraceError("nothing to merge")
    first = traces[0]
    devices: list[str] = []
    firings: list[dict[str, Any]] = []
    marks: list[dict[str, Any]] = []
    owner: dict[str, int] = {}
    for i, t in enumerate(traces):
        if (t.plan, t.seed) != (first.plan, first.seed):
            raise TraceError(f"trace #{i + 1} is of plan {t.plan[:12]} seed {t.seed}, "
                             f"trace #1 of plan {first.plan[:12]} seed {first.seed}")
        for record in t.firings + t.marks:
            prev = owner.setdefault(record["device"], i)
            if prev != i:
                raise TraceError(f"device {record['device']!r} has records in traces #{prev + 1} and #{i + 1}")
        devices.extend(d for d in t.devices if d not in devices)
        firings.extend(t.firings)
        marks.extend(t.marks)
    return Trace(plan=first.plan, seed=first.seed, devices=devices, firings=_ordered(firings),
                 marks=_ordered(marks))
