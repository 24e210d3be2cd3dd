"""seccomp.compile_filters: the filter built in a short-lived child (so a
forked device keeps none of libseccomp's pages) is the program libseccomp
itself would load, and loaded through sb_load_bpf it is enforced (real
processes; the full device path is tests/devserver/test_sandbox.py's)."""

from __future__ import annotations

import errno
import os

from devserver._sandbox_c import lib
from devserver.sandbox import seccomp
from devserver.sandbox.policy import common, Rule


def exported_here(rules, default, log) -> bytes:
    r, w = os.pipe()
    try:
        seccomp._with_filter(rules, default, log, w)
        os.close(w)
        w = -1
        data = b""
        while chunk := os.read(r, 65536):
            data += chunk
        return data
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


def test_the_childs_program_is_libseccomps_own():
    rules = common.rules(os.getpid())
    filters = [((Rule("exit_group", kill=True),), lib.SCMP_ACT_ALLOW, False), (rules, lib.SCMP_ACT_TRAP, True)]
    progs = seccomp.compile_filters(filters)
    assert len(progs) == 2
    for prog, f in zip(progs, filters, strict=True):
        assert prog and len(prog) % 8 == 0
        assert prog == exported_here(*f)


def test_a_compiled_filter_is_enforced_once_loaded():
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            r, w = os.pipe()
            prog, = seccomp.compile_filters([((Rule("dup2", errno=errno.EPERM),), lib.SCMP_ACT_ALLOW, False)])
            os.close(os.dup2(r, 100))           # allowed before
            code = 2
            seccomp._load_bpf(prog, False)
            code = 3
            try:
                os.dup2(r, 101)
            except PermissionError:
                code = 0
        except BaseException as e:
            os.write(2, f"{e!r}\n".encode())
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, status


def test_a_failing_build_is_one_clear_error():
    try:
        seccomp.compile_filters([((Rule("no_such_call"),), lib.SCMP_ACT_ALLOW, False)])
    except seccomp.SeccompError as e:
        assert "building the filter failed" in str(e)
    else:
        raise AssertionError("an unknown call built a filter")
