"""Snapshot and restore of the virtio devices (rng, blk, console) at the
model level, over a guarded mmap'd buffer as guest RAM that both "processes"
share, as they share the VM's: transport, features, queue configuration,
ring indices and MSI-X come back; a request the driver made available
while the device was down is served at start; the rings go on where they
were; device state (blk's configuration, console input not yet taken)
is kept.  Hostile snapshots are refused with BadState."""

from __future__ import annotations

import copy
import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devices import pci_config as cfg
from devices.base import BadState, ConsoleFds, Space, resume
from devices.virtio import blk as vb
from devices.virtio import pci as vp
from devices.virtio import spec as vs
from devices.virtio.blk import VirtioBlk
from devices.virtio.console import RECEIVEQ, TRANSMITQ, VirtioConsole
from devices.virtio.rng import VirtioRng
from devices.virtio.virtqueue import VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from tests.devices.snapshots import KeptHost, hostile, plain, wire
from tests.devices.test_virtio import (BUF, DESC, common_r, common_w, negotiate, notify, offer,
                                       put_desc, ready, setup_queue, used)
from tests.waiting import wait_for

RNG = dict(slot="3", intx_gsi="19")


def with_msix(dev, queue_vector=1, config_vector=0):
    """MSI-X on, entries 0 and 1 routed and unmasked, the queue and the
    configuration on them (a driver's set-up, virtio 1.2 §4.1.5.1.2)."""
    assert dev.msix is not None
    for n in (config_vector, queue_vector):
        dev.write(Space.MMIO, vp.BAR_MSIX, 16 * n, 4, 0xFEE0_0000 + 0x1000 * n)
        dev.write(Space.MMIO, vp.BAR_MSIX, 16 * n + 8, 4, 0x30 + n)
        dev.write(Space.MMIO, vp.BAR_MSIX, 16 * n + 12, 4, 0)
    dev.write(Space.PCI, 0x100, cfg.PCI_COMMAND, 2, 0x7)
    dev.write(Space.PCI, 0x100, dev.msix.cap + cfg.PCI_MSIX_FLAGS, 2, cfg.PCI_MSIX_FLAGS_ENABLE)
    common_w(dev, vs.VIRTIO_PCI_COMMON_MSIX, 2, config_vector)
    common_w(dev, vs.VIRTIO_PCI_COMMON_Q_SELECT, 2, 0)
    common_w(dev, vs.VIRTIO_PCI_COMMON_Q_MSIX, 2, queue_vector)


def rng_request(ram, head, length=32):
    put_desc(ram, head, BUF + 0x100 * head, length, VIRTQ_DESC_F_WRITE)
    offer(ram, head)


def common_view(dev):
    """Every common-configuration field of every queue, and the rest of
    BAR 0's registers that reads do not change."""
    out = []
    for q in range(len(dev.queues) + 1):
        common_w(dev, vs.VIRTIO_PCI_COMMON_Q_SELECT, 2, q)
        for sel in (0, 1, 2):
            common_w(dev, vs.VIRTIO_PCI_COMMON_DFSELECT, 4, sel)
            common_w(dev, vs.VIRTIO_PCI_COMMON_GFSELECT, 4, sel)
            out.append(bytes(common_r(dev, o, 1) for o in range(vs.VIRTIO_PCI_COMMON_CFG_SIZE)))
    out.append(bytes(dev.read(Space.MMIO, vp.BAR_VIRTIO, vp.DEVICE_OFFSET + i, 1) for i in range(64)))
    out.append(bytes(dev.read(Space.MMIO, vp.BAR_VIRTIO, vp.STATS_OFFSET + i, 4) & 0xFF for i in (0, 4)))
    out.append(bytes(dev.read(Space.PCI, 0x100, o, 1) for o in range(256)))
    out.append(bytes(dev.read(Space.MMIO, vp.BAR_MSIX, o, 4) & 0xFF for o in range(0, 0x30, 4)))
    return out


def rng_in_use(registry, guarded):
    host = KeptHost(registry, memory=guarded.ram)
    dev = VirtioRng(host, **RNG)
    dev.start()
    ready(dev)
    with_msix(dev)
    for head in range(3):
        rng_request(guarded.ram, head)
        notify(dev)
    assert used(guarded.ram)[0] == 3
    return host, dev


