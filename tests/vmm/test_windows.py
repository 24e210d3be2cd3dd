"""Owner windows on real KVM (vmm.windows): a hostile device that
registers regions over a sibling's BAR, over the VMM's ports, over
another function's configuration space and inside the PCI aperture but
outside its BARs captures no access; the guest's accesses go to the
rightful owner or read all ones (guest: tests/guests/squatter.c)."""

from __future__ import annotations

import logging

import pytest

from tests.testkinds import SQUATTER
from tests.vmm.conftest import GUEST_SOURCES, needs_kvm
from vmm import guests
from vmm.config import parse_device_spec
from vmm.endpoint import VMM_OWNER
from vmm.machine import Machine
from vmm.outcome import Ending

pytestmark = needs_kvm

SLOT = 3
EMPTY = 9
HPORT = 0x2000
SQUAT = 0xE100_0000
MOVETO = 0xE800_0000
OK = 0x5A


@pytest.fixture(scope="session")
def squatter_guest(guest_cache):
    return guests.build([GUEST_SOURCES / "squatter.c", guests.HERE / "pci.c"], guest_cache)


@pytest.mark.parametrize("placement, fast_path", [
    ("isolated", True),
    ("isolated", False),
    ("inline", True),
], ids=["isolated-c-loop", "isolated-python-loop", "inline-c-loop"])
def test_hostile_device_captures_nothing(squatter_guest, caplog, placement, fast_path):
    caplog.set_level(logging.WARNING, logger="vmm.windows")
    with Machine(memory=32 << 20, vcpus=1, fast_path=fast_path) as m:
        m.load_pvh(squatter_guest, f"hostile={HPORT:#x} slot={SLOT} empty={EMPTY} squat={SQUAT:#x} "
                                     f"moveto={MOVETO:#x}")
        sibling = m.add_device(parse_device_spec(f"pci-echo,slot={SLOT},process=isolated"))
        hostile = m.add_device(parse_device_spec(f"{SQUATTER},pio={HPORT:#x},process={placement}"))
        outcome = m.run(timeout=120)
        # The run ends through the test-exit port the hostile device squats
        # on: the VMM kept it.  Any other value is the failed step.
        assert outcome.ending is Ending.TEST_EXIT and outcome.value == OK, outcome
        regions = m.query_regions()
        refused = {(r["bus"], r["start"], r["owner"]) for r in regions if r["refused"]}
        assert refused == {
            ("pio", 0xF4, hostile.owner), ("pio", 0xCF8, hostile.owner),
            ("mmio", SQUAT, hostile.owner),
            ("mmio", SQUAT + 0x10000, sibling.owner),       # forged: the sibling's name, no BAR there
            ("mmio", 0xE000_0000 + SLOT * 0x10_0000, sibling.owner),   # BAR 0's old place
        }, regions
        # Everything else is honoured: the sibling's BARs at their (new)
        # places, its config space, the hostile's own ports, the VMM's own.
        honoured = {(r["bus"], r["start"], r["owner"]) for r in regions if not r["refused"]}
        assert ("mmio", MOVETO, sibling.owner) in honoured
        assert ("pci", SLOT << 15, sibling.owner) in honoured
        assert ("pio", HPORT, hostile.owner) in honoured
        assert all(o == VMM_OWNER for b, s, o in honoured if b == "pio" and s < 0x1000)
        # Each refused region is logged once, however often it was hit.
        logged = [r.getMessage() for r in caplog.records if "refused region" in r.getMessage()]
        assert len(logged) == len(set(logged)), logged
        assert any(f"{SQUAT:#x}" in line for line in logged), logged
        assert m.registry.check() == []
