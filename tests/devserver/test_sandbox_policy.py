"""One test per seccomp rule, Firecracker-style: the call with allowed
arguments runs, the same call with a forbidden argument is stopped (the
process dies of SIGSYS, or gets the errno the rule answers).  Each case
is a fresh process that loads a kind's allowlist
(devserver.sandbox.policy) and makes one call (seccomp_probe.py)."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys

import pytest

from devices.base import Device
from devserver.sandbox.policy import KIND_MODULES, kind_rules
from devserver.sandbox.policy import common

PROBE = os.path.join(os.path.dirname(__file__), "seccomp_probe.py")
RAN = "ran"
KILLED = "killed"


def probe(kind: str, case: str) -> str | int:
    """RAN, KILLED, or the errno the call failed with."""
    p = subprocess.run([sys.executable, PROBE, kind, case], capture_output=True, timeout=60)
    if p.returncode == 0:
        return RAN
    if p.returncode == -signal.SIGSYS:
        return KILLED
    assert p.returncode == 3, f"probe {kind} {case}: status {p.returncode}: {p.stderr.decode()[-2000:]}"
    return int(p.stdout)


# (allowed case, forbidden case, what stops the forbidden one)
COMMON_PAIRS = [
    ("mmap_rw", "mmap_exec", KILLED),                   # mmap without PROT_EXEC
    ("mprotect_ro", "mprotect_exec", KILLED),           # mprotect without PROT_EXEC
    ("madvise_dontneed", "madvise_hugepage", KILLED),   # madvise: the allocator's advice only
    ("thread", "fork", KILLED),                         # clone only with CLONE_THREAD
    ("kill_self", "kill_parent", KILLED),               # signals to itself only
    ("tgkill_self", "kill_parent", KILLED),
    ("fstat", "stat_path", KILLED),                     # newfstatat only with AT_EMPTY_PATH
    ("getrlimit", "setrlimit", KILLED),                 # prlimit64 without a new limit
    ("ioctl_fionbio", "ioctl_tiocsti", KILLED),         # ioctl: FIONBIO/FIOCLEX
]


@pytest.mark.parametrize("allowed, forbidden, stopped", COMMON_PAIRS,
                         ids=[p[0] + "-vs-" + p[1] for p in COMMON_PAIRS])
def test_common_rule_allows_its_arguments_and_denies_the_others(allowed, forbidden, stopped):
    assert probe("echo", allowed) == RAN
    assert probe("echo", forbidden) == stopped


@pytest.mark.parametrize("case, answer", [
    ("open", errno.EACCES), ("socket", errno.EACCES), ("clone3", errno.ENOSYS), ("ioctl_tcgets", errno.ENOTTY),
])
def test_calls_answered_with_an_errno(case, answer):
    assert probe("echo", case) == answer


def test_the_ipc_calls_run():
    assert probe("echo", "sendmsg") == RAN


@pytest.mark.parametrize("kind, case", [
    ("virtio-blk", "pread"), ("virtio-blk", "preadv"), ("virtio-blk", "pwritev"), ("virtio-blk", "fdatasync"),
    ("virtio-rng", "getrandom"), ("virtio-console", "accept"),
])
def test_a_kinds_own_calls_run_for_it_only(kind, case):
    assert probe(kind, case) == RAN
    assert probe("echo", case) == KILLED       # not in the common part
    other = "virtio-rng" if kind != "virtio-rng" else "virtio-blk"
    assert probe(other, case) == KILLED


def test_a_user_model_gets_what_its_class_declares():
    class Mine(Device):
        syscalls = ("getrandom", "pread64")

    rules = kind_rules("my-model", Mine)
    assert [r.name for r in rules] == ["getrandom", "pread64"]
    assert kind_rules("echo", None) == ()
    with pytest.raises(TypeError):
        class Bad(Device):
            syscalls = "getrandom"  # type: ignore[assignment]
        kind_rules("my-model", Bad)


def test_allowlist_sizes_stay_small():
    base = len({r.name for r in common.rules(1)})
    assert base < 100
    for kind in KIND_MODULES:
        assert len(kind_rules(kind, None)) <= 8
