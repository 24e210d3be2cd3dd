"""The access proxy: a device in another process as the dispatcher sees it.

:class:`RemoteEndpoint` is crosvm's ProxyDevice for this VMM: it implements
:class:`vmm.endpoint.Endpoint`, so the dispatcher cannot tell it from a
device running inline.  ``access`` forwards through the vCPU's slot
(:mod:`ipc.slots`) and never returns a quiet default: a device that is
dead, late, or says its model failed raises :class:`DeviceFailed`.
While the device is usable (not failed, down, paused or closing) most
accesses do not reach ``access`` at all: the vCPU loop forwards them into
the same slots in C (:attr:`RemoteEndpoint.c_forward`, ``svmm_forward``
in ``vmm/_vcpu.c``, turned on and off with every change of that state),
and a call that fails there comes back to the same restart rules.

Two ways in, one endpoint: :meth:`RemoteEndpoint.spawn` starts the device
as a child (:mod:`vmm.remote.process`); :meth:`RemoteEndpoint.attach` takes
any connected control socket and the :class:`~vmm.remote.peer.Peer` behind
it.  Both run the handshake (:mod:`vmm.remote.handshake`) with a deadline
and return once the device is Ready (its initial regions are in the
registry by then).

The device is untrusted.  Everything read back from it is validated (the
slot answer by the C core, control messages by :mod:`ipc.protocol`); a
device that breaks the protocol, misses a deadline or dies is cut off: one
``logging.error`` line, the slots are marked dead (waiting vCPUs return at
once), the peer is killed and its regions are reaped from the registry.
A monitor thread per device watches the control socket (messages go to a
``{message type: handler}`` table; requests to
:class:`~vmm.remote.requests.RequestService`) and the peer's exit fd, so
death is noticed when it happens, not at the next access timeout.

Restart (issue 10 §2-§3).  The VMM creates a state segment
(:mod:`ipc.state`) per device and keeps it, with the device's regions,
irqfds, MSI routes and ioeventfds, across the device's processes.  Each
access gets a per-device sequence number (``aseq``) that travels in the
slot and must come back with the answer.  When a device with a restart
policy (:mod:`vmm.remote.restart`) dies -- or is cut off: killed for a
missed deadline, the registry lock, a protocol error -- the monitor
thread of the dead process becomes its supervisor: it reads the access
record of the last snapshot the dead process stored, then starts a new
process (same slots count, a fresh slot segment, the same state segment)
which restores from the snapshot.  A vCPU whose access was cut short
waits (at most ``restart_timeout``) and then completes it with
:func:`ipc.accessseq.decide`: an answer already in the old slot is taken
as it is; the access the snapshot records is answered from the record;
any other is sent again, with its number, to the new process.  Accesses
made while the device is down wait the same way.  Past the timeout or the
start limit the device is failed as a device without restart is.

Fault injection (:mod:`vmm.faults`) asks the device's engine with
:meth:`RemoteEndpoint.fault_control` and gets its firing records through
``on_fault_record``; what a device sent just before it died is read before
its exit is handled, so the record of a ``crash`` firing is not lost.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from devices import kinds
from devices.virtio.core import VirtioCore
from ipc import Registry
from ipc.accessseq import BadRecord, Outcome, Pending, decide
from ipc.protocol import (ConnectionClosed, DeviceConfig, Error, FaultControl, FaultFired, FaultReply,
                          LocalProtocolError, MemRegion, Message, RemoteProtocolError, Reset, ResetDone, Role, SetSlots, SetState,
                          Shutdown)
from ipc.batch import BATCH_SPACE, BatchWriter
from ipc.slots import (C_CALL, CallStats, ServeStats, SlotBadResponse, SlotCaller, SlotDeviceError,
                       SlotError, SlotPeerDead, SlotTimeout)
from ipc.state import AccessRecord, StateSegment
from ipc.transport import Channel, ChannelTimeout, socketpair
from vmm import sandbox_report
from vmm._kvm_c import ffi as _kvm_ffi, lib as _kvm_lib
from vmm.coalesce import DeviceZones
from vmm.endpoint import FIRST_DEVICE_OWNER, DeviceFailed, VmmError
from vmm.ioevent import DeviceIoeventfds
from vmm.irq import DeviceIrqs
from vmm.remote.handshake import Agreement, Offer, StartError, handshake, registry_fd
from vmm.remote.options import RemoteOptions
from vmm.remote.peer import Peer
from vmm.remote.process import DeviceProcess, child_env
from vmm.remote.requests import RequestService
from vmm.remote.restart import RestartPolicy, StartLimiter

__all__ = ["RemoteEndpoint", "Launched", "SHUTDOWN_GRACE", "MAX_VCPUS", "STATE_CAPACITY"]

log = logging.getLogger(__name__)

#: After Shutdown, how long a device may take to end before it is killed.
SHUTDOWN_GRACE = 2.0
MAX_VCPUS = 256

_DEFAULT = RemoteOptions()
#: Room for one snapshot in a device's state segment (a virtio-blk
#: model's is about 2 KiB).
STATE_CAPACITY = 64 * 1024
#: The cause of a restart asked for (QMP device-restart).
RESTART_REQUESTED = "restart requested (device-restart)"
#: First wait after a start that failed; it doubles up to the maximum.
RETRY_BACKOFF = 0.02
MAX_RETRY_BACKOFF = 0.5
#: Old slot segments kept after restarts (a vCPU may still look at one).
KEEP_OLD_SLOTS = 8
#: Slot segments a vCPU's call in C did not leave at teardown: kept mapped.
_STUCK_SLOTS: list[SlotCaller] = []


#: The attributes of the endpoint's state that decide whether the vCPU loop
#: may forward in C: setting any of them turns the C forward on or off
#: (RemoteEndpoint._sync_forward), so that no change of state can forget to.
_GATES = frozenset({"_failure", "_down", "_paused", "_closing", "_live"})


class RemoteEndpoint:
    """One device process, forwarded to through shared-memory slots."""

    def __setattr__(self, name: str, value: Any) -> None:
        # (reads stay plain attribute reads: the Python access path reads
        # these on every access, sets are changes of state)
        object.__setattr__(self, name, value)
        if name in _GATES and "_fwd_lock" in self.__dict__:
            self._sync_forward()

    #: Registry owner id of the device's regions.
    owner: int
    #: The device's ``id=``.
    name: str

    def __init__(self, *, kind: str, owner: int, name: str, registry: Registry, peer: Peer,
                 channel: Channel, slots: SlotCaller | None, access_timeout: float,
                 irqs: DeviceIrqs | None = None, ioevents: DeviceIoeventfds | None = None,
                 zones: DeviceZones | None = None,
                 state: StateSegment | None = None, policy: RestartPolicy | None = None):
        self.kind = kind
        self.owner = owner
        self.name = name
        self.registry = registry
        #: ``struct svmm_forward *`` (vmm/_vcpu.h): this device's slots for
        #: the vCPU loop, which forwards in C while it is on; its ``aseq``
        #: is the endpoint's access counter, whichever path sends.
        self.c_forward = _kvm_ffi.new("struct svmm_forward *")
        self.c_forward.call_fn = C_CALL
        self._fwd_lock = threading.Lock()
        #: The device process (a DeviceProcess when this VMM spawned it).
        self.peer = peer
        #: The pid the device reported in Ready (differs under a sandbox
        #: launcher with its own pid namespace).
        self.reported_pid = 0
        #: The service socket it was reached at (``connect=PATH``), or None.
        self.service_path: str | None = None
        self.features: frozenset[str] = frozenset()
        #: The device's sandbox as it reported it (vmm.sandbox_report).
        self.sandbox = sandbox_report.DeviceSandbox()
        self.access_timeout = access_timeout
        self._channel = channel
        #: (slot segment, generation) of the process serving now; one
        #: value, so a vCPU never pairs one process's slots with another's.
        self._live: tuple[SlotCaller | None, int] = (slots, 0)
        self._failure: str | None = None
        self._closing = False
        self._closed = False
        self._lock = threading.Lock()        # failure / close bookkeeping
        self._chan_lock = threading.Lock()   # the protocol state of the channel
        self._reset_done = threading.Event()
        self._monitor: threading.Thread | None = None
        self._exited = threading.Event()
        #: The device's interrupt pins and MSI routes (None: it may have none).
        self.irqs = irqs
        #: The device's doorbells (None: it may have none).
        self.ioevents = ioevents
        #: The device's coalesced-MMIO zones (None: it may have none).
        self.zones = zones
        #: Where queued writes go in batches (ipc.batch), once the device
        #: has a zone and speaks ``coalesced-batch``.
        self._batch: BatchWriter | None = None
        self._batch_lock = threading.Lock()       # one batch in the segment at a time
        self._batch_make_lock = threading.Lock()  # not _batch_lock: a batch's handler may ask for zones
        #: The state segment the VMM keeps for the device (None: none).
        self.state = state
        #: What happens when the process ends (None or mode "no": failed).
        self.policy = policy if policy is not None else RestartPolicy(mode="no")
        #: Starts a new process for a restart: (socket, peer), or None when
        #: this endpoint cannot (set by spawn()).
        self.relaunch: Callable[[], tuple[socket.socket, Peer]] | None = None
        #: Called with the endpoint once a new process is Ready (a service
        #: peer learns its pid), or None.
        self.after_ready: Callable[[RemoteEndpoint], None] | None = None
        #: Called after a restart once the new process serves (vmm.faults:
        #: the new process's share of the plan, less what has fired).
        self.on_restarted: Callable[[RemoteEndpoint], None] | None = None
        #: Warm spare processes for restarts (spawn() with options.spare).
        self._spares: _Spares | None = None
        self._offer: Offer | None = None
        self._options: RemoteOptions = _DEFAULT
        self._limiter = StartLimiter(self.policy.burst, self.policy.interval)
        #: Processes started after the first one, and why the last one went.
        self.restarts = 0
        self.last_cause: str | None = None
        #: Longest restart so far (death seen to serving again), seconds.
        self.longest_restart = 0.0
        self.last_restart = 0.0
        #: Longest time one access waited for the device to come back
        #: (the pause a guest saw), seconds; a benchmark may reset it.
        self.longest_wait = 0.0
        #: Called with (event name, data) for DEVICE_RESTARTING/RESTARTED,
        #: and DEVICE_FAILED once a failed device's regions are reaped.
        self.on_event: Callable[[str, dict], object] | None = None
        self._aseq = functools.partial(_kvm_lib.svmm_forward_next_aseq, self.c_forward)
        self._down = False
        self._cause: str | None = None       # why the current process is being ended
        self._dead_at = 0.0
        self._death_records: dict[int, AccessRecord | None] = {}
        self._old_slots: list[SlotCaller] = []
        self._cond = threading.Condition(threading.Lock())
        self._paused = 0                     # device-restart: new accesses wait
        #: Per vCPU: inside a slot call now (device-restart drains them).
        self._busy = [False] * 256
        self._stop_restart = threading.Event()
        self.requests = RequestService(name, irqs, ioevents, send=self._send,
                                       stopping=lambda: self._failure is not None or self._closing,
                                       on_send_error=self._fail, zones=zones, batch_fd=self._batch_fd)
        #: What the monitor does with each message type after the start
        #: (False: the channel is done).  Anything else the protocol let
        #: through (late Ready/Welcome answers crossing a Shutdown) needs
        #: nothing.
        #: (Keyed by type: each handler gets messages of its key's type.)
        self._on_message: dict[type, Callable[[Any], bool]] = {
            ConnectionClosed: self._on_closed,
            Error: self._on_error,
            ResetDone: self._on_reset_done,
            FaultFired: self._on_fault_fired,
            FaultReply: self._on_fault_reply,
            **{t: self._on_request for t in self.requests.handlers},
        }
        #: Where the device's fault records go once checked (vmm.faults);
        #: None: they are dropped.
        self.on_fault_record: Callable[[dict], None] | None = None
        self._fault_seq = itertools.count(1)
        self._fault_waits: dict[int, list] = {}     # seq -> [event, reply]

    @property
    def sender_pid(self) -> int:
        """The pid the kernel attached to the device's last control message
        (SO_PASSCRED set on its socket, as vmm.remote.connect does; else 0)."""
        return self._channel.sender_pid

    @property
    def pid(self) -> int:
        """Pid of the device process as this VMM knows it (0: unknown)."""
        return self.peer.pid

    @property
    def _slots(self) -> SlotCaller | None:
        return self._live[0]

    @property
    def _gen(self) -> int:
        return self._live[1]

    # -- start ---------------------------------------------------------------

    @classmethod
    def spawn(cls, kind: str, params: dict[str, str], owner: int, name: str, registry: Registry,
              nvcpus: int, options: RemoteOptions = _DEFAULT) -> RemoteEndpoint:
        """Start a device process (``options.command --fd N``) and return once
        it is Ready.

        ``kind``/``params``: the model and its ``key=value`` parameters;
        ``owner``: its registry owner id (>= FIRST_DEVICE_OWNER); ``nvcpus``:
        one slot per vCPU; ``options``: the rest (:class:`RemoteOptions`;
        ``options.restart`` says whether a process that ends is started
        again).

        Raises :class:`DeviceFailed` when the device does not come up
        (bad parameters, protocol error, death, deadline).
        """
        return cls.launch(kind, params, owner, name, registry, nvcpus, options).finish()

    @classmethod
    def launch(cls, kind: str, params: dict[str, str], owner: int, name: str, registry: Registry,
               nvcpus: int, options: RemoteOptions = _DEFAULT) -> Launched:
        """The first half of :meth:`spawn`: start the device process and
        return at once, while it starts up (imports, builds its model);
        :meth:`Launched.finish` runs the handshake.  Several devices
        launched before the first is finished start in parallel.  The
        start deadline counts from here."""
        config = _config(kind, params, owner, name, nvcpus, options)
        env = child_env(kind, name)

        def launch(spare: bool = False) -> tuple[socket.socket, Peer]:
            ours, theirs = socketpair()
            command = (*options.command, "--spare", "--preload", kind) if spare else options.command
            try:
                return ours, DeviceProcess.start(command, theirs, name, options.cpus, env, stderr=options.stderr,
                                                 forkserver=options.forkserver)
            except BaseException:
                ours.close()
                raise

        deadline = time.monotonic() + options.start_timeout
        ours, process = launch()

        def finish() -> RemoteEndpoint:
            ep = cls._attach(config, ours, process, registry, options, deadline, relaunch=launch)
            # A fork server is the warm spare of every device (vmm.forkserver).
            if options.spare and options.forkserver is None and ep.policy.mode != "no":
                ep._spares = _Spares(lambda: launch(spare=True), name)
                ep._spares.refill()
            return ep

        return Launched(finish, ours, process)  # type: ignore[arg-type]

    @classmethod
    def attach(cls, sock: socket.socket, peer: Peer, kind: str, params: dict[str, str], owner: int,
               name: str, registry: Registry, nvcpus: int,
               options: RemoteOptions = _DEFAULT) -> RemoteEndpoint:
        """Serve a device over ``sock``, a connected AF_UNIX SOCK_SEQPACKET
        control socket that nothing has spoken on yet, whose far end is
        ``peer``; returns once it is Ready.  The endpoint owns ``sock`` from
        here on (closed on every path); ``options.command``/``cpus`` are not
        used.  Raises :class:`DeviceFailed` like :meth:`spawn`."""
        try:
            config = _config(kind, params, owner, name, nvcpus, options)
        except BaseException:
            sock.close()
            peer.close()
            raise
        return cls._attach(config, sock, peer, registry, options,
                           time.monotonic() + options.start_timeout)

    @classmethod
    def _attach(cls, config: DeviceConfig, sock: socket.socket, peer: Peer, registry: Registry,
                options: RemoteOptions, deadline: float,
                relaunch: Callable[[], tuple[socket.socket, Peer]] | None = None) -> RemoteEndpoint:
        state = None
        try:
            channel = Channel(sock, Role.VMM)
            if options.state:
                state = StateSegment.create(STATE_CAPACITY, _queue_sizes(config.kind))
        except BaseException:
            if state is not None:
                state.close()
            sock.close()
            peer.kill()
            peer.wait(5.0)
            peer.close()
            raise
        irqs = ioevents = None
        if options.irq_router is not None:
            irqs = DeviceIrqs(options.irq_router, config.name)
            ioevents = DeviceIoeventfds(options.irq_router.vm, registry, config.owner, config.name)
        zones = None
        if options.coalesced is not None:
            zones = DeviceZones(options.coalesced, registry, config.owner, config.name)
        ep = cls(kind=config.kind, owner=config.owner, name=config.name, registry=registry, peer=peer,
                 channel=channel, slots=None, access_timeout=options.access_timeout,
                 irqs=irqs, ioevents=ioevents, zones=zones, state=state, policy=options.restart)
        ep.relaunch = relaunch
        ep._options = options
        mem_regions = options.mem_regions
        try:
            if options.memfd is not None and mem_regions is None:
                mem_regions = (MemRegion(0, os.fstat(options.memfd).st_size, 0),)
            ep._offer = Offer(config=config, registry_fd=-1,
                              slots=SetSlots(fd=0, nslots=config.nvcpus, poll_ns=options.poll_us * 1000,
                                             adaptive=options.adaptive, move=options.move),
                              memfd=options.memfd, mem_regions=mem_regions or (), console=options.console)
            ep._limiter.allow()
            agreed, slots = ep._handshake(deadline)
            ep._live = (slots, 0)
        except StartError as e:
            reason = str(e)
            # The caller reports the DeviceFailed (one line); this is detail.
            log.info("device %s (%s, pid %d) failed to start: %s", ep.name, ep.kind, ep.pid, reason)
            ep._failure = f"failed to start: {reason}"
            ep._teardown()
            raise DeviceFailed(f"device {ep.name}: {reason}") from None
        except BaseException:
            ep._failure = "start interrupted"
            ep._teardown()
            raise
        ep._started(agreed)
        return ep

    def _handshake(self, deadline: float) -> tuple[Agreement, SlotCaller]:
        """Run the handshake with the current peer on a new slot segment
        (returned with the agreement; the old one is kept for a while, a
        vCPU may still read an answer from it).  Raises StartError."""
        assert self._offer is not None
        opts = self._options
        try:
            slots = SlotCaller.create(self._offer.config.nvcpus, spin_ns=opts.spin_us * 1000)
        except (OSError, ValueError) as e:
            raise StartError(f"cannot create the slot segment: {e}") from None
        try:
            reg_fd = registry_fd(self.registry)
        except BaseException:
            slots.close()
            raise
        try:
            assert slots.fd is not None         # created here: it owns its memfd
            offer = dataclasses.replace(self._offer, registry_fd=reg_fd,
                                        slots=dataclasses.replace(self._offer.slots, fd=slots.fd))
            agreed = handshake(self._channel, self._send, offer, deadline, self.requests.serve,
                               self.peer.exit_text, on_welcome=self._agreed,
                               extra=self._state_offer)
        except BaseException:
            slots.close()
            raise
        finally:
            os.close(reg_fd)
        old = self._slots
        if old is not None:
            self._old_slots.append(old)
            # (not while a call made in C may still use one: next time)
            while len(self._old_slots) > KEEP_OLD_SLOTS and not _kvm_lib.svmm_forward_inflight(self.c_forward):
                self._old_slots.pop(0).close()
        return agreed, slots

    def _state_offer(self, features: frozenset[str]) -> list[Message]:
        """The state segment for the handshake, if the device takes one."""
        if self.state is None or self.state.fd is None:
            return []
        if "state" not in features:
            if self.policy.mode != "no":
                log.warning("device %s does not take a state segment: a restart starts it from power-on",
                            self.name)
            return []
        return [SetState(fd=self.state.fd)]

    def _started(self, agreed: Agreement) -> None:
        self.features = agreed.features
        self.reported_pid = agreed.pid
        self.sandbox, self.peer = sandbox_report.at_ready(self.name, self.peer, agreed.sandbox, agreed.pid)
        if agreed.pid != self.pid:
            log.debug("device %s reports pid %d; its process is %d", self.name, agreed.pid, self.pid)
        self._exited.clear()
        self._monitor = threading.Thread(target=self._watch, name=f"device-{self.name}", daemon=True)
        self._monitor.start()

    def _send(self, msg: Message) -> None:
        with self._chan_lock:
            self._channel.send(msg)

    # -- the Endpoint interface ----------------------------------------------

    def access(self, vcpu: int, space: int, cookie: int, offset: int, size: int,
               is_write: bool, value: int) -> int:
        """Forward one access through vCPU ``vcpu``'s slot; the value read
        (0 for a write).  Raises :class:`DeviceFailed`."""
        if self._failure is not None:
            raise DeviceFailed(f"device {self.name}: {self._failure}")
        aseq = self._aseq()
        busy = self._busy
        busy[vcpu] = True
        try:
            slots, gen = self._live
            if self._down or self._paused or slots is None:
                busy[vcpu] = False
                return self._access_later(vcpu, space, cookie, offset, size, is_write, value, aseq, None, gen)
            try:
                return slots.call(vcpu, space, cookie, offset, size, is_write, value, self.access_timeout, aseq)
            except SlotError as e:
                self._call_failed(e)
        finally:
            busy[vcpu] = False
        return self._access_later(vcpu, space, cookie, offset, size, is_write, value, aseq, slots, gen)

    def access_batch(self, vcpu: int, writes: list[tuple[int, int, int, int, int]]) -> None:
        """Forward writes (space, cookie, offset, size, value) in order: a
        request per batch (ipc.batch) once the device has a batch segment,
        else one access each.  A batch is one access for the restart
        rules: it is answered, from the record, or sent again whole (the
        segment still holds it: one batch at a time).  Raises
        :class:`DeviceFailed`."""
        batch = self._batch
        if batch is None:
            for space, cookie, offset, size, value in writes:
                self.access(vcpu, space, cookie, offset, size, True, value)
            return
        if self._failure is not None:
            raise DeviceFailed(f"device {self.name}: {self._failure}")
        with self._batch_lock:
            done = 0
            while done < len(writes):
                n = batch.write(writes[done:done + batch.capacity])
                self.access(vcpu, BATCH_SPACE, 0, 0, 8, True, n)
                done += n

    def _call_failed(self, e: SlotError) -> None:
        """What a slot call that raised ``e`` does to the device (both
        paths, and both tries of :meth:`access`); the access is then
        completed by :meth:`_access_later`."""
        if isinstance(e, SlotTimeout):
            self._fail(f"no answer within {self.access_timeout:g} s")
        elif isinstance(e, SlotPeerDead):
            pass
        elif isinstance(e, (SlotDeviceError, SlotBadResponse)):
            self._fail(str(e), final=True)
        else:                   # closed under us
            self._fail(str(e))

    def access_failed(self, vcpu: int, space: int, cookie: int, offset: int, size: int, is_write: bool,
                      value: int, rc: int, aseq: int, handle: int, gen: int) -> int:
        """An access the vCPU loop forwarded in C (``c_forward``) whose
        slot call failed with ``rc`` (ipc/_slots.h) for access ``aseq``
        on the slots at ``handle`` of generation ``gen``: completed as
        :meth:`access` completes one whose call raised.  Raises
        :class:`DeviceFailed`."""
        slots = self._slots_at(handle)
        e = SlotCaller.error(rc, vcpu, self.access_timeout, size)
        if not isinstance(e, SlotError):       # a bad access (EINVAL): not the device's doing
            raise DeviceFailed(f"device {self.name}: {e}")
        self._call_failed(e)
        return self._access_later(vcpu, space, cookie, offset, size, is_write, value, aseq, slots, gen)

    def _slots_at(self, handle: int) -> SlotCaller | None:
        for slots in [self._live[0], *self._old_slots]:
            if slots is not None and slots.c_handle() == handle:
                return slots
        return None

    def _sync_forward(self) -> None:
        """Turn the C forward on while accesses may go straight to the
        current slots, off otherwise (called on every change of state)."""
        with self._fwd_lock:
            self._sync_forward_locked()

    def _sync_forward_locked(self) -> None:
        f = self.c_forward
        state = self.__dict__           # (during __init__, some are not set yet)
        slots, gen = state.get("_live", (None, 0))
        handle = slots.c_handle() if slots is not None else 0
        on = (handle != 0 and state.get("_failure") is None and not state.get("_down", True)
              and not state.get("_paused", 1) and not state.get("_closing", True))
        if not on:
            _kvm_lib.svmm_forward_switch(f, 0)
            return
        if f.on and f.slots == handle and f.gen == gen:
            return
        _kvm_lib.svmm_forward_switch(f, 0)
        f.slots = handle
        f.gen = gen
        f.nslots = slots.nslots
        f.spin_ns = slots.spin_ns
        f.slice_ns = slots.slice_ns
        f.timeout_ns = int(self.access_timeout * 1e9)
        _kvm_lib.svmm_forward_switch(f, 1)

    def _forward_quiet(self, timeout: float = 5.0) -> bool:
        """With the C forward off: wait until no call made through it is
        in flight (before slots it may use are closed); False if one is
        still in after ``timeout``."""
        _kvm_lib.svmm_forward_switch(self.c_forward, 0)
        deadline = time.monotonic() + timeout
        while _kvm_lib.svmm_forward_inflight(self.c_forward):
            if time.monotonic() >= deadline:
                log.error("device %s: a vCPU is still in a slot call; its slots stay mapped", self.name)
                return False
            time.sleep(0.0005)
        return True

    def _agreed(self, features: frozenset[str]) -> None:
        self.features = features

    def _batch_fd(self) -> int | None:
        """The batch segment's descriptor to hand the device with a zone
        (made the first time), or None when it takes no batches."""
        if "coalesced-batch" not in self.features:
            return None
        with self._batch_make_lock:
            if self._batch is None:
                self._batch = BatchWriter()
            return self._batch.fd

    def _access_later(self, vcpu: int, space: int, cookie: int, offset: int, size: int, is_write: bool,
                      value: int, aseq: int, slots: SlotCaller | None, gen: int) -> int:
        t0 = time.monotonic()
        try:
            return self._complete_later(vcpu, space, cookie, offset, size, is_write, value, aseq, slots, gen)
        finally:
            waited = time.monotonic() - t0
            if waited > self.longest_wait:
                self.longest_wait = waited

    def _complete_later(self, vcpu: int, space: int, cookie: int, offset: int, size: int, is_write: bool,
                        value: int, aseq: int, slots: SlotCaller | None, gen: int) -> int:
        """Complete an access the device could not answer (it died, or is
        down or paused): exactly once with respect to its state, or raise
        DeviceFailed when it does not come back in time."""
        deadline = time.monotonic() + max(self.policy.timeout, 0.1)
        while True:
            if slots is not None:
                # The process behind ``slots`` is gone: wait until its
                # death is settled (the record read), then decide.
                def settled(g: int = gen) -> bool:
                    return g in self._death_records
                if not self._wait(settled, deadline):
                    break
                try:
                    got = slots.answer(vcpu, aseq)
                except (SlotDeviceError, SlotBadResponse) as e:
                    self._fail(str(e), final=True)
                    break
                except SlotError:
                    got = None
                if got is not None:
                    return got                                   # ANSWERED
                try:
                    d = decide(Pending(aseq, size), self._death_records[gen], self._issued())
                except BadRecord as e:
                    self._fail(f"bad state segment: {e}", final=True)
                    break
                if d.outcome is Outcome.FROM_RECORD:
                    return 0 if is_write else d.value
            # RERUN (or never sent): on the next process.
            after = gen if slots is not None else gen - 1     # a generation past the one that died
            def serving(a: int = after) -> bool:
                return not self._down and not self._paused and self._gen > a
            if not self._wait(serving, deadline):
                break
            slots, gen = self._live
            if slots is None:
                break
            try:
                return slots.call(vcpu, space, cookie, offset, size, is_write, value, self.access_timeout, aseq)
            except SlotError as e:
                self._call_failed(e)
        if self._failure is None and not self._closing:
            self._fail(f"not serving again within {self.policy.timeout:g} s", final=True)
        raise DeviceFailed(f"device {self.name}: {self._failure or ('closed' if self._closing else 'failed')}")

    def _issued(self) -> int:
        """The highest access number handed out so far (takes one: gaps
        are harmless)."""
        return self._aseq()

    def _wait(self, ready: Callable[[], bool], deadline: float) -> bool:
        """Wait for ``ready()`` (under the condition) until ``deadline``;
        False when the device failed for good, is closing, or time ran out."""
        with self._cond:
            while not ready():
                if self._failure is not None or self._closing:
                    return False
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return self._failure is None and not self._closing

    def reset(self, timeout: float = 5.0) -> None:
        """Put the model back in its power-on state.  Raises DeviceFailed."""
        if self._failure is not None:
            raise DeviceFailed(f"device {self.name}: {self._failure}")
        if "reset" not in self.features:
            raise DeviceFailed(f"device {self.name} does not support reset")
        self._reset_done.clear()
        if self.irqs is not None:
            self.irqs.release_all()     # power-on state: no routes; the new model asks again
        if self.ioevents is not None:
            self.ioevents.release_all()
        if self.zones is not None:
            self.zones.release_all()
        try:
            self._send(Reset())
        except Exception as e:
            self._fail(f"cannot send reset: {e}", final=True)
            raise DeviceFailed(f"device {self.name}: {self._failure}") from None
        if not self._reset_done.wait(timeout):
            self._fail(f"no reset-done within {timeout:g} s", final=True)
        if self._failure is not None:
            raise DeviceFailed(f"device {self.name}: {self._failure}")

    @property
    def failed(self) -> str | None:
        """Why the device was cut off for good, or None while it works (or
        is being restarted)."""
        return self._failure

    @property
    def restarting(self) -> bool:
        """True while the device is down and being started again."""
        return self._down

    def cut_off(self, reason: str) -> None:
        """Cut the device off from outside (once): one error line, its
        slots dead, the peer killed (SIGKILL through the pidfd for a child,
        so only this child can be hit).  With a restart policy a new
        process takes over; else its regions are reaped when it has ended.
        The VMM's lock watch (vmm.lockwatch) calls this for a device that
        holds the registry lock past the deadline."""
        self._fail(reason)

    def restart(self, timeout: float | None = None) -> float:
        """Live restart (QMP ``device-restart``): stop new accesses, let
        those in flight finish (their snapshot is stored before each
        answer), end the process, start a new one that restores from the
        state segment, go on.  Returns the pause in seconds (accesses held
        back).  Raises DeviceFailed when the device cannot be restarted."""
        if self._failure is not None:
            raise DeviceFailed(f"device {self.name}: {self._failure}")
        if self.relaunch is None:
            raise DeviceFailed(f"device {self.name}: this VMM did not start it, so cannot restart it")
        if self.state is None:
            raise DeviceFailed(f"device {self.name} has no state segment: a restart would lose its state")
        limit = self.policy.timeout if timeout is None else timeout
        t0 = time.monotonic()
        with self._cond:
            self._paused += 1
        try:
            deadline = t0 + limit
            while (any(self._busy) or _kvm_lib.svmm_forward_inflight(self.c_forward)) \
                    and time.monotonic() < deadline:
                time.sleep(0.0002)          # drain: accesses in flight are microseconds long
            gen = self._gen
            self._cause = RESTART_REQUESTED
            self._end_process(self._cause)
            if not self._wait(lambda: self._gen > gen and not self._down, deadline):
                raise DeviceFailed(f"device {self.name}: {self._failure or 'did not come back in time'}")
        finally:
            with self._cond:
                self._paused -= 1
                self._cond.notify_all()
        return time.monotonic() - t0

    def wait_exited(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the device process to end;
        True once it has (or when it is no longer watched)."""
        if self._exited.is_set():
            return True
        fd = self.peer.exit_fd
        if fd is None:
            return self._exited.wait(timeout)
        if fd < 0:
            return True
        poller = select.poll()
        try:
            poller.register(fd, select.POLLIN)
            return bool(poller.poll(max(0, int(timeout * 1000))))
        except (OSError, ValueError):
            return True     # the exit fd was closed under us: torn down

    def close(self) -> None:
        """Shut the device down (Shutdown, then kill after a grace period),
        reap it, close every descriptor and mapping, and reap its regions
        from the registry.  Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = self._closing = True
        self._stop_restart.set()
        with self._cond:
            self._cond.notify_all()
        if self._failure is None and not self._down and not self.peer.wait(0):
            try:
                self._send(Shutdown())
            except Exception as e:
                log.debug("device %s: cannot send shutdown: %s", self.name, e)
        self._teardown()

    def __enter__(self) -> RemoteEndpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = (f"failed: {self._failure}" if self._failure else "closed" if self._closed
                 else "restarting" if self._down else "running")
        return f"<RemoteEndpoint {self.name} {self.kind} pid {self.pid} owner {self.owner} {state}>"

    # -- figures -------------------------------------------------------------

    def device_stats(self) -> ServeStats:
        """The device's serve-loop counters (as it published them)."""
        assert self._slots is not None
        return self._slots.device_stats()

    def call_stats(self) -> CallStats:
        """What this side counted."""
        assert self._slots is not None
        return self._slots.stats()

    def cpu_seconds(self) -> float:
        """CPU time (user + system) the device process has used so far (0
        when its pid is unknown)."""
        if self.pid <= 0:
            return 0.0
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            return 0.0

    # -- the monitor ---------------------------------------------------------

    def _watch(self) -> None:
        """Monitor thread: control messages, end of stream, peer exit."""
        poller = select.poll()
        sock_fd = self._channel.fileno()
        poller.register(sock_fd, select.POLLIN)
        exit_fd = self.peer.exit_fd
        if exit_fd is not None:
            poller.register(exit_fd, select.POLLIN)
        sock_open = True
        while True:
            try:
                events = poller.poll()
            except (OSError, ValueError):
                return
            for fd, _ev in events:
                if fd == exit_fd:
                    if sock_open:       # what it sent before it died (a fault's record)
                        self._on_readable()
                    self._on_exit()
                    return
                if fd == sock_fd and sock_open:
                    if not self._on_readable():
                        if exit_fd is None:     # the stream was the device
                            self._on_exit()
                            return
                        poller.unregister(sock_fd)
                        sock_open = False

    def _on_readable(self) -> bool:
        """Handle what the device sent; False once the socket is done."""
        while True:
            try:
                with self._chan_lock:
                    msg = self._channel.receive(0)
            except ChannelTimeout:
                return True
            except RemoteProtocolError as e:
                self._fail(f"broke the control protocol: {e}")
                return False
            except (OSError, ValueError) as e:  # closed under us
                if not self._closing:
                    self._fail(f"control socket: {e}")
                return False
            handler = self._on_message.get(type(msg))
            if handler is not None and not handler(msg):
                return False

    def _on_closed(self, msg: Message) -> bool:
        if not self._closing and self._cause is None:
            wait = 0.2
            if self.policy.mode == "no" or self.relaunch is None:
                # No restart: the waiting vCPUs get their all ones now; the
                # exit is only described, and a sandboxed device's reapers
                # pass it on a moment after the socket closes (longer than
                # 0.2 s on a loaded host: the reason read "still running").
                self._slots_dead()
                wait = 2.0
            self._fail(f"closed its control socket ({self.peer.exit_text(wait)})")
        return False

    def _on_error(self, msg: Message) -> bool:
        assert isinstance(msg, Error)
        self._fail(sandbox_report.error_text(self.name, self.sandbox, msg.message))
        return False

    def _on_reset_done(self, msg: Message) -> bool:
        self._reset_done.set()
        return True

    # -- faults (devices.faults; ipc.protocol "faults" block) -----------------

    def fault_control(self, op: str, body: object, timeout: float = 5.0) -> object:
        """Ask the device's fault engine (setup, arm, disarm, query); its
        answer, decoded.  Raises :class:`DeviceFailed` (cut off, no
        answer) or ValueError with the device's refusal."""
        if self._failure is not None:
            raise DeviceFailed(f"device {self.name}: {self._failure}")
        seq = next(self._fault_seq) & 0xFFFF_FFFF
        wait: list = [threading.Event(), None]
        self._fault_waits[seq] = wait
        try:
            self._send(FaultControl(seq, op, json.dumps(body, separators=(",", ":"))))
            if not wait[0].wait(timeout):
                raise DeviceFailed(f"device {self.name}: no answer to fault {op} within {timeout:g} s")
        except (OSError, LocalProtocolError) as e:
            # (LocalProtocolError: the channel has ended -- the device's socket
            # closed and its failure or restart not yet noted by the reader)
            raise DeviceFailed(f"device {self.name}: cannot send fault {op}: {e}") from None
        finally:
            self._fault_waits.pop(seq, None)
        reply = wait[1]
        if reply is None:
            raise DeviceFailed(f"device {self.name}: {self._failure or 'gone'}")
        if not reply.ok:
            raise ValueError(reply.body)
        try:
            return json.loads(reply.body)
        except ValueError:
            self._fail("sent a fault reply that is not JSON")
            raise DeviceFailed(f"device {self.name}: {self._failure}") from None

    def _on_fault_reply(self, msg: Message) -> bool:
        assert isinstance(msg, FaultReply)
        wait = self._fault_waits.get(msg.seq)
        if wait is None:
            log.debug("device %s: fault reply %d that nobody waits for", self.name, msg.seq)
            return True
        wait[1] = msg
        wait[0].set()
        return True

    def _on_fault_fired(self, msg: Message) -> bool:
        """A trace record from the device: untrusted; checked by the sink
        (vmm.faults), which drops a bad one with a warning."""
        assert isinstance(msg, FaultFired)
        sink = self.on_fault_record
        if sink is not None:
            try:
                record = json.loads(msg.record)
            except ValueError:
                log.warning("device %s: a fault record that is not JSON; dropped", self.name)
                return True
            sink(record)
        return True

    def _on_request(self, msg: Message) -> bool:
        self.requests.serve(msg)
        return True

    def _on_exit(self) -> None:
        """The peer is gone: start a new one (restart policy), or fail it
        if that was not asked for and reap it and its regions."""
        if not self._closing and self._failure is None:
            cause = self._cause or self.peer.exit_text(1.0)
            clean = self._cause is None and self.peer.wait(1.0) and _clean_exit(self.peer)
            if (self._cause == RESTART_REQUESTED or self.policy.restarts(clean)) \
                    and self.relaunch is not None:
                self._supervise(cause)
                return
            self._fail(cause, final=True)
        self._slots_dead()
        self.peer.wait(1.0)
        self._reap_regions()
        if self.irqs is not None:
            self.irqs.release_all()     # its routes and irqfds go with it
        if self.ioevents is not None:
            self.ioevents.release_all()
        if self.zones is not None:
            self.zones.release_all()
        if self._failure is not None and not self._closing:
            # Said here, on the monitor's thread, whatever failed it: a
            # failure no access and no poll of the VMM's sees (the start
            # limit reached while the guest ends its run) is still told.
            self._emit("DEVICE_FAILED", {"reason": self._failure})
        self._exited.set()

    # -- restart -------------------------------------------------------------

    def _supervise(self, cause: str) -> None:
        """On the dead process's monitor thread: settle its death, then
        start new processes until one is Ready, the start limit or the
        restart timeout is reached, or the endpoint closes."""
        t_dead = time.monotonic()
        gen = self._gen
        with self._cond:
            self._down = True
        self._slots_dead()
        self.peer.wait(1.0)
        record = None
        if self.state is not None:
            got = self.state.inspect()
            record = got.snapshot.access if got.snapshot is not None else None
            for why in got.problems:
                log.warning("device %s: state segment: %s", self.name, why)
        with self._cond:
            self._death_records[gen] = record
            for g in [g for g in self._death_records if g < gen - KEEP_OLD_SLOTS]:
                del self._death_records[g]
            self._cond.notify_all()
        self.last_cause = cause
        log.warning("device %s (%s, pid %d) ended: %s; restarting", self.name, self.kind, self.pid, cause)
        self._emit("DEVICE_RESTARTING", {"cause": cause})
        deadline = t_dead + self.policy.timeout
        started = self._start_again(cause, deadline)
        if started is None:
            return
        agreed, slots = started
        took = time.monotonic() - t_dead
        self.restarts += 1
        self.last_restart = took
        self.longest_restart = max(self.longest_restart, took)
        hook = self.on_restarted
        with self._cond:
            self._live = (slots, gen + 1)
            self._down = False
            self._cause = None
            if hook is not None:
                self._paused += 1       # no access before the hook is done (the fault plan is in)
            self._cond.notify_all()
        self._started(agreed)
        if self.after_ready is not None:
            self.after_ready(self)
        if hook is not None:
            try:
                hook(self)
            except (DeviceFailed, ValueError) as e:
                log.warning("device %s after its restart: %s", self.name, e)
            finally:
                with self._cond:
                    self._paused -= 1
                    self._cond.notify_all()
        if self._spares is not None:
            self._spares.refill()
        log.info("device %s restarted (pid %d) in %.1f ms", self.name, self.pid, took * 1000)
        self._emit("DEVICE_RESTARTED", {"pid": self.pid, "restarts": self.restarts,
                                        "pause_ms": round(took * 1000, 3)})

    def _start_again(self, cause: str, deadline: float) -> tuple[Agreement, SlotCaller] | None:
        """Start new processes until one is Ready (returned), or give up --
        start limit, restart timeout, the endpoint closing -- and fail the
        device (None)."""
        why = "restart timeout"
        requested = cause == RESTART_REQUESTED
        first = True
        backoff = RETRY_BACKOFF
        while not self._closing and self._failure is None:
            # A restart asked for (device-restart) is not a failure: its
            # first start does not count against the start limit.
            if not (requested and first) and not self._limiter.allow():
                why = f"start limit: {self.policy.burst} start(s) within {self.policy.interval:g} s"
                break
            if self.policy.delay and not (requested and first) and self._stop_restart.wait(self.policy.delay):
                break
            first = False
            if time.monotonic() >= deadline:
                break
            try:
                return self._replace_process(deadline)
            except StartError as e:
                why = f"restart failed: {e}"
            except (OSError, VmmError) as e:     # also a service not listening (yet): ConfigError
                why = f"cannot start a new process: {e}"
            log.warning("device %s: %s", self.name, why)
            # A start that failed at once would fail the same way at once
            # again: back off (doubling) within the restart timeout.
            if self._stop_restart.wait(min(backoff, max(0.0, deadline - time.monotonic()))):
                break
            backoff = min(backoff * 2, MAX_RETRY_BACKOFF)
        if self._closing:
            with self._cond:
                self._down = False
                self._cond.notify_all()
            self._exited.set()
            return None
        self._fail(f"{cause}; {why}", final=True)
        with self._cond:
            self._down = False
            self._cond.notify_all()
        self._on_exit()
        return None

    def _replace_process(self, deadline: float) -> tuple[Agreement, SlotCaller]:
        """Start one new process and run its handshake (raises StartError)."""
        assert self.relaunch is not None
        taken = self._spares.take() if self._spares is not None else None
        sock, peer = taken if taken is not None else self.relaunch()
        try:
            channel = Channel(sock, Role.VMM)
        except BaseException:
            sock.close()
            peer.kill()
            peer.wait(5.0)
            peer.close()
            raise
        old_peer, old_channel = self.peer, self._channel
        with self._chan_lock:
            self._channel = channel
        self.peer = peer
        old_channel.close()
        old_peer.close()
        try:
            agreed, slots = self._handshake(deadline)
        except BaseException:
            peer.kill()
            peer.wait(5.0)
            raise
        return agreed, slots

    def _end_process(self, cause: str) -> None:
        """Kill the current process (its monitor restarts or fails it)."""
        log.info("device %s (pid %d): %s", self.name, self.pid, cause)
        self.peer.kill()

    def _slots_dead(self) -> None:
        if self._slots is not None:
            self._slots.mark_dead()

    def _emit(self, event: str, data: dict) -> None:
        if self.on_event is not None:
            try:
                self.on_event(event, {"device": self.name, "kind": self.kind, **data})
            except Exception:
                log.exception("device %s: %s event handler failed", self.name, event)

    # -- failure and teardown ------------------------------------------------

    def _fail(self, reason: str, final: bool = False) -> None:
        """Cut the device off (once): one error line, slots dead, peer
        killed.  Unless ``final`` and with a restart policy, a new process
        takes over (the monitor sees the death); otherwise the monitor
        reaps its regions when it has ended."""
        with self._lock:
            if self._failure is not None or self._closing:
                if self._failure is None:
                    self._failure = reason
                return
            if not final and self.policy.mode != "no" and self.relaunch is not None:
                if self._cause is None:
                    self._cause = reason
                    log.error("device %s (%s, pid %d) cut off: %s", self.name, self.kind, self.pid, reason)
                restart = True
            else:
                self._failure = reason
                restart = False
        if restart:
            self._slots_dead()
            self.peer.kill()
            return
        log.error("device %s (%s, pid %d) cut off: %s", self.name, self.kind, self.pid, reason)
        self._slots_dead()
        self.peer.kill()
        self._reset_done.set()
        with self._cond:
            self._cond.notify_all()
        for wait in list(self._fault_waits.values()):
            wait[0].set()

    def _reap_regions(self) -> None:
        try:
            n = self.registry.unregister_owner(self.owner)
        except Exception as e:  # registry closed, or its lock unusable
            log.warning("device %s: cannot reap its regions: %s", self.name, e)
            return
        if n:
            log.info("device %s: reaped %d region(s)", self.name, n)

    def _teardown(self) -> None:
        """Wait for the peer (kill it after the grace period), stop the
        monitor, then release every resource."""
        self._closing = True
        self._stop_restart.set()
        with self._cond:
            self._cond.notify_all()
        if self._failure is not None:
            self.peer.kill()            # cut off: no grace
        if not self.peer.wait(SHUTDOWN_GRACE):
            if self._failure is None:
                log.warning("device %s (pid %d) did not exit after shutdown; killing it",
                            self.name, self.pid)
            self.peer.kill()
            if not self.peer.wait(5.0):
                log.error("device process %d does not die", self.pid)
        self._slots_dead()
        self._channel.shutdown()
        monitor = self._monitor
        if monitor is not None and monitor is not threading.current_thread():
            monitor.join(5.0)
            if monitor.is_alive():
                log.warning("device %s: monitor thread did not stop", self.name)
        self._reap_regions()
        if self.irqs is not None:
            self.irqs.release_all()
        if self.ioevents is not None:
            self.ioevents.release_all()
        if self.zones is not None:
            self.zones.release_all()
        if self._slots is not None:
            log.debug("device %s: %s; device counters %s", self.name, self._slots.stats(),
                      self._slots.device_stats())
        with self._chan_lock:
            self._channel.close()
        self.peer.close()
        if self._forward_quiet():
            for old in self._old_slots:
                old.close()
            if self._slots is not None:
                self._slots.close()
        else:       # a vCPU is still in C on one of them: never unmap (nor collect) them
            _STUCK_SLOTS.extend(s for s in [self._slots, *self._old_slots] if s is not None)
        self._old_slots.clear()
        if self.state is not None:
            self.state.close()
        if self._spares is not None:
            self._spares.close()
        with self._batch_make_lock, self._batch_lock:
            if self._batch is not None:
                self._batch.close()
        self._closed = True


