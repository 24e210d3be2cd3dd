"""Layer 3: mount, pid, net, ipc, uts and cgroup namespaces, and an empty
read-only root.

The new network namespace has only a loopback that is down; the root
becomes a small tmpfs (``pivot_root``, the old root detached, the tmpfs
then remounted read-only, nosuid, nodev, noexec).  A new pid namespace
takes effect for children only, so the process forks twice: its child is
pid 1 of the namespace, a tiny reaper (:func:`reap_inside`) that moves the
namespace's next pid to the device's own range (``ns_last_pid``) and forks
the device proper; the parent, the process the VMM started, is the outer
reaper (:func:`reap`).  Each mirrors the device's exit -- the same status,
or death by the same signal (pid 1 passes the device's wait status out on
a pipe, since it cannot die of its own signal) -- so the VMM's view of its
child is the device's.  The device dies with pid 1 (the kernel kills a
namespace whose init is gone), pid 1 with the outer reaper
(``PR_SET_PDEATHSIG``), and the outer reaper leaves when the VMM is gone.

Why not run the device as pid 1: the registry lock word holds the holder's
thread id in the holder's own namespace, and pid 1 is the first thread of
every namespace, so a lock held by two devices' main threads would read
the same.  With the device forked into its range, every thread of every
device -- the first one too -- has an id of its own device's range
(:func:`tid_base`), which the VMM maps back through ``/proc/*/status``
``NSpid`` (vmm.sandbox_report); the only pid 1 is a reaper that never
takes the lock.

The reapers are not interpreters: right after its fork each closes its
other descriptors and drops its capabilities, then execs
:data:`PROGRAM` (``devserver/_reaper.c``, a static program that loads its
own small seccomp allowlist before it reads anything).  A forked
interpreter kept a copy of every page the device wrote after the fork
(~4.5 MB of Pss per reaper, two per device); the program holds ~0.1 MB.
It is exec'd through a descriptor opened before the sandbox began
(:func:`open_program`): by then the process has another uid, and the
device may have pivoted to its empty root already."""

from __future__ import annotations

import os
import signal
import sys
from typing import Callable, NoReturn

from devserver.sandbox import _sys

FLAGS = (_sys.CLONE_NEWNS | _sys.CLONE_NEWPID | _sys.CLONE_NEWNET | _sys.CLONE_NEWIPC
         | _sys.CLONE_NEWUTS | _sys.CLONE_NEWCGROUP)
#: Where the new root is built (any directory that exists on every host;
#: the tmpfs is mounted over it in this process's own mount namespace).
BUILD_DIR = "/tmp"
#: The reapers' program (``devserver/_reaper.c``; ``pip install`` links
#: it, static, next to its source), and its name in ``ps``.
PROGRAM = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "_reaper")
PROGRAM_NAME = "splitvmm-reaper"


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


#: Thread ids each device's namespace gives out before running into the
#: next device's range (a device with more threads than this, or one that
#: keeps starting and ending threads, eventually shares ids with another
#: device: the VMM then cannot tell them apart, and says so).
TID_RANGE = 1000