def test_rng_round_trip_serves_what_came_while_down(registry, guarded):
    ram = guarded.ram
    host, old = rng_in_use(registry, guarded)
    assert host.log.count(("msi", 1)) == 3
    common_w(old, vs.VIRTIO_PCI_COMMON_Q_SELECT, 2, 0)
    state = old.snapshot()
    plain(state)
    view = common_view(old)
    old.doorbells.stop()                     # the old process is gone
    rng_request(ram, 3)                      # the driver rang while the device was down
    new_host = KeptHost(registry, memory=ram)
    new = VirtioRng(new_host, **RNG)
    resume(new, wire(state))
    assert used(ram)[0] == 4 and used(ram)[1][3] == (3, 32)
    assert new_host.log == [("program", 0, 0xFEE0_0000, 0x30), ("program", 1, 0xFEE0_1000, 0x31),
                            ("msi", 1)]
    assert new_host.regions() == host.regions()
    assert common_view(new) == view
    rng_request(ram, 4)
    notify(new)
    assert used(ram)[0] == 5 and new.queues[0].served == 5
    new.stop()


def test_restored_queue_reports_to_the_inflight_hook(registry, guarded):
    ram = guarded.ram
    _, old = rng_in_use(registry, guarded)
    state = old.snapshot()
    old.doorbells.stop()
    seen: list = []

    class Record:
        def popped(self, queue, head, last_avail):
            seen.append(("popped", queue, head, last_avail))

        def pushed(self, queue, head, used_idx):
            seen.append(("pushed", queue, head, used_idx))

        def enabled(self, queue, size):
            seen.append(("enabled", queue, size))

    new = VirtioRng(KeptHost(registry, memory=ram), **RNG)
    new.queues[0].inflight = Record()
    resume(new, state)
    rng_request(ram, 5)
    notify(new)
    assert seen == [("popped", 0, 5, 4), ("pushed", 0, 5, 4)]     # the record follows the ring
    common_w(new, vs.VIRTIO_PCI_COMMON_STATUS, 1, 0)          # reset, then a driver sets it up again
    ready(new)
    assert seen[2] == ("enabled", 0, 8)
    new.stop()


def test_requests_in_flight_are_served_again_first(registry, guarded):
    ram = guarded.ram
    _, old = rng_in_use(registry, guarded)
    state = old.snapshot()
    old.doorbells.stop()
    # The dead process had taken head 3 and not returned it (the record
    # says so); the driver then made head 4 available.
    rng_request(ram, 3)
    rng_request(ram, 4)
    new = VirtioRng(KeptHost(registry, memory=ram), **RNG)
    new.restore(state)
    new.resume_inflight(0, [3], last_avail=4, used_idx=3)
    new.start()
    assert used(ram)[0] == 5 and used(ram)[1][3:] == [(3, 32), (4, 32)]
    new.stop()


@pytest.mark.parametrize("heads, last_avail, used_idx", [
    ([8], 4, 3), ([1, 1], 5, 3), ([1], 5, 3), ([True], 4, 3), ([1], 1 << 16, 3), (list(range(9)), 12, 3)])
def test_inflight_that_does_not_fit_is_refused(registry, guarded, heads, last_avail, used_idx):
    _, old = rng_in_use(registry, guarded)
    state = old.snapshot()
    old.stop()
    new = VirtioRng(KeptHost(registry, owner=9, memory=guarded.ram), **RNG)
    new.restore(state)
    with pytest.raises(BadState):
        new.resume_inflight(0, heads, last_avail, used_idx)
    assert new.queues[0].resubmit == [] and new.queues[0].last_avail == 3
    with pytest.raises(BadState):
        new.resume_inflight(1, [], 3, 3)                    # no such queue


def test_rng_hostile_snapshots(registry, guarded):
    _, old = rng_in_use(registry, guarded)
    state = old.snapshot()
    old.stop()
    host = KeptHost(registry, owner=9, memory=guarded.ram)
    n = 0
    for what, bad in hostile(state):
        dev = VirtioRng(host, **RNG)
        built = dev.snapshot()
        with pytest.raises(BadState):
            dev.restore(bad)
            pytest.fail(f"accepted: {what}")
        assert dev.snapshot() == built, what
        n += 1
    assert n > 300
    dev.start()                               # still usable: a fresh start
    assert common_r(dev, vs.VIRTIO_PCI_COMMON_STATUS, 1) == 0
    ready(dev)
    dev.stop()


