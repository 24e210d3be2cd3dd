"""How the VMM reads a seccomp death out of the kernel log
(vmm.sandbox_report): only a trap or kill (SIGSYS) counts, never a call the
filter answered with an errno."""

from __future__ import annotations

from vmm.sandbox_report import death_syscall

HEAD = b'5,14380,10362781979,-;audit: type=1326 audit(1796127556.236:34688): auid=4294967295 uid=1900000468 '


def record(pid: int, sig: int, nr: int, code: str) -> bytes:
    return HEAD + (f'gid=1900000468 ses=4294967295 pid={pid} comm="python" exe="/usr/bin/python3.11" '
                   f'sig={sig} arch=c000003e syscall={nr} compat=0 ip=0x7f3bf75278d9 code={code}').encode()


def test_a_trap_of_the_device_names_its_call():
    assert death_syscall(record(482, 31, 257, "0x30000"), {b"482"}) == 257


def test_an_errno_answer_is_not_a_death():
    # clone3 answered ENOSYS at every thread start (glibc then uses clone):
    # logged, but the process lives on.  A device SIGKILLed from outside
    # after one was once reported "killed by seccomp: clone3".
    assert death_syscall(record(482, 0, 435, "0x50000"), {b"482"}) is None


def test_other_pids_and_the_sentinel_are_not_the_device_s_call():
    assert death_syscall(record(483, 31, 257, "0x30000"), {b"482"}) is None
    assert death_syscall(record(482, 31, 231, "0x80000000"), {b"482"}) is None
    assert death_syscall(b"6,1,2,-;some other line", {b"482"}) is None
