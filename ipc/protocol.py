"""The control protocol between the VMM and a device process, without I/O.

vhost-user in spirit, h11 in shape: messages are small frozen dataclasses
that validate themselves, the conversation is a transition table, and a
:class:`Connection` turns bytes (plus the file descriptors that arrived
with them) into messages and messages into bytes and descriptors.  No
socket is touched here; :mod:`ipc.transport` does that.

Framing: each frame is a 4-byte little-endian length followed by that many
bytes of msgpack: a map with a ``"type"`` key and the message's fields.
Descriptors are not in the map: a message type says how many it carries
(:attr:`Message.FD_FIELDS`), and they travel as SCM_RIGHTS ancillary data
with the frame.  A frame is at most :data:`MAX_FRAME` bytes and a message
carries at most :data:`MAX_FDS` descriptors.

The conversation (VMM = front end, device = back end)::

    VMM                                   device
    Hello(version, features)      ─►
                                  ◄─      Welcome(version, features)
    DeviceConfig(kind, params, owner, name, nvcpus, sandbox, seccomp)
    SetRegistry  [fd]                     (each once, in any order;
    SetSlots     [fd]                      SetMemTable is optional)
    SetMemTable  [fd]
    Start                         ─►
                                  ◄─      Ready(pid, sandbox)   (initial regions claimed;
                                                                 the sandbox layers that are on)
    Reset                         ─►
                                  ◄─      ResetDone
    Shutdown (at any time)        ─►      (the device exits)
                                  ◄─      Error(message)  (at any time)

Errors a peer makes raise :class:`RemoteProtocolError` (cut that peer
off); errors this side makes raise :class:`LocalProtocolError` (a bug here).
"""

from __future__ import annotations

import enum
import struct
from typing import Any, ClassVar, NoReturn

import msgpack

from devices.record import Record, record
from ipc.errors import IpcError

__all__ = [
    "PROTOCOL_VERSION",
    "FEATURES",
    "MAX_FRAME",
    "MAX_FDS",
    "ProtocolError",
    "LocalProtocolError",
    "RemoteProtocolError",
    "Role",
    "State",
    "Message",
    "Hello",
    "Welcome",
    "DeviceConfig",
    "SetRegistry",
    "SetSlots",
    "MemRegion",
    "SetMemTable",
    "Start",
    "Ready",
    "Reset",
    "ResetDone",
    "Shutdown",
    "Error",
    "ConnectionClosed",
    "NEED_DATA",
    "Connection",
    "negotiate",
]

PROTOCOL_VERSION = 1
#: Optional capabilities this code knows; a Welcome names the agreed subset.
#: ``coalesced-batch``: the device applies write batches (ipc.batch) and
#: takes a batch segment in the answer to its first CoalescedMmioRequest.
#: ``state``: the device takes a state segment (SetState, ipc.state).
FEATURES = frozenset({"mem-table", "reset", "coalesced-batch", "state"})
#: Largest frame body (msgpack bytes after the length prefix).
MAX_FRAME = 64 * 1024
#: Most descriptors one message may carry.
MAX_FDS = 4
MAX_NAME = 64
#: A device kind may be ``MODULE:CLASS`` (devices.kinds), longer than a name.
MAX_KIND = 256
MAX_TEXT = 1024
MAX_PARAMS = 64
MAX_VCPUS = 256
MAX_MEM_REGIONS = 64
MAX_POLL_NS = 10_000_000
U64_MAX = (1 << 64) - 1
#: DeviceConfig.sandbox and .seccomp values (devserver.sandbox).
SANDBOX_MODES = ("strict", "auto", "off")
SECCOMP_MODES = ("kill", "trap", "log")

_LENGTH = struct.Struct("<I")


class ProtocolError(IpcError):
    """Base of the control protocol's errors."""


class LocalProtocolError(ProtocolError):
    """This side tried to send something the protocol does not allow."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol does not allow: cut it off."""


class Role(enum.Enum):
    VMM = "vmm"
    DEVICE = "device"


class State(enum.Enum):
    """Where the conversation is (one state for both sides)."""

    AWAIT_HELLO = "await-hello"
    AWAIT_WELCOME = "await-welcome"
    CONFIGURING = "configuring"
    STARTING = "starting"
    RUNNING = "running"
    RESETTING = "resetting"
    FAILED = "failed"          # the device sent Error
    CLOSING = "closing"        # the VMM sent Shutdown
    CLOSED = "closed"          # end of stream


# ---- messages ------------------------------------------------------------

def _need(cond: bool, what: str) -> None:
    if not cond:
        raise ValueError(what)


def _u64(name: str, v: Any) -> None:
    _need(type(v) is int and 0 <= v <= U64_MAX, f"{name} must be an integer in [0, 2**64), not {v!r}")


def _text(name: str, v: Any, limit: int, empty: bool = False) -> None:
    _need(isinstance(v, str), f"{name} must be a string, not {type(v).__name__}")
    _need(len(v) <= limit, f"{name} is longer than {limit} characters")
    _need(empty or len(v) > 0, f"{name} must not be empty")


