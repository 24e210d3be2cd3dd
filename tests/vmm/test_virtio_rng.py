"""virtio-rng on real KVM, inline and in a device process, driven by a
minimal driver in the test guest (tests/guests/virtio_rng.c): PCI IDs and
capabilities, VERSION_1, one split queue in guest RAM, MSI-X or polling,
random bytes.  The doorbell is a KVM ioeventfd the device polls: every
notification reaches the device through its eventfd and none as an MMIO
access through the VMM, also after the guest moved BAR 0.  Hostile
requests from the guest fail alone or set DEVICE_NEEDS_RESET; the device
and the VMM go on."""

from __future__ import annotations

import struct

import pytest

from tests.vmm.conftest import GUEST_SOURCES, needs_kvm, vmm_run
from vmm import guests
from vmm.config import parse_device_spec
from vmm.machine import Machine
from vmm.outcome import Ending

pytestmark = needs_kvm

STATS = 0x80_0000
MOVED = 0xE900_0000
PLACEMENTS = ["isolated", "inline"]


@pytest.fixture(scope="session")
def rng_guest(guest_cache):
    return guests.build([GUEST_SOURCES / "virtio_rng.c", guests.HERE / "pci.c"], guest_cache)


def run(path, placement: str, **args):
    args.setdefault("stats", hex(STATS))
    with Machine(memory=32 << 20, vcpus=1) as m:
        m.load_pvh(path, " ".join(f"{k}={v}" for k, v in args.items()))
        ep = m.add_device(parse_device_spec(f"virtio-rng,process={placement}"))
        outcome = m.run(timeout=45)
        eventfd, mmio, rounds = struct.unpack("<3Q", m.memory.read(STATS, 24))
        data = m.memory.read(STATS + 24, 16)
        kicks = struct.unpack("<Q", m.memory.read(STATS + 40, 8))[0]
        assert eventfd == kicks, (eventfd, kicks)      # every doorbell went through the eventfd
        failed = getattr(ep, "failed", None)
    return outcome, eventfd, mmio, rounds, data, failed


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("msix", [1, 0])
def test_random_bytes_through_the_ioeventfd(rng_guest, placement, msix):
    outcome, eventfd, mmio, rounds, data, failed = run(rng_guest, placement, rounds=6, msix=msix)
    assert outcome.ending is Ending.POWER_OFF, str(outcome)
    assert rounds == 6 and len(set(data)) > 4
    assert eventfd == 6 and mmio == 0       # the VMM never saw a notification
    assert failed is None


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_bar_move_takes_the_doorbell_along(rng_guest, placement):
    outcome, eventfd, mmio, rounds, _data, failed = run(rng_guest, placement, rounds=6, move=hex(MOVED))
    assert outcome.ending is Ending.POWER_OFF, str(outcome)
    assert (rounds, eventfd, mmio) == (6, 6, 0)
    assert failed is None


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_hostile_requests(rng_guest, placement):
    outcome, eventfd, mmio, rounds, _data, failed = run(rng_guest, placement, rounds=3, hostile=1)
    assert outcome.ending is Ending.POWER_OFF, str(outcome)
    assert rounds == 3 and mmio == 0
    assert failed is None


def test_vmm_run_command_line(rng_guest):
    r = vmm_run("--guest", str(rng_guest), "--serial", "none", "--device", "virtio-rng",
                "--cmdline", "rounds=2", timeout=60)
    assert r.returncode == 0, r.stderr
    assert "virtio-rng" in r.stderr
