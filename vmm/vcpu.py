"""One thread per vCPU: the KVM_RUN loop and its exits.

Exits handled (Documentation/virt/kvm/api.rst, "kvm_run"):

* ``KVM_EXIT_IO``: ``count`` elements of ``size`` bytes at ``data_offset``
  in the kvm_run page (``count`` > 1 for ``rep ins/outs``), one dispatched
  access per element, all to the same port;
* ``KVM_EXIT_MMIO``: ``len`` bytes in ``mmio.data``;
* ``KVM_EXIT_HLT`` (only without an in-kernel LAPIC), ``KVM_EXIT_SHUTDOWN``
  (triple fault), ``KVM_EXIT_SYSTEM_EVENT``, ``KVM_EXIT_INTERNAL_ERROR``,
  ``KVM_EXIT_FAIL_ENTRY`` and unknown exits end the run with an
  :class:`~vmm.outcome.Outcome` (and a report for the failures).

**Fast path.**  By default the loop runs in C (``_vcpu.c`` through
:class:`vmm.kvm.FastPath`): KVM_RUN, decoding and the registry lookup
happen there, unclaimed accesses never reach Python, and Python hands the
access to :meth:`vmm.dispatch.Dispatcher.forward` -- the endpoint lookup
and failure handling the all-Python loop (``fast=False``, or
``SPLITVMM_SLOW_PATH=1``) reaches through ``Dispatcher.access``.  A
registry call that fails (a missed lock deadline) comes back to Python in
both loops and goes to the same ``Dispatcher.lookup_failed`` /
``put_timed_out``, which hand the holder to
:class:`vmm.lockwatch.LockWatch` (a device process holding the lock is
killed; the stalled lookup completes as unclaimed, a stalled put is
retried).  Coalesced MMIO: both loops have the dispatcher drain the ring
on every exit that finds writes queued in it (:mod:`vmm.coalesce`).

**Forwarding in C.**  An access to a device process goes from the C loop
straight into its slot (``svmm_forward`` in ``_vcpu.c``, through the
dispatcher's table of forwards, :meth:`Dispatcher.look_at_forward`) while
the endpoint's forward is on (:attr:`vmm.remote.RemoteEndpoint.c_forward`:
not failed, restarting, paused or closing); the first access to an owner
and every one while its forward is off come to Python as usual.  A call
that fails comes back as ``STEP_FORWARD_ERROR`` and goes to
:meth:`Dispatcher.forward_failed`, i.e. to the endpoint's restart rules,
as a failed call from Python does.

**Inline models.**  An inline model's endpoint
(:class:`vmm.local.LocalEndpoint`) has a forward with ``local`` set: while
it is on, the C loop hands its accesses out as ``STEP_LOCAL`` and this
loop calls the model's ``read``/``write`` itself (the dispatcher's
:attr:`~vmm.dispatch.Dispatcher.local_reads` / ``local_writes``, filled
by ``look_at_forward``); C puts the registry reference and counts the
access in the device's statistics (its time runs from the hand-out to the
completion), so that the model's call is all the Python of an access.  The
forward is off while a fault is armed on the endpoint's ``access`` or
``process`` point (its accesses then go through ``Dispatcher.forward`` and
``LocalEndpoint.access``, which serve the points); a model that raises
fails its device as there (``Dispatcher.local_failed``).  As with
forwarding in C, the ring of coalesced writes is drained at the exit, and
while another vCPU's drain is delivering what it took the access goes to
``forward``, which waits for that drain.

**Kicks.**  To stop or pause a vCPU that sits in ``KVM_RUN``, another
thread sets ``kvm_run.immediate_exit`` and sends the thread ``SIGUSR1``,
whose handler (installed in C, no SA_RESTART) does nothing: ``KVM_RUN``
returns EINTR, or returns at once if the signal came before it was
entered.  The vCPU thread clears ``immediate_exit`` and looks at its
flags.  vCPU threads block SIGINT, SIGTERM and SIGHUP so those reach the
main thread.
"""

