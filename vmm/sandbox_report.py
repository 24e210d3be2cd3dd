"""The VMM's view of a device process's sandbox: the layers the device
reported (``Ready.sandbox``), for ``query-devices`` and the run's closing
summary, and what killed it when it died of SIGSYS.

With ``seccomp=kill`` the device dies at once and cannot say anything;
the kernel logs every seccomp kill (an audit record, type 1326, with the
pid and the system call number; ``/proc/sys/kernel/seccomp/actions_logged``),
so the VMM reads the kernel log (``/dev/kmsg``) for the device's pids and
names the call: "device blk0 killed by seccomp: openat".  ``seccomp=trap``
and ``log`` ask the kernel to log too, and ``trap`` also writes its own
report (with the Python line) to the device's stderr.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import logging
import os
import re
import signal

log = logging.getLogger(__name__)

KMSG = "/dev/kmsg"
#: The audit record of a seccomp action (AUDIT_SECCOMP).
AUDIT_SECCOMP = 1326
#: Only records with ``sig=31`` (SIGSYS: a trap or a kill) tell a death:
#: the filters also log the calls they answer with an errno (clone3's
#: ENOSYS at every thread start, ``sig=0``), and a device that was
#: SIGKILLed from outside must not be reported as killed for one of those.
_RECORD = re.compile(rb"type=1326 .*? pid=(\d+) .*? sig=(\d+) .*? syscall=(\d+)")
_SIGSYS = str(int(signal.SIGSYS)).encode()
#: Most kernel-log records read when looking for a device's death.
MAX_RECORDS = 100_000


@dataclasses.dataclass
class DeviceSandbox:
    """What one device process reported about its sandbox."""

    #: The layers that are on (devserver.sandbox.LAYERS names; empty: none).
    layers: tuple[str, ...] = ()
    #: Host pids of the device's processes: the one the VMM started, and,
    #: when the device runs in a pid namespace of its own, that
    #: namespace's pid 1 and the device itself.
    pids: tuple[int, ...] = ()
    #: The device, when it runs in a pid namespace of its own as the
    #: grandchild of the process the VMM started (that process and pid 1
    #: of the namespace, its child, only reap it); else None.
    device_pid: int | None = None
    #: The system call the device reported dying of (its SIGSYS handler's
    #: Error message), if it did.
    killed_by: str | None = None

    @classmethod
    def from_ready(cls, pid: int, layers: tuple[str, ...], reported_pid: int) -> DeviceSandbox:
        """From Ready: the device's claim of its pid is believed only when
        that process is a grandchild of the one the VMM started."""
        kids = children(pid)
        grandkids = tuple(g for k in kids for g in children(k))
        device = reported_pid if reported_pid != pid and reported_pid in grandkids else None
        return cls(tuple(layers), (pid, *kids, *grandkids), device)

    def describe(self) -> str:
        return "sandbox " + " ".join(self.layers) if self.layers else "no sandbox"


def for_service(layers: tuple[str, ...], pid: int) -> DeviceSandbox:
    """The sandbox of a service's session device whose process (the
    kernel's word, SO_PASSCRED) is ``pid``: with the namespaces layer it is
    pid 1 of its own pid namespace, whose thread ids the lock word holds."""
    if pid <= 0:
        return DeviceSandbox(tuple(layers))
    in_ns = "namespaces" in layers
    return DeviceSandbox(tuple(layers), (pid,), pid if in_ns else None)


def seccomp_death(name: str, sandbox: DeviceSandbox) -> str | None:
    """The system call a device that died was killed for, when the
    kernel logged a seccomp kill of its process (a service's device is not
    this VMM's child: no exit status tells); logged once.  Call it only
    once the process is known to be dead."""
    if sandbox.killed_by is not None:
        return sandbox.killed_by
    if not sandbox.pids or "seccomp=kill" not in sandbox.layers:
        return None
    nr = seccomp_syscall(sandbox.pids)
    if nr is None:
        return None
    call = syscall_name(nr)
    sandbox.killed_by = call
    _log_once(name, sandbox, call)
    return call


def at_ready(name: str, peer, layers: tuple[str, ...], reported_pid: int):
    """(DeviceSandbox, peer) once device ``name`` is Ready: a child this
    VMM spawned (:class:`vmm.remote.process.DeviceProcess`) comes back as a
    :class:`SandboxedChild`, which knows the device in its pid namespace."""
    from vmm.remote.process import DeviceProcess

    if not isinstance(peer, DeviceProcess):
        return DeviceSandbox(tuple(layers)), peer
    sandbox = DeviceSandbox.from_ready(peer.pid, layers, reported_pid)
    return sandbox, SandboxedChild(name, peer, sandbox)


class SandboxedChild:
    """The :class:`vmm.remote.peer.Peer` of a spawned device in its own pid
    namespace: ``pid`` is the device's (the child only reaps it), ``kill``
    kills the device first (:func:`kill`), ``exit_text`` names the seccomp
    call a SIGSYS death came from."""

    def __init__(self, name: str, child, sandbox: DeviceSandbox):
        self._name = name
        self._child = child
        self.sandbox = sandbox
        self.pid = sandbox.device_pid or child.pid

    @property
    def exit_fd(self) -> int | None:
        return self._child.exit_fd

    @property
    def returncode(self) -> int | None:
        return self._child.returncode

    def kill(self) -> None:
        fd = self._child.exit_fd
        if fd is None or fd < 0 or not kill_device(self.sandbox, self._child.pid):
            self._child.kill()

    def wait(self, timeout: float) -> bool:
        return self._child.wait(timeout)

    def exit_text(self, wait: float) -> str:
        if not self._child.wait(wait):
            return "still running"
        return exit_text(self._name, self.sandbox, self._child.returncode)

    def close(self) -> None:
        self._child.close()


def kill_device(sandbox: DeviceSandbox, pid: int) -> bool:
    """SIGKILL a device in its own pid namespace, the grandchild of ``pid``
    (the process the VMM started), through a pidfd once it is seen to be
    still that grandchild; True if sent.  Its reapers (pid 1 of the
    namespace, then ``pid``) reap it and die the same way; killing a reaper
    first would lose the device's own status, or (``pid`` first) leave pid
    1 to an init that may never reap it (this machine's does not)."""
    if sandbox.device_pid is not None:
        try:
            fd = os.pidfd_open(sandbox.device_pid)
        except OSError:
            fd = -1         # gone already: the reaper is leaving too
        if fd >= 0:
            try:
                inner = _parent_of(sandbox.device_pid)
                if inner is not None and _parent_of(inner) == pid:
                    signal.pidfd_send_signal(fd, signal.SIGKILL)
                    return True
            except OSError:
                pass
            finally:
                os.close(fd)
    return False


def _parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def device_of_ns_tid(endpoints, tid: int):
    """The one endpoint among ``endpoints`` that runs in a pid namespace
    of its own and has a thread whose id there is ``tid`` (the registry
    lock word holds that id: the kernel's robust-futex protocol uses the
    holder's own namespace), or None when none or several have one (two
    devices' namespaces number threads alike: the VMM cannot tell)."""
    found = []
    for ep in endpoints:
        sandbox = getattr(ep, "sandbox", None)
        if not isinstance(sandbox, DeviceSandbox) or sandbox.device_pid is None:
            continue
        if tid in _ns_tids(sandbox.device_pid):
            found.append(ep)
    return found[0] if len(found) == 1 else None


def _ns_tids(pid: int) -> set[int]:
    out: set[int] = set()
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for t in tasks:
        try:
            with open(f"/proc/{pid}/task/{t}/status", "rb") as f:
                for line in f:
                    if line.startswith(b"NSpid:"):
                        out.add(int(line.split()[-1]))
                        break
        except (OSError, ValueError):
            pass
    return out


def children(pid: int) -> tuple[int, ...]:
    """The children of process ``pid`` (its device, under a pid namespace)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return tuple(int(x) for x in f.read().split())
    except (OSError, ValueError):
        return ()


def error_text(name: str, sandbox: DeviceSandbox, message: str) -> str:
    """The failure text of an Error message from a running device; the
    report of its seccomp SIGSYS handler gets the line "device NAME killed
    by seccomp: CALL" (the device may lie, but only about itself)."""
    if message.startswith(SECCOMP_PREFIX):
        call = message[len(SECCOMP_PREFIX):]
        if call.isidentifier() and len(call) <= 32:
            sandbox.killed_by = call
            _log_once(name, sandbox, call)
            return message
    return f"reported: {message}"


def _log_once(name: str, sandbox: DeviceSandbox, call: str) -> None:
    key = (name, sandbox.pids)
    if key not in _reported:
        _reported.add(key)
        log.error("device %s killed by seccomp: %s", name, call)


def exit_text(name: str, sandbox: DeviceSandbox, rc: int | None) -> str:
    """How a device process ended, for the VMM's error line."""
    if rc is None:
        return "still running"
    if rc >= 0:
        return f"exited with status {rc}"
    signo = -rc
    if signo != signal.SIGSYS:
        return f"killed by {signal.Signals(signo).name}"
    call = sandbox.killed_by
    if call is None:
        nr = seccomp_syscall(sandbox.pids)
        call = syscall_name(nr) if nr is not None else "a system call outside its allowlist (not in the kernel log)"
    _log_once(name, sandbox, call)
    return f"killed by seccomp: {call}"


def seccomp_syscall(pids: tuple[int, ...]) -> int | None:
    """The system call of the last seccomp record of one of ``pids`` in
    the kernel log, or None."""
    want = {str(p).encode() for p in pids}
    found = None
    try:
        fd = os.open(KMSG, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        log.debug("cannot read the kernel log: %s", e)
        return None
    try:
        for _ in range(MAX_RECORDS):
            try:
                record = os.read(fd, 8192)
            except BlockingIOError:
                break
            except OSError as e:        # EPIPE: overwritten while reading; go on
                if e.errno == 32:
                    continue
                break
            if not record:
                break
            nr = death_syscall(record, want)
            if nr is not None:
                found = nr
    finally:
        os.close(fd)
    return found


def death_syscall(record: bytes, pids: set[bytes]) -> int | None:
    """The system call of one kernel-log ``record`` if it is a seccomp
    trap or kill (SIGSYS) of one of ``pids`` (decimal, as bytes), other
    than the SIGSYS handler's sentinel exit_group; else None."""
    m = _RECORD.search(record)
    if m is None or m.group(1) not in pids or m.group(2) != _SIGSYS:
        return None
    nr = int(m.group(3))
    return None if nr == _EXIT_GROUP else nr


_libseccomp = None
#: Devices whose seccomp death was logged already (by name and pids).
_reported: set[tuple[str, tuple[int, ...]]] = set()
#: How a device's SIGSYS handler words its report (devserver/_sandbox.c).
SECCOMP_PREFIX = "killed by seccomp: "
#: exit_group: the sentinel call of that handler, killed by the filter.
_EXIT_GROUP = 231


def syscall_name(nr: int) -> str:
    """The name of x86-64 system call ``nr`` (libseccomp's table)."""
    global _libseccomp
    if _libseccomp is None:
        path = ctypes.util.find_library("seccomp") or "libseccomp.so.2"
        try:
            _libseccomp = ctypes.CDLL(path)
            _libseccomp.seccomp_syscall_resolve_num_arch.restype = ctypes.c_void_p
        except OSError:
            return f"system call {nr}"
    p = _libseccomp.seccomp_syscall_resolve_num_arch(0, nr)
    if not p:
        return f"system call {nr}"
    try:
        return ctypes.string_at(p).decode()
    finally:
        ctypes.CDLL(None).free(ctypes.c_void_p(p))