def _fd(name: str, v: Any) -> None:
    _need(type(v) is int and v >= 0, f"{name} must be a file descriptor, not {v!r}")


class Message(Record):
    """Base of the messages.  Subclasses are frozen dataclasses
    (:func:`devices.record.record`: methods shared, not compiled per
    class); their ``__post_init__`` checks every field, so a
    message that exists is valid."""

    #: The ``"type"`` of the wire map.
    TYPE: ClassVar[str] = ""
    #: Which side may send it.
    SENDER: ClassVar[Role]
    #: Fields that hold file descriptors (not in the map; SCM_RIGHTS).
    FD_FIELDS: ClassVar[tuple[str, ...]] = ()

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.TYPE}
        for name in self._record_fields:
            if name not in self.FD_FIELDS:
                out[name] = _plain(getattr(self, name))
        return out

    @classmethod
    def from_wire(cls, body: dict[str, Any], fds: list[int]) -> Message:
        names = set(cls._record_fields) - set(cls.FD_FIELDS)
        extra = set(body) - names - {"type"}
        if extra:
            raise ValueError(f"unknown field(s) {sorted(extra)}")
        missing = names - set(body)
        if missing:
            raise ValueError(f"missing field(s) {sorted(missing)}")
        kw = {n: body[n] for n in names}
        kw.update(zip(cls.FD_FIELDS, fds, strict=False))
        return cls._build(kw)

    @classmethod
    def _build(cls, kw: dict[str, Any]) -> Message:
        return cls(**kw)

    def fds(self) -> list[int]:
        return [getattr(self, n) for n in self.FD_FIELDS]


def _plain(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_plain(x) for x in v]
    if isinstance(v, Record):
        return {name: _plain(getattr(v, name)) for name in v._record_fields}
    if isinstance(v, frozenset):
        return sorted(v)
    return v


def _features(name: str, v: Any) -> frozenset[str]:
    _need(isinstance(v, (list, tuple, set, frozenset)) and len(v) <= 32,
          f"{name} must be a list of at most 32 strings")
    for x in v:
        _text(f"{name} entry", x, MAX_NAME)
    return frozenset(v)


@record
class _Versions(Message):
    """The two handshake messages: a version and a feature set."""

    version: int = PROTOCOL_VERSION
    features: frozenset[str] = FEATURES

    def __post_init__(self) -> None:
        _need(type(self.version) is int and 1 <= self.version <= 0xFFFF, f"bad version {self.version!r}")
        object.__setattr__(self, "features", _features("features", self.features))


@record
class Hello(_Versions):
    """VMM → device: the protocol version and features the VMM speaks."""

    TYPE: ClassVar[str] = "hello"
    SENDER: ClassVar[Role] = Role.VMM


@record
class Welcome(_Versions):
    """Device → VMM: the version and the subset of features agreed on."""

    TYPE: ClassVar[str] = "welcome"
    SENDER: ClassVar[Role] = Role.DEVICE


@record
class DeviceConfig(Message):
    """VMM → device: which model to run, with what, as which owner."""

    TYPE: ClassVar[str] = "device-config"
    SENDER: ClassVar[Role] = Role.VMM
    kind: str
    params: dict[str, str]
    owner: int
    name: str
    nvcpus: int
    #: The device's sandbox (devserver.sandbox): strict, auto or off.
    sandbox: str = "strict"
    #: What seccomp does with a call outside the allowlist: kill, trap or log.
    seccomp: str = "kill"

    def __post_init__(self) -> None:
        _need(self.sandbox in SANDBOX_MODES, f"sandbox must be one of {', '.join(SANDBOX_MODES)}, not {self.sandbox!r}")
        _need(self.seccomp in SECCOMP_MODES, f"seccomp must be one of {', '.join(SECCOMP_MODES)}, not {self.seccomp!r}")
        _text("kind", self.kind, MAX_KIND)
        _need(isinstance(self.params, dict) and len(self.params) <= MAX_PARAMS,
              f"params must be a map of at most {MAX_PARAMS} entries")
        for k, v in self.params.items():
            _text("parameter name", k, MAX_NAME)
            _text(f"parameter {k}", v, MAX_TEXT, empty=True)
        object.__setattr__(self, "params", dict(self.params))
        _u64("owner", self.owner)
        _need(self.owner > 0, "owner must not be 0")
        _text("name", self.name, MAX_NAME)
        _need(self.name.isprintable(), "name must be printable")
        _need(type(self.nvcpus) is int and 1 <= self.nvcpus <= MAX_VCPUS,
              f"nvcpus must be in [1, {MAX_VCPUS}], not {self.nvcpus!r}")


@record
class SetRegistry(Message):
    """VMM → device: the region registry segment."""

    TYPE: ClassVar[str] = "set-registry"
    SENDER: ClassVar[Role] = Role.VMM
    FD_FIELDS: ClassVar[tuple[str, ...]] = ("fd",)
    fd: int

    def __post_init__(self) -> None:
        _fd("fd", self.fd)