def _core(state):
    return state["model"]["core"]


def _queue(state):
    return _core(state)["queues"][0]


@pytest.mark.parametrize("bad", ["driver_ok_alone", "features_not_offered", "offer_differs", "broken_silent",
                                 "needs_reset_silent", "ring_outside_ram", "ring_misaligned", "size_not_pow2",
                                 "inflight_beyond_size", "vector_beyond", "disabled_with_indices", "isr"])
def test_virtio_inconsistent_snapshots(registry, guarded, bad):
    _, old = rng_in_use(registry, guarded)
    state = old.snapshot()
    old.stop()
    core, q, transport = _core(state), _queue(state), state["model"]["transport"]
    if bad == "driver_ok_alone":
        core["status"] = vs.VIRTIO_CONFIG_S_DRIVER_OK | vs.VIRTIO_CONFIG_S_DRIVER
    elif bad == "features_not_offered":
        core["driver_features"] |= 1 << vs.VIRTIO_F_RING_PACKED
    elif bad == "offer_differs":
        core["features"] |= 1 << 5
    elif bad == "broken_silent":
        core["broken"] = "the driver broke it"
    elif bad == "needs_reset_silent":
        core["status"] |= vs.VIRTIO_CONFIG_S_NEEDS_RESET
    elif bad == "ring_outside_ram":
        q["device"] = 0x10_0000 - 8
    elif bad == "ring_misaligned":
        q["desc"] = DESC + 8
    elif bad == "size_not_pow2":
        q["size"] = 6
    elif bad == "inflight_beyond_size":
        q["last_avail"] = (q["used_idx"] + 9) & 0xFFFF
    elif bad == "vector_beyond":
        q["msix_vector"] = 2
    elif bad == "disabled_with_indices":
        q["enabled"] = False
    elif bad == "isr":
        transport["isr"] = 4
    dev = VirtioRng(KeptHost(registry, owner=9, memory=guarded.ram), **RNG)
    with pytest.raises(BadState):
        dev.restore(state)


def test_an_enabled_queue_needs_guest_memory(registry, guarded):
    _, old = rng_in_use(registry, guarded)
    state = old.snapshot()
    old.stop()
    with pytest.raises(BadState, match="guest memory"):
        VirtioRng(KeptHost(registry, owner=9), **RNG).restore(state)


# -- virtio-blk -----------------------------------------------------------------

SECTORS = 64
HDR, DATA, STATUS = BUF, BUF + 0x1000, BUF + 0x100


def blk_request(dev, ram, rtype, sector, data=b"", read_len=0):
    ram.write(HDR, struct.pack("<IIQ", rtype, 0, sector))
    ram.write(STATUS, b"\xee")
    descs = [(HDR, 16, 0)]
    if data:
        ram.write(DATA, data)
        descs.append((DATA, len(data), 0))
    if read_len:
        descs.append((DATA, read_len, VIRTQ_DESC_F_WRITE))
    descs.append((STATUS, 1, VIRTQ_DESC_F_WRITE))
    for i, (a, n, f) in enumerate(descs):
        put_desc(ram, i, a, n, f | (VIRTQ_DESC_F_NEXT if i + 1 < len(descs) else 0), i + 1)
    offer(ram, 0)
    notify(dev)
    return used(ram)[1][-1][1], ram.read(STATUS, 1)[0]


@pytest.fixture
def image(tmp_path):
    p = tmp_path / "disk.img"
    p.write_bytes(bytes(SECTORS * 512))
    return p


def blk_in_use(registry, guarded, image, **params):
    host = KeptHost(registry, memory=guarded.ram)
    dev = VirtioBlk(host, slot="4", path=str(image), serial="blk-7", **params)
    dev.start()
    assert negotiate(dev) == 0xB
    setup_queue(dev)
    common_w(dev, vs.VIRTIO_PCI_COMMON_STATUS, 1, 0xF)
    return host, dev


