"""A VM's fault injection, VMM side: one plan for every device, the trace,
and the run-time controls (``Machine.faults``; QMP ``fault-arm``,
``fault-disarm``, ``query-faults``; event ``FAULT_FIRED``).

The engines run where the devices run (:mod:`devices.faults`): an inline
device's engine is built here and attached to its model; an isolated
device gets its share of the plan in a ``FaultControl`` setup request right
after Ready (before the guest runs) and validates it again on its side.
Every firing record reaches :meth:`MachineFaults.record` -- directly from
an inline engine, as a ``FaultFired`` message from a device process (a
sandboxed process has no filesystem) -- which checks it (a device process
is untrusted: a record must be well formed and name that device), writes
it to the trace (JSON Lines, a header with the plan digest and seed),
counts it and emits ``FAULT_FIRED``.

``process`` faults need a device process of their own: on an inline
device they are refused (the process would be the VMM).  A ``crash`` with
today's VMM, which does not restart devices, is the device-lost case: the
device is failed, its regions reaped, the VM goes on.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from vmm.endpoint import VmmError
from vmm.qmp.events import FAULT_FIRED

if TYPE_CHECKING:
    from devices.faults.engine import FaultEngine
    from devices.faults.plan import Fault, Plan
    from devices.faults.table import PointSpec
    from devices.faults.trace import Trace, TraceWriter
    from vmm.config import DeviceSpec
    from vmm.machine import Machine

# The engines, the trace and the plan parser are imported where a plan, a
# trace or a run-time request needs them: a run without any (most) goes
# without (start-up, issue 15).

log = logging.getLogger(__name__)

#: Records kept in memory for :meth:`MachineFaults.trace` (the file has all).
MAX_KEPT = 100_000


class FaultsError(VmmError):
    """A fault request the VM refuses (bad fault, unknown name, a device
    that did not answer)."""


#: How long :meth:`MachineFaults.sync` waits for each device process's answer.
SYNC_TIMEOUT = 1.0
#: Longest wait for a restarted device to take its faults (its accesses wait).
RESETUP_TIMEOUT = 2.0


def device_points(specs: Mapping[str, DeviceSpec]) -> dict[str, Mapping[str, PointSpec]]:
    """Each device id with the fault points its model has."""
    return {name: spec.model_class.all_fault_points() for name, spec in specs.items()}


def check_placement(fault: Fault, spec: DeviceSpec, label: str = "fault", source: str | None = None) -> None:
    """Refuse a ``process`` fault on an inline device."""
    import json

    from devices.faults.plan import PlanError

    if fault.point == "process" and spec.placement == "inline":
        raise PlanError(f"device {fault.device!r} runs inside the VMM (process=inline): the process point "
                        "needs process=isolated", fault=f"{label} {json.dumps(fault.name)}", key="point",
                        source=source)


def check_plan(plan: Plan, specs: Mapping[str, DeviceSpec], source: str | None = None) -> None:
    """What a plan needs beyond its own validation: placements."""
    for i, fault in enumerate(plan.faults, 1):
        check_placement(fault, specs[fault.device], f"fault #{i}", source)


class MachineFaults:
    """The fault side of one :class:`vmm.machine.Machine` (``machine.faults``)."""

    def __init__(self, machine: Machine):
        self._machine = machine
        self._plan: Plan | None = None      # None: no plan (made empty when first asked for)
        self.replay: Trace | None = None
        self._writer: TraceWriter | None = None
        self._lock = threading.Lock()
        self._records: list[dict[str, Any]] = []
        self._firings: dict[str, int] = {}          # "device/fault" -> firings
        self._engines: dict[str, FaultEngine] = {}  # inline devices
        self._owners: dict[str, int] = {}

    # -- set-up (before the devices start) --------------------------------

    def configure(self, plan: Plan | None = None, *, trace: str | None = None,
                  replay: Trace | None = None, devices: list[str] | None = None) -> None:
        """The plan (validated already) or a trace to replay, and where to
        write the trace.  Before the first :meth:`Machine.add_device`."""
        if self._owners:
            raise FaultsError("faults are configured before the devices are added")
        if replay is not None:
            from devices.faults.plan import Plan

            self.replay = replay
            self._plan = Plan(seed=replay.seed)
        else:
            self._plan = plan
        if trace is not None:
            digest = self.digest
            from devices.faults.trace import TraceError, TraceWriter

            try:
                self._writer = TraceWriter(trace, plan=digest, seed=self.plan.seed,
                                           devices=devices if devices is not None else self.plan.devices())
            except TraceError as e:
                raise FaultsError(str(e)) from None

    @property
    def plan(self) -> Plan:
        """The plan (an empty one where none was configured)."""
        if self._plan is None:
            from devices.faults.plan import Plan

            self._plan = Plan()
        return self._plan

    @property
    def digest(self) -> str:
        return self.replay.plan if self.replay is not None else self.plan.digest

    def attach(self, endpoint: Any, spec: DeviceSpec) -> None:
        """Give a new device its engine and its share of the plan."""
        from vmm.local import LocalEndpoint
        from vmm.remote import RemoteEndpoint

        name = spec.name
        faults = self.plan.for_device(name)
        for fault in faults:
            check_placement(fault, spec)
        replay = self.replay.for_device(name) if self.replay is not None else None
        seed = self.plan.seed
        self._owners[name] = endpoint.owner
        if isinstance(endpoint, LocalEndpoint):
            from devices.faults.engine import FaultEngine, ReplayEngine

            points = spec.model_class.all_fault_points()
            sink = lambda rec, _n=name: self.record(_n, rec)  # noqa: E731
            engine: FaultEngine
            if replay is not None:
                engine = ReplayEngine(name, replay, seed=seed, sink=sink)
            else:
                engine = FaultEngine(name, faults, seed=seed, points=points, sink=sink)
            self._engines[name] = engine
            endpoint.attach_faults(engine)
        elif isinstance(endpoint, RemoteEndpoint):
            endpoint.on_fault_record = lambda rec, _n=name: self.record(_n, rec)
            endpoint.on_restarted = lambda ep, _n=name: ep.fault_control("setup", self._setup_body(_n),
                                                                         timeout=RESETUP_TIMEOUT)
            try:
                endpoint.fault_control("setup", self._setup_body(name))
            except ValueError as e:
                raise FaultsError(f"device {name} refused its faults: {e}") from None

    def _setup_body(self, name: str) -> dict[str, Any]:
        """A device process's share of the plan.  For a process started
        again (restart policy) that is what its predecessors left: the
        faults armed at run time are in, the disarmed ones out, each
        fault's ``times`` less its firings so far, a spent one left out
        (a fired ``nth`` does not fire again: no crash loop), and of a
        replay the firings not yet recorded.  Event counters begin again
        at 0 in the new process."""
        with self._lock:
            faults = {f.name: f.to_dict() for f in self.plan.for_device(name)}
            fired: dict[str, int] = {}
            done: set[tuple[str, str, int]] = set()
            for rec in self._records:
                if rec["device"] != name:
                    continue
                if rec["type"] == "arm" and isinstance(rec.get("plan"), dict):
                    faults[rec["fault"]] = rec["plan"]
                elif rec["type"] == "disarm":
                    faults.pop(rec["fault"], None)
                elif rec["type"] == "fire":
                    done.add((rec["fault"], rec["point"], rec["event"]))
            for key, n in self._firings.items():
                device, _, fault = key.partition("/")
                if device == name:
                    fired[fault] = n
        left = []
        for fname, f in faults.items():
            times = f.get("times")
            if isinstance(times, int) and fired.get(fname):
                if times <= fired[fname]:
                    continue
                f = {**f, "times": times - fired[fname]}
            left.append(f)
        replay = self.replay.for_device(name) if self.replay is not None else None
        if replay is not None:
            replay = [r for r in replay if (r["fault"], r["point"], r["event"]) not in done]
        return {"seed": self.plan.seed, "digest": self.digest, "faults": left, "replay": replay}

    # -- records ---------------------------------------------------------------

    def record(self, device: str, record: object) -> None:
        """One trace record of ``device`` (checked: it may come from an
        untrusted process)."""
        from devices.faults.trace import TraceError, check_record

        try:
            rec = check_record(record, f"device {device}")
            if rec["device"] != device:
                raise TraceError(f"device {device}: a record naming device {rec['device']!r}")
        except TraceError as e:
            log.warning("fault record dropped: %s", e)
            return
        with self._lock:
            if rec["type"] == "fire":
                key = f"{device}/{rec['fault']}"
                self._firings[key] = self._firings.get(key, 0) + 1
            if len(self._records) < MAX_KEPT:
                self._records.append(rec)
            writer = self._writer
            if writer is not None:
                from devices.faults.trace import TraceError

                try:
                    writer(rec)
                except TraceError as e:
                    log.error("fault trace: %s; no more records are written", e)
                    self._writer = None
        if rec["type"] == "fire":
            log.info("fault %s fired on %s %s event %d: %s: %s", rec["fault"], device, rec["point"],
                     rec["event"], rec["action"], rec["detail"])
            self._machine.events.emit(FAULT_FIRED, {k: rec[k] for k in (
                "device", "fault", "point", "event", "action", "params", "detail")})

    def sync(self) -> None:
        """Wait until every record the live device processes have sent is
        in: a device sends a firing's record before it answers the access,
        and its answer to a query comes after every record sent before it
        on the same socket, so one query round trip per device is enough."""
        from vmm.endpoint import DeviceFailed

        for device in self._owners:
            if device in self._engines:
                continue        # inline: recorded synchronously
            try:
                self._endpoint(device).fault_control("query", {}, timeout=SYNC_TIMEOUT)
            except (DeviceFailed, ValueError, KeyError) as e:
                log.debug("fault records of %s: %s", device, e)

    def trace(self) -> list[dict[str, Any]]:
        """The records so far (firings, arms, disarms), in arrival order,
        including those still on their way from device processes."""
        self.sync()
        with self._lock:
            return list(self._records)

    def trace_object(self) -> Trace:
        """The run's trace as :class:`devices.faults.trace.Trace`."""
        from devices.faults.trace import Trace

        records = self.trace()
        return Trace(plan=self.digest, seed=self.plan.seed, devices=list(self._owners),
                     firings=[r for r in records if r["type"] == "fire"],
                     marks=[r for r in records if r["type"] != "fire"])

    def digest_of_trace(self) -> str:
        from devices.faults.trace import trace_digest

        return trace_digest(self.trace_object())

    def firings(self) -> dict[str, int]:
        """Firings per ``device/fault``."""
        self.sync()
        with self._lock:
            return dict(self._firings)

    def summary(self) -> str:
        """The closing summary's fault part (empty without a plan)."""
        firings = self.firings()
        names = [f"{f.device}/{f.name}" for f in (self._plan.faults if self._plan is not None else ())]
        names += [k for k in firings if k not in names]
        if not names:
            return ""
        return "faults: " + "; ".join(f"{k}: {firings.get(k, 0)} firing(s)" for k in names)

    # -- run time --------------------------------------------------------------

    def _specs(self) -> dict[str, DeviceSpec]:
        return {spec.name: spec for spec in self._machine.device_specs.values()}

    def _endpoint(self, device: str) -> Any:
        owner = self._owners.get(device)
        if owner is None:
            raise FaultsError(f"no device {device!r} (devices: {', '.join(sorted(self._owners)) or 'none'})")
        return self._machine.endpoints[owner]

    def _call(self, device: str, op: str, body: object) -> Any:
        from vmm.endpoint import DeviceFailed

        engine = self._engines.get(device)
        if engine is not None:
            return None
        try:
            return self._endpoint(device).fault_control(op, body)
        except ValueError as e:
            raise FaultsError(f"device {device}: {e}") from None
        except DeviceFailed as e:
            raise FaultsError(str(e)) from None

    def arm(self, fault: Mapping[str, Any]) -> dict[str, Any]:
        """Arm one fault (plan form, e.g. ``{"device": "blk", "point":
        "blk.write", "nth": 3, "action": "ioerr"}``) on the running VM; the
        fault as armed (name and defaults filled in).  Raises
        :class:`FaultsError` (with the plan's one-line message)."""
        from devices.faults.plan import parse_fault
        from devices.faults.table import FaultError

        specs = self._specs()
        taken = [s["name"] for s in self.list()]
        try:
            parsed = parse_fault(fault, devices=device_points(specs), taken=taken)
            check_placement(parsed, specs[parsed.device])
        except FaultError as e:
            raise FaultsError(str(e)) from None
        engine = self._engines.get(parsed.device)
        try:
            if engine is not None:
                engine.arm(parsed)
            else:
                self._call(parsed.device, "arm", parsed.to_dict())
        except FaultError as e:
            raise FaultsError(str(e)) from None
        return parsed.to_dict()

    def disarm(self, name: str) -> dict[str, Any]:
        """Disarm the fault ``name``; its final counters."""
        from devices.faults.table import FaultError

        for status in self.list():
            if status["name"] == name:
                device = status["device"]
                engine = self._engines.get(device)
                try:
                    if engine is not None:
                        return engine.disarm(name).to_dict()
                    return self._call(device, "disarm", {"name": name})
                except FaultError as e:
                    raise FaultsError(str(e)) from None
        raise FaultsError(f"no fault {name!r} is armed")

    def list(self) -> list[dict[str, Any]]:
        """Every armed fault with its counters (events matched, firings,
        shadowed), devices in start order."""
        from vmm.endpoint import DeviceFailed

        out: list[dict[str, Any]] = []
        for device in self._owners:
            engine = self._engines.get(device)
            if engine is not None:
                out += [s.to_dict() for s in engine.query()]
                continue
            try:
                answer = self._endpoint(device).fault_control("query", {})
            except (DeviceFailed, ValueError) as e:
                log.debug("query-faults: device %s: %s", device, e)
                continue
            out += _checked_statuses(device, answer)
        return out

    def close(self) -> None:
        """At teardown: record the inline firings never reported, close the trace."""
        for engine in self._engines.values():
            engine.flush()
        with self._lock:
            writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()


def _checked_statuses(device: str, answer: object) -> list[dict[str, Any]]:
    """A device process's query answer, checked (it is untrusted)."""
    if not isinstance(answer, dict) or not isinstance(answer.get("faults"), list):
        log.warning("device %s: malformed query-faults answer; ignored", device)
        return []
    out = []
    for s in answer["faults"][:1000]:
        if (isinstance(s, dict) and s.get("device") == device and isinstance(s.get("name"), str)
                and all(isinstance(s.get(k), int) and not isinstance(s.get(k), bool)
                        for k in ("events", "firings", "shadowed"))):
            out.append({k: s.get(k) for k in ("name", "device", "point", "action", "events", "firings",
                                              "shadowed", "fault")})
    return out
