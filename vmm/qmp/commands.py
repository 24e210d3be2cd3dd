"""The control commands: one table, :data:`COMMANDS`, that the QMP socket,
``vmm ctl`` and :meth:`vmm.machine.Machine.qmp` all go through.

Each :class:`Command` names its arguments with QAPI's JSON types
(``string``, ``integer``, ``boolean``, ``number``); :func:`execute` checks
them the way QEMU does (an unknown argument, a missing one, a wrong type:
``GenericError`` with QEMU's wording) before the handler runs.  A handler
takes the machine and the arguments as keywords and returns the
``return`` value (JSON: dicts, lists, str, int, float, bool, None); it
raises :class:`~vmm.qmp.wire.QmpError` for an error reply.  ``table`` is
the optional view of the return value that ``vmm ctl --table`` prints.

To add a command, add one :class:`Command` to the literal below.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import TYPE_CHECKING, Any, Callable, Sequence

from ipc import Bus, RegistryError
from vmm.endpoint import VMM_OWNER, VmmError
from vmm.remote import RemoteEndpoint
from vmm.qmp.wire import COMMAND_NOT_FOUND, DEVICE_NOT_FOUND, GENERIC_ERROR, QmpError

if TYPE_CHECKING:
    from vmm.machine import Machine

#: One table as ``vmm ctl --table`` prints it: column names, then rows.
Table = tuple[Sequence[str], Sequence[Sequence[Any]]]

_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,), "integer": (int,), "boolean": (bool,), "number": (int, float),
}


@dataclasses.dataclass(frozen=True)
class Arg:
    """One argument of a command."""

    name: str
    #: QAPI's name of its JSON type: string, integer, boolean or number.
    type: str
    help: str
    required: bool = False

    def __post_init__(self) -> None:
        if self.type not in _JSON_TYPES:
            raise ValueError(f"argument {self.name}: unknown type {self.type!r}")

    def accepts(self, value: Any) -> bool:
        if isinstance(value, bool) and self.type != "boolean":
            return False
        return isinstance(value, _JSON_TYPES[self.type])


@dataclasses.dataclass(frozen=True)
class Command:
    """One control command."""

    name: str
    help: str
    #: run(machine, **arguments) -> the ``return`` value.
    run: Callable[..., Any]
    args: tuple[Arg, ...] = ()
    #: The ``return`` value as tables, for ``vmm ctl --table``.
    table: Callable[[Any], list[Table]] | None = None
    #: Arguments not declared: run(machine, arguments) gets them all as one
    #: mapping and validates them itself (``fault-arm``: a fault's keys).
    free: bool = False


def execute(machine: Machine, name: str, arguments: dict[str, Any] | None = None) -> Any:
    """Run command ``name`` on ``machine``; returns its ``return`` value.
    Raises :class:`QmpError` (unknown command, bad arguments, the
    command's own failure)."""
    command = COMMANDS.get(name)
    if command is None:
        raise QmpError(COMMAND_NOT_FOUND, f"The command {name} has not been found")
    arguments = dict(arguments or {})
    if command.free:
        try:
            return command.run(machine, arguments)
        except (VmmError, RegistryError) as e:
            raise QmpError(GENERIC_ERROR, str(e)) from None
    declared = {a.name: a for a in command.args}
    for key, value in arguments.items():
        arg = declared.get(key)
        if arg is None:
            raise QmpError(GENERIC_ERROR, f"Parameter '{key}' is unexpected")
        if not arg.accepts(value):
            raise QmpError(GENERIC_ERROR, f"Invalid parameter type for '{key}', expected: {arg.type}")
    for arg in command.args:
        if arg.required and arg.name not in arguments:
            raise QmpError(GENERIC_ERROR, f"Parameter '{arg.name}' is missing")
    try:
        return command.run(machine, **{k.replace("-", "_"): v for k, v in arguments.items()})
    except (VmmError, RegistryError) as e:
        raise QmpError(GENERIC_ERROR, str(e)) from None


# -- what the queries read -----------------------------------------------


def device_name(machine: Machine, owner: int) -> str | None:
    """The ``id=`` of a registry owner ("vmm" for the VMM's own regions)."""
    if owner == VMM_OWNER:
        return "vmm"
    endpoint = machine.endpoints.get(owner)
    return None if endpoint is None else endpoint.name


def _owner_of(machine: Machine, device: str) -> int:
    for owner in machine.endpoints:
        if device_name(machine, owner) == device:
            return owner
    raise QmpError(DEVICE_NOT_FOUND, f"Device '{device}' not found")


def query_status(machine: Machine) -> dict[str, Any]:
    state = machine.run_state
    started = machine.started_at
    uptime = 0.0 if started is None else (machine.ended_at or time.monotonic()) - started
    vcpus = []
    for v in machine.vcpus:
        if v.parked:
            vstate = "parked"
        elif started is None:
            vstate = "prelaunch"
        elif not v.alive:
            vstate = "stopped"
        else:
            vstate = "paused" if state == "paused" else "running"
        vcpus.append({"cpu-index": v.index, "state": vstate, "thread-id": v.thread.native_id})
    out: dict[str, Any] = {"status": state, "running": state == "running", "uptime": round(uptime, 6),
                           "vcpus": vcpus}
    if machine.outcome is not None:
        out["ending"] = {"ending": machine.outcome.ending.value, "detail": machine.outcome.detail,
                         "status": machine.outcome.status}
    return out


def query_devices(machine: Machine) -> list[dict[str, Any]]:
    stats = machine.dispatcher.stats
    out = []
    for owner, endpoint in sorted(machine.endpoints.items()):
        if owner == VMM_OWNER:
            continue
        spec = machine.device_specs.get(owner)
        reason = machine.device_failure(owner)
        # A device process has a pid of its own; an inline model is the VMM's.
        # (A device the VMM connected to, rather than started, may have none.)
        if isinstance(endpoint, RemoteEndpoint):
            pid = endpoint.pid if endpoint.pid > 0 else None
        else:
            pid = os.getpid()
        counted = stats.device(owner)
        out.append({
            "id": endpoint.name,
            "kind": spec.kind if spec is not None else None,
            "placement": spec.placement if spec is not None else None,
            "owner": owner,
            "pid": pid,
            "state": "failed" if reason is not None else "running",
            "reason": reason,
            "accesses": counted.accesses,
            "failures": counted.failures,
            # the sandbox layers the device reported (devserver.sandbox); None inline
            "sandbox": list(endpoint.sandbox.layers) if isinstance(endpoint, RemoteEndpoint) else None,
        })
    return out


_BUSES = {bus.name.lower(): bus for bus in Bus}


def query_regions(machine: Machine, bus: str | None = None, device: str | None = None) -> list[dict[str, Any]]:
    if bus is not None and bus not in _BUSES:
        raise QmpError(GENERIC_ERROR, f"Parameter 'bus' does not accept value '{bus}'")
    owner = _owner_of(machine, device) if device is not None else None
    out: list[dict[str, Any]] = []
    registry = machine.registry
    if registry is None:
        raise QmpError(GENERIC_ERROR, "the machine has no registry (closed?)")
    windows = machine.dispatcher.windows
    for r in sorted(registry.regions(), key=lambda r: (int(r.bus), r.start, r.slot)):
        if bus is not None and r.bus != _BUSES[bus]:
            continue
        if owner is not None and r.owner != owner:
            continue
        out.append({
            "bus": r.bus.name.lower() if isinstance(r.bus, Bus) else int(r.bus),
            "start": r.start, "length": r.length, "owner": r.owner,
            "device": device_name(machine, r.owner),
            "refcount": r.refcount, "removing": r.removing,
            "slot": r.slot, "generation": r.generation,
            # Outside the windows the VMM granted its owner: accesses to it
            # complete as unclaimed (vmm.windows).
            "refused": windows is not None and windows.is_refused(r),
        })
    return out


def query_stats(machine: Machine, device: str | None = None) -> list[dict[str, Any]]:
    stats = machine.dispatcher.stats
    if device is not None:
        owners = [_owner_of(machine, device)]
    else:
        owners = sorted(set(machine.endpoints) | stats.owners())
    return [{"id": device_name(machine, owner), "owner": owner, **stats.device(owner).as_json()}
            for owner in owners]


def query_commands(machine: Machine) -> list[dict[str, str]]:
    return [{"name": name} for name in sorted([*COMMANDS, "qmp_capabilities"])]


def stop(machine: Machine) -> dict[str, Any]:
    machine.pause()
    return {}


def cont(machine: Machine) -> dict[str, Any]:
    machine.resume()
    return {}


def quit_(machine: Machine) -> dict[str, Any]:
    machine.quit()
    return {}


def fault_arm(machine: Machine, arguments: dict[str, Any]) -> dict[str, Any]:
    return machine.faults.arm(arguments)


def fault_disarm(machine: Machine, name: str) -> dict[str, Any]:
    return machine.faults.disarm(name)


def query_faults(machine: Machine, device: str | None = None) -> list[dict[str, Any]]:
    faults = machine.faults.list()
    return [f for f in faults if device is None or f["device"] == device]


# -- tables for people -------------------------------------------------------


def _hex(n: Any) -> str:
    return f"{n:#x}" if isinstance(n, int) else str(n)


def _ns(n: Any) -> str:
    if n is None:
        return "-"
    return f"{n / 1000:.1f} us" if n < 1_000_000 else f"{n / 1e6:.1f} ms"


def _status_table(r: dict[str, Any]) -> list[Table]:
    head = [("status", r["status"]), ("uptime", f"{r['uptime']:.3f} s")]
    if "ending" in r:
        head.append(("ending", f"{r['ending']['ending']}: {r['ending']['detail']} (status {r['ending']['status']})"))
    return [(("field", "value"), head),
            (("vcpu", "state", "thread-id"), [(v["cpu-index"], v["state"], v["thread-id"]) for v in r["vcpus"]])]


def _devices_table(r: list[dict[str, Any]]) -> list[Table]:
    return [(("id", "kind", "placement", "pid", "state", "accesses", "failures"),
             [(d["id"], d["kind"], d["placement"], d["pid"],
               d["state"] if d["reason"] is None else f"failed: {d['reason']}", d["accesses"], d["failures"])
              for d in r])]


def _regions_table(r: list[dict[str, Any]]) -> list[Table]:
    return [(("bus", "start", "length", "owner", "device", "refcount", "removing", "refused"),
             [(x["bus"], _hex(x["start"]), _hex(x["length"]), x["owner"], x["device"], x["refcount"],
               "yes" if x["removing"] else "", "REFUSED" if x.get("refused") else "") for x in r])]


def _stats_table(r: list[dict[str, Any]]) -> list[Table]:
    rows = []
    for d in r:
        a = d["accesses"]
        lat = d["latency"]
        rows.append((d["id"], a["pio"]["read"], a["pio"]["write"], a["mmio"]["read"], a["mmio"]["write"],
                     a["pci"]["read"], a["pci"]["write"], d["failures"], _ns(lat["mean-ns"]),
                     f"< {_ns(lat['p50-ns'])}" if lat["p50-ns"] else "-",
                     f"< {_ns(lat['p99-ns'])}" if lat["p99-ns"] else "-"))
    return [(("id", "pio-r", "pio-w", "mmio-r", "mmio-w", "pci-r", "pci-w", "failures", "mean", "p50", "p99"),
             rows)]


def _faults_table(r: list[dict[str, Any]]) -> list[Table]:
    return [(("name", "device", "point", "action", "events", "firings", "shadowed"),
             [(f["name"], f["device"], f["point"], f["action"], f["events"], f["firings"], f["shadowed"])
              for f in r])]


def _commands_table(r: list[dict[str, str]]) -> list[Table]:
    return [(("command", "what it does"),
             [(c["name"], COMMANDS[c["name"]].help if c["name"] in COMMANDS else "capabilities negotiation")
              for c in r])]


_DEVICE_ARG = Arg("device", "string", "only this device (its id=)")

#: Every control command, by name.  Later commands join this literal.
COMMANDS: dict[str, Command] = {c.name: c for c in (
    Command("query-status", "run state (prelaunch, running, paused, shutdown), uptime, vCPUs",
            query_status, table=_status_table),
    Command("query-devices", "every device: id, kind, placement, pid, state, accesses, failures, sandbox",
            query_devices, table=_devices_table),
    Command("query-regions", "the registry's regions, live: bus, start, length, owner, device, refcount, removing, refused",
            query_regions, (Arg("bus", "string", "pio, mmio or pci"), _DEVICE_ARG), table=_regions_table),
    Command("query-stats", "per device: accesses by space and direction, failures, forwarding latency "
            "(log2 histogram, p50, p99)", query_stats, (_DEVICE_ARG,), table=_stats_table),
    Command("query-commands", "the commands this socket knows", query_commands, table=_commands_table),
    Command("stop", "pause every vCPU (out of KVM_RUN, waiting); event STOP", stop),
    Command("cont", "resume every vCPU; event RESUME", cont),
    Command("quit", "end the run (status 12); event SHUTDOWN", quit_),
    Command("fault-arm", "arm one fault: its plan keys as arguments (device, point, one of nth/every/after/"
            "probability, action, parameters, match keys; name optional); event FAULT_FIRED when it fires",
            fault_arm, free=True),
    Command("fault-disarm", "disarm the fault called name; its final counters", fault_disarm,
            (Arg("name", "string", "the fault's name", required=True),)),
    Command("query-faults", "every armed fault: device, point, action, events matched, firings, shadowed",
            query_faults, (_DEVICE_ARG,), table=_faults_table),
)}