@record
class SetSlots(Message):
    """VMM → device: the access-slot segment and how to serve it."""

    TYPE: ClassVar[str] = "set-slots"
    SENDER: ClassVar[Role] = Role.VMM
    FD_FIELDS: ClassVar[tuple[str, ...]] = ("fd",)
    fd: int
    nslots: int
    #: Longest poll after a request before sleeping (0: sleep at once).
    poll_ns: int
    #: Grow and shrink the window (KVM halt-polling style).
    adaptive: bool = True
    #: Let the serving thread move itself off the CPU of the vCPU it serves.
    move: bool = False

    def __post_init__(self) -> None:
        _fd("fd", self.fd)
        _need(type(self.nslots) is int and 1 <= self.nslots <= MAX_VCPUS,
              f"nslots must be in [1, {MAX_VCPUS}], not {self.nslots!r}")
        _need(type(self.poll_ns) is int and 0 <= self.poll_ns <= MAX_POLL_NS,
              f"poll_ns must be in [0, {MAX_POLL_NS}], not {self.poll_ns!r}")
        _need(type(self.adaptive) is bool, "adaptive must be a boolean")
        _need(type(self.move) is bool, "move must be a boolean")


@record
class MemRegion(Record):
    """One range of guest RAM: ``size`` bytes at guest physical
    ``guest_addr``, found at ``offset`` in the memory fd."""

    guest_addr: int
    size: int
    offset: int

    def __post_init__(self) -> None:
        for n in ("guest_addr", "size", "offset"):
            _u64(n, getattr(self, n))
        _need(self.size > 0, "memory region size must not be zero")
        _need(self.guest_addr + self.size - 1 <= U64_MAX, "memory region wraps the address space")
        _need(self.offset + self.size - 1 <= U64_MAX, "memory region wraps the file")


@record
class SetMemTable(Message):
    """VMM → device: guest RAM (a memfd) and where it sits in the guest."""

    TYPE: ClassVar[str] = "set-mem-table"
    SENDER: ClassVar[Role] = Role.VMM
    FD_FIELDS: ClassVar[tuple[str, ...]] = ("fd",)
    fd: int
    regions: tuple[MemRegion, ...]

    def __post_init__(self) -> None:
        _fd("fd", self.fd)
        _need(isinstance(self.regions, (list, tuple)) and 1 <= len(self.regions) <= MAX_MEM_REGIONS,
              f"regions must be a list of 1 to {MAX_MEM_REGIONS} entries")
        regions = []
        for r in self.regions:
            if isinstance(r, dict):
                _need(set(r) == {"guest_addr", "size", "offset"}, f"bad memory region {r!r}")
                r = MemRegion(**r)
            _need(isinstance(r, MemRegion), f"bad memory region {r!r}")
            regions.append(r)
        ordered = sorted(regions, key=lambda r: r.guest_addr)
        for a, b in zip(ordered, ordered[1:], strict=False):
            _need(a.guest_addr + a.size <= b.guest_addr, "memory regions overlap")
        object.__setattr__(self, "regions", tuple(regions))


@record
class Start(Message):
    """VMM → device: configuration is complete; build the model."""

    TYPE: ClassVar[str] = "start"
    SENDER: ClassVar[Role] = Role.VMM


@record
class Ready(Message):
    """Device → VMM: the model runs and has claimed its initial regions."""

    TYPE: ClassVar[str] = "ready"
    SENDER: ClassVar[Role] = Role.DEVICE
    pid: int
    #: The sandbox layers that are on in the device (devserver.sandbox).
    sandbox: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _need(type(self.pid) is int and 0 < self.pid < 1 << 31, f"bad pid {self.pid!r}")
        _need(isinstance(self.sandbox, (list, tuple)) and len(self.sandbox) <= 16,
              "sandbox must be a list of at most 16 layer names")
        for layer in self.sandbox:
            _text("sandbox layer", layer, MAX_NAME)
            _need(layer.isprintable(), "sandbox layer names must be printable")
        object.__setattr__(self, "sandbox", tuple(self.sandbox))


@record
class Reset(Message):
    """VMM → device: put the model back in its power-on state."""

    TYPE: ClassVar[str] = "reset"
    SENDER: ClassVar[Role] = Role.VMM


@record
class ResetDone(Message):
    """Device → VMM: the model is back in its power-on state (the answer to :class:`Reset`)."""

    TYPE: ClassVar[str] = "reset-done"
    SENDER: ClassVar[Role] = Role.DEVICE


@record
class Shutdown(Message):
    """VMM → device: release your regions and exit."""

    TYPE: ClassVar[str] = "shutdown"
    SENDER: ClassVar[Role] = Role.VMM