class _Spares:
    """One warm spare device process, started in the background after each
    start: it has imported everything and waits for a Hello, so a restart
    skips the interpreter's start and the imports (~170 ms here)."""

    def __init__(self, launch: Callable[[], tuple[socket.socket, Peer]], name: str):
        self._launch = launch
        self._name = name
        self._lock = threading.Lock()
        self._spare: tuple[socket.socket, Peer] | None = None
        self._closed = False
        self._filling: threading.Thread | None = None

    def refill(self) -> None:
        """Start a spare in the background unless one is there."""
        with self._lock:
            if self._closed or self._spare is not None or (self._filling and self._filling.is_alive()):
                return
            self._filling = threading.Thread(target=self._fill, name=f"spare-{self._name}", daemon=True)
            self._filling.start()

    def _fill(self) -> None:
        spare: tuple[socket.socket, Peer] | None
        try:
            spare = self._launch()
        except Exception as e:
            log.warning("device %s: cannot start a spare process: %s", self._name, e)
            return
        with self._lock:
            if not self._closed and self._spare is None:
                self._spare, spare = spare, None
        if spare is not None:
            _drop(spare)

    def take(self) -> tuple[socket.socket, Peer] | None:
        """The spare if it is alive (None: start one the slow way)."""
        with self._lock:
            spare, self._spare = self._spare, None
        if spare is not None and spare[1].wait(0):
            _drop(spare)
            return None
        return spare

    def close(self) -> None:
        with self._lock:
            self._closed = True
            spare, self._spare = self._spare, None
            filling = self._filling
        if spare is not None:
            _drop(spare)
        if filling is not None:
            filling.join(10)
            with self._lock:
                spare, self._spare = self._spare, None
            if spare is not None:
                _drop(spare)


