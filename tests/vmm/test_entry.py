"""The ``vmm`` command's entry point (vmm.entry): whether a run starts the
fork server before the VMM's imports, and that the command then works
the same."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.vmm.conftest import needs_kvm
from vmm.entry import wants_forkserver


@pytest.mark.parametrize("argv, wanted", [
    (["run"], True),                                               # the demo: four device processes
    (["-v", "run", "--guest", "g.elf"], True),                     # COM1 in its own process
    (["run", "--guest", "g.elf", "--serial", "none"], False),      # no device at all
    (["run", "--guest=g.elf", "--serial=none"], False),
    (["run", "--guest", "g.elf", "--serial", "none", "--device", "echo"], True),
    (["run", "--kernel", "bzImage", "--serial", "none"], False),
    (["run", "--help"], False),
    (["ctl", "sock", "query-status"], False),
    ([], False),
])
def test_which_runs_start_the_fork_server_first(argv, wanted):
    assert wants_forkserver(argv) is wanted


@needs_kvm
def test_a_run_through_the_entry_point_ends_as_before(tmp_path):
    """The console script's path (fork server first, os._exit at the end)
    on the start-up benchmark's guest (its first instructions write the
    test-exit port): status 1, the summary line names COM1's process."""
    from vmm.bench.startup import build_startup_guest

    elf = build_startup_guest(tmp_path)
    r = subprocess.run([sys.executable, "-m", "vmm.entry", "run", "--guest", str(elf)], stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r.stderr
    assert "guest wrote 0x0 to the test-exit port" in r.stderr and "serial0: pid" in r.stderr, r.stderr
    assert "own process" in r.stderr and "seccomp=kill" in r.stderr, r.stderr