@record
class Error(Message):
    """Device → VMM: the device cannot go on (bad config, model failure)."""

    TYPE: ClassVar[str] = "error"
    SENDER: ClassVar[Role] = Role.DEVICE
    message: str

    def __post_init__(self) -> None:
        _text("message", self.message, MAX_TEXT)


@record
class ConnectionClosed(Record):
    """Not a message: the peer closed the stream at a frame boundary."""


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


#: What :meth:`Connection.next_event` returns when no whole frame is buffered.
NEED_DATA = _NeedData()

MESSAGES: dict[str, type[Message]] = {
    m.TYPE: m for m in (Hello, Welcome, DeviceConfig, SetRegistry, SetSlots, SetMemTable,
                        Start, Ready, Reset, ResetDone, Shutdown, Error)
}
_CONFIG: tuple[type[Message], ...] = (DeviceConfig, SetRegistry, SetSlots, SetMemTable)
_REQUIRED_CONFIG: frozenset[type[Message]] = frozenset({DeviceConfig, SetRegistry, SetSlots})

S = State
#: (state, message type) -> next state.  The sender of each type is fixed
#: by the type (Message.SENDER); Shutdown and Error are handled below.
TRANSITIONS: dict[tuple[State, type[Message]], State] = {
    (S.AWAIT_HELLO, Hello): S.AWAIT_WELCOME,
    (S.AWAIT_WELCOME, Welcome): S.CONFIGURING,
    **{(S.CONFIGURING, m): S.CONFIGURING for m in _CONFIG},
    (S.CONFIGURING, Start): S.STARTING,
    (S.STARTING, Ready): S.RUNNING,
    (S.RUNNING, Reset): S.RESETTING,
    (S.RESETTING, ResetDone): S.RUNNING,
    # Answers that cross a Shutdown on the wire are harmless.
    (S.CLOSING, Welcome): S.CLOSING,
    (S.CLOSING, Ready): S.CLOSING,
    (S.CLOSING, ResetDone): S.CLOSING,
    (S.CLOSING, Error): S.CLOSING,
}
#: States in which each side may still send Shutdown / Error.
_SHUTDOWN_FROM = frozenset(State) - {S.CLOSING, S.CLOSED}
_ERROR_FROM = frozenset(State) - {S.CLOSING, S.CLOSED, S.FAILED, S.AWAIT_HELLO}


# ---- console (the serial device's line) ------------------------------------

@record
class SetConsole(Message):
    """VMM → device (optional, configuring): the console of ``vmm run
    --serial``: bytes the device sends go to ``out_fd`` (the VMM's stdout
    or a file), bytes it receives come from ``in_fd`` (a pipe the VMM
    feeds from its terminal, or an empty input).  Nothing else of the
    terminal reaches the device."""

    TYPE: ClassVar[str] = "set-console"
    SENDER: ClassVar[Role] = Role.VMM
    FD_FIELDS: ClassVar[tuple[str, ...]] = ("out_fd", "in_fd")
    out_fd: int
    in_fd: int

    def __post_init__(self) -> None:
        _fd("out_fd", self.out_fd)
        _fd("in_fd", self.in_fd)


__all__.append("SetConsole")
MESSAGES[SetConsole.TYPE] = SetConsole
_CONFIG = (*_CONFIG, SetConsole)
TRANSITIONS[(S.CONFIGURING, SetConsole)] = S.CONFIGURING


# ---- state segment (issue 10 §2) --------------------------------------------

@record
class SetState(Message):
    """VMM → device (optional, configuring; needs the ``state`` feature):
    the device's state segment (:mod:`ipc.state`), the sealed memfd the
    VMM keeps across restarts of the device.  The device stores its
    model's snapshot there before it answers the access that changed it,
    and a device that finds a snapshot in it restores from it instead of
    starting from power-on."""

    TYPE: ClassVar[str] = "set-state"
    SENDER: ClassVar[Role] = Role.VMM
    FD_FIELDS: ClassVar[tuple[str, ...]] = ("fd",)
    fd: int

    def __post_init__(self) -> None:
        _fd("fd", self.fd)


__all__.append("SetState")
MESSAGES[SetState.TYPE] = SetState
_CONFIG = (*_CONFIG, SetState)
TRANSITIONS[(S.CONFIGURING, SetState)] = S.CONFIGURING


# ---- interrupts (irqfds and MSI routes) ------------------------------------
#
#   device                                         VMM
#   IrqLineRequest(seq, gsi)                  ─►   validates, KVM_IRQFD
#   MsiRouteRequest(seq, index, address, data) ─►  KVM_SET_GSI_ROUTING (+ irqfd)
#   MsiUnrouteRequest(seq, index)             ─►
#                                             ◄─   IrqGranted(seq) [eventfd]  (line, route)
#                                             ◄─   IrqDone(seq)               (route removed)
#                                             ◄─   IrqRefused(seq, message)
#
# Allowed from Start on (a model asks in its start(), in a reset, or inside
# an access handler); the device then writes the eventfd to interrupt, and
# the VMM is not on that path.  Values are only type-checked here: the VMM
# judges them (pin range, MSI window, per-device limits) and refuses with
# IrqRefused, which does not cut the device off.

