"""PCI on real KVM and real device processes: configuration mechanism #1,
the host bridge, pci-echo's BARs moved and switched off by the guest, a
BAR moved 1000 times under another vCPU's accesses, and random
configuration writes (guest: tests/guests/pci_echo.c with
vmm/guests/pci.c)."""

from __future__ import annotations

import os
import signal
import struct

import pytest

from devices.pci_echo import BAR_IO, BAR_MSIX, BAR_REGS
from ipc import Bus, pci_address
from tests.vmm.conftest import GUEST_SOURCES, needs_kvm, vmm_run
from tests.waiting import wait_for
from vmm import guests, layout
from vmm.config import parse_device_spec
from vmm.endpoint import VMM_OWNER
from vmm.machine import Machine
from vmm.outcome import Ending

pytestmark = needs_kvm

SLOT = 3
MMIO_WIN = layout.PCI_MMIO_WINDOW + SLOT * layout.PCI_MMIO_PER_SLOT
IO_WIN = layout.PCI_IO_WINDOW + SLOT * layout.PCI_IO_PER_SLOT
MMIO_NEW = 0xE800_0000
IO_NEW = 0xD000
BAR64 = 0x8_0000_0000
STATS = 0x80_0000
MOVES = 1001
DECLARED = {BAR_REGS: (Bus.MMIO, 0x1000), BAR_IO: (Bus.PIO, 0x100), BAR_MSIX: (Bus.MMIO, 0x1000)}
PLACEMENTS = ["isolated", "inline"]


@pytest.fixture(scope="session")
def pci_guest(guest_cache):
    return guests.build([GUEST_SOURCES / "pci_echo.c", guests.HERE / "pci.c"], guest_cache)


def cmdline(mode: int, **extra) -> str:
    args = dict(mode=mode, slot=SLOT, mmio_win=hex(MMIO_WIN), io_win=hex(IO_WIN), mmio_new=hex(MMIO_NEW),
                io_new=hex(IO_NEW), bar64=hex(BAR64), stats=hex(STATS), moves=MOVES, **extra)
    return " ".join(f"{k}={v}" for k, v in args.items())


def run(pci_guest, mode: int, placement: str, vcpus: int = 1, **extra):
    """Run the guest in ``mode``; returns (outcome, device regions,
    every region, the endpoint's failure or None, the stats block)."""
    with Machine(memory=32 << 20, vcpus=vcpus) as m:
        m.load_pvh(pci_guest, cmdline(mode, **extra))
        ep = m.add_device(parse_device_spec(f"pci-echo,slot={SLOT},process={placement}"))
        outcome = m.run(timeout=60)
        assert m.registry.check() == []
        regions = m.registry.regions()
        mine = sorted((r.bus, r.start, r.length, r.cookie) for r in regions if r.owner == ep.owner)
        failed = getattr(ep, "failed", None)
        stats = struct.unpack("<6Q", m.memory.read(STATS, 48))
    return outcome, mine, regions, failed, stats


def config_region() -> tuple:
    return (Bus.PCI, pci_address(0, SLOT, 0), 0x1000, 0x100)


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_enumerate_ids_bar_sizes_and_firmware_assignment(pci_guest, placement):
    # Linux's type-1 probe, CONFIG_ADDRESS rules, the bridge and pci-echo
    # IDs, absent functions, byte/word views, BAR sizes (64-bit too), MSI-X
    # capability; then the guest assigns every BAR itself (status 0 = all
    # held, test_exit(n) names the failed check in tests/guests/pci_echo.c).
    outcome, mine, *_ = run(pci_guest, 1, placement)
    assert outcome.ending is Ending.POWER_OFF, str(outcome)
    assert mine == sorted([config_region(), (Bus.PIO, IO_NEW, 0x100, BAR_IO),
                           (Bus.MMIO, MMIO_NEW, 0x1000, BAR_REGS), (Bus.MMIO, BAR64, 0x1000, BAR_MSIX)])


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_move_bars_and_toggle_decode(pci_guest, placement):
    outcome, mine, *_ = run(pci_guest, 2, placement)
    assert outcome.ending is Ending.POWER_OFF, str(outcome)
    # the guest's last moves: BAR 0 back at A (odd count of 20), BAR 1 at Q
    assert (Bus.MMIO, MMIO_WIN, 0x1000, BAR_REGS) in mine and (Bus.PIO, IO_NEW, 0x100, BAR_IO) in mine


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_bar_moved_1000_times_under_another_vcpu(pci_guest, placement):
    outcome, mine, regions, failed, stats = run(pci_guest, 3, placement, vcpus=2)
    good, _ones, bad, first_bad, _, rounds = stats
    assert outcome.ending is Ending.POWER_OFF, f"{outcome}; bad={bad} first={first_bad:#x}"
    assert failed is None
    assert bad == 0 and rounds > 0 and good > 0
    # no leaked slot: nothing referenced or waiting for removal, and the
    # device holds exactly its config space and three BARs at their ends
    assert all(r.refcount == 0 and not r.removing for r in regions), regions
    assert mine == sorted([config_region(), (Bus.PIO, IO_NEW, 0x100, BAR_IO),
                           (Bus.MMIO, MMIO_NEW, 0x1000, BAR_REGS),
                           (Bus.MMIO, MMIO_WIN + 0x1000, 0x1000, BAR_MSIX)])


