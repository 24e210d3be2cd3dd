"""Every kind's snapshot through the real state segment (ipc.state): it
is plain data the segment takes, fits its default capacity, comes back
equal and restores a fresh model.  (virtio-console's input backlog may
reach RX_PENDING bytes: its segment needs a larger capacity, shown here.)"""

from __future__ import annotations

import pytest

from devices.echo import Echo
from devices.pci_echo import PciEcho
from devices.serial import Serial
from devices.virtio.console import READ_CHUNK, RX_PENDING, VirtioConsole
from ipc.state import DEFAULT_CAPACITY, StateSegment
from tests.devices.snapshots import KeptHost
from tests.devices.test_snapshot import echo_in_use, pci_echo_in_use, serial_in_use
from tests.devices.test_snapshot_virtio import blk_in_use, rng_in_use


def through_segment(state, capacity=DEFAULT_CAPACITY):
    with StateSegment.create(capacity=capacity) as seg:
        assert seg.store(state)
        back = seg.read()
    assert back is not None and back.state == state
    return back.state


@pytest.mark.parametrize("kind", ["echo", "serial", "pci-echo", "virtio-rng", "virtio-blk"])
def test_each_kind_through_the_state_segment(registry, guarded, tmp_path, kind):
    if kind == "echo":
        _, old = echo_in_use(registry)
        make = lambda: Echo(KeptHost(registry, owner=9), pio="0x500", mmio="0xd0000000")  # noqa: E731
    elif kind == "serial":
        _, old = serial_in_use(registry)
        make = lambda: Serial(KeptHost(registry, owner=9))  # noqa: E731
    elif kind == "pci-echo":
        _, old = pci_echo_in_use(registry)
        make = lambda: PciEcho(KeptHost(registry, owner=9), slot="3", mmio_window="0xe0100000",  # noqa: E731
                               io_window="0xc200", intx_gsi="19")
    elif kind == "virtio-rng":
        _, old = rng_in_use(registry, guarded)
        make = lambda: type(old)(KeptHost(registry, owner=9, memory=guarded.ram), slot="3",  # noqa: E731
                                 intx_gsi="19")
    else:
        image = tmp_path / "disk.img"
        image.write_bytes(bytes(64 * 512))
        _, old = blk_in_use(registry, guarded, image)
        make = lambda: type(old)(KeptHost(registry, owner=9, memory=guarded.ram), slot="4",  # noqa: E731
                                 path=str(image), serial="blk-7")
    state = old.snapshot()
    old.stop()
    new = make()
    new.restore(through_segment(state))
    assert new.snapshot() == state


def test_console_backlog_needs_a_larger_segment(registry, guarded):
    dev = VirtioConsole(KeptHost(registry, memory=guarded.ram), slot="5")
    dev._pending[:] = bytes(RX_PENDING + READ_CHUNK - 1)      # the most that can wait
    state = dev.snapshot()
    with pytest.raises(ValueError):
        through_segment(state)
    back = through_segment(state, capacity=2 * RX_PENDING)
    fresh = VirtioConsole(KeptHost(registry, owner=9, memory=guarded.ram), slot="5")
    fresh.restore(back)
    assert fresh.snapshot()["model"]["device"]["pending"] == bytes(RX_PENDING + READ_CHUNK - 1)