def test_blk_round_trip(registry, guarded, image):
    ram = guarded.ram
    host, old = blk_in_use(registry, guarded, image)
    pattern = os.urandom(1024)
    assert blk_request(old, ram, vb.VIRTIO_BLK_T_OUT, 2, data=pattern) == (1, 0)
    state = old.snapshot()
    plain(state)
    view = common_view(old)
    old.doorbells.stop()
    new_host = KeptHost(registry, memory=ram)
    new = VirtioBlk(new_host, slot="4", path=str(image), serial="blk-7")
    resume(new, wire(state))
    assert new_host.regions() == host.regions()
    assert common_view(new) == view
    ram.write(DATA, bytes(1024))
    assert blk_request(new, ram, vb.VIRTIO_BLK_T_IN, 2, read_len=1024) == (1025, 0)
    assert ram.read(DATA, 1024) == pattern
    assert blk_request(new, ram, vb.VIRTIO_BLK_T_GET_ID, 0, read_len=20) == (21, 0)
    assert ram.read(DATA, 20) == b"blk-7".ljust(20, b"\0")
    assert used(ram)[0] == 3                              # the ring went on
    new.stop()


def test_blk_image_resized_while_down_is_a_config_change(registry, guarded, image):
    host, old = blk_in_use(registry, guarded, image)
    state = old.snapshot()
    old.doorbells.stop()
    with open(image, "ab") as f:
        f.write(bytes(16 * 512))
    new_host = KeptHost(registry, memory=guarded.ram)
    new = VirtioBlk(new_host, slot="4", path=str(image), serial="blk-7")
    resume(new, state)
    assert struct.unpack("<Q", bytes(new.read(Space.MMIO, 0, vp.DEVICE_OFFSET + i, 1) for i in range(8)))[0] \
        == SECTORS + 16
    assert common_r(new, vs.VIRTIO_PCI_COMMON_CFGGENERATION, 1) == 1
    assert new.isr & vs.VIRTIO_PCI_ISR_CONFIG
    new.stop()


@pytest.mark.parametrize("params", [dict(serial="blk-8"), dict(serial="blk-7", readonly="on")])
def test_blk_refuses_a_snapshot_of_other_parameters(registry, guarded, image, params):
    _, old = blk_in_use(registry, guarded, image)
    state = old.snapshot()
    old.stop()
    with pytest.raises(BadState):
        VirtioBlk(KeptHost(registry, owner=9, memory=guarded.ram), slot="4", path=str(image),
                  **params).restore(state)


def test_blk_hostile_device_state(registry, guarded, image):
    _, old = blk_in_use(registry, guarded, image)
    state = old.snapshot()
    old.stop()
    for bad in ({"capacity": -1, "ident": state["model"]["device"]["ident"]}, {"capacity": 1},
                {"capacity": 1 << 64, "ident": b"blk-7".ljust(20, b"\0")},
                {"capacity": 1, "ident": b"blk-7"}, None, [1, 2]):
        s = {**state, "model": {**state["model"], "device": bad}}
        with pytest.raises(BadState):
            VirtioBlk(KeptHost(registry, owner=9, memory=guarded.ram), slot="4", path=str(image),
                      serial="blk-7").restore(s)


# -- virtio-console ---------------------------------------------------------------

RX = dict(desc=0x1000, avail=0x2000, used=0x3000)
TX = dict(desc=0x4000, avail=0x5000, used=0x6000)


def console_setup(dev, q, desc, avail, used):
    common_w(dev, vs.VIRTIO_PCI_COMMON_Q_SELECT, 2, q)
    common_w(dev, vs.VIRTIO_PCI_COMMON_Q_SIZE, 2, 8)
    for off, v in ((vs.VIRTIO_PCI_COMMON_Q_DESCLO, desc), (vs.VIRTIO_PCI_COMMON_Q_AVAILLO, avail),
                   (vs.VIRTIO_PCI_COMMON_Q_USEDLO, used)):
        common_w(dev, off, 4, v)
        common_w(dev, off + 4, 4, 0)
    common_w(dev, vs.VIRTIO_PCI_COMMON_Q_ENABLE, 2, 1)


class Pipes:
    def __init__(self):
        self.out_r, self.out_w = os.pipe2(os.O_NONBLOCK)
        self.in_r, self.in_w = os.pipe()

    @property
    def fds(self):
        return ConsoleFds(self.out_w, self.in_r)

    def close(self):
        for fd in (self.out_r, self.out_w, self.in_r, self.in_w):
            os.close(fd)


