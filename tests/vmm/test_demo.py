"""``vmm run`` with no arguments: the demo guest (vmm/guests/demo.c) with
virtio-rng, virtio-blk on a temporary 16 MiB image and virtio-console, each
in its own process next to the serial console, on real KVM."""

from __future__ import annotations

import os
import re

from tests.vmm.conftest import needs_kvm, vmm_run

pytestmark = needs_kvm


def _env(tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir(exist_ok=True)
    return tmp, {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "TMPDIR": str(tmp)}


def test_vmm_run_without_arguments_runs_the_demo(tmp_path):
    tmp, env = _env(tmp_path)
    r = vmm_run(env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    # the device list: host bridge and the three virtio functions
    pci = re.findall(r"^  pci ([0-9a-f]{2}:[0-9a-f]{2}\.[0-7]) ([0-9a-f]{4}):([0-9a-f]{4}) class ([0-9a-f]{6})",
                     out, re.M)
    assert {(v, d) for _, v, d, _ in pci} >= {("1af4", "1044"), ("1af4", "1042"), ("1af4", "1043")}, out
    assert re.search(r"^demo: virtio-rng BAR0 assigned by the guest: 0x[0-9a-f]+ -> 0xe8000000$", out, re.M), out
    m = re.search(r"^demo: 16 random bytes from virtio-rng: ([0-9a-f]{32}) \(MSI-X vector 0x60, interrupts: (\d+)\)$",
                  out, re.M)
    assert m and int(m[2]) >= 1 and int(m[1], 16) != 0, out
    assert re.search(r'^demo: virtio-blk id "splitvmm-demo", capacity 32768 sectors \(16 MiB\)', out, re.M), out
    assert re.search(r"^demo: virtio-blk wrote, read back and verified sectors \d+-\d+, flushed: ok", out, re.M), out
    # the console port shares the VMM's console (stdout) with COM1
    assert "demo: virtio-console port: wrote 51 bytes: ok" in out
    assert "virtio-console: hello from the splitvmm demo guest\n" in out
    assert "demo: all checks passed: ok" in out

    line = [text for text in r.stderr.splitlines() if text.startswith("vmm: power off")]
    assert len(line) == 1, r.stderr
    vmm_pid = int(re.search(r"VMM pid (\d+)", line[0]).group(1))
    pids = {name: int(re.search(rf"\b{name}\d*: pid (\d+) \(own process\)", line[0]).group(1))
            for name in ("rng", "blk", "console", "serial")}
    assert vmm_pid not in pids.values() and len(set(pids.values())) == 4, line[0]
    assert list((tmp_path / "cache").glob("splitvmm/guests/demo-*.elf")), "the demo guest is built into the cache"
    assert list(tmp.iterdir()) == [], "the temporary disk image is removed"


def test_demo_removes_its_image_when_the_run_times_out(tmp_path):
    tmp, env = _env(tmp_path)
    r = vmm_run("--timeout", "0.001", env=env)
    assert r.returncode in (0, 8), r.stderr
    assert list(tmp.iterdir()) == []


def test_demo_refuses_devices_without_a_guest():
    r = vmm_run("--device", "echo,pio=0x3000")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "need --guest" in r.stderr


def test_demo_console_to_a_file(tmp_path):
    # --serial file:PATH: COM1 and the virtio-console port both write there
    _tmp, env = _env(tmp_path)
    out = tmp_path / "console.log"
    r = vmm_run("--serial", f"file:{out}", env=env)
    assert r.returncode == 0, r.stderr
    text = out.read_text()
    assert r.stdout == ""
    assert "virtio-console: hello from the splitvmm demo guest\n" in text
    assert "demo: all checks passed: ok" in text