def _u32(name: str, v: Any) -> None:
    _need(type(v) is int and 0 <= v <= 0xFFFF_FFFF, f"{name} must be an integer in [0, 2**32), not {v!r}")


@record
class IrqLineRequest(Message):
    """Device → VMM: an eventfd raising irqchip input ``gsi``."""

    TYPE: ClassVar[str] = "irq-line"
    SENDER: ClassVar[Role] = Role.DEVICE
    seq: int
    gsi: int

    def __post_init__(self) -> None:
        _u32("seq", self.seq)
        _u32("gsi", self.gsi)


@record
class MsiRouteRequest(Message):
    """Device → VMM: route MSI vector ``index`` to ``address``/``data``
    (a new route or an update; answered with the route's eventfd)."""

    TYPE: ClassVar[str] = "msi-route"
    SENDER: ClassVar[Role] = Role.DEVICE
    seq: int
    index: int
    address: int
    data: int

    def __post_init__(self) -> None:
        _u32("seq", self.seq)
        _u32("index", self.index)
        _u64("address", self.address)
        _u32("data", self.data)


@record
class MsiUnrouteRequest(Message):
    """Device → VMM: drop MSI vector ``index``'s route."""

    TYPE: ClassVar[str] = "msi-unroute"
    SENDER: ClassVar[Role] = Role.DEVICE
    seq: int
    index: int

    def __post_init__(self) -> None:
        _u32("seq", self.seq)
        _u32("index", self.index)


@record
class IrqGranted(Message):
    """VMM → device: the eventfd that raises what request ``seq`` asked for."""

    TYPE: ClassVar[str] = "irq-granted"
    SENDER: ClassVar[Role] = Role.VMM
    FD_FIELDS: ClassVar[tuple[str, ...]] = ("fd",)
    seq: int
    fd: int

    def __post_init__(self) -> None:
        _u32("seq", self.seq)
        _fd("fd", self.fd)


@record
class IrqDone(Message):
    """VMM → device: request ``seq`` is done (no new eventfd)."""

    TYPE: ClassVar[str] = "irq-done"
    SENDER: ClassVar[Role] = Role.VMM
    seq: int

    def __post_init__(self) -> None:
        _u32("seq", self.seq)


@record
class IrqRefused(Message):
    """VMM → device: request ``seq`` is refused, and why."""

    TYPE: ClassVar[str] = "irq-refused"
    SENDER: ClassVar[Role] = Role.VMM
    seq: int
    message: str

    def __post_init__(self) -> None:
        _u32("seq", self.seq)
        _text("message", self.message, MAX_TEXT)


IRQ_REQUESTS: tuple[type[Message], ...] = (IrqLineRequest, MsiRouteRequest, MsiUnrouteRequest)
IRQ_ANSWERS: tuple[type[Message], ...] = (IrqGranted, IrqDone, IrqRefused)
_m: type[Message]
__all__ += ["IrqLineRequest", "MsiRouteRequest", "MsiUnrouteRequest", "IrqGranted", "IrqDone",
            "IrqRefused", "IRQ_REQUESTS", "IRQ_ANSWERS"]
for _m in IRQ_REQUESTS + IRQ_ANSWERS:
    MESSAGES[_m.TYPE] = _m
    for _s in (S.STARTING, S.RUNNING, S.RESETTING, S.CLOSING):
        TRANSITIONS[(_s, _m)] = _s


# ---- ioeventfds (doorbells) -------------------------------------------------
#
#   device                                              VMM
#   IoeventfdRequest(seq, space, address, length,  ─►   validates (a region this
#                    datamatch, match)                  device owns), KVM_IOEVENTFD
#   IoeventfdRemoveRequest(seq, same fields)       ─►   KVM_IOEVENTFD deassign
#                                                  ◄─   IrqGranted(seq) [eventfd] (added)
#                                                  ◄─   IrqDone(seq)              (removed)
#                                                  ◄─   IrqRefused(seq, message)
#
# Same rules and answers as the interrupt requests (from Start on, answered
# on the VMM's monitor thread, so a device may ask from inside an access
# handler -- a BAR that moves takes its doorbells along).  ``space`` is 0
# (port I/O) or 1 (MMIO); ``match`` says whether only writes of
# ``datamatch`` signal.

@record
class IoeventfdRequest(Message):
    """Device → VMM: an eventfd signalled by guest writes at ``address``."""

    TYPE: ClassVar[str] = "ioeventfd"
    SENDER: ClassVar[Role] = Role.DEVICE
    seq: int
    space: int
    address: int
    length: int
    datamatch: int = 0
    match: bool = False

    def __post_init__(self) -> None:
        _u32("seq", self.seq)
        _need(type(self.space) is int and self.space in (0, 1), f"space must be 0 or 1, not {self.space!r}")
        _u64("address", self.address)
        _need(type(self.length) is int and self.length in (1, 2, 4, 8),
              f"length must be 1, 2, 4 or 8, not {self.length!r}")
        _u64("datamatch", self.datamatch)
        _need(type(self.match) is bool, "match must be a boolean")


