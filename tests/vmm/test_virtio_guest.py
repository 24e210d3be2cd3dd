"""The guest-side virtio-pci driver library (vmm/guests/virtio.h): the
guests that use it build, and its virtio-rng driver runs on real KVM
against the project's virtio-rng device, polling and with MSI-X, in a
device process and inline (tests/guests/virtio_lib_rng.c).  The checks
against QEMU's own devices live in ``python -m vmm.bench.virtio_blk``
(not in the tests: CI has no QEMU)."""

from __future__ import annotations

import re

import pytest

from tests.vmm.conftest import GUEST_SOURCES, needs_kvm, vmm_run
from vmm import guests
from vmm.bench import virtio_blk

LIBRARY = (guests.HERE / "virtio.c", guests.HERE / "pci.c", guests.HERE / "serial.c")


@pytest.fixture(scope="session")
def lib_rng_guest(guest_cache):
    return guests.build([GUEST_SOURCES / "virtio_lib_rng.c", *LIBRARY], guest_cache)


def test_guests_build(guest_cache, lib_rng_guest):
    assert lib_rng_guest.stat().st_size > 0
    assert virtio_blk.build_guest(guest_cache).stat().st_size > 0


def test_bench_image_and_summary(tmp_path):
    img = tmp_path / "d.img"
    virtio_blk.make_image(img, 1)
    data = img.read_bytes()
    assert len(data) == 1 << 20
    assert all(int.from_bytes(data[s * 512:s * 512 + 8], "little") == s for s in (0, 1, 777, 2047))
    run = {"phases": {"seq1m": [(10_000_000, 10, 2_000_000)], "rand4k": [(4096 * 100, 100, 1_000_000)]}}
    out = virtio_blk.summarize([run], tsc_hz=1e9)
    assert out["seq1m"]["MB_s"] == 5000.0 and out["rand4k"]["IOPS"] == 100_000


@needs_kvm
@pytest.mark.parametrize("placement", ["isolated", "inline"])
@pytest.mark.parametrize("msix", [0, 1])
@pytest.mark.parametrize("unassign", [0, 1])
def test_rng_driver(lib_rng_guest, placement, msix, unassign):
    """unassign=1: the guest clears the BARs first; the library assigns
    every BAR it needs (capabilities and MSI-X) in its window."""
    r = vmm_run("--guest", str(lib_rng_guest), "--cmdline",
                f"msix={msix} rounds=6 len=32 unassign={unassign} window=0xe8000000",
                "--device", f"virtio-rng,process={placement}", "--timeout", "45")
    assert r.returncode == 0, r.stdout + r.stderr
    common = int(re.search(r"common (0x[0-9a-f]+)", r.stdout)[1], 16)
    assert (0xE800_0000 <= common < 0xE900_0000) == bool(unassign)
    assert "rng: ok" in r.stdout
    samples = re.findall(r"^rng: ([0-9a-f]{64})$", r.stdout, re.M)
    assert len(samples) == 6 and len(set(samples)) == 6
    assert ("msix" if msix else "polling") in r.stdout
    if msix:
        m = re.search(r"^rng: interrupts (\d+)$", r.stdout, re.M)
        assert m and int(m[1]) >= 6


@needs_kvm
@pytest.mark.parametrize("threads", ["per-queue", "one"])
def test_blk_driver_four_queues_at_depth(guest_cache, tmp_path, threads):
    """The library's MQ and queue-depth paths (virtio_blk_init_mq,
    virtio_blk_submit / _complete) against the project's virtio-blk with
    num_queues=4 in its own process: 256 4 KiB writes spread over the 4
    queues, 32 in flight on each, then read back the same way; the guest
    refuses any completion of a request not in flight (none twice), and
    the image holds what was written."""
    elf = virtio_blk.build_guest(guest_cache)
    image = tmp_path / "d.img"
    virtio_blk.make_image(image, 4)
    seed, n = 7, 256
    r = vmm_run("--guest", str(elf), "--memory", "64M", "--timeout", "90",
                "--cmdline", f"mqcheck=1 queues=4 qd=32 n4k={n} seed={seed}",
                "--device", f"virtio-blk,path={image},num_queues=4,notify_threads={threads}", timeout=150)
    assert r.returncode == 0, r.stdout + r.stderr
    assert re.search(r"features offered \S+ accepted \S+ queues 4 used 4 ", r.stdout), r.stdout
    assert f"mqcheck {n} writes and reads over 4 queues at depth 32: ok" in r.stdout
    data = image.read_bytes()
    key = seed * 0x9E3779B97F4A7C15 & (1 << 64) - 1
    for s in (0, 8 * 37, 8 * (n - 1)):
        for i in (0, 8, 4088):
            assert int.from_bytes(data[s * 512 + i:s * 512 + i + 8], "little") == (s * 4096 + i) ^ key
    assert int.from_bytes(data[n * 4096:n * 4096 + 8], "little") == n * 8     # beyond: untouched


@needs_kvm
def test_blk_driver_at_depth_ignores_used_idx_ahead_of_inflight(guest_cache, tmp_path):
    """Regression: at queue depth 32 on 4 queues, the guest's view of a used
    ring page was seen (on this host's nested KVM) to read all zeros for a
    while, and a driver that took "used->idx != last_used" as completions
    consumed stale elements (a request not in flight, status still 0xff)
    about once per run of 32k requests.  virtq_get ignores an index further
    ahead than the chains in flight; three runs of 32k requests each must
    all complete (without the check, most runs failed)."""
    elf = virtio_blk.build_guest(guest_cache)
    image = tmp_path / "d.img"
    virtio_blk.make_image(image, 64)
    n = 16000
    for seed in (1, 2, 3):
        r = vmm_run("--guest", str(elf), "--memory", "64M", "--timeout", "120",
                    "--cmdline", f"mqcheck=1 queues=4 qd=32 n4k={n} seed={seed}",
                    "--device", f"virtio-blk,path={image},num_queues=4", timeout=180)
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"mqcheck {n} writes and reads over 4 queues at depth 32: ok" in r.stdout, r.stdout
        assert re.search(r"used idx reads ahead of the requests in flight \(ignored\): \d+$", r.stdout, re.M)
