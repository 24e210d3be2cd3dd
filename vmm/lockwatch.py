"""What the VMM does when the registry lock is not free by its deadline.

DESIGN.md, "Rules for shared memory": a device that holds the registry lock
too long is a fault.  Every registry call a vCPU thread makes has a
deadline (``Registry.lock_timeout``, ``--lock-timeout``).  When it passes,
the thread calls :meth:`LockWatch.stalled`, which:

1. reads the holder's thread id from the lock word (the robust futex keeps
   it there; the pid a holder writes next to it is the holder's own claim
   and is not used) and finds the thread's process from
   ``/proc/<tid>/status`` (``Tgid``);
2. if that process is one of this VMM's device processes -- the ``pid`` of
   an endpoint that can be cut off (:class:`vmm.remote.RemoteEndpoint`) --
   cuts that device off: one error line, SIGKILL through the endpoint's
   pidfd (never a kill by number, so a pid the kernel has handed to
   someone else cannot be hit), the device marked failed and its regions
   reaped.  The kernel's robust-futex exit handling sets OWNER_DIED in the
   lock word and wakes a waiter; the next locker rebuilds the index from
   the slots (``ipc/_registry.c``) and everything goes on;
3. otherwise -- the word names no thread at all, a thread of the VMM
   itself, or a process that is none of our devices: a device wrote over
   the lock -- it kills nothing and logs an error naming the holder.  If
   the same holder is still there :data:`UNUSABLE_DEADLINES` deadlines
   after it was first seen, the lock is unusable and the VM ends
   (:attr:`~vmm.outcome.Ending.VMM_ERROR`, status 10) with an error that
   says so.

What the guest sees: an access whose lookup missed the deadline completes
as unclaimed (reads all ones, writes dropped), like any access to a failed
device.  An access whose handler ran but whose ``put`` missed the deadline
has been served; the put is retried once the holder is dealt with (at most
:data:`MAX_PUT_RETRIES` times; after that the reference is abandoned: its
slot stays counted, which is logged).

Why the VMM does not reinitialise the registry or force the lock open when
the holder is none of its devices: the registry is the only record of the
devices' regions, and device processes may be in the middle of changing
it; wiping it would silently take every device off the bus.  Forcing the
word to OWNER_DIED is safe only if the named thread provably holds
nothing, which the VMM cannot tell once devices run in their own pid
namespace (a tid it cannot see may be a live holder there).  A device that
scribbles over the lock can therefore end its own VM -- with a clear error,
never a hang or a crash of the VMM.  (It can also write a sibling device's
thread id into the word and have that device killed: every device of a VM
is that VM's, which DESIGN.md allows a scribbler to disrupt.)
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Callable, Mapping

from ipc import Registry, RegistryError
from vmm.endpoint import DeviceFailed, Endpoint
from vmm.outcome import Ending, Outcome

log = logging.getLogger(__name__)

#: Deadlines the same foreign holder may keep the lock before the VM ends.
UNUSABLE_DEADLINES = 3
#: How often a put that missed its deadline is retried before the
#: reference is abandoned.
MAX_PUT_RETRIES = 8
#: Longest wait for a killed device process to be gone.
EXIT_WAIT = 2.0


def thread_group(tid: int) -> int | None:
    """The process (thread-group) id of thread ``tid``, None when no such
    thread is visible."""
    try:
        with open(f"/proc/{tid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Tgid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


class LockWatch:
    """Deals with the holder of a registry lock that missed a deadline.

    ``endpoints``: owner id -> endpoint (the dispatcher's live mapping);
    ``fail``: marks an endpoint failed and reaps its regions;
    ``on_fatal``: ends the run (:meth:`vmm.machine.Machine.end`).
    Safe to call from many vCPU threads at once.
    """

    def __init__(self, registry: Registry, endpoints: Mapping[int, Endpoint],
                 fail: Callable[[Endpoint, Exception], None],
                 on_fatal: Callable[[Outcome], None] | None = None):
        self.registry = registry
        self.endpoints = endpoints
        self._fail = fail
        self.on_fatal = on_fatal
        self._lock = threading.Lock()
        #: Deadlines missed, in total.
        self.stalls = 0
        #: Device processes killed for holding the lock.
        self.kills = 0
        #: Set once the lock was found unusable (the run is ending).
        self.unusable: str | None = None
        self._foreign: tuple[int, float, float] | None = None   # tid, since, last seen

    @property
    def lock_timeout(self) -> float:
        return self.registry.lock_timeout

    def stalled(self, vcpu: int, what: str, put: bool = False) -> None:
        """A registry call of vCPU ``vcpu`` (``what``: for the log; ``put``:
        it was the put of an access already served, which the caller
        retries) missed its deadline: find the holder and deal with it (see
        the module docstring).  Returns once a killed holder is gone."""
        with self._lock:
            self.stalls += 1
            if self.unusable is not None:
                return
            try:
                tid = self.registry.holder()[1]
            except RegistryError:       # closed under us: the run is ending
                return
            if tid == 0:
                log.warning("vCPU %d: %s missed the registry lock deadline (%g s); the lock is free "
                            "again", vcpu, what, self.lock_timeout)
                self._foreign = None
                return
            from vmm import sandbox_report

            endpoint = sandbox_report.device_of_ns_tid(list(self.endpoints.values()), tid)
            pid = endpoint.pid if endpoint is not None else thread_group(tid)
            if endpoint is None:
                endpoint = self._device_of(pid) if pid is not None else None
            if endpoint is None:
                self._not_ours(vcpu, what, put, self._describe(tid, pid), tid)
            elif endpoint.failed is not None and endpoint.wait_exited(0):
                # Killed already and gone (a zombie not yet reaped): its
                # death did not free the word, so the word was written over.
                self._not_ours(vcpu, what, put, f"thread {tid} of device {endpoint.name} "
                               f"(pid {pid}), which is dead", tid)
            else:
                self._foreign = None
                self._kill(vcpu, what, endpoint, tid)

    def _device_of(self, pid: int) -> Endpoint | None:
        """The endpoint whose device process is ``pid``, if any."""
        if pid == os.getpid():
            return None
        for endpoint in list(self.endpoints.values()):
            if getattr(endpoint, "pid", None) == pid and callable(getattr(endpoint, "cut_off", None)):
                return endpoint
        return None

    def _kill(self, vcpu: int, what: str, endpoint, tid: int) -> None:
        reason = (f"held the registry lock for more than {self.lock_timeout:g} s "
                  f"(thread {tid}); killed")
        log.error("vCPU %d: %s missed the registry lock deadline (%g s): the lock is held by "
                  "thread %d of device %s (pid %d); killing the device", vcpu, what,
                  self.lock_timeout, tid, endpoint.name, endpoint.pid)
        if endpoint.failed is None:
            self.kills += 1
        endpoint.cut_off(reason)
        if not endpoint.wait_exited(EXIT_WAIT):
            log.error("device %s (pid %d) still runs %g s after SIGKILL", endpoint.name,
                      endpoint.pid, EXIT_WAIT)
        if endpoint.failed is None:
            return      # it is being restarted (vmm.remote): its regions stay
        # The kernel has marked the lock OWNER_DIED by now: reaping the
        # regions is the first locker, and rebuilds the registry.
        self._fail(endpoint, DeviceFailed(f"device {endpoint.name}: {reason}"))

    @staticmethod
    def _describe(tid: int, pid: int | None) -> str:
        if pid is None:
            return f"thread {tid}, which does not exist"
        if pid == os.getpid():
            return f"thread {tid} of the VMM itself"
        return f"thread {tid} of pid {pid}, which is none of this VM's devices"

    def _not_ours(self, vcpu: int, what: str, put: bool, who: str, tid: int) -> None:
        now = time.monotonic()
        held = self._foreign
        if held is None or held[0] != tid or now - held[2] > 2 * self.lock_timeout + 1.0:
            # First sight of this holder: it has held the lock for at least
            # the deadline that just passed.
            held = (tid, now - self.lock_timeout, now)
        else:
            held = (tid, held[1], now)
        self._foreign = held
        for_s = now - held[1]
        log.error("vCPU %d: %s missed the registry lock deadline (%g s): the lock word names %s "
                  "(held for %.1f s so far); nothing is killed, %s", vcpu, what, self.lock_timeout,
                  who, for_s, "the put is tried again" if put else "the access completes as unclaimed")
        if for_s >= UNUSABLE_DEADLINES * self.lock_timeout - 1e-3:
            self.unusable = (f"the registry lock is unusable: held for {for_s:.1f} s by {who}; "
                             f"no device of this VM holds it (a device wrote over it?)")
            log.error("%s; ending the VM", self.unusable)
            if self.on_fatal is not None:
                self.on_fatal(Outcome(Ending.VMM_ERROR, self.unusable, vcpu=vcpu))
