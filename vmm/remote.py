"""A device in its own process (``process=isolated``), as the dispatcher
sees it.

:class:`RemoteEndpoint` is crosvm's ProxyDevice for this VMM: it implements
:class:`vmm.endpoint.Endpoint`, so the dispatcher cannot tell it from a
device running inline.  :meth:`RemoteEndpoint.spawn` creates the control
socket pair and the access-slot segment, starts ``python -m devserver --fd
N``, runs the handshake with a deadline and returns once the device is
Ready (its initial regions are in the registry by then).  ``access``
forwards through the vCPU's slot (:mod:`ipc.slots`) and never returns a
quiet default: a device that is dead, late, or says its model failed
raises :class:`DeviceFailed`.

The device is untrusted.  Everything read back from it is validated (the
slot answer by the C core, control messages by :mod:`ipc.protocol`); a
device that breaks the protocol, misses a deadline or dies is cut off: one
``logging.error`` line, the slots are marked dead (waiting vCPUs return at
once), the process is killed and its regions are reaped from the registry.
A monitor thread per device watches the control socket and a pidfd, so
death is noticed when it happens, not at the next access timeout.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import NoReturn

import posix_ipc

from ipc import Registry
from ipc.protocol import (ConnectionClosed, DeviceConfig, Error, Hello, MemRegion, Message,
                          Ready, RemoteProtocolError, Reset, ResetDone, Role, SetConsole,
                          SetMemTable, SetRegistry, SetSlots, Shutdown, Start, Welcome)
from ipc.protocol import CoalescedMmioRemoveRequest, CoalescedMmioRequest
from ipc.protocol import (IRQ_REQUESTS, IoeventfdRemoveRequest, IoeventfdRequest, IrqDone, IrqGranted,
                          IrqLineRequest, IrqRefused, MsiRouteRequest, MsiUnrouteRequest)
from ipc.batch import BATCH_SPACE, BatchWriter
from ipc.slots import (CallStats, ServeStats, SlotCaller, SlotError, SlotPeerDead, SlotTimeout)
from ipc.transport import Channel, ChannelTimeout, socketpair
from vmm.coalesce import CoalescedMmio, CoalesceRefused, DeviceZones
from vmm.console import StderrRelay
from vmm.endpoint import FIRST_DEVICE_OWNER, DeviceFailed
from vmm.ioevent import DeviceIoeventfds, IoeventfdRefused
from vmm.irq import DeviceIrqs, IrqError, IrqRouter

__all__ = ["RemoteEndpoint", "DEVSERVER_COMMAND"]

log = logging.getLogger(__name__)

#: How a device process is started; ``--fd N`` is appended.
DEVSERVER_COMMAND = (sys.executable, "-m", "devserver")
#: After Shutdown, how long a device may take to exit before SIGKILL.
SHUTDOWN_GRACE = 2.0
MAX_VCPUS = 256


class RemoteEndpoint:
    """One device process, forwarded to through shared-memory slots."""

    #: Registry owner id of the device's regions.
    owner: int
    #: The device's ``id=``.
    name: str
    #: Pid of the device process (the child this VMM started).
    pid: int

    def __init__(self, *, kind: str, owner: int, name: str, registry: Registry,
                 proc: subprocess.Popen, pidfd: int, channel: Channel, slots: SlotCaller,
                 access_timeout: float):
        self.kind = kind
        self.owner = owner
        self.name = name
        self.registry = registry
        self.pid = proc.pid
        #: The pid the device reported in Ready (differs under a sandbox
        #: launcher with its own pid namespace).
        self.reported_pid = 0
        self.features: frozenset[str] = frozenset()
        self.access_timeout = access_timeout
        self._proc = proc
        self._pidfd = pidfd
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
        self.irqs: DeviceIrqs | None = None
        #: The device's doorbells (None: it may have none).
        self.ioevents: DeviceIoeventfds | None = None
        #: The device's coalesced-MMIO zones (None: it may have none).
        self.zones: DeviceZones | None = None
        #: Where queued writes go in batches (ipc.batch), once the device
        #: has a zone and speaks ``coalesced-batch``.
        self._batch: BatchWriter | None = None
        self._batch_lock = threading.Lock()      # one batch in the segment at a time
        self._batch_make_lock = threading.Lock()  # not _batch_lock: a batch's handler may ask for zones

    # -- start ---------------------------------------------------------------

    @classmethod
    def spawn(cls, kind: str, params: dict[str, str], owner: int, name: str,
              registry: Registry, nvcpus: int, memfd: int | None = None,
              mem_regions: Sequence[MemRegion] | None = None,
              access_timeout: float = 1.0, poll_us: int = 200, adaptive: bool = True,
              spin_us: int = 100, start_timeout: float = 10.0,
              command: Sequence[str] = DEVSERVER_COMMAND,
              cpus: set[int] | None = None, move: bool = False,
              console: SetConsole | None = None,
              irq_router: IrqRouter | None = None,
              coalesced: CoalescedMmio | None = None) -> RemoteEndpoint:
        """Start a device process and return once it is Ready.

        ``kind``/``params``: the model and its ``key=value`` parameters;
        ``owner``: its registry owner id (>= FIRST_DEVICE_OWNER); ``nvcpus``:
        one slot per vCPU; ``memfd``: guest RAM to share (``mem_regions``
        says where it sits; default: the whole fd at guest address 0);
        ``access_timeout``: deadline of one access; ``poll_us``: the
        device's longest poll after a request (0: sleep at once);
        ``spin_us``: how long a vCPU spins on the answer before sleeping;
        ``command``: the device program (``--fd N`` is appended);
        ``cpus``: CPUs the device process may run on (default: any);
        ``move``: let the device's serving thread move itself off the CPU
        of the vCPU it serves (see ipc.slots; off by default: measured
        bimodal on the nested development host);
        ``console``: the console fds to hand the device (the VMM keeps
        its own copies);
        ``irq_router``: the VM's interrupt routing, from which the device
        may ask for irqfds (pins, MSI routes; see ipc.protocol);
        ``coalesced``: the VM's coalesced-MMIO zones, of which the device
        may ask for some inside its own regions.

        Raises :class:`DeviceFailed` when the device does not come up
        (bad parameters, protocol error, death, deadline).
        """
        if not isinstance(owner, int) or owner < FIRST_DEVICE_OWNER:
            raise ValueError(f"owner must be an integer >= {FIRST_DEVICE_OWNER}, not {owner!r}")
        if not isinstance(nvcpus, int) or not 1 <= nvcpus <= MAX_VCPUS:
            raise ValueError(f"nvcpus must be in [1, {MAX_VCPUS}], not {nvcpus!r}")
        if not isinstance(poll_us, int) or poll_us < 0:
            raise ValueError(f"poll_us must be an integer >= 0, not {poll_us!r}")
        config = DeviceConfig(kind=kind, params=dict(params), owner=owner, name=name, nvcpus=nvcpus)
        if memfd is not None and mem_regions is None:
            mem_regions = (MemRegion(0, os.fstat(memfd).st_size, 0),)
        deadline = time.monotonic() + start_timeout
        reg_fd = _registry_fd(registry)
        try:
            return cls._start(kind, config, registry, reg_fd, memfd, mem_regions, deadline,
                              SetSlots(fd=0, nslots=nvcpus, poll_ns=poll_us * 1000,
                                       adaptive=adaptive, move=move),
                              access_timeout, spin_us, command, cpus, console, irq_router, coalesced)
        finally:
            os.close(reg_fd)

    @classmethod
    def _start(cls, kind: str, config: DeviceConfig, registry: Registry, reg_fd: int,
               memfd: int | None, mem_regions: Sequence[MemRegion] | None, deadline: float,
               set_slots: SetSlots, access_timeout: float, spin_us: int,
               command: Sequence[str], cpus: set[int] | None,
               console: SetConsole | None = None,
               irq_router: IrqRouter | None = None,
               coalesced: CoalescedMmio | None = None) -> RemoteEndpoint:
        name, owner = config.name, config.owner
        slots = SlotCaller.create(config.nvcpus, spin_ns=spin_us * 1000)
        ours, theirs = socketpair()
        proc = pidfd = None
        # No descriptor of the VMM's terminal reaches the device (vmm.console).
        relay = StderrRelay.for_child()
        try:
            try:
                proc = subprocess.Popen([*command, "--fd", str(theirs.fileno()), *_log_level_args(command)],
                                        pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, start_new_session=True,
                                        stderr=relay.child_fd if relay is not None else None)
            finally:
                theirs.close()      # the child has its copy
                if relay is not None and proc is not None:
                    relay.started(name)
                elif relay is not None:
                    relay.abandon()
            pidfd = os.pidfd_open(proc.pid)
            if cpus is not None:
                os.sched_setaffinity(proc.pid, cpus)
        except BaseException:
            slots.close()
            ours.close()
            if pidfd is not None:
                os.close(pidfd)
            if proc is not None:
                _kill_and_reap(proc)
            raise
        ep = cls(kind=kind, owner=owner, name=name, registry=registry, proc=proc, pidfd=pidfd,
                 channel=Channel(ours, Role.VMM), slots=slots, access_timeout=access_timeout)
        if irq_router is not None:
            ep.irqs = DeviceIrqs(irq_router, name)
            ep.ioevents = DeviceIoeventfds(irq_router.vm, registry, owner, name)
        if coalesced is not None:
            ep.zones = DeviceZones(coalesced, registry, owner, name)
        try:
            ep._handshake(config, reg_fd, dataclasses.replace(set_slots, fd=slots.fd),
                          memfd, mem_regions, deadline, console)
        except _StartError as e:
            reason = str(e)
            log.error("device %s (%s, pid %d) failed to start: %s", name, kind, proc.pid, reason)
            ep._failure = f"failed to start: {reason}"
            ep._teardown()
            raise DeviceFailed(f"device {name}: {reason}") from None
        except BaseException:
            ep._failure = "start interrupted"
            ep._teardown()
            raise
        ep._monitor = threading.Thread(target=ep._watch, name=f"device-{name}", daemon=True)
        ep._monitor.start()
        return ep

    def _receive(self, deadline: float) -> Message:
        try:
            msg = self._channel.receive(max(0.0, deadline - time.monotonic()))
        except RemoteProtocolError as e:
            raise _StartError(f"broke the control protocol: {e}") from None
        except ChannelTimeout:
            raise _StartError("no answer before the start deadline") from None
        except OSError as e:
            raise _StartError(f"control socket: {e}") from None
        if isinstance(msg, ConnectionClosed):
            raise _StartError(f"closed its control socket ({self._exit_text(0.5)})")
        if isinstance(msg, Error):
            raise _StartError(f"refused: {msg.message}")
        return msg

    def _handshake(self, config: DeviceConfig, reg_fd: int, set_slots: SetSlots, memfd: int | None,
                   mem_regions: Sequence[MemRegion] | None, deadline: float,
                   console: SetConsole | None = None) -> None:
        send = self._send
        send(Hello())
        welcome = self._receive(deadline)
        assert isinstance(welcome, Welcome)  # the protocol table allows nothing else
        self.features = welcome.features
        send(config)
        send(SetRegistry(fd=reg_fd))
        send(set_slots)
        if memfd is not None:
            if "mem-table" not in welcome.features:
                raise _StartError("does not take guest memory (no mem-table feature)")
            send(SetMemTable(fd=memfd, regions=tuple(mem_regions or ())))
        if console is not None:
            send(console)
        send(Start())
        ready = self._receive(deadline)
        while isinstance(ready, IRQ_REQUESTS):      # the model's start() asks
            self._serve_irq(ready)
            ready = self._receive(deadline)
        assert isinstance(ready, Ready)
        self.reported_pid = ready.pid
        if ready.pid != self.pid:
            log.debug("device %s reports pid %d; its process is %d", self.name, ready.pid, self.pid)

    def _send(self, msg: Message) -> None:
        try:
            with self._chan_lock:
                self._channel.send(msg)
        except OSError as e:
            raise _StartError(f"control socket: {e} ({self._exit_text(0.5)})") from None

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
            with self._chan_lock:
                self._channel.send(Reset())
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
        slots dead, SIGKILL through the pidfd, so only this child can be
        hit; its regions are reaped when it has exited.  The VMM's lock
        watch (vmm.lockwatch) calls this for a device that holds the
        registry lock past the deadline."""
        self._fail(reason)

    def wait_exited(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the device process to exit;
        True once it has (or when it is no longer watched)."""
        pidfd = self._pidfd
        if pidfd < 0 or self._exited.is_set():
            return True
        poller = select.poll()
        try:
            poller.register(pidfd, select.POLLIN)
            return bool(poller.poll(max(0, int(timeout * 1000))))
        except (OSError, ValueError):
            return True     # the pidfd was closed under us: torn down

    def close(self) -> None:
        """Shut the device down (Shutdown, then SIGKILL after a grace
        period), reap it, close every descriptor and mapping, and reap
        its regions from the registry.  Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = self._closing = True
        if self._failure is None and self._proc.poll() is None:
            try:
                with self._chan_lock:
                    self._channel.send(Shutdown())
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
        """CPU time (user + system) the device process has used so far."""
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            return 0.0

    # -- failure and teardown ------------------------------------------------

    def _fail(self, reason: str) -> None:
        """Cut the device off (once): one error line, slots dead, process
        killed; the monitor reaps its regions when it has exited."""
        with self._lock:
            if self._failure is not None or self._closing:
                if self._failure is None:
                    self._failure = reason
                return
            self._failure = reason
        log.error("device %s (%s, pid %d) cut off: %s", self.name, self.kind, self.pid, reason)
        self._slots.mark_dead()
        self._kill()
        self._reset_done.set()

    def _kill(self) -> None:
        try:
            signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
        except (OSError, ValueError):
            pass  # already gone, or pidfd closed

    def _exit_text(self, wait: float) -> str:
        try:
            rc = self._proc.wait(wait)
        except subprocess.TimeoutExpired:
            return "still running"
        return f"killed by {signal.Signals(-rc).name}" if rc < 0 else f"exited with status {rc}"

    def _watch(self) -> None:
        """Monitor thread: control messages, end of stream, process exit."""
        poller = select.poll()
        sock_fd = self._channel.fileno()
        poller.register(sock_fd, select.POLLIN)
        poller.register(self._pidfd, select.POLLIN)
        sock_open = True
        while True:
            try:
                events = poller.poll()
            except (OSError, ValueError):
                return
            for fd, _ev in events:
                if fd == self._pidfd:
                    self._on_exit()
                    return
                if fd == sock_fd and sock_open:
                    if not self._on_readable():
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
            if isinstance(msg, ConnectionClosed):
                if not self._closing:
                    self._fail(f"closed its control socket ({self._exit_text(0.2)})")
                return False
            if isinstance(msg, Error):
                self._fail(f"reported: {msg.message}")
                return False
            if isinstance(msg, ResetDone):
                self._reset_done.set()
            elif isinstance(msg, IRQ_REQUESTS):
                self._serve_irq(msg)
            # Anything else the protocol let through (late Ready/Welcome
            # answers crossing a Shutdown) needs nothing.

    def _serve_irq(self, msg: Message) -> None:
        """Answer one interrupt request (on the monitor thread, or during
        the handshake): validate it, act on the VM, send the answer.  A
        refusal is logged and answered; it does not cut the device off."""
        irqs = self.irqs
        answer: Message
        try:
            if irqs is None:
                raise IrqError("this VMM gives the device no interrupts")
            if isinstance(msg, (IoeventfdRemoveRequest, CoalescedMmioRemoveRequest)) and (
                    self._failure is not None or self._closing):
                answer = IrqDone(msg.seq)       # released with the rest at teardown
            elif self._failure is not None or self._closing:
                raise IrqError("the device is cut off or closing")
            elif isinstance(msg, CoalescedMmioRequest):
                if self.zones is None:
                    raise IrqError("this VMM gives the device no coalesced MMIO")
                self.zones.add(msg.address, msg.length)
                answer = IrqDone(msg.seq)
                if "coalesced-batch" in self.features:
                    with self._batch_make_lock:
                        if self._batch is None:
                            self._batch = BatchWriter()
                        assert self._batch.fd is not None
                        answer = IrqGranted(msg.seq, self._batch.fd)
            elif isinstance(msg, CoalescedMmioRemoveRequest):
                if self.zones is not None:
                    self.zones.remove(msg.address)
                answer = IrqDone(msg.seq)
            elif isinstance(msg, IoeventfdRemoveRequest):
                if self.ioevents is None:
                    raise IrqError("this VMM gives the device no ioeventfds")
                self.ioevents.remove(msg.space, msg.address, msg.length, msg.datamatch if msg.match else None)
                answer = IrqDone(msg.seq)
            elif isinstance(msg, IoeventfdRequest):
                if self.ioevents is None:
                    raise IrqError("this VMM gives the device no ioeventfds")
                answer = IrqGranted(msg.seq, self.ioevents.add(msg.space, msg.address, msg.length,
                                                               msg.datamatch if msg.match else None))
            elif isinstance(msg, IrqLineRequest):
                answer = IrqGranted(msg.seq, irqs.pin(msg.gsi))
            elif isinstance(msg, MsiRouteRequest):
                answer = IrqGranted(msg.seq, irqs.program(msg.index, msg.address, msg.data))
            else:
                assert isinstance(msg, MsiUnrouteRequest)
                irqs.unprogram(msg.index)
                answer = IrqDone(msg.seq)
        except (IrqError, IoeventfdRefused, CoalesceRefused, OSError) as e:
            log.warning("device %s: %s refused: %s", self.name, msg.TYPE, e)
            answer = IrqRefused(msg.seq, str(e)[:1000] or type(e).__name__)
        try:
            with self._chan_lock:
                self._channel.send(answer)
        except Exception as e:
            if not self._closing:
                self._fail(f"cannot answer {msg.TYPE}: {e}")

    def _on_exit(self) -> None:
        """The process is gone: fail it if that was not asked for, reap it
        and its regions."""
        if not self._closing:
            self._fail(self._exit_text(1.0))
        self._slots.mark_dead()
        _poll(self._proc)
        self._reap_regions()
        if self.irqs is not None:
            self.irqs.release_all()     # its routes and irqfds go with it
        if self.ioevents is not None:
            self.ioevents.release_all()
        if self.zones is not None:
            self.zones.release_all()
        self._exited.set()

    def _reap_regions(self) -> None:
        try:
            n = self.registry.unregister_owner(self.owner)
        except Exception as e:  # registry closed, or its lock unusable
            log.warning("device %s: cannot reap its regions: %s", self.name, e)
            return
        if n:
            log.info("device %s: reaped %d region(s)", self.name, n)

    def _teardown(self) -> None:
        """Wait for the process (kill after the grace period), stop the
        monitor, then release every resource."""
        self._closing = True
        if self._failure is not None:
            self._kill()            # cut off: no grace
        try:
            self._proc.wait(SHUTDOWN_GRACE)
        except subprocess.TimeoutExpired:
            if self._failure is None:
                log.warning("device %s (pid %d) did not exit after shutdown; killing it",
                            self.name, self.pid)
            self._kill()
            _kill_and_reap(self._proc)
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
        try:
            os.close(self._pidfd)
        except OSError:
            pass
        self._pidfd = -1
        self._slots.close()
        with self._batch_make_lock, self._batch_lock:
            if self._batch is not None:
                self._batch.close()
        self._closed = True


class _StartError(Exception):
    """Why a device did not come up (becomes DeviceFailed)."""


def _registry_fd(registry: Registry) -> int:
    """A new read-write descriptor on the registry's segment: a duplicate of
    a sealed registry's memfd, or the named segment opened again."""
    if registry.fd is not None:
        return os.dup(registry.fd)
    if registry.name is None:
        raise ValueError("the registry must be sealed (Registry.create_sealed) or named to be shared")
    shm = posix_ipc.SharedMemory(registry.name)
    return shm.fd


def _log_level_args(command: Sequence[str]) -> list[str]:
    """Give a devserver the VMM's logging level (quiet unless the VMM is
    verbose); other device programs get no extra arguments."""
    if tuple(command) != tuple(DEVSERVER_COMMAND):
        return []
    level = logging.getLogger().getEffectiveLevel()
    name = "DEBUG" if level <= logging.DEBUG else "INFO" if level <= logging.INFO else "WARNING"
    return ["--log-level", name]


def _poll(proc: subprocess.Popen) -> None:
    try:
        proc.wait(1.0)
    except subprocess.TimeoutExpired:
        pass


def _kill_and_reap(proc: subprocess.Popen) -> None:
    try:
        proc.kill()
    except OSError:
        pass
    try:
        proc.wait(5.0)
    except subprocess.TimeoutExpired:
        log.error("device process %d does not die", proc.pid)