@record
class IoeventfdRemoveRequest(IoeventfdRequest):
    """Device → VMM: drop the ioeventfd added with these same fields."""

    TYPE: ClassVar[str] = "ioeventfd-remove"


IRQ_REQUESTS = (*IRQ_REQUESTS, IoeventfdRequest, IoeventfdRemoveRequest)
__all__ += ["IoeventfdRequest", "IoeventfdRemoveRequest"]
for _m in (IoeventfdRequest, IoeventfdRemoveRequest):
    MESSAGES[_m.TYPE] = _m
    for _s in (S.STARTING, S.RUNNING, S.RESETTING, S.CLOSING):
        TRANSITIONS[(_s, _m)] = _s


# ---- faults (devices.faults) ------------------------------------------------
#
#   VMM                                            device
#   FaultControl(seq, op, body)               ─►   setup / arm / disarm / query
#                                             ◄─   FaultReply(seq, ok, body)
#                                             ◄─   FaultFired(record)   (each firing, as it happens)
#
# From Ready on.  ``body`` and ``record`` are JSON texts: setup's body is
# {"seed", "digest", "faults": [fault...], "replay": [firing...] | null},
# arm's one fault (plan form), disarm's {"name"}, query's {}; a reply's
# body is the result or, with ok false, the error line.  Both sides
# validate what is inside (devices.faults.plan, devices.faults.trace):
# here only the framing is checked.  A sandboxed device has no filesystem,
# so its trace records travel this way, and the VMM writes the trace.

MAX_FAULT_TEXT = 60_000
FAULT_OPS = frozenset({"setup", "arm", "disarm", "query"})


@record
class FaultControl(Message):
    """VMM → device: a fault-engine request (see above)."""

    TYPE: ClassVar[str] = "fault-control"
    SENDER: ClassVar[Role] = Role.VMM
    seq: int
    op: str
    body: str

    def __post_init__(self) -> None:
        _u32("seq", self.seq)
        _need(self.op in FAULT_OPS, f"op must be one of {sorted(FAULT_OPS)}, not {self.op!r}")
        _text("body", self.body, MAX_FAULT_TEXT)


@record
class FaultReply(Message):
    """Device → VMM: the answer to FaultControl ``seq``."""

    TYPE: ClassVar[str] = "fault-reply"
    SENDER: ClassVar[Role] = Role.DEVICE
    seq: int
    ok: bool
    body: str

    def __post_init__(self) -> None:
        _u32("seq", self.seq)
        _need(type(self.ok) is bool, "ok must be a boolean")
        _text("body", self.body, MAX_FAULT_TEXT)


@record
class FaultFired(Message):
    """Device → VMM: one trace record (a firing), JSON."""

    TYPE: ClassVar[str] = "fault-fired"
    SENDER: ClassVar[Role] = Role.DEVICE
    record: str

    def __post_init__(self) -> None:
        _text("record", self.record, MAX_FAULT_TEXT)


__all__ += ["FaultControl", "FaultReply", "FaultFired", "FAULT_OPS"]
for _m in (FaultControl, FaultReply, FaultFired):
    MESSAGES[_m.TYPE] = _m
    for _s in (S.RUNNING, S.RESETTING, S.CLOSING):
        TRANSITIONS[(_s, _m)] = _s


# ---- coalesced MMIO zones ---------------------------------------------------
#
#   device                                              VMM
#   CoalescedMmioRequest(seq, address, length)     ─►   validates (inside an MMIO
#                                                       region this device owns, no
#                                                       overlap, a bounded count),
#                                                       KVM_REGISTER_COALESCED_MMIO
#   CoalescedMmioRemoveRequest(seq, address)       ─►   KVM_UNREGISTER_COALESCED_MMIO
#                                                  ◄─   IrqDone(seq)
#                                                  ◄─   IrqGranted(seq) [batch segment]
#                                                  ◄─   IrqRefused(seq, message)
#
# The device registers the region in the registry itself, then asks for
# the zone (only the VMM holds the VM fd); same rules and answers as the
# ioeventfd requests.  Removing a zone the device does not hold is done.
# With the feature ``coalesced-batch`` a granted zone is answered with
# IrqGranted carrying the device's batch segment (ipc.batch, the same one
# each time): the VMM then delivers the queued writes in batches.

@record
class CoalescedMmioRequest(Message):
    """Device → VMM: queue guest writes to ``[address, address + length)``
    in KVM's coalesced-MMIO ring instead of exiting on each."""

    TYPE: ClassVar[str] = "coalesced-mmio"
    SENDER: ClassVar[Role] = Role.DEVICE
    seq: int
    address: int
    length: int

    def __post_init__(self) -> None:
        _u32("seq", self.seq)
        _u64("address", self.address)
        _need(type(self.length) is int and 0 < self.length <= 0xFFFF_FFFF,
              f"length must be an integer in [1, 2**32), not {self.length!r}")


