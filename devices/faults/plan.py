"""Fault plans: parse a TOML file (or the same fields as JSON / a dict, as
QMP ``fault-arm`` sends them), validate it completely, and give it a digest.

A plan is ``seed`` (optional, default 0) and a list of ``[[fault]]`` tables::

    seed = 1234
    [[fault]]
    name = "third-write-fails"   # optional; default fault-1, fault-2, ... by position
    device = "blk"               # a device id
    point = "blk.write"          # a point of devices.faults.table.POINTS (or the model's own)
    nth = 3                      # exactly one of nth, every, after, probability
    times = 1                    # most firings (default 1 with nth, else unlimited)
    action = "ioerr"             # an action of the point, its parameters as more keys
    sector = [0, 2047]           # optional match keys of the point

Every error is one :class:`PlanError` whose text names the fault and the
key.  The digest (:attr:`Plan.digest`) is the SHA-256 of the canonical JSON
of the validated faults -- names, defaults and implied match values filled
in -- so two spellings of one plan share it; the seed is not part of it
(a trace header carries both, so "same plan, other seed" is visible).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Collection, Iterable, Mapping
from typing import Any, Union

from devices.faults.table import (
    POINTS, RESERVED, TRIGGERS, ActionSpec, FaultError, Int, Number, PointSpec,
)

#: A plan's top-level keys.
PLAN_KEYS = ("seed", "fault")
#: What a fault name may be (it appears in traces, QMP and command lines).
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")
SEED = Int(0, 2**64 - 1)
#: Trigger arguments: nth/every count from 1, after from 0 (every event).
TRIGGER_KINDS: dict[str, Int | Number] = {
    "nth": Int(1, 2**63 - 1),
    "every": Int(1, 2**63 - 1),
    "after": Int(0, 2**63 - 1),
    "probability": Number(0.0, 1.0),
}
TIMES = Int(1, 2**63 - 1)

#: What the caller knows of the devices: ids only, or each id with the
#: points its model has (a mapping name -> PointSpec), or None to check nothing.
Devices = Union[Mapping[str, Union[Mapping[str, PointSpec], None]], Collection[str], None]


class PlanError(FaultError):
    """A plan (or one fault of it) is invalid.  ``fault`` and ``key`` name
    what is wrong, when known; ``str()`` is the whole one-line message."""

    def __init__(self, message: str, *, fault: str | None = None, key: str | None = None,
                 source: str | None = None):
        self.fault = fault
        self.key = key
        self.source = source
        self.reason = message
        where = [w for w in (source, fault, key and f"key {key!r}") if w]
        super().__init__(": ".join(where + [message]))


@dataclasses.dataclass(frozen=True)
class Fault:
    """One validated fault.  ``trigger`` is one of :data:`TRIGGERS` with its
    argument ``arg``; ``times`` None is unlimited; ``params`` has every
    parameter of the action (defaults filled in); ``match`` every match key
    the plan gave or the action implies, in canonical form (a span as
    ``[lo, hi]``)."""

    name: str
    device: str
    point: str
    trigger: str
    arg: int | float
    times: int | None
    action: str
    params: Mapping[str, Any]
    match: Mapping[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """The fault in plan form (flat, as in TOML; every key explicit):
        ``parse_fault(f.to_dict(), ...) == f``."""
        out: dict[str, Any] = {"name": self.name, "device": self.device, "point": self.point,
                               self.trigger: self.arg, "times": self.times, "action": self.action}
        out.update(self.params)
        out.update(self.match)
        return out


@dataclasses.dataclass(frozen=True)
class Plan:
    """A validated plan: its seed and faults, in plan order."""

    seed: int = 0
    faults: tuple[Fault, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """The plan in its JSON form (canonical: every key explicit; an
        unlimited ``times`` is null)."""
        return {"seed": self.seed, "fault": [f.to_dict() for f in self.faults]}

    @property
    def digest(self) -> str:
        """SHA-256 (hex) of the canonical JSON of the faults (not the seed)."""
        return plan_digest(self.faults)

    def with_seed(self, seed: int | None) -> Plan:
        """This plan with ``seed`` instead (``--fault-seed``); None keeps it."""
        if seed is None:
            return self
        try:
            return dataclasses.replace(self, seed=SEED.check(seed))
        except ValueError as e:
            raise PlanError(str(e), key="seed") from None

    def for_device(self, device: str) -> tuple[Fault, ...]:
        """The faults of ``device`` (what its engine arms), in plan order."""
        return tuple(f for f in self.faults if f.device == device)

    def devices(self) -> list[str]:
        """The device ids the plan names, in order of first use."""
        return list(dict.fromkeys(f.device for f in self.faults))

    def fault(self, name: str) -> Fault:
        for f in self.faults:
            if f.name == name:
                return f
        raise KeyError(name)


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys, no spaces, ASCII only and no NaN: one text per
    value, for digests."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def plan_digest(faults: Iterable[Fault]) -> str:
    try:        # CPython's own SHA-256: hashlib would load OpenSSL (~4 MB of each process, issue 15)
        from _sha256 import sha256
    except ImportError:
        from hashlib import sha256

    return sha256(canonical_json([f.to_dict() for f in faults]).encode()).hexdigest()


def load_plan(path: str | os.PathLike[str], *, devices: Devices = None,
              points: Mapping[str, PointSpec] = POINTS, seed: int | None = None) -> Plan:
    """Read and validate the plan in ``path`` (TOML; JSON when the name ends
    in ``.json``).  ``seed`` overrides the plan's (``--fault-seed``)."""
    source = os.fspath(path)
    try:
        with open(source, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise PlanError(f"cannot read: {e.strerror}", source=source) from None
    import tomllib      # here, as the other parsers: only a run with a plan reads one

    try:
        text = raw.decode()
        data = json.loads(text) if source.endswith(".json") else tomllib.loads(text)
    except (UnicodeDecodeError, ValueError) as e:   # TOMLDecodeError and JSONDecodeError are ValueErrors
        raise PlanError(f"not valid {'JSON' if source.endswith('.json') else 'TOML'}: {e}",
                        source=source) from None
    return parse_plan(data, devices=devices, points=points, seed=seed, source=source)


def loads_plan(text: str, *, devices: Devices = None, points: Mapping[str, PointSpec] = POINTS,
               seed: int | None = None, source: str = "plan") -> Plan:
    """Validate the plan in the TOML ``text``."""
    import tomllib

    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise PlanError(f"not valid TOML: {e}", source=source) from None
    return parse_plan(data, devices=devices, points=points, seed=seed, source=source)


def parse_plan(data: object, *, devices: Devices = None, points: Mapping[str, PointSpec] = POINTS,
               seed: int | None = None, source: str | None = None) -> Plan:
    """Validate a plan given as a mapping (parsed TOML or JSON)."""
    if not isinstance(data, Mapping):
        raise PlanError(f"a plan is a table, not {type(data).__name__}", source=source)
    for key in data:
        if key not in PLAN_KEYS:
            raise PlanError(f"unknown key (a plan has: {', '.join(PLAN_KEYS)})", key=str(key), source=source)
    try:
        plan_seed = SEED.check(data.get("seed", 0))
    except ValueError as e:
        raise PlanError(str(e), key="seed", source=source) from None
    entries = data.get("fault", [])
    if not isinstance(entries, list):
        raise PlanError("must be a list of tables ([[fault]])", key="fault", source=source)
    faults: list[Fault] = []
    first: dict[str, int] = {}
    for i, entry in enumerate(entries, 1):
        fault = parse_fault(entry, default_name=f"fault-{i}", devices=devices, points=points,
                            label=f"fault #{i}", source=source)
        if fault.name in first:
            raise PlanError(f"{fault.name!r} is already the name of fault #{first[fault.name]}",
                            fault=_label(f"fault #{i}", fault.name), key="name", source=source)
        first[fault.name] = i
        faults.append(fault)
    return Plan(seed=plan_seed, faults=tuple(faults)).with_seed(seed)


def next_name(taken: Collection[str]) -> str:
    """The first of fault-1, fault-2, ... not in ``taken`` (QMP fault-arm
    without a name)."""
    i = 1
    while f"fault-{i}" in taken:
        i += 1
    return f"fault-{i}"


def parse_fault(entry: object, *, default_name: str | None = None, devices: Devices = None,
                points: Mapping[str, PointSpec] = POINTS, taken: Collection[str] = (),
                label: str = "fault", source: str | None = None) -> Fault:
    """Validate one fault (a plan's ``[[fault]]`` table, or QMP ``fault-arm``'s
    argument).  Without a name it gets ``default_name`` (default: the first
    free fault-N given ``taken``); a name in ``taken`` is refused."""
    if not isinstance(entry, Mapping):
        raise PlanError(f"a fault is a table, not {type(entry).__name__}", fault=label, source=source)
    for key in entry:
        if not isinstance(key, str):
            raise PlanError("keys are strings", fault=label, key=repr(key), source=source)

    def err(message: str, key: str | None = None) -> PlanError:
        return PlanError(message, fault=where, key=key, source=source)

    where = _label(label, entry.get("name"))
    name = entry.get("name", default_name if default_name is not None else next_name(taken))
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise err("must be 1-64 letters, digits, '_', '.', ':' or '-', starting with a letter or "
                  f"digit, not {name!r}", "name")
    if name in taken:
        raise err(f"{name!r} is already armed", "name")
    where = _label(label, name)

    device = entry.get("device")
    if not isinstance(device, str) or not device:
        raise err("missing" if device is None else f"must be a device id (a string), not {device!r}", "device")
    table = points
    if devices is not None:
        if device not in devices:
            known = ", ".join(sorted(devices)) or "none"
            raise err(f"no device {device!r} (devices: {known})", "device")
        if isinstance(devices, Mapping):
            own = devices[device]
            if own is not None:
                table = own

    point = entry.get("point")
    if not isinstance(point, str):
        raise err("missing" if point is None else f"must be a point name, not {point!r}", "point")
    spec = table.get(point)
    if spec is None:
        has = "device " + repr(device) if table is not points else "the table"
        raise err(f"{point!r} is not a point of {has} (points: {', '.join(table)})", "point")

    given = [t for t in TRIGGERS if t in entry]
    if not given:
        raise err(f"no trigger: give one of {', '.join(TRIGGERS)}")
    if len(given) > 1:
        raise err(f"two triggers at once ({' and '.join(given)}): give exactly one", given[1])
    trigger = given[0]
    try:
        arg = TRIGGER_KINDS[trigger].check(entry[trigger])
    except ValueError as e:
        raise err(str(e), trigger) from None

    action = entry.get("action")
    if not isinstance(action, str):
        raise err("missing" if action is None else f"must be an action name, not {action!r}", "action")
    aspec = spec.actions.get(action)
    if aspec is None:
        raise err(f"{action!r} is not an action of point {point!r} (its actions: {', '.join(spec.actions)})",
                  "action")

    for key in entry:
        if key not in RESERVED and key not in aspec.params and key not in spec.match:
            raise err(_unknown(key, point, spec, action, aspec), key)

    if entry.get("times") is not None:
        try:
            times: int | None = TIMES.check(entry["times"])
        except ValueError as e:
            raise err(str(e), "times") from None
        if trigger == "nth" and times != 1:
            raise err(f"nth fires once; times = {times} means nothing with it (use every or after)", "times")
    elif trigger == "nth":
        if "times" in entry:
            raise err("nth fires once; times must be 1 or absent", "times")
        times = 1
    else:
        times = None        # absent, or null in JSON: unlimited

    params: dict[str, Any] = {}
    for key, kind in aspec.params.items():
        if key not in entry:
            if kind.default is None:
                raise err(f"missing: action {action!r} needs it", key)
            params[key] = kind.default
            continue
        try:
            params[key] = kind.check(entry[key])
        except ValueError as e:
            raise err(str(e), key) from None

    match: dict[str, Any] = {}
    for key, kind in spec.match.items():
        if key in entry:
            try:
                match[key] = kind.check(entry[key])
            except ValueError as e:
                raise err(str(e), key) from None
    for key, value in aspec.when.items():
        if match.setdefault(key, value) != value:
            raise err(f"action {action!r} applies to {key} = {value!r} only, not {match[key]!r}", key)

    return Fault(name=name, device=device, point=point, trigger=trigger, arg=arg, times=times,
                 action=action, params=params, match=match)


def _label(base: str, name: object) -> str:
    """``fault #2 "name"`` (or ``fault "name"`` outside a plan)."""
    return f"{base} {json.dumps(name)}" if isinstance(name, str) else base


def _unknown(key: str, point: str, spec: PointSpec, action: str, aspec: ActionSpec) -> str:
    others = [a for a, s in spec.actions.items() if key in s.params]
    if others:
        return f"unknown key: a parameter of action {others[0]!r}, not of {action!r}"
    keys = list(aspec.params) + list(spec.match)
    takes = f"; {point}/{action} takes {', '.join(keys)}" if keys else f"; {point}/{action} takes no more keys"
    elsewhere = [p for p, s in POINTS.items() if key in s.match]
    if elsewhere:
        return f"unknown key: a match key of {elsewhere[0]!r}, not of {point!r}{takes}"
    return f"unknown key{takes}"