from __future__ import annotations

import errno
import logging
import signal
import threading
from typing import Callable

from devices.base import Space
from vmm import kvm, report
from vmm.dispatch import MMIO, PIO, Dispatcher, registry_c_api
from vmm.memory import GuestMemory
from vmm.outcome import Ending, Outcome

log = logging.getLogger(__name__)

#: The signal that kicks a vCPU thread out of KVM_RUN.
KICK_SIGNAL = signal.SIGUSR1
_BLOCKED_IN_VCPU = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
_MASK = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFF_FFFF, 8: 0xFFFF_FFFF_FFFF_FFFF}
#: bus number -> what a model's read/write takes as its space.
SPACES = tuple(Space(i) for i in range(len(Space)))


class VcpuThread:
    """Runs one :class:`vmm.kvm.Vcpu`; ``on_end`` receives the outcome
    when this vCPU ends the run, or None when the guest parked it."""

    def __init__(self, fd: kvm.Vcpu, dispatcher: Dispatcher, memory: GuestMemory,
                 on_end: Callable[[Outcome | None], None], fast: bool = True):
        self.fd = fd
        api = registry_c_api(dispatcher.registry) if fast else None
        page = dispatcher.coalesced_page
        #: This vCPU's view of the VM's coalesced-MMIO ring (None: none).
        self.ring = fd.coalesced_ring(page) if page else None
        #: The C exit loop, or None for the all-Python one.
        self.fast = None if api is None else kvm.FastPath(
            fd, api.handle, api.get, api.put, int(dispatcher.registry.lock_timeout * 1e9), self.ring,
            None if dispatcher.windows is None else dispatcher.windows.table, dispatcher.forwards)
        self.index = fd.index
        self.dispatcher = dispatcher
        self.memory = memory
        self.on_end = on_end
        self.exits = 0
        self._stop = False
        self._park_requested = False
        #: Set (after the flag) with _stop, _park_requested and _pause: the
        #: C fast loop reads only this one between two accesses.
        self._attention = False
        self._check_halt = False
        #: True once the guest parked this vCPU (it never runs again).
        self.parked = False
        self._pause = False
        self._paused = False
        self._alive = False
        self._ident: int | None = None
        self._cond = threading.Condition()
        self.thread = threading.Thread(target=self._main, name=f"vcpu{self.index}", daemon=True)

    # -- control, from other threads ---------------------------------

    def start(self) -> None:
        """Start the thread; :attr:`alive` is True from here on until the
        thread ends (not only once the thread got to run)."""
        with self._cond:
            self._alive = True
        try:
            self.thread.start()
        except BaseException:
            with self._cond:
                self._alive = False
            raise

    def kick(self) -> None:
        """Make the vCPU leave KVM_RUN soon (no-op once the thread ended)."""
        with self._cond:
            if self._alive and self._ident is not None:
                self.fd.run.immediate_exit = 1
                signal.pthread_kill(self._ident, KICK_SIGNAL)

    def request_stop(self) -> None:
        self._stop = True
        self._attention = True
        with self._cond:
            self._cond.notify_all()
        self.kick()

    def request_park(self) -> None:
        """Called from this vCPU's own thread (a handler of its access):
        stop running it once the access completes."""
        self._park_requested = True
        self._attention = True

    def check_halt(self) -> None:
        """Have the thread look whether the vCPU sits in HLT with
        interrupts off (the in-kernel LAPIC keeps HLT from exiting)."""
        self._check_halt = True
        self.kick()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the thread; True when it has ended."""
        if self.thread.ident is None:
            return True
        self.thread.join(timeout)
        return not self.thread.is_alive()

    def pause(self, timeout: float = 5.0) -> bool:
        """Hold the vCPU outside KVM_RUN; True once it is parked (or gone)."""
        with self._cond:
            self._pause = True
            self._attention = True
        self.kick()
        with self._cond:
            return self._cond.wait_for(lambda: self._paused or not self._alive, timeout)

    def resume(self) -> None:
        with self._cond:
            self._pause = False
            self._cond.notify_all()

    @property
    def exit_count(self) -> int:
        """Exits to user space so far: live with the C fast path (also
        from another thread, or a handler of this vCPU's access); with the
        Python loop, counted when the loop ends (:attr:`exits`)."""
        return self.fast.ctx.exits if self.fast is not None else self.exits

    @property
    def alive(self) -> bool:
        return self._alive

    # -- the thread ----------------------------------------------------

    def _main(self) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, _BLOCKED_IN_VCPU)
        with self._cond:
            self._ident = threading.get_ident()
        try:
            if self.fast is not None:
                self._loop_fast()
            else:
                self._loop()
        except Exception as e:
            log.exception("vCPU %d: VMM error", self.index)
            self.on_end(Outcome(Ending.VMM_ERROR, f"{type(e).__name__}: {e}", vcpu=self.index))
        finally:
            with self._cond:
                self._alive = False
                self._cond.notify_all()

    def _park(self) -> None:
        with self._cond:
            self._paused = True
            self._cond.notify_all()
            self._cond.wait_for(lambda: not self._pause or self._stop)
            self._paused = False

    def _loop(self) -> None:
        fd = self.fd
        run = fd.run
        io = fd.io
        mmio = fd.mmio
        page = fd.page
        run_once = fd.run_once
        access = self.dispatcher.access
        drain = self.dispatcher.drain
        ring = self.ring
        index = self.index
        mmio_data = fd.mmio_data_offset
        EXIT_IO, EXIT_MMIO, OUT = kvm.EXIT_IO, kvm.EXIT_MMIO, kvm.EXIT_IO_OUT
        exits = 0
        try:
            while True:
                if self._stop:
                    return
                if self._pause:
                    self._park()
                    continue
                if run_once():
                    run.immediate_exit = 0
                    if self._check_halt and self._halted_for_good():
                        return
                    continue
                exits += 1
                if ring is not None and ring.pending():
                    drain(index)
                reason = run.exit_reason
                if reason == EXIT_IO:
                    size = io.size
                    port = io.port
                    off = io.data_offset
                    count = io.count
                    if io.direction == OUT:
                        for _ in range(count):
                            access(index, PIO, port, size, True, int.from_bytes(page[off:off + size], "little"))
                            off += size
                    else:
                        mask = _MASK[size]
                        for _ in range(count):
                            page[off:off + size] = (access(index, PIO, port, size, False, 0) & mask).to_bytes(size, "little")
                            off += size
                elif reason == EXIT_MMIO:
                    size = mmio.len
                    if size not in _MASK:
                        raise kvm.KvmError(f"MMIO exit of {size} bytes", 22)
                    if mmio.is_write:
                        access(index, MMIO, mmio.phys_addr, size, True,
                               int.from_bytes(page[mmio_data:mmio_data + size], "little"))
                    else:
                        value = access(index, MMIO, mmio.phys_addr, size, False, 0) & _MASK[size]
                        page[mmio_data:mmio_data + size] = value.to_bytes(size, "little")
                elif self._other_exit(reason):
                    return
                if self._park_requested:
                    self.parked = True
                    self.on_end(None)
                    return
        finally:
            self.exits = exits

    def _loop_fast(self) -> None:
        """The loop over the C fast path: Python runs only handlers, through
        the dispatcher's own forward/failure methods (one path, two speeds)."""
        fast = self.fast
        assert fast is not None
        ctx = fast.ctx
        c_step, view, read_access = fast.c_step_value, fast.view, fast.read_access
        unpack_local, LOCAL_AT = fast.unpack_local, kvm.LOCAL_AT
        run = self.fd.run
        dispatcher = self.dispatcher
        forward = dispatcher.forward
        error = dispatcher.registry.error
        index = self.index
        look_at_forward = dispatcher.look_at_forward
        reads, writes, local_failed = dispatcher.local_reads, dispatcher.local_writes, dispatcher.local_failed
        ACCESS, EXIT, ERRNO, PUT_ERROR, DRAIN, REFUSED, FORWARD_ERROR, LOCAL = (
            kvm.STEP_ACCESS, kvm.STEP_EXIT, kvm.STEP_ERRNO, kvm.STEP_PUT_ERROR, kvm.STEP_DRAIN, kvm.STEP_REFUSED,
            kvm.STEP_FORWARD_ERROR, kvm.STEP_LOCAL)
        put_attempts = 0
        out = 0         # the value of the access served last, handed to the next step
        try:
            while True:
                if self._attention:
                    # (cleared before the flags are read: a request made
                    # from now on is seen at the next turn)
                    self._attention = False
                    if self._stop:
                        return
                    if self._park_requested:
                        self.parked = True
                        self.on_end(None)
                        return
                    if self._pause:
                        fast.account(ctx)       # (the pause is no part of a pending access's time)
                        self._park()
                        continue
                rc = c_step(ctx, out)
                if rc == LOCAL:
                    # A model in this process: the call is all the Python
                    # an access costs (C counts it, puts its reference).
                    put_attempts = 0
                    bus, size, is_write, value, owner, cookie, offset = unpack_local(view, LOCAL_AT)
                    try:
                        if is_write:
                            writes[owner](SPACES[bus], cookie, offset, size, value)
                        else:
                            out = reads[owner](SPACES[bus], cookie, offset, size) & _MASK[size]
                    except Exception as e:
                        ctx.acct_failed = 1
                        out = local_failed(index, owner, size, is_write != 0, e)
                    continue
                if rc == PUT_ERROR:
                    # The access was served; its put failed.  The next step
                    # puts again, unless the reference is given up here.
                    # (It may be one C served: its value is the context's.)
                    out = ctx.value
                    put_attempts += 1
                    if not dispatcher.put_timed_out(index, ctx.slot, error(ctx.reg_error), put_attempts) \
                            or self._stop:
                        ctx.has_ref = 0
                        ctx.put_errors += 1
                    continue
                put_attempts = 0
                if rc == ACCESS:
                    bus, size, is_write, fresh, _, value, owner, cookie, offset = read_access(view)
                    if fresh:
                        # (the next access to it may go straight to its slot, in C)
                        look_at_forward(owner)
                    value = forward(index, bus, owner, cookie, offset, size, is_write != 0, value)
                    if not is_write:
                        out = value & _MASK[size]
                elif rc == FORWARD_ERROR:
                    bus, size, is_write, _, _, value, owner, cookie, offset = read_access(view)
                    value = dispatcher.forward_failed(index, bus, owner, cookie, offset, size, is_write != 0,
                                                      value, ctx.fwd_rc, ctx.fwd_aseq, ctx.fwd_slots,
                                                      ctx.fwd_gen)
                    if not is_write:
                        out = value & _MASK[size]
                elif rc == DRAIN:
                    dispatcher.drain(index)
                    continue
                elif rc == REFUSED:
                    windows = dispatcher.windows
                    if windows is not None:
                        windows.note_refused(ctx.bus, ctx.region_start, ctx.region_length, ctx.owner,
                                             ctx.cookie, ctx.slot, ctx.generation)
                    continue
                elif rc == ERRNO:
                    err = ctx.err
                    if err not in (errno.EINTR, errno.EAGAIN):
                        raise kvm.KvmError(f"KVM_RUN on vCPU {index}", err)
                    run.immediate_exit = 0
                    if self._check_halt and self._halted_for_good():
                        return
                    continue
                elif rc == EXIT:
                    if self._other_exit(run.exit_reason):
                        return
                else:
                    out = dispatcher.lookup_failed(index, ctx.bus, ctx.addr, ctx.size, bool(ctx.is_write),
                                                   error(ctx.reg_error))
        finally:
            if ctx.pending and not ctx.is_write:
                ctx.value = out
            fast.finish()
            self.exits = ctx.exits
            dispatcher.unclaimed += ctx.unclaimed
            if ctx.put_errors:
                log.error("vCPU %d: %d registry put(s) failed (last code %d)", index, ctx.put_errors,
                          ctx.reg_error)

    def _halted_for_good(self) -> bool:
        self._check_halt = False
        if self.fd.get_mp_state() != kvm.MP_STATE_HALTED:
            return False
        if self.fd.get_regs().rflags & (1 << 9):
            return False
        self._end(Ending.POWER_OFF, f"vCPU {self.index} halted with interrupts off")
        return True

    def _other_exit(self, reason: int) -> bool:
        """Handle a rare exit; True when this vCPU is done."""
        fd = self.fd
        name = kvm.exit_reason_name(reason)
        if reason == kvm.EXIT_INTR:
            return False
        if reason == kvm.EXIT_HLT:
            # Only without an in-kernel LAPIC; with it, HLT waits in KVM.
            regs = fd.get_regs()
            if self.index == 0 and not regs.rflags & (1 << 9):
                self._end(Ending.POWER_OFF, "vCPU 0 halted with interrupts off")
            return True
        if reason == kvm.EXIT_SHUTDOWN:
            self._end(Ending.RESET, "triple fault (KVM_EXIT_SHUTDOWN)", report.describe(fd, self.memory))
            return True
        if reason == kvm.EXIT_SYSTEM_EVENT:
            ev = fd.system_event
            kind = ev.type
            data = fd.system_event_data()
            if kind == kvm.SYSTEM_EVENT_SHUTDOWN:
                self._end(Ending.POWER_OFF, "shutdown system event")
            elif kind == kvm.SYSTEM_EVENT_RESET:
                self._end(Ending.RESET, "reset system event")
            elif kind == kvm.SYSTEM_EVENT_CRASH:
                self._end(Ending.RESET, f"crash system event {[hex(d) for d in data]}")
            else:
                self._end(Ending.KVM_FAILURE, f"system event {kind} {[hex(d) for d in data]}")
            return True
        if reason == kvm.EXIT_INTERNAL_ERROR:
            internal = fd.internal
            sub = internal.suberror
            data = [internal.data[i] for i in range(min(internal.ndata, 16))]
            insn = fd.emulation_insn_bytes() if sub == kvm.INTERNAL_ERROR_EMULATION else None
            detail = f"KVM internal error, {kvm.internal_error_name(sub)} (suberror {sub})"
            if sub == kvm.INTERNAL_ERROR_EMULATION:
                from vmm import emulate     # only here: a run that never needs it skips its import (issue 15)

                done, what = emulate.fallback(fd, self.memory, insn)
                if done:
                    return False
                detail += f" on {what}"
            if data and insn is None:
                detail += f", data {' '.join(hex(d) for d in data)}"
            self._end(Ending.KVM_FAILURE, detail, report.describe(fd, self.memory, insn))
            return True
        if reason == kvm.EXIT_FAIL_ENTRY:
            fe = fd.fail_entry
            self._end(Ending.KVM_FAILURE,
                      f"VM entry failed, hardware reason {fe.hardware_entry_failure_reason:#x} on host CPU {fe.cpu}",
                      report.describe(fd, self.memory))
            return True
        if reason == kvm.EXIT_UNKNOWN:
            self._end(Ending.KVM_FAILURE, f"unknown exit, hardware reason {fd.hw.hardware_exit_reason:#x}",
                      report.describe(fd, self.memory))
            return True
        self._end(Ending.KVM_FAILURE, f"unhandled exit {name} ({reason})", report.describe(fd, self.memory))
        return True

    def _end(self, ending: Ending, detail: str, text: str = "") -> None:
        self.on_end(Outcome(ending, detail, vcpu=self.index, report=text))
