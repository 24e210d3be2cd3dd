"""Layer 3: mount, pid, net, ipc, uts and cgroup namespaces, and an empty
read-only root.

The new network namespace has only a loopback that is down; the root
becomes a small tmpfs (``pivot_root``, the old root detached, the tmpfs
then remounted read-only, nosuid, nodev, noexec).  A new pid namespace
takes effect for children only, so the process forks: the child is pid 1
of the namespace and goes on as the device; the parent, the process the
VMM started, becomes a tiny reaper (:func:`reap`) that mirrors the
device's exit -- the same status, or death by the same signal -- so the
VMM's view of its child is the device's.  The device dies with the reaper
(``PR_SET_PDEATHSIG``), and the reaper leaves when the VMM is gone.
Thread ids in the namespace start at a base the runtime chooses per
device (``ns_last_pid``), so two devices' threads do not share ids: the
registry lock word holds the holder's id in its own namespace."""

from __future__ import annotations

import os
import select
import signal
import sys

from devserver.sandbox import _sys

FLAGS = (_sys.CLONE_NEWNS | _sys.CLONE_NEWPID | _sys.CLONE_NEWNET | _sys.CLONE_NEWIPC
         | _sys.CLONE_NEWUTS | _sys.CLONE_NEWCGROUP)
#: Where the new root is built (any directory that exists on every host;
#: the tmpfs is mounted over it in this process's own mount namespace).
BUILD_DIR = "/tmp"
#: How often the reaper looks at its parent.
PARENT_CHECK_MS = 500


def unshare() -> None:
    _sys.unshare(FLAGS)


def empty_root() -> None:
    _sys.mount("none", "/", None, _sys.MS_REC | _sys.MS_PRIVATE)
    _sys.mount("splitvmm-device", BUILD_DIR, "tmpfs", _sys.MS_NOSUID | _sys.MS_NODEV | _sys.MS_NOEXEC,
               "size=4k,nr_inodes=4,mode=0555")
    os.chdir(BUILD_DIR)
    _sys.pivot_root(".", ".")           # the old root is stacked under the new one ...
    _sys.umount2(".", _sys.MNT_DETACH)  # ... and detached
    os.chdir("/")
    _sys.mount("none", "/", None, _sys.MS_REMOUNT | _sys.MS_BIND | _sys.MS_RDONLY | _sys.MS_NOSUID
               | _sys.MS_NODEV | _sys.MS_NOEXEC)


def set_next_pid(base: int) -> None:
    """Make thread ids in this (new) pid namespace continue from ``base``
    (``ns_last_pid``; needs CAP_SYS_ADMIN over the namespace and /proc
    still there)."""
    fd = os.open("/proc/sys/kernel/ns_last_pid", os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, str(base).encode())
    finally:
        os.close(fd)


def fork_into_pid_namespace(on_reaper) -> int:
    """Fork; return in the child (pid 1 of the new namespace) with its pid
    as the host sees it.  The parent calls ``on_reaper(pidfd, pid)`` (its
    own lock-down), then :func:`reap`, and never returns."""
    sys.stdout.flush()
    sys.stderr.flush()
    r, w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        _sys.set_parent_death_signal(signal.SIGKILL)
        os.close(w)
        try:
            data = os.read(r, 32)
        finally:
            os.close(r)
        if not data:
            os._exit(1)     # the reaper died before telling
        return int(data)
    try:
        os.close(r)
        os.write(w, str(pid).encode())
        os.close(w)
        pidfd = os.pidfd_open(pid)
        on_reaper(pidfd, pid)
        reap(pid, pidfd)
    finally:
        os._exit(1)


def reap(pid: int, pidfd: int) -> None:
    """Wait for the device, then leave the way it left.  When the VMM goes
    away first, kill the device and leave (nothing else would reap it)."""
    parent = os.getppid()
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    while not poller.poll(PARENT_CHECK_MS):
        if os.getppid() != parent:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            os.waitpid(pid, 0)
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        mirror_signal(os.WTERMSIG(status))
    code = os.waitstatus_to_exitcode(status)
    if code == 128 + signal.SIGSYS:     # seccomp=trap in pid 1, which cannot die of its own signal
        mirror_signal(signal.SIGSYS)
    os._exit(code)


def mirror_signal(signo: int) -> None:
    if signo not in (signal.SIGKILL, signal.SIGSTOP):
        signal.signal(signo, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signo])
    os.kill(os.getpid(), signo)
