"""The seed's scenario end to end (kvmtool "ioport: mmio: Use a mutex and
reference counting for locking"): vCPU 1 moves the echo windows back and
forth >= 1000 times, PIO onto overlapping ranges, while vCPU 0 hammers
them (guest: tests/guests/relocate.c)."""

from __future__ import annotations

import struct

import pytest

from ipc import Bus
from tests.vmm.conftest import needs_kvm
from vmm.config import parse_device_spec
from vmm.endpoint import VMM_OWNER
from vmm.machine import Machine
from vmm.outcome import Ending

pytestmark = needs_kvm

STATS = 0x80_0000
MOVES = 1001


@pytest.mark.parametrize("placement, fast_path", [
    ("inline", True),
    ("inline", False),
    ("isolated", True),
], ids=["inline-c-loop", "inline-python-loop", "isolated"])
def test_relocation_under_fire(guest, placement, fast_path):
    with Machine(memory=32 << 20, vcpus=2, fast_path=fast_path) as m:
        m.load_pvh(guest("relocate"), f"mmio=0xd0000000 mmio2=0xd0001000 pio=0x1000 pio2=0x1080 "
                                      f"moves={MOVES} stats={STATS:#x}")
        ep = m.add_device(parse_device_spec(f"echo,pio=0x1000,mmio=0xd0000000,process={placement}"))
        outcome = m.run(timeout=120)
        good, ones, bad, first_bad, _, rounds = struct.unpack("<6Q", m.memory.read(STATS, 48))
        # No deadlock (the run ended by itself), every read a scratch value
        # or all ones, and the old/new windows right afterwards (status 0).
        assert outcome.ending is Ending.POWER_OFF, f"{outcome}; bad={bad} first={first_bad:#x}"
        assert bad == 0
        assert rounds > 0 and good > 0
        assert m.registry.check() == []
        regions = m.registry.regions()
        # No slot leaked: nothing removing or referenced, and exactly the
        # VMM's own regions (three ports, PCI CONFIG_ADDRESS/CONFIG_DATA and
        # the host bridge's config space) plus the echo's two windows, at
        # their new bases.
        assert all(r.refcount == 0 and not r.removing for r in regions), regions
        assert sorted((r.bus, r.start, r.length) for r in regions if r.owner == ep.owner) == [
            (Bus.PIO, 0x1080, 0x100), (Bus.MMIO, 0xD000_1000, 0x1000)]
        assert len([r for r in regions if r.owner == VMM_OWNER]) == 6
        assert len(regions) == 8
