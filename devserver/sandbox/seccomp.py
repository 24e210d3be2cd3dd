"""Layer 7, last: the seccomp allowlist, built with libseccomp and loaded
on every thread (TSYNC).  The program is built in a short-lived child of
the device and loaded by the device itself (:func:`compile_filters`), so
that libseccomp's work leaves no pages behind in the device.

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

import errno
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
        _load_bpf(compile_filters([(rules, lib.SCMP_ACT_LOG, True)])[0], True)
        return len(rules)
    fill_syscall_names()
    if mode == "trap":
        faulthandler.register(signal.SIGSYS, file=sys.stderr, all_threads=True, chain=False)
    _check(lib.sb_install_sigsys(report_sock, sys.stderr.fileno() if mode == "trap" else -1, SENTINEL),
           "sigaction(SIGSYS)")
    if mode == "kill":      # the handler must stay: no rt_sigaction on SIGSYS
        rules = tuple(r for r in rules if r.name != "rt_sigaction") + (
            Rule("rt_sigaction", (Arg(0, NE, signal.SIGSYS),)),)
    filters = [((Rule("exit_group", (Arg(0, EQ, SENTINEL),), kill=True),), lib.SCMP_ACT_ALLOW, False),
               (rules, lib.SCMP_ACT_TRAP, True)]
    for blob, (_, _, log) in zip(compile_filters(filters), filters, strict=True):
        _load_bpf(blob, log)
    return len(rules)


def compile_filters(filters: list[tuple[tuple[Rule, ...], int, bool]]) -> list[bytes]:
    """The BPF programs libseccomp makes of ``filters`` (rules, default
    action, log: as :func:`load_with_default` takes them), built in a
    short-lived child: building one allocates and frees ~0.5 MB in
    libseccomp and runs over every rule object, and in a device forked by
    the fork server each page that touches is a copy of the server's that
    the device would keep for good (issue 15 section 2: -0.5 MB a device).
    The child's copies go when it exits; what is loaded is the same
    program, made by the same code, as seccomp_load would load."""
    pipes = [os.pipe2(os.O_CLOEXEC) for _ in filters]
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            for r, _ in pipes:
                os.close(r)
            for (_, w), (rules, default, log) in zip(pipes, filters, strict=True):
                _with_filter(rules, default, log, w)
                os.close(w)
            code = 0
        except BaseException as e:
            try:
                os.write(2, f"device sandbox: building the seccomp filter failed: {e}\n".encode())
            except OSError:
                pass
        finally:
            os._exit(code)
    out = []
    try:
        for _, w in pipes:
            os.close(w)
        for r, _ in pipes:
            chunks = []
            while chunk := os.read(r, 65536):
                chunks.append(chunk)
            out.append(b"".join(chunks))
    finally:
        for r, _ in pipes:
            os.close(r)
        _, status = os.waitpid(pid, 0)
    if status != 0:
        raise SeccompError(f"building the filter failed (wait status {status:#x})")
    return out


def _load_bpf(prog: bytes, log: bool) -> None:
    """Load ``prog`` on every thread, with the flags seccomp_load would use
    for our attributes (TSYNC; LOG; no forced store-bypass mitigation where
    the kernel knows the flag)."""
    flags = lib.SECCOMP_FILTER_FLAG_TSYNC | (lib.SECCOMP_FILTER_FLAG_LOG if log else 0)
    rc = lib.sb_load_bpf(prog, len(prog), flags | lib.SECCOMP_FILTER_FLAG_SPEC_ALLOW)
    if rc == -1 and ffi.errno == errno.EINVAL:
        rc = lib.sb_load_bpf(prog, len(prog), flags)
    if rc > 0:
        raise SeccompError(errno.EBUSY, f"seccomp: thread {rc} could not be synchronised")
    _check(rc, "seccomp(SET_MODE_FILTER)")


def load_with_default(rules: tuple[Rule, ...], default: int, log: bool = False) -> int:
    """Load a filter of ``rules`` with the default action ``default`` (a
    libseccomp SCMP_ACT_* value) on every thread; returns len(rules)."""
    _with_filter(rules, default, log, -1)
    return len(rules)


def _with_filter(rules: tuple[Rule, ...], default: int, log: bool, export_fd: int) -> None:
    """Build the filter and load it (``export_fd`` -1) or write its BPF
    program to ``export_fd``."""
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
        if export_fd < 0:
            _check(lib.seccomp_load(ctx), "seccomp_load")
        else:
            _check(lib.seccomp_export_bpf(ctx, export_fd), "seccomp_export_bpf")
    finally:
        lib.seccomp_release(ctx)


def _check(rc: int, what: str) -> None:
    if rc < 0:      # libseccomp returns -errno; sigaction -1 with errno
        err = -rc if rc != -1 else ffi.errno
        raise SeccompError(err, f"{what}: {os.strerror(err)}")