@pytest.mark.parametrize("seed", [1, 0xDEADBEEF])
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_random_config_writes(pci_guest, placement, seed):
    # Every offset of pci-echo's and the bridge's config space written with
    # random values and sizes, CONFIG_ADDRESS too: the device and the VMM
    # stay up and no region leaves its BAR's declared size.
    outcome, mine, regions, failed, _ = run(pci_guest, 4, placement, seed=seed)
    assert outcome.ending is Ending.POWER_OFF, str(outcome)
    assert failed is None
    vmm_regions = {(r.bus, r.start, r.length) for r in regions if r.owner == VMM_OWNER}
    assert {(Bus.PIO, 0xCF8, 4), (Bus.PIO, 0xCFC, 4), (Bus.PCI, pci_address(0, 0, 0), 0x1000)} <= vmm_regions
    assert config_region() in mine
    for bus, start, length, cookie in mine:
        if bus == Bus.PCI:
            continue
        assert (bus, length) == DECLARED[cookie], (bus, start, length, cookie)
        assert start % length == 0 and start != 0
        assert bus != Bus.PIO or start + length <= 0x10000


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_msix_delivery_mask_and_pending(pci_guest, placement):
    # Vectors raised by the device arrive in the guest's ring-0 handler; a
    # vector masked (entry, function, bus mastering) is held with its PBA
    # bit visible to the guest and delivered on unmask.
    outcome, _, _, failed, _ = run(pci_guest, 5, placement)
    assert outcome.ending is Ending.POWER_OFF, str(outcome)
    assert failed is None


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_overlapping_bars_are_not_lost(pci_guest, placement):
    # Two functions' BAR 0 on one range: the region already there keeps
    # it, the newcomer keeps its BAR value and reports the conflict, and
    # takes the range over by itself once the other BAR moves away.
    slot2 = SLOT + 1
    mmio2 = layout.PCI_MMIO_WINDOW + slot2 * layout.PCI_MMIO_PER_SLOT
    io2 = layout.PCI_IO_WINDOW + slot2 * layout.PCI_IO_PER_SLOT
    with Machine(memory=32 << 20) as m:
        m.load_pvh(pci_guest, cmdline(6, slot2=slot2, mmio_win2=hex(mmio2), io_win2=hex(io2)))
        a = m.add_device(parse_device_spec(f"pci-echo,slot={SLOT},process={placement}"))
        b = m.add_device(parse_device_spec(f"pci-echo,slot={slot2},process={placement}"))
        outcome = m.run(timeout=60)
        assert outcome.ending is Ending.POWER_OFF, str(outcome)
        assert m.registry.check() == []
        regions = {(r.owner, r.bus, r.start) for r in m.registry.regions()}
        assert (b.owner, Bus.MMIO, MMIO_WIN) in regions and (a.owner, Bus.MMIO, MMIO_NEW) in regions


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_intx_fallback_with_msix_off(pci_guest, placement):
    # MSI-X disabled: the request arrives through INTA#, wired by the VMM
    # to GSI 16 + slot % 4 (Interrupt Line pre-set to it), on the vector the
    # guest routed that IOAPIC pin to; STATUS.Interrupt_Status follows the
    # device's condition until REG_ACK; INTx_Disable holds it back and
    # clearing it delivers; with MSI-X enabled only the MSI vector fires.
    gsi = layout.pci_intx_gsi(SLOT)
    assert gsi == 16 + SLOT % 4
    outcome, _, _, failed, _ = run(pci_guest, 7, placement, intx_gsi=gsi)
    assert outcome.ending is Ending.POWER_OFF, str(outcome)
    assert failed is None


def test_dead_device_function_reads_all_ones(pci_guest):
    # The device process dies before the guest looks: its regions are
    # reaped, so enumeration finds only the bridge (check 7 of mode 1).
    with Machine(memory=32 << 20) as m:
        m.load_pvh(pci_guest, cmdline(1))
        ep = m.add_device(parse_device_spec(f"pci-echo,slot={SLOT},restart=no"))
        os.kill(ep.pid, signal.SIGKILL)
        assert ep.wait_exited(5)
        wait_for(lambda: not any(r.owner == ep.owner for r in m.registry.regions()), 5, "the regions reaped")
        outcome = m.run(timeout=30)
        assert outcome.ending is Ending.TEST_EXIT and outcome.value == 7, str(outcome)
        assert m.registry.check() == []


def test_pci_echo_through_the_cli(pci_guest):
    r = vmm_run("--guest", str(pci_guest), "--cmdline", cmdline(1), "--device", f"pci-echo,slot={SLOT}")
    assert r.returncode == 0, r.stderr


def test_slot_taken_is_a_config_error(pci_guest):
    r = vmm_run("--guest", str(pci_guest), "--cmdline", cmdline(1), "--device", f"pci-echo,slot={SLOT}",
                "--device", f"pci-echo,slot={SLOT}")
    assert r.returncode == 2 and "slot 3 is taken" in r.stderr, r.stderr
