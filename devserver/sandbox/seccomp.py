"""Layer 7, last: the seccomp allowlist, built with libseccomp and loaded
on every thread (TSYNC).

``seccomp=kill`` (default): a call outside the list kills the process.
To still name the call, the filter traps it (SECCOMP_RET_TRAP) and a
small SIGSYS handler in C (``_sandbox.c``) sends the VMM an Error message
"killed by seccomp: NAME" on the control socket, then makes a sentinel
call that a second filter answers with SECCOMP_RET_KILL_PROCESS: the
process dies of SIGSYS, and cannot replace that handler (``rt_sigaction``
on SIGSYS is not allowed).  ``trap``: the same, and first the handler
writes the call's name and every thread's Python stack to stderr (the line
that made it is on top of the current thread); ``rt_sigaction`` stays
allowed there (interpreter exit restores faulthandler's handlers).
``log``: calls outside the list are allowed and logged by the kernel, for
writing a policy.  Traps and logs also go to the kernel log (audit
records, rate-limited), which the VMM reads when nothing else said why."""

from __future__ import annotations

import faulthandler
import os
import signal
import sys

from devserver._sandbox_c import ffi, lib
from devserver.sandbox.policy import EQ, GE, GT, LE, LT, MASKED_EQ, NE, Arg, Rule

MODES = ("kill", "trap", "log")
_OPS = {NE: lib.SCMP_CMP_NE, LT: lib.SCMP_CMP_LT, LE: lib.SCMP_CMP_LE, EQ: lib.SCMP_CMP_EQ,
        GE: lib.SCMP_CMP_GE, GT: lib.SCMP_CMP_GT, MASKED_EQ: lib.SCMP_CMP_MASKED_EQ}
#: exit_group's status when the SIGSYS handler asks to be killed.
SENTINEL = 0x5EC_C0DE


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


_names_filled = False


def fill_syscall_names() -> None:
    """The SIGSYS handler's table of call names (it cannot allocate), once
    per interpreter: a device forked by the fork server has the server's
    (the preload layer fills it) instead of rebuilding it, 512 lookups
    whose objects would copy pages of the server's heap."""
    global _names_filled
    if _names_filled:
        return
    for nr in range(lib.SB_MAX_SYSCALL):
        name = syscall_name(nr)
        if name != str(nr):
            lib.sb_set_syscall_name(nr, name.encode()[:lib.SB_NAME_LEN - 1])
    _names_filled = True


def load(rules: tuple[Rule, ...], mode: str = "kill", report_sock: int = -1) -> int:
    """Build and load the filter for ``mode``; ``report_sock``: where the
    SIGSYS handler sends its Error message (the control socket; -1: none).
    Returns the number of rules."""
    if mode not in MODES:
        raise ValueError(f"seccomp={mode!r} (expected kill, trap or log)")
    if mode == "log":
        return load_with_default(rules, lib.SCMP_ACT_LOG, log=True)
    fill_syscall_names()
    if mode == "trap":
        faulthandler.register(signal.SIGSYS, file=sys.stderr, all_threads=True, chain=False)
    _check(lib.sb_install_sigsys(report_sock, sys.stderr.fileno() if mode == "trap" else -1, SENTINEL),
           "sigaction(SIGSYS)")
    if mode == "kill":      # the handler must stay: no rt_sigaction on SIGSYS
        rules = tuple(r for r in rules if r.name != "rt_sigaction") + (
            Rule("rt_sigaction", (Arg(0, NE, signal.SIGSYS),)),)
    load_with_default((Rule("exit_group", (Arg(0, EQ, SENTINEL),), kill=True),), lib.SCMP_ACT_ALLOW)
    return load_with_default(rules, lib.SCMP_ACT_TRAP, log=True)


def load_with_default(rules: tuple[Rule, ...], default: int, log: bool = False) -> int:
    """Load a filter of ``rules`` with the default action ``default`` (a
    libseccomp SCMP_ACT_* value) on every thread; returns len(rules)."""
    ctx = lib.seccomp_init(default)
    if ctx == ffi.NULL:
        raise SeccompError("seccomp_init failed")
    try:
        _check(lib.seccomp_attr_set(ctx, lib.SCMP_FLTATR_CTL_TSYNC, 1), "TSYNC")
        # No forced speculative-store-bypass mitigation (the kernel's default
        # for a process with a filter, costly on hosts that have it): the
        # device holds the guest's memory already, there is nothing of its
        # own to hide from itself.  (As container runtimes do; best effort.)
        lib.seccomp_attr_set(ctx, lib.SCMP_FLTATR_CTL_SSB, 1)
        if log:
            _check(lib.seccomp_attr_set(ctx, lib.SCMP_FLTATR_CTL_LOG, 1), "log")
        for rule in rules:
            if rule.kill:
                action = lib.SCMP_ACT_KILL_PROCESS
            else:
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
    if rc < 0:      # libseccomp returns -errno; sigaction -1 with errno
        err = -rc if rc != -1 else ffi.errno
        raise SeccompError(err, f"{what}: {os.strerror(err)}")
