"""The access proxy: a device in another process as the dispatcher sees it.

:class:`RemoteEndpoint` is crosvm's ProxyDevice for this VMM: it implements
:class:`vmm.endpoint.Endpoint`, so the dispatcher cannot tell it from a
device running inline.  ``access`` forwards through the vCPU's slot
(:mod:`ipc.slots`) and never returns a quiet default: a device that is
dead, late, or says its model failed raises :class:`DeviceFailed`.

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
Fault injection (:mod:`vmm.faults`) asks the device's engine with
:meth:`RemoteEndpoint.fault_control` and gets its firing records through
``on_fault_record``; what a device sent just before it died is read before
its exit is handled, so the record of a ``crash`` firing is not lost.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import NoReturn

from ipc import Registry
from ipc.protocol import (ConnectionClosed, DeviceConfig, Error, FaultControl, FaultFired, FaultReply,
                          MemRegion, Message, RemoteProtocolError, Reset, ResetDone, Role, SetSlots, Shutdown)
from ipc.batch import BATCH_SPACE, BatchWriter
from ipc.slots import CallStats, ServeStats, SlotCaller, SlotError, SlotPeerDead, SlotTimeout
from ipc.transport import Channel, ChannelTimeout, socketpair
from vmm import sandbox_report
from vmm.coalesce import DeviceZones
from vmm.endpoint import FIRST_DEVICE_OWNER, DeviceFailed
from vmm.ioevent import DeviceIoeventfds
from vmm.irq import DeviceIrqs
from vmm.remote.handshake import Offer, StartError, handshake, registry_fd
from vmm.remote.options import RemoteOptions
from vmm.remote.peer import Peer
from vmm.remote.process import DeviceProcess, child_env
from vmm.remote.requests import RequestService

__all__ = ["RemoteEndpoint", "Launched", "SHUTDOWN_GRACE", "MAX_VCPUS"]

log = logging.getLogger(__name__)

#: After Shutdown, how long a device may take to end before it is killed.
SHUTDOWN_GRACE = 2.0
MAX_VCPUS = 256

_DEFAULT = RemoteOptions()


class RemoteEndpoint:
    """One device process, forwarded to through shared-memory slots."""

    #: Registry owner id of the device's regions.
    owner: int
    #: The device's ``id=``.
    name: str

    def __init__(self, *, kind: str, owner: int, name: str, registry: Registry, peer: Peer,
                 channel: Channel, slots: SlotCaller, access_timeout: float,
                 irqs: DeviceIrqs | None = None, ioevents: DeviceIoeventfds | None = None,
                 zones: DeviceZones | None = None):
        self.kind = kind
        self.owner = owner
        self.name = name
        self.registry = registry
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
        self._slots = slots
        self._call = slots.call
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
        self.requests = RequestService(name, irqs, ioevents, send=self._send,
                                       stopping=lambda: self._failure is not None or self._closing,
                                       on_send_error=self._fail, zones=zones, batch_fd=self._batch_fd)
        #: What the monitor does with each message type after the start
        #: (False: the channel is done).  Anything else the protocol let
        #: through (late Ready/Welcome answers crossing a Shutdown) needs
        #: nothing.
        self._on_message: dict[type, Callable[[Message], bool]] = {
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

    # -- start ---------------------------------------------------------------

    @classmethod
    def spawn(cls, kind: str, params: dict[str, str], owner: int, name: str, registry: Registry,
              nvcpus: int, options: RemoteOptions = _DEFAULT) -> RemoteEndpoint:
        """Start a device process (``options.command --fd N``) and return once
        it is Ready.

        ``kind``/``params``: the model and its ``key=value`` parameters;
        ``owner``: its registry owner id (>= FIRST_DEVICE_OWNER); ``nvcpus``:
        one slot per vCPU; ``options``: the rest (:class:`RemoteOptions`).

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
        deadline = time.monotonic() + options.start_timeout
        ours, theirs = socketpair()
        try:
            process = DeviceProcess.start(options.command, theirs, name, options.cpus, env)
        except BaseException:
            ours.close()
            raise
        return Launched(lambda: cls._attach(config, ours, process, registry, options, deadline),
                        ours, process)

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
                options: RemoteOptions, deadline: float) -> RemoteEndpoint:
        try:
            slots = SlotCaller.create(config.nvcpus, spin_ns=options.spin_us * 1000)
            try:
                channel = Channel(sock, Role.VMM)
            except BaseException:
                slots.close()
                raise
        except BaseException:
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
                 channel=channel, slots=slots, access_timeout=options.access_timeout,
                 irqs=irqs, ioevents=ioevents, zones=zones)
        mem_regions = options.mem_regions
        try:
            if options.memfd is not None and mem_regions is None:
                mem_regions = (MemRegion(0, os.fstat(options.memfd).st_size, 0),)
            reg_fd = registry_fd(registry)
        except BaseException:
            ep._failure = "start interrupted"
            ep._teardown()
            raise
        try:
            offer = Offer(config=config, registry_fd=reg_fd,
                          slots=SetSlots(fd=slots.fd, nslots=config.nvcpus, poll_ns=options.poll_us * 1000,
                                         adaptive=options.adaptive, move=options.move),
                          memfd=options.memfd, mem_regions=mem_regions or (), console=options.console)
            agreed = handshake(channel, ep._send, offer, deadline, ep.requests.serve, peer.exit_text,
                               on_welcome=ep._agreed)
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
        finally:
            os.close(reg_fd)
        ep.features = agreed.features
        ep.reported_pid = agreed.pid
        ep.sandbox, ep.peer = sandbox_report.at_ready(ep.name, ep.peer, agreed.sandbox, agreed.pid)
        if agreed.pid != ep.pid:
            log.debug("device %s reports pid %d; its process is %d", ep.name, agreed.pid, ep.pid)
        ep._monitor = threading.Thread(target=ep._watch, name=f"device-{ep.name}", daemon=True)
        ep._monitor.start()
        return ep

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
        try:
            return self._call(vcpu, space, cookie, offset, size, is_write, value, self.access_timeout)
        except SlotError as e:
            self._call_failed(e)

    def access_batch(self, vcpu: int, writes: list[tuple[int, int, int, int, int]]) -> None:
        """Forward writes (space, cookie, offset, size, value) in order: a
        request per batch (ipc.batch) once the device has a batch segment,
        else one access each.  Raises :class:`DeviceFailed`."""
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
                try:
                    self._call(vcpu, BATCH_SPACE, 0, 0, 8, True, n, self.access_timeout)
                except SlotError as e:
                    self._call_failed(e)
                done += n

    def _call_failed(self, error: SlotError) -> NoReturn:
        """Cut the device off for a failed slot call (a dead device is cut
        off by its monitor already) and raise DeviceFailed."""
        if isinstance(error, SlotTimeout):
            self._fail(f"no answer within {self.access_timeout:g} s")
        elif not isinstance(error, SlotPeerDead):    # it failed, answered garbage, or closed under us
            self._fail(str(error))
        raise DeviceFailed(f"device {self.name}: {self._failure or ('closed' if self._closing else 'failed')}") \
            from None

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
            self._fail(f"cannot send reset: {e}")
            raise DeviceFailed(f"device {self.name}: {self._failure}") from None
        if not self._reset_done.wait(timeout):
            self._fail(f"no reset-done within {timeout:g} s")
        if self._failure is not None:
            raise DeviceFailed(f"device {self.name}: {self._failure}")

    @property
    def failed(self) -> str | None:
        """Why the device was cut off, or None while it works."""
        return self._failure

    def cut_off(self, reason: str) -> None:
        """Cut the device off from outside (once): one error line, its
        slots dead, the peer killed (SIGKILL through the pidfd for a child,
        so only this child can be hit); its regions are reaped when it has
        ended.  The VMM's lock watch (vmm.lockwatch) calls this for a device
        that holds the registry lock past the deadline."""
        self._fail(reason)

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
        if self._failure is None and not self.peer.wait(0):
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
        state = f"failed: {self._failure}" if self._failure else "closed" if self._closed else "running"
        return f"<RemoteEndpoint {self.name} {self.kind} pid {self.pid} owner {self.owner} {state}>"

    # -- figures -------------------------------------------------------------

    def device_stats(self) -> ServeStats:
        """The device's serve-loop counters (as it published them)."""
        return self._slots.device_stats()

    def call_stats(self) -> CallStats:
        """What this side counted."""
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
        if not self._closing:
            self._fail(f"closed its control socket ({self.peer.exit_text(0.2)})")
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
        except OSError as e:
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
        """The peer is gone: fail it if that was not asked for, reap it and
        its regions."""
        if not self._closing:
            self._fail(self.peer.exit_text(1.0))
        self._slots.mark_dead()
        self.peer.wait(1.0)
        self._reap_regions()
        if self.irqs is not None:
            self.irqs.release_all()     # its routes and irqfds go with it
        if self.ioevents is not None:
            self.ioevents.release_all()
        if self.zones is not None:
            self.zones.release_all()
        self._exited.set()

    # -- failure and teardown ------------------------------------------------

    def _fail(self, reason: str) -> None:
        """Cut the device off (once): one error line, slots dead, peer
        killed; the monitor reaps its regions when it has ended."""
        with self._lock:
            if self._failure is not None or self._closing:
                if self._failure is None:
                    self._failure = reason
                return
            self._failure = reason
        log.error("device %s (%s, pid %d) cut off: %s", self.name, self.kind, self.pid, reason)
        self._slots.mark_dead()
        self.peer.kill()
        self._reset_done.set()
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
        if self._failure is not None:
            self.peer.kill()            # cut off: no grace
        if not self.peer.wait(SHUTDOWN_GRACE):
            if self._failure is None:
                log.warning("device %s (pid %d) did not exit after shutdown; killing it",
                            self.name, self.pid)
            self.peer.kill()
            if not self.peer.wait(5.0):
                log.error("device process %d does not die", self.pid)
        self._slots.mark_dead()
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
        log.debug("device %s: %s; device counters %s", self.name, self._slots.stats(),
                  self._slots.device_stats())
        with self._chan_lock:
            self._channel.close()
        self.peer.close()
        self._slots.close()
        with self._batch_make_lock, self._batch_lock:
            if self._batch is not None:
                self._batch.close()
        self._closed = True


class Launched:
    """A device process started by :meth:`RemoteEndpoint.launch`, not yet
    handshaken: :meth:`finish` exactly once, or :meth:`abandon`."""

    def __init__(self, attach: Callable[[], RemoteEndpoint], sock: socket.socket, process: DeviceProcess):
        self._attach: Callable[[], RemoteEndpoint] | None = attach
        self._sock = sock
        self._process = process

    def finish(self) -> RemoteEndpoint:
        """Handshake up to Ready (raises like :meth:`RemoteEndpoint.spawn`;
        on every failure the process is killed and reaped)."""
        attach, self._attach = self._attach, None
        if attach is None:
            raise RuntimeError("Launched.finish: already finished or abandoned")
        return attach()

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