@record
class CoalescedMmioRemoveRequest(Message):
    """Device → VMM: drop the coalesced zone that starts at ``address``."""

    TYPE: ClassVar[str] = "coalesced-mmio-remove"
    SENDER: ClassVar[Role] = Role.DEVICE
    seq: int
    address: int

    def __post_init__(self) -> None:
        _u32("seq", self.seq)
        _u64("address", self.address)


IRQ_REQUESTS = (*IRQ_REQUESTS, CoalescedMmioRequest, CoalescedMmioRemoveRequest)
__all__ += ["CoalescedMmioRequest", "CoalescedMmioRemoveRequest"]
for _m in (CoalescedMmioRequest, CoalescedMmioRemoveRequest):
    MESSAGES[_m.TYPE] = _m
    for _s in (S.STARTING, S.RUNNING, S.RESETTING, S.CLOSING):
        TRANSITIONS[(_s, _m)] = _s


def negotiate(hello: Hello, versions: frozenset[int] = frozenset({PROTOCOL_VERSION}),
              features: frozenset[str] = FEATURES) -> Welcome | None:
    """The device's answer to ``hello``: the highest common version and the
    common features, or None when there is no common version."""
    common = [v for v in versions if v <= hello.version]
    if not common:
        return None
    return Welcome(max(common), hello.features & features)