def _drop(spare: tuple[socket.socket, Peer]) -> None:
    sock, peer = spare
    peer.kill()
    peer.wait(5.0)
    peer.close()
    sock.close()


def _clean_exit(peer: Peer) -> bool:
    """Whether the peer ended with status 0 (a DeviceProcess says)."""
    code = getattr(peer, "returncode", None)
    return code == 0


def _queue_sizes(kind: str) -> tuple[int, ...]:
    """The virtqueue sizes of ``kind`` (one inflight record each), () when
    it is no virtio model or cannot be resolved here."""
    try:
        cls = kinds.resolve(kind)
    except Exception:       # a kind only the device side knows
        return ()
    if isinstance(cls, type) and issubclass(cls, VirtioCore):
        return tuple(cls.queue_sizes)
    return ()
class Launched:
    """A device process started by :meth:`RemoteEndpoint.launch`, not yet
    handshaken: :meth:`finish` exactly once, or :meth:`abandon`."""

    def __init__(self, attach: Callable[[], RemoteEndpoint], sock: socket.socket, process: DeviceProcess):
        self._attach: Callable[[], RemoteEndpoint] | None = attach
        self._sock = sock
        self._process = process
        #: Given to the endpoint as its ``on_event`` (restart and failure events).
        self.on_event: Callable[[str, dict], object] | None = None

    def finish(self) -> RemoteEndpoint:
        """Handshake up to Ready (raises like :meth:`RemoteEndpoint.spawn`;
        on every failure the process is killed and reaped)."""
        attach, self._attach = self._attach, None
        if attach is None:
            raise RuntimeError("Launched.finish: already finished or abandoned")
        ep = attach()
        ep.on_event = self.on_event
        return ep

    def abandon(self) -> None:
        """Kill and reap the process and close the socket (a device started
        with others, one of which failed first)."""
        if self._attach is None:
            return
        self._attach = None
        self._sock.close()
        self._process.kill()
        self._process.wait(5.0)
        self._process.close()


def _config(kind: str, params: dict[str, str], owner: int, name: str, nvcpus: int,
            options: RemoteOptions) -> DeviceConfig:
    if not isinstance(owner, int) or owner < FIRST_DEVICE_OWNER:
        raise ValueError(f"owner must be an integer >= {FIRST_DEVICE_OWNER}, not {owner!r}")
    if not isinstance(nvcpus, int) or not 1 <= nvcpus <= MAX_VCPUS:
        raise ValueError(f"nvcpus must be in [1, {MAX_VCPUS}], not {nvcpus!r}")
    return DeviceConfig(kind=kind, params=dict(params), owner=owner, name=name, nvcpus=nvcpus,
                        sandbox=options.sandbox, seccomp=options.seccomp)