def test_console_keeps_input_the_guest_has_not_taken(registry, guarded):
    ram = guarded.ram
    old_pipes, new_pipes = Pipes(), Pipes()
    old = VirtioConsole(KeptHost(registry, memory=ram, console=old_pipes.fds), slot="5")
    old.start()
    assert negotiate(old) == 0xB
    console_setup(old, RECEIVEQ, **RX)
    console_setup(old, TRANSMITQ, **TX)
    common_w(old, vs.VIRTIO_PCI_COMMON_STATUS, 1, 0xF)
    os.write(old_pipes.in_w, b"typed ahead")          # no receive buffer yet: it waits
    wait_for(lambda: old.snapshot()["model"]["device"]["pending"] == b"typed ahead")
    state = old.snapshot()
    plain(state)
    old.stop()
    new = VirtioConsole(KeptHost(registry, memory=ram, console=new_pipes.fds), slot="5")
    resume(new, wire(state))
    ram.write_int(RX["desc"], 8, 0x8000)               # a receive buffer now
    ram.write_int(RX["desc"] + 8, 4, 64)
    ram.write_int(RX["desc"] + 12, 2, VIRTQ_DESC_F_WRITE)
    ram.write_int(RX["avail"] + 4, 2, 0)
    ram.write_int(RX["avail"] + 2, 2, 1)
    notify(new, RECEIVEQ)
    assert ram.read_int(RX["used"] + 2, 2) == 1
    assert ram.read_int(RX["used"] + 8, 4) == 11 and ram.read(0x8000, 11) == b"typed ahead"
    os.write(new_pipes.in_w, b"!")                     # and the new input after it
    ram.write_int(RX["avail"] + 6, 2, 0)
    ram.write_int(RX["avail"] + 2, 2, 2)
    notify(new, RECEIVEQ)
    wait_for(lambda: ram.read_int(RX["used"] + 2, 2) == 2)
    assert ram.read(0x8000, 1) == b"!"
    new.stop()
    old_pipes.close()
    new_pipes.close()


def test_console_hostile_device_state(registry, guarded):
    state = VirtioConsole(KeptHost(registry, memory=guarded.ram), slot="5").snapshot()
    for bad in ({"pending": b"x" * (1 << 20), "dropped": 0}, {"pending": "text", "dropped": 0},
                {"pending": b"", "dropped": -1}, {"pending": b""}):
        s = {**state, "model": {**state["model"], "device": bad}}
        with pytest.raises(BadState):
            VirtioConsole(KeptHost(registry, owner=9, memory=guarded.ram), slot="5").restore(s)


# -- anything restore accepts is safe to run ------------------------------------

def _leaves(value, path=()):
    if type(value) is dict:
        for k, v in value.items():
            yield from _leaves(v, path + (k,))
    elif type(value) is list:
        for i, v in enumerate(value):
            yield from _leaves(v, path + (i,))
    else:
        yield path, value


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_values_are_refused_or_safe(registry, guarded, data):
    """Random values of the right types in random fields of a real
    snapshot: restore refuses them (BadState) or the model starts, serves
    every register and a request, and stops -- never another error."""
    global _RNG_STATE
    if _RNG_STATE is None:
        _, old = rng_in_use(registry, guarded)
        _RNG_STATE = old.snapshot()
        old.stop()
    state = copy.deepcopy(_RNG_STATE)
    leaves = list(_leaves(state))
    for path, value in data.draw(st.lists(st.sampled_from(leaves), min_size=1, max_size=6)):
        if type(value) is bool:
            new = data.draw(st.booleans())
        elif type(value) is int:
            new = data.draw(st.one_of(st.integers(0, 0xFF), st.integers(0, 0xFFFF), st.integers(0, (1 << 64) - 1)))
        elif type(value) is bytes:
            new = data.draw(st.binary(min_size=len(value), max_size=len(value)))
        else:
            continue
        parent = state
        for p in path[:-1]:
            parent = parent[p]
        parent[path[-1]] = new
    dev = VirtioRng(KeptHost(registry, owner=11, memory=guarded.ram), **RNG)
    try:
        dev.restore(state)
    except BadState:
        return
    try:
        dev.start()
        common_view(dev)
        rng_request(guarded.ram, 6)
        notify(dev)
    finally:
        dev.stop()
        for r in registry.regions():
            if r.owner == 11:
                registry.unregister(r.bus, r.start, r.owner)


_RNG_STATE: dict | None = None
