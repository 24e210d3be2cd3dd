"""``vmm run`` with no arguments: the demo guest and its two echo devices,
one in its own process and one inline, on real KVM."""

from __future__ import annotations

import os
import re

from tests.vmm.conftest import needs_kvm, vmm_run

pytestmark = needs_kvm


def test_vmm_run_without_arguments_runs_the_demo(tmp_path):
    r = vmm_run(env={**os.environ, "XDG_CACHE_HOME": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    line = [text for text in r.stderr.splitlines() if text.startswith("vmm: power off")]
    assert len(line) == 1, r.stderr
    vmm_pid = int(re.search(r"VMM pid (\d+)", line[0]).group(1))
    iso = int(re.search(r"echo-isolated: pid (\d+) \(own process\)", line[0]).group(1))
    inl = int(re.search(r"echo-inline: pid (\d+) \(the VMM\)", line[0]).group(1))
    assert iso != vmm_pid and inl == vmm_pid
    assert list(tmp_path.glob("splitvmm/guests/demo-*.elf")), "the demo guest is built into the cache"


def test_demo_refuses_devices_without_a_guest():
    r = vmm_run("--device", "echo,pio=0x3000")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "need --guest" in r.stderr
