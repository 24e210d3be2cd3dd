"""Layer 7, last: the seccomp allowlist, built with libseccomp and loaded
on every thread (TSYNC).

``seccomp=kill`` (default): a call outside the list kills the process
(SECCOMP_RET_KILL_PROCESS; the kernel logs it, which is where the VMM
finds the call's name, :mod:`vmm.sandbox_report`).  ``trap``: SIGSYS; the
handler writes the call's name and every thread's Python stack to stderr
(the line that made it is on top of the current thread), then the
process dies of SIGSYS.  ``log``: allowed, and logged by the kernel, for
writing a policy."""

from __future__ import annotations

import faulthandler
import os
import signal
import sys

from devserver._sandbox_c import ffi, lib
from devserver.sandbox.policy import EQ, GE, GT, LE, LT, MASKED_EQ, NE, Rule

MODES = ("kill", "trap", "log")
_OPS = {NE: lib.SCMP_CMP_NE, LT: lib.SCMP_CMP_LT, LE: lib.SCMP_CMP_LE, EQ: lib.SCMP_CMP_EQ,
        GE: lib.SCMP_CMP_GE, GT: lib.SCMP_CMP_GT, MASKED_EQ: lib.SCMP_CMP_MASKED_EQ}


class SeccompError(OSError):
    pass


def syscall_number(name: str) -> int:
    nr = lib.seccomp_syscall_resolve_name(name.encode())
    if nr == lib.__NR_SCMP_ERROR:
        raise SeccompError(f"unknown system call {name!r}")
    return nr


def syscall_name(nr: int) -> str:
    """The name of system call ``nr`` on this architecture (or ``nr``)."""
    p = lib.seccomp_syscall_resolve_num_arch(0, nr)    # 0: SCMP_ARCH_NATIVE
    if p == ffi.NULL:
        return str(nr)
    try:
        return ffi.string(p).decode()
    finally:
        lib.free(p)


def _default_action(mode: str) -> int:
    return {"kill": lib.SCMP_ACT_KILL_PROCESS, "trap": lib.SCMP_ACT_TRAP, "log": lib.SCMP_ACT_LOG}[mode]


def load(rules: tuple[Rule, ...], mode: str = "kill") -> int:
    """Build and load the filter; returns the number of rules."""
    if mode not in MODES:
        raise ValueError(f"seccomp={mode!r} (expected kill, trap or log)")
    if mode == "trap":
        faulthandler.register(signal.SIGSYS, file=sys.stderr, all_threads=True, chain=False)
        _check(lib.sb_install_sigsys(sys.stderr.fileno()), "sigaction")
    ctx = lib.seccomp_init(_default_action(mode))
    if ctx == ffi.NULL:
        raise SeccompError("seccomp_init failed")
    try:
        _check(lib.seccomp_attr_set(ctx, lib.SCMP_FLTATR_CTL_TSYNC, 1), "TSYNC")
        if mode != "kill":      # kills are always logged; traps and logs on request
            _check(lib.seccomp_attr_set(ctx, lib.SCMP_FLTATR_CTL_LOG, 1), "log")
        for rule in rules:
            action = lib.SCMP_ACT_ALLOW if rule.errno is None else lib.sb_act_errno(rule.errno)
            args = ffi.new("struct scmp_arg_cmp[]", len(rule.args) or 1)
            for i, a in enumerate(rule.args):
                args[i].arg = a.index
                args[i].op = _OPS[a.op]
                args[i].datum_a = a.value
                args[i].datum_b = a.match
            _check(lib.seccomp_rule_add_array(ctx, action, syscall_number(rule.name), len(rule.args), args),
                   f"rule {rule}")
        _check(lib.seccomp_load(ctx), "seccomp_load")
    finally:
        lib.seccomp_release(ctx)
    return len(rules)


def _check(rc: int, what: str) -> None:
    if rc < 0:      # libseccomp returns -errno
        raise SeccompError(-rc, f"{what}: {os.strerror(-rc)}")
