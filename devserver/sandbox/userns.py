"""Layer 2: a user namespace whose root is an unprivileged host uid of the
device's own.

Started as root, the process first switches to a dedicated uid and gid
(:func:`device_uid`: a base plus its pid, so no two live devices share one),
losing every capability in the host's namespace, then unshares a user
namespace and maps its root to that uid (one line, ``setgroups`` denied):
root inside, with capabilities only over the namespaces it creates next;
nobody outside.  Started as another user, root inside maps to that user.
``unshare(CLONE_NEWUSER)`` fails once a thread exists, so this runs before
the first thread."""

from __future__ import annotations

import os

from devserver.sandbox import _sys

#: Host uids (and gids) of device processes started as root: base + pid.
DEVICE_UID_BASE = 1_900_000_000


def device_uid(pid: int) -> int:
    return DEVICE_UID_BASE + pid


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def apply() -> int:
    """Enter the namespace; returns the host uid its root maps to."""
    uid = os.geteuid()
    gid = os.getegid()
    if uid == 0:
        _probe()        # before giving root up: a refusal must leave the other layers possible
        uid = gid = device_uid(os.getpid())
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
        _sys.set_dumpable(True)     # a uid change cleared it; /proc/self/*_map need it (fds.py clears it again)
    _sys.unshare(_sys.CLONE_NEWUSER)
    _write("/proc/self/setgroups", "deny")
    _write("/proc/self/uid_map", f"0 {uid} 1")
    _write("/proc/self/gid_map", f"0 {gid} 1")
    return uid


def _probe() -> None:
    """Raise the OSError ``unshare(CLONE_NEWUSER)`` would raise here (a
    child process tries, so this one stays as it is).  The child is made
    in C (``_sys.probe_userns``: it shares this process's memory and is
    waited for at once, ~0.2 ms); only if that child cannot be made, a
    forked one (a copy of this interpreter, ~3 ms plus its scheduling)."""
    err = _sys.probe_userns()
    if err > 0:
        raise OSError(err, f"unshare: {os.strerror(err)}")
    if err == 0:
        return
    pid = os.fork()
    if pid == 0:
        try:
            _sys.unshare(_sys.CLONE_NEWUSER)
        except OSError as e:
            os._exit(min(e.errno or 1, 255))
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    err = os.waitstatus_to_exitcode(status)
    if err:
        raise OSError(err, f"unshare: {os.strerror(err)}")


def switch_uid() -> int:
    """Without a user namespace (the fallback ``sandbox=auto`` takes when
    the host refuses one): a plain switch to the dedicated uid, made after
    the other namespaces, which still need root's capabilities."""
    from devserver.sandbox import caps

    caps.drop_bounding()    # while this process still may (CAP_SETPCAP)
    uid = device_uid(os.getpid())
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    return uid
