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
_RECORD = re.compile(rb"type=1326 .*? pid=(\d+) .*? syscall=(\d+)")
#: Most kernel-log records read when looking for a device's death.
MAX_RECORDS = 100_000


@dataclasses.dataclass(frozen=True)
class DeviceSandbox:
    """What one device process reported about its sandbox."""

    #: The layers that are on (devserver.sandbox.LAYERS names; empty: none).
    layers: tuple[str, ...] = ()
    #: Host pids of the device's processes: the one the VMM started, and
    #: the device itself when it runs in a pid namespace of its own.
    pids: tuple[int, ...] = ()

    @classmethod
    def at_ready(cls, pid: int, layers: tuple[str, ...]) -> DeviceSandbox:
        return cls(tuple(layers), (pid, *children(pid)))

    def describe(self) -> str:
        return "sandbox " + " ".join(self.layers) if self.layers else "no sandbox"


def children(pid: int) -> tuple[int, ...]:
    """The children of process ``pid`` (its device, under a pid namespace)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return tuple(int(x) for x in f.read().split())
    except (OSError, ValueError):
        return ()


def exit_text(name: str, sandbox: DeviceSandbox, rc: int | None) -> str:
    """How a device process ended, for the VMM's error line."""
    if rc is None:
        return "still running"
    if rc >= 0:
        return f"exited with status {rc}"
    signo = -rc
    if signo != signal.SIGSYS:
        return f"killed by {signal.Signals(signo).name}"
    nr = seccomp_syscall(sandbox.pids)
    call = syscall_name(nr) if nr is not None else "a system call outside its allowlist (not in the kernel log)"
    log.error("device %s killed by seccomp: %s", name, call)
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
            m = _RECORD.search(record)
            if m and m.group(1) in want:
                found = int(m.group(2))
    finally:
        os.close(fd)
    return found


_libseccomp = None


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