def tid_base(owner: int, pid_max: int | None = None) -> int:
    """The first thread id in the pid namespace of device ``owner``: its
    main thread's; its other threads follow.  Ranges of :data:`TID_RANGE`
    ids from TID_RANGE up (ids below it, pid 1 among them, are the
    reaper's), as many as the namespace's ``pid_max`` allows; owners
    beyond that share ranges."""
    if pid_max is None:
        pid_max = read_pid_max()
    ranges = max(1, pid_max // TID_RANGE - 1)
    return TID_RANGE * (1 + (owner - 1) % ranges)


def read_pid_max() -> int:
    try:
        with open("/proc/sys/kernel/pid_max", "rb") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 32768


def set_next_pid(base: int) -> None:
    """Make the next pid (or thread id) this (new) pid namespace gives out
    ``base`` (``ns_last_pid`` = base - 1; needs CAP_SYS_ADMIN over the
    namespace and /proc still there)."""
    fd = os.open("/proc/sys/kernel/ns_last_pid", os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, str(base - 1).encode())
    finally:
        os.close(fd)


def open_program() -> int:
    """An ``O_PATH`` descriptor of :data:`PROGRAM` (close-on-exec), to exec
    the reapers through once the process has another uid and, at any
    moment, an empty root; raises OSError when it is not there (the
    package was not built: ``pip install``)."""
    return os.open(PROGRAM, os.O_PATH | os.O_CLOEXEC)


def fork_into_pid_namespace(lock_down: Callable[[set[int]], None], tid_base: int = 0, *, program: int,
                            parent: int | None = None, parent_death: bool = False,
                            forward: bool = False) -> int:
    """Fork twice (module docstring); return in the device (the child of
    pid 1 of the new namespace, at ``tid_base`` when not 0) with its pid
    as the host sees it.  The outer parent and pid 1 each call
    ``lock_down(keep)`` (their descriptors to keep: stderr, the pipe's
    end, pid 1's pidfd, ``program``) and exec :data:`PROGRAM` through
    ``program`` (:func:`reap`, :func:`reap_inside`); neither returns.

    ``parent``: the pid of the process that started this one, as it was
    before the sandbox began (default: now); the outer reaper leaves when
    its parent is no longer that one.  It must be taken early: a parent
    that dies while the layers are applied -- before :func:`reap` looks --
    would otherwise leave a reaper that waits for a parent it has already
    lost, and a device nobody stops.  ``parent_death``: that parent is
    single-threaded (a service's listener), so the outer reaper also gets
    PR_SET_PDEATHSIG again (the uid switch of the userns layer cleared
    it) and dies with it at once, not at its next look.  ``forward``:
    each reaper passes SIGTERM on, towards the device (a service's
    session); it stays blocked from before the forks until the reapers
    handle it, so one sent meanwhile is passed on too."""
    if parent is None:
        parent = os.getppid()
    sys.stdout.flush()
    sys.stderr.flush()
    if forward:
        signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM])
    r, w = os.pipe2(os.O_CLOEXEC)       # the device's wait status, from pid 1 to the outer reaper
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            _sys.set_parent_death_signal(signal.SIGKILL)
            if tid_base:
                set_next_pid(tid_base)
            device = os.fork()
            if device == 0:
                os.close(w)
                _sys.set_parent_death_signal(signal.SIGKILL)
                if forward:
                    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGTERM])
                return int(os.readlink("/proc/self"))   # the host's /proc: the host's pid
            lock_down({2, w, program})
            reap_inside(device, w, program=program, forward=forward)
        except BaseException as e:      # pid 1 must never return into the device's code
            try:
                os.write(2, f"device sandbox: pid 1 of the namespace failed: {e}\n".encode())
            except OSError:
                pass
        os._exit(1)
    try:
        os.close(w)
        if parent_death:
            _sys.set_parent_death_signal(signal.SIGKILL)
        pidfd = os.pidfd_open(pid)
        lock_down({2, pidfd, r, program})
        reap(pid, pidfd, r, parent, program=program, forward=forward)
    finally:
        os._exit(1)


def reap_inside(device: int, status_fd: int, *, program: int = -1, forward: bool = False) -> NoReturn:
    """Become pid 1's reaper (exec :data:`PROGRAM`): wait for the device
    (reaping any other process that ends here meanwhile), hand its wait
    status to the outer reaper on ``status_fd``, leave.  ``program``: its
    descriptor (default: opened now); ``forward``: pass SIGTERM on to the
    device."""
    _exec(program, ("inner", device, status_fd, int(forward)), (status_fd,), forward)


def reap(pid: int, pidfd: int, status_fd: int = -1, parent: int | None = None, *, program: int = -1,
         forward: bool = False) -> NoReturn:
    """Become the outer reaper (exec :data:`PROGRAM`): wait for pid 1 of
    the namespace, then leave the way the device left (the wait status
    pid 1 passed on ``status_fd``; pid 1's own when it passed none: it was
    killed).  When the parent (``parent``, default the one now) goes away
    first, kill pid 1 -- and so the namespace -- and leave (nothing else
    would reap it).  ``forward``: pass SIGTERM on to pid 1."""
    if parent is None:
        parent = os.getppid()
    _exec(program, ("outer", pid, pidfd, status_fd, parent, int(forward)), (pidfd, status_fd), forward)


def _exec(program: int, args: tuple, inherit: tuple[int, ...], forward: bool) -> NoReturn:
    """Exec the reaper program with ``args``, ``inherit`` surviving the
    exec; never returns (exits 1 with a line on stderr when it cannot)."""
    try:
        if program < 0:
            program = open_program()
        for fd in inherit:
            if fd >= 0:
                os.set_inheritable(fd, True)
        if forward:
            signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM])
        # Kept through the exec: without it a root (inside its user
        # namespace) would regain capabilities there, and lose its
        # parent-death signal with them.
        _sys.set_no_new_privs()
        os.execve(program, [PROGRAM_NAME, *map(str, args)], {})
    except BaseException as e:
        try:
            os.write(2, f"device sandbox: cannot exec the reaper {PROGRAM}: {e}\n".encode())
        except OSError:
            pass
    os._exit(1)
