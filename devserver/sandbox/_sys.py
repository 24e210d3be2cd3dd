"""The system calls the sandbox makes that Python 3.11 has no wrapper for
(unshare, mount, pivot_root, capset, prctl, Landlock), one thin function
each over ``devserver._sandbox_c``; a failure raises :class:`OSError`.
The only module of the sandbox besides :mod:`.seccomp` that touches ``lib``."""

from __future__ import annotations

import os

from devserver._sandbox_c import ffi, lib

CLONE_NEWUSER = lib.CLONE_NEWUSER
CLONE_NEWNS = lib.CLONE_NEWNS
CLONE_NEWPID = lib.CLONE_NEWPID
CLONE_NEWNET = lib.CLONE_NEWNET
CLONE_NEWIPC = lib.CLONE_NEWIPC
CLONE_NEWUTS = lib.CLONE_NEWUTS
CLONE_NEWCGROUP = lib.CLONE_NEWCGROUP
CLONE_THREAD = lib.CLONE_THREAD
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = lib.MS_RDONLY, lib.MS_NOSUID, lib.MS_NODEV, lib.MS_NOEXEC
MS_REC, MS_PRIVATE, MS_REMOUNT, MS_BIND = lib.MS_REC, lib.MS_PRIVATE, lib.MS_REMOUNT, lib.MS_BIND
MNT_DETACH = lib.MNT_DETACH
CAP_LAST_CAP = lib.CAP_LAST_CAP


def _check(rc: int, what: str) -> int:
    if rc < 0:
        err = ffi.errno
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return rc


def unshare(flags: int) -> None:
    _check(lib.unshare(flags), "unshare")


def mount(source: str, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    _check(lib.mount(source.encode(), target.encode(), fstype.encode() if fstype else ffi.NULL, flags,
                     data.encode() if data else ffi.NULL), f"mount {target}")


def umount2(target: str, flags: int) -> None:
    _check(lib.umount2(target.encode(), flags), f"umount {target}")


def pivot_root(new_root: str, put_old: str) -> None:
    _check(lib.sb_pivot_root(new_root.encode(), put_old.encode()), "pivot_root")


def prctl(option: int, a2: int = 0, a3: int = 0, a4: int = 0, a5: int = 0) -> int:
    return _check(lib.prctl(option, a2, a3, a4, a5), f"prctl({option})")


def set_dumpable(on: bool) -> None:
    prctl(lib.PR_SET_DUMPABLE, int(on))


def set_no_new_privs() -> None:
    prctl(lib.PR_SET_NO_NEW_PRIVS, 1)


def set_parent_death_signal(signo: int) -> None:
    prctl(lib.PR_SET_PDEATHSIG, signo)


def drop_bounding(cap: int) -> None:
    if prctl(lib.PR_CAPBSET_READ, cap):
        prctl(lib.PR_CAPBSET_DROP, cap)


def clear_ambient() -> None:
    prctl(lib.PR_CAP_AMBIENT, lib.PR_CAP_AMBIENT_CLEAR_ALL)


def capset_zero() -> None:
    _check(lib.sb_capset_zero(), "capset")


def landlock_abi() -> int:
    """The kernel's Landlock ABI version; raises OSError without Landlock."""
    return _check(lib.sb_landlock_abi(), "landlock_create_ruleset")


def landlock_deny_all(abi: int) -> None:
    _check(lib.sb_landlock_deny_all(abi), "landlock")



def probe_userns() -> int:
    """0 if ``unshare(CLONE_NEWUSER)`` would succeed here, else the errno it
    would fail with (asked in a vfork-style child: no copy of this
    process); a negative errno when no such child can be made."""
    return int(lib.sb_probe_userns())