class Connection:
    """The protocol state of one control connection, seen from ``our_role``.

    Feed it what the socket gave with :meth:`receive_data` (``b""`` for end
    of stream) and take messages out with :meth:`next_event`; turn messages
    into ``(bytes, fds)`` with :meth:`send`.  Descriptors handed to
    :meth:`receive_data` belong to the connection until a message carries
    them out; those it refuses are returned by :meth:`take_unclaimed_fds`,
    for the caller to close.
    """

    def __init__(self, our_role: Role):
        self.our_role = our_role
        self.their_role = Role.DEVICE if our_role is Role.VMM else Role.VMM
        self.state = State.AWAIT_HELLO
        self.hello: Hello | None = None
        self.welcome: Welcome | None = None
        self._configured: set[type[Message]] = set()
        self._buf = bytearray()
        self._fds: list[int] = []
        self._unclaimed: list[int] = []
        self._eof = False
        self._broken: RemoteProtocolError | None = None

    # -- state machine -----------------------------------------------------

    def _transition(self, msg: Message, error: type[ProtocolError]) -> None:
        kind = type(msg)
        state = self.state
        if kind is Shutdown and state in _SHUTDOWN_FROM:
            self.state = State.CLOSING
            return
        if kind is Error and state in _ERROR_FROM:
            self.state = State.FAILED
            return
        new = TRANSITIONS.get((state, kind))
        if new is None:
            raise error(f"{kind.TYPE} is not allowed in state {state.value}")
        if state is State.CONFIGURING and kind in _CONFIG:
            if kind in self._configured:
                raise error(f"{kind.TYPE} sent twice")
            if kind is SetMemTable and self.welcome and "mem-table" not in self.welcome.features:
                raise error("set-mem-table without the mem-table feature")
            if kind is SetState and self.welcome and "state" not in self.welcome.features:
                raise error("set-state without the state feature")
        if kind is Start and not _REQUIRED_CONFIG <= self._configured:
            missing = sorted(m.TYPE for m in _REQUIRED_CONFIG - self._configured)
            raise error(f"start before {', '.join(missing)}")
        if kind is Reset and self.welcome and "reset" not in self.welcome.features:
            raise error("reset without the reset feature")
        if kind is Welcome and state is State.AWAIT_WELCOME:
            self._check_welcome(msg, error)  # type: ignore[arg-type]
        if kind is Hello:
            self.hello = msg  # type: ignore[assignment]
        if state is State.CONFIGURING and kind in _CONFIG:
            self._configured.add(kind)
        self.state = new

    def _check_welcome(self, w: Welcome, error: type[ProtocolError]) -> None:
        assert self.hello is not None
        if w.version > self.hello.version:
            raise error(f"welcome names version {w.version}, above the offered {self.hello.version}")
        if w.version != PROTOCOL_VERSION:
            raise error(f"protocol version {w.version} is not supported (this side: {PROTOCOL_VERSION})")
        if not w.features <= self.hello.features:
            raise error(f"welcome names features never offered: {sorted(w.features - self.hello.features)}")
        self.welcome = w

    # -- sending -------------------------------------------------------------

    def send(self, msg: Message) -> tuple[bytes, list[int]]:
        """The frame and the descriptors that carry ``msg``.  The
        descriptors still belong to the caller (the peer gets copies)."""
        if not isinstance(msg, Message) or type(msg).TYPE not in MESSAGES:
            raise LocalProtocolError(f"not a protocol message: {msg!r}")
        if msg.SENDER is not self.our_role:
            raise LocalProtocolError(f"{msg.TYPE} is sent by the {msg.SENDER.value}, not the {self.our_role.value}")
        body = msgpack.packb(msg.to_wire(), use_bin_type=True)
        if len(body) > MAX_FRAME:
            raise LocalProtocolError(f"{msg.TYPE} is {len(body)} bytes, above the {MAX_FRAME}-byte limit")
        self._transition(msg, LocalProtocolError)
        return _LENGTH.pack(len(body)) + body, msg.fds()

    # -- receiving -----------------------------------------------------------

    def receive_data(self, data: bytes, fds: list[int] | tuple[int, ...] = ()) -> None:
        """Buffer what arrived; ``b""`` means end of stream."""
        if self._eof or self._broken is not None:
            self._unclaimed.extend(fds)
            if data and self._broken is None:
                self._broken = RemoteProtocolError("data after end of stream")
            return
        self._fds.extend(fds)
        if len(self._fds) > MAX_FDS * 4:
            self._broken = RemoteProtocolError("too many descriptors without a frame to carry them")
            self._unclaimed.extend(self._fds)
            self._fds.clear()
            return
        if not data:
            self._eof = True
        else:
            self._buf += data

    def next_event(self) -> Message | ConnectionClosed | _NeedData:
        """The next message from the peer, :data:`NEED_DATA`, or
        :class:`ConnectionClosed` at end of stream.  Raises
        :class:`RemoteProtocolError` (again on every call once broken)."""
        if self._broken is not None:
            raise self._broken
        try:
            return self._next()
        except RemoteProtocolError as e:
            self._broken = e
            self._unclaimed.extend(self._fds)
            self._fds.clear()
            raise

    def _fail(self, why: str) -> NoReturn:
        raise RemoteProtocolError(why)

    def _next(self) -> Message | ConnectionClosed | _NeedData:
        buf = self._buf
        if len(buf) < 4:
            if self._eof:
                if buf:
                    self._fail("end of stream inside a frame header")
                if self._fds:
                    self._fail(f"{len(self._fds)} descriptor(s) with no message to carry them")
                self.state = State.CLOSED
                return ConnectionClosed()
            return NEED_DATA
        (length,) = _LENGTH.unpack_from(buf)
        if length == 0 or length > MAX_FRAME:
            self._fail(f"frame length {length} outside [1, {MAX_FRAME}]")
        if len(buf) < 4 + length:
            if self._eof:
                self._fail("end of stream inside a frame")
            return NEED_DATA
        body = bytes(buf[4:4 + length])
        del buf[:4 + length]
        msg = self._decode(body)
        try:
            self._transition(msg, RemoteProtocolError)
        except RemoteProtocolError:
            self._unclaimed.extend(msg.fds())
            raise
        if not buf and self._fds:
            extra = len(self._fds)
            self._unclaimed.extend(msg.fds())
            raise RemoteProtocolError(f"{extra} descriptor(s) more than {msg.TYPE} carries")
        return msg

    def _decode(self, body: bytes) -> Message:
        try:
            obj = msgpack.unpackb(body, raw=False, strict_map_key=True, use_list=True)
        except Exception as e:  # msgpack raises several unrelated types
            self._fail(f"frame is not valid msgpack ({type(e).__name__}: {e})")
        if not isinstance(obj, dict) or not isinstance(obj.get("type"), str):
            self._fail("frame is not a map with a string \"type\"")
        kind = MESSAGES.get(obj["type"])
        if kind is None:
            self._fail(f"unknown message type {obj['type'][:MAX_NAME]!r}")
        if kind.SENDER is not self.their_role:
            self._fail(f"{kind.TYPE} is sent by the {kind.SENDER.value}, not the {self.their_role.value}")
        n = len(kind.FD_FIELDS)
        if len(self._fds) < n:
            self._fail(f"{kind.TYPE} needs {n} descriptor(s), {len(self._fds)} arrived")
        fds = self._fds[:n]
        del self._fds[:n]
        try:
            return kind.from_wire(obj, fds)
        except (ValueError, TypeError) as e:
            self._unclaimed.extend(fds)
            self._fail(f"bad {kind.TYPE}: {e}")
        raise AssertionError("unreachable")

    def peer_error(self, why: str) -> None:
        """Record an error the transport saw in what the peer sent (e.g.
        truncated ancillary data); :meth:`next_event` raises it."""
        if self._broken is None:
            self._broken = RemoteProtocolError(why)
        self._unclaimed.extend(self._fds)
        self._fds.clear()

    def take_unclaimed_fds(self) -> list[int]:
        """Descriptors that arrived but that no accepted message carries
        (refused, extra, or still pending after an error): close them."""
        out = self._unclaimed
        self._unclaimed = []
        if self._broken is not None or self._eof:
            out.extend(self._fds)
            self._fds.clear()
        return out

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a whole frame."""
        return len(self._buf)

    @property
    def broken(self) -> bool:
        return self._broken is not None
