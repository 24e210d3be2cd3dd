"""The virtio 1.x PCI transport, modern only (virtio 1.2 §4.1), on
:class:`devices.pci.PciDevice`.

Function: vendor :data:`VIRTIO_PCI_VENDOR_ID`, device 0x1040 + the virtio
device ID (§4.1.2), revision 1, subsystem vendor 0x1AF4, subsystem ID
0x40 + the device ID.  Interrupt pin INTA# for drivers without MSI-X.

===== ============= ====================================================
BAR   kind, size    contents
===== ============= ====================================================
0     mem64, 16 KiB 0x0000 common configuration (§4.1.4.3),
                    0x1000 ISR status (§4.1.4.5),
                    0x2000 device-specific configuration (§4.1.4.6),
                    0x3000 notifications (§4.1.4.4): queue ``q`` at
                    0x3000 + 4 q (queue_notify_off = q, multiplier 4),
                    0x3800 splitvmm counters (not virtio): read 4 at
                    +0 notifications that came through the ioeventfd,
                    +4 those that came as MMIO writes through the VMM
                    (doorbell writes, counted as the eventfd sums them)
2     mem64, 4 KiB  MSI-X table at 0x000, PBA at 0x800; one vector per
                    queue plus one for configuration changes
===== ============= ====================================================

Capabilities (§4.1.4): VIRTIO_PCI_CAP_COMMON_CFG, _NOTIFY_CFG, _ISR_CFG,
_DEVICE_CFG, _PCI_CFG (the configuration-space window of §4.1.4.9), and
MSI-X.

The status, feature and queue logic is the transport-independent
:class:`devices.virtio.core.VirtioCore`; the spec's numbers are in
:mod:`devices.virtio.spec`.

Notifications: the device asks its host for one ioeventfd per queue at the
queue's notify address (a doorbell KVM signals with no exit), polls them
on a thread of its own (:mod:`devices.virtio.doorbells`), and moves them
when the guest moves BAR 0 (:meth:`devices.pci.PciDevice.bar_moved`); an
MMIO write that reaches the device anyway (no ioeventfd) is served the
same.  Completions go out as the queue's MSI-X vector (or INTx,
acknowledged by reading the ISR).  Queues are processed under the
device's lock.
"""

from __future__ import annotations

import logging
import struct
from typing import cast

from devices.base import DeviceHost, HostRefused, Space, all_ones
from devices.faults.table import POINTS
from devices.pci import Bar, BarKind, PciDevice
from devices.pci_config import PCI_CFG_SPACE_EXP_SIZE
from devices.guestmem import GuestRam
from devices.snapshot import U16, U32, Fields, require
from devices.virtio.core import VirtioCore
from devices.virtio.doorbells import Doorbells
from devices.virtio.spec import (
    PCI_CAP_ID_VNDR,
    VIRTIO_MSI_NO_VECTOR,
    VIRTIO_PCI_CAP_BAR,
    VIRTIO_PCI_CAP_CFG_TYPE,
    VIRTIO_PCI_CAP_COMMON_CFG,
    VIRTIO_PCI_CAP_DEVICE_CFG,
    VIRTIO_PCI_CAP_ISR_CFG,
    VIRTIO_PCI_CAP_LEN,
    VIRTIO_PCI_CAP_LENGTH,
    VIRTIO_PCI_CAP_NOTIFY_CFG,
    VIRTIO_PCI_CAP_OFFSET,
    VIRTIO_PCI_CAP_PCI_CFG,
    VIRTIO_PCI_CAP_SIZEOF,
    VIRTIO_PCI_CFG_CAP_SIZEOF,
    VIRTIO_PCI_CFG_DATA,
    VIRTIO_PCI_COMMON_CFG_SIZE,
    VIRTIO_PCI_COMMON_DFSELECT,
    VIRTIO_PCI_COMMON_GF,
    VIRTIO_PCI_COMMON_GFSELECT,
    VIRTIO_PCI_COMMON_MSIX,
    VIRTIO_PCI_COMMON_Q_DESCLO,
    VIRTIO_PCI_COMMON_Q_ENABLE,
    VIRTIO_PCI_COMMON_Q_MSIX,
    VIRTIO_PCI_COMMON_Q_SELECT,
    VIRTIO_PCI_COMMON_Q_SIZE,
    VIRTIO_PCI_COMMON_STATUS,
    VIRTIO_PCI_DEVICE_ID_BASE,
    VIRTIO_PCI_ISR_CONFIG,
    VIRTIO_PCI_ISR_QUEUE,
    VIRTIO_PCI_NOTIFY_CAP_MULT,
    VIRTIO_PCI_NOTIFY_CAP_SIZEOF,
    VIRTIO_PCI_SUBSYSTEM_ID_BASE,
    VIRTIO_PCI_VENDOR_ID,
)
from devices.virtio.virtqueue import Virtqueue

log = logging.getLogger(__name__)

# Layout of BAR 0 (module docstring)
BAR_VIRTIO = 0
BAR_MSIX = 2
VIRTIO_BAR_SIZE = 0x4000
COMMON_OFFSET = 0x0000
ISR_OFFSET = 0x1000
DEVICE_OFFSET = 0x2000
DEVICE_CFG_MAX = 0x1000
NOTIFY_OFFSET = 0x3000
NOTIFY_OFF_MULTIPLIER = 4
NOTIFY_LENGTH = 2                          # the driver writes a 16-bit queue index
STATS_OFFSET = 0x3800
STATS_SIZE = 8
MSIX_BAR_SIZE = 0x1000
MSIX_TABLE = 0x000
MSIX_PBA = 0x800

_COMMON = struct.Struct("<IIIIHHBBHHHHHQQQ")
assert _COMMON.size == VIRTIO_PCI_COMMON_CFG_SIZE


class VirtioPciDevice(VirtioCore, PciDevice):
    """Base of virtio-pci device models.

    A subclass sets ``virtio_id``, ``class_code``, ``queue_sizes`` (one
    maximum size per queue) and ``device_features``, and implements
    :meth:`handle` (one request) and, if it has any, the device-specific
    configuration (:meth:`device_config`, :meth:`device_config_write`);
    the other hooks are :class:`devices.virtio.core.VirtioCore`'s.
    """

    virtio_id = 0
    #: Every virtio device's fault points (devices.faults); a device adds its own.
    fault_points = {"irq": POINTS["irq"], "queue.complete": POINTS["queue.complete"]}
    vendor_id = VIRTIO_PCI_VENDOR_ID
    revision = 1
    subsystem_vendor_id = VIRTIO_PCI_VENDOR_ID
    interrupt_pin = 1
    #: Doorbell threads (queue q is polled by thread q % notify_threads).
    notify_threads = 1

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        cls.device_id = VIRTIO_PCI_DEVICE_ID_BASE + cls.virtio_id
        cls.subsystem_id = VIRTIO_PCI_SUBSYSTEM_ID_BASE + cls.virtio_id

    def __init__(self, host: DeviceHost, **params: str):
        super().__init__(host, **params)
        self.init_core()
        self.vbar = self.add_bar(BAR_VIRTIO, BarKind.MEM64, VIRTIO_BAR_SIZE)
        self.add_bar(BAR_MSIX, BarKind.MEM64, MSIX_BAR_SIZE)
        self._add_virtio_cap(VIRTIO_PCI_CAP_COMMON_CFG, COMMON_OFFSET, VIRTIO_PCI_COMMON_CFG_SIZE)
        notify = self._add_virtio_cap(VIRTIO_PCI_CAP_NOTIFY_CFG, NOTIFY_OFFSET,
                                      max(1, len(self.queues)) * NOTIFY_OFF_MULTIPLIER,
                                      VIRTIO_PCI_NOTIFY_CAP_SIZEOF)
        self.config.set(notify + VIRTIO_PCI_NOTIFY_CAP_MULT, 4, NOTIFY_OFF_MULTIPLIER)
        self._add_virtio_cap(VIRTIO_PCI_CAP_ISR_CFG, ISR_OFFSET, 1)
        self._add_virtio_cap(VIRTIO_PCI_CAP_DEVICE_CFG, DEVICE_OFFSET, DEVICE_CFG_MAX)
        self.pci_cfg_cap = self._add_virtio_cap(VIRTIO_PCI_CAP_PCI_CFG, 0, 0, VIRTIO_PCI_CFG_CAP_SIZEOF)
        c = self.config
        c.set_wmask(self.pci_cfg_cap + VIRTIO_PCI_CAP_BAR, 1, 0xFF)
        c.set_wmask(self.pci_cfg_cap + VIRTIO_PCI_CAP_OFFSET, 4, 0xFFFF_FFFF)
        c.set_wmask(self.pci_cfg_cap + VIRTIO_PCI_CAP_LENGTH, 4, 0xFFFF_FFFF)
        c.set_wmask(self.pci_cfg_cap + VIRTIO_PCI_CFG_DATA, 4, 0xFFFF_FFFF)
        self.add_msix(len(self.queues) + 1, BAR_MSIX, MSIX_TABLE, MSIX_PBA)
        #: Notifications seen through the ioeventfds / as MMIO writes.
        self.notifies_eventfd = 0
        self.notifies_mmio = 0
        self.doorbells = Doorbells(host, self._lock, self.kind, NOTIFY_LENGTH, self._rung,
                                   threads=self.notify_threads)
        self._reset_transport()
        self.reset_core()

    def _add_virtio_cap(self, cfg_type: int, offset: int, length: int,
                        size: int = VIRTIO_PCI_CAP_SIZEOF) -> int:
        at = self.add_capability(PCI_CAP_ID_VNDR, size)
        c = self.config
        c.set(at + VIRTIO_PCI_CAP_LEN, 1, size)
        c.set(at + VIRTIO_PCI_CAP_CFG_TYPE, 1, cfg_type)
        c.set(at + VIRTIO_PCI_CAP_BAR, 1, BAR_VIRTIO)
        c.set(at + VIRTIO_PCI_CAP_OFFSET, 4, offset)
        c.set(at + VIRTIO_PCI_CAP_LENGTH, 4, length)
        return at

    def _reset_transport(self) -> None:
        self.device_feature_select = 0
        self.driver_feature_select = 0
        self.config_msix_vector = VIRTIO_MSI_NO_VECTOR
        self.queue_select = 0
        self.isr = 0

    def reset(self) -> None:
        """Device reset (§2.4, the driver wrote 0 to the status)."""
        self._reset_transport()
        self.reset_core()
        self.deassert_intx()

    # -- life ----------------------------------------------------------------

    def start(self) -> None:
        try:
            self._mem = self.host.guest_memory()
        except HostRefused as e:
            log.warning("%s: no guest memory (%s); queues cannot be used", self.kind, e)
        self.doorbells.start()
        super().start()
        if self.restored:
            with self._lock:
                self.resume_queues()

    def stop(self) -> None:
        self.doorbells.stop()
        super().stop()

    # -- snapshot: transport, core, device (devices.base.Device, "Snapshots") --

    def model_state(self) -> dict:
        return {"transport": {"device_feature_select": self.device_feature_select,
                              "driver_feature_select": self.driver_feature_select,
                              "config_msix_vector": self.config_msix_vector,
                              "queue_select": self.queue_select, "isr": self.isr,
                              "notifies_eventfd": self.notifies_eventfd, "notifies_mmio": self.notifies_mmio},
                "core": self.core_state(), "device": self.device_state()}

    def check_model_state(self, state: object, where: str) -> object:
        f = Fields(state, where, ("transport", "core", "device"))
        t = f.sub("transport", ("device_feature_select", "driver_feature_select", "config_msix_vector",
                                "queue_select", "isr", "notifies_eventfd", "notifies_mmio"))
        assert self.msix is not None
        nvectors = self.msix.nvectors
        transport = {k: t.integer(k, 0, U32) for k in ("device_feature_select", "driver_feature_select")}
        transport.update({k: t.integer(k) for k in ("notifies_eventfd", "notifies_mmio")})
        transport["queue_select"] = t.integer("queue_select", 0, U16)
        transport["isr"] = t.integer("isr", 0, VIRTIO_PCI_ISR_QUEUE | VIRTIO_PCI_ISR_CONFIG)
        vector = t.integer("config_msix_vector", 0, U16)
        require(vector < nvectors or vector == VIRTIO_MSI_NO_VECTOR, t.name("config_msix_vector"),
                f"{vector} (the function has {nvectors} vectors)")
        transport["config_msix_vector"] = vector
        try:
            mem: GuestRam | None = self.host.guest_memory()
        except HostRefused:
            mem = None
        core = self.check_core_state(f.state["core"], f.name("core"), mem, nvectors)
        device = self.check_device_state(f.state["device"], f.name("device"))
        return transport, core, device

    def load_model_state(self, checked: object) -> None:
        transport, core, device = cast("tuple[dict[str, object], dict, object]", checked)  # check_model_state's
        for k, v in transport.items():
            setattr(self, k, v)
        self.load_core_state(core)
        self.load_device_state(device)

    def resume_queues(self) -> None:
        """After a restore (lock held): serve what the driver made
        available while the device was down -- a doorbell the dead
        process had drained but not served is not lost."""
        for q in self.queues:
            self.process_queue(q)

    # -- doorbells -------------------------------------------------------------

    def bar_moved(self, bar: Bar) -> None:
        """BAR 0 moved: the doorbells go with it (lock held)."""
        if bar is not self.vbar:
            return
        base = bar.mapped
        self.doorbells.bind(None if base is None else {
            q.index: base + NOTIFY_OFFSET + q.index * NOTIFY_OFF_MULTIPLIER for q in self.queues})

    def _rung(self, queue: int, count: int) -> None:
        self.notifies_eventfd += count
        self.process_queue(self.queues[queue])

    # -- BAR 0 ------------------------------------------------------------------

    def bar_read(self, bar: Bar, offset: int, size: int) -> int:
        if bar is not self.vbar:
            return all_ones(size)
        if COMMON_OFFSET <= offset and offset + size <= COMMON_OFFSET + VIRTIO_PCI_COMMON_CFG_SIZE:
            raw = self._common_bytes()
            o = offset - COMMON_OFFSET
            return int.from_bytes(raw[o:o + size], "little")
        if offset == ISR_OFFSET:
            value, self.isr = self.isr, 0       # §4.1.4.5.1: reading clears
            self.deassert_intx()
            return value
        if DEVICE_OFFSET <= offset and offset + size <= DEVICE_OFFSET + DEVICE_CFG_MAX:
            raw = self.device_config()
            o = offset - DEVICE_OFFSET
            if o + size <= len(raw):
                return int.from_bytes(raw[o:o + size], "little")
            return 0
        if offset == STATS_OFFSET and size == 4:
            return self.notifies_eventfd & 0xFFFF_FFFF
        if offset == STATS_OFFSET + 4 and size == 4:
            return self.notifies_mmio & 0xFFFF_FFFF
        return 0 if NOTIFY_OFFSET <= offset < STATS_OFFSET else all_ones(size)

    def bar_write(self, bar: Bar, offset: int, size: int, value: int) -> None:
        if bar is not self.vbar:
            return
        if COMMON_OFFSET <= offset and offset + size <= COMMON_OFFSET + VIRTIO_PCI_COMMON_CFG_SIZE:
            self._common_write(offset - COMMON_OFFSET, size, value)
        elif DEVICE_OFFSET <= offset and offset + size <= DEVICE_OFFSET + DEVICE_CFG_MAX:
            self.device_config_write(offset - DEVICE_OFFSET, size, value)
        elif NOTIFY_OFFSET <= offset < NOTIFY_OFFSET + len(self.queues) * NOTIFY_OFF_MULTIPLIER:
            self.notifies_mmio += 1
            self.process_queue(self.queues[(offset - NOTIFY_OFFSET) // NOTIFY_OFF_MULTIPLIER])

    def _selected(self) -> Virtqueue | None:
        qs = self.queue_select
        return self.queues[qs] if qs < len(self.queues) else None

    def _common_bytes(self) -> bytes:
        q = self._selected()
        sel = self.device_feature_select
        df = (self.features >> (32 * sel)) & 0xFFFF_FFFF if sel < 2 else 0
        gsel = self.driver_feature_select
        gf = (self.driver_features >> (32 * gsel)) & 0xFFFF_FFFF if gsel < 2 else 0
        if q is None:   # §4.1.4.3.2: an unavailable queue reads size 0
            qfields = (0, VIRTIO_MSI_NO_VECTOR, 0, 0, 0, 0, 0)
        else:
            qfields = (q.size, q.msix_vector, int(q.enabled), q.index, q.desc, q.driver, q.device)
        return _COMMON.pack(sel, df, gsel, gf, self.config_msix_vector, len(self.queues), self.status,
                            self.config_generation, self.queue_select, *qfields)

    def _msix_vector_value(self, v: int) -> int:
        """§4.1.5.1.2: a vector the device cannot map reads back NO_VECTOR."""
        assert self.msix is not None
        return v if v < self.msix.nvectors else VIRTIO_MSI_NO_VECTOR

    def _common_write(self, o: int, size: int, value: int) -> None:
        q = self._selected()
        if o == VIRTIO_PCI_COMMON_DFSELECT and size == 4:
            self.device_feature_select = value
        elif o == VIRTIO_PCI_COMMON_GFSELECT and size == 4:
            self.driver_feature_select = value
        elif o == VIRTIO_PCI_COMMON_GF and size == 4:
            if self.features_locked() or self.driver_feature_select >= 2:
                return          # §2.2.1: no feature changes after FEATURES_OK
            shift = 32 * self.driver_feature_select
            self.driver_features = (self.driver_features & ~(0xFFFF_FFFF << shift)) | (value << shift)
        elif o == VIRTIO_PCI_COMMON_MSIX and size == 2:
            self.config_msix_vector = self._msix_vector_value(value)
        elif o == VIRTIO_PCI_COMMON_STATUS and size == 1:
            self.status_write(value)
        elif o == VIRTIO_PCI_COMMON_Q_SELECT and size == 2:
            self.queue_select = value
        elif q is None or q.enabled:
            # §4.1.4.3.2: the driver sets a queue up before enabling it;
            # writes to an unavailable or enabled queue are ignored.
            if q is not None and o == VIRTIO_PCI_COMMON_Q_MSIX and size == 2:
                q.msix_vector = self._msix_vector_value(value)
            return
        elif o == VIRTIO_PCI_COMMON_Q_SIZE and size == 2:
            q.size = value
        elif o == VIRTIO_PCI_COMMON_Q_MSIX and size == 2:
            q.msix_vector = self._msix_vector_value(value)
        elif o == VIRTIO_PCI_COMMON_Q_ENABLE and size == 2:
            if value == 1:
                self.enable_queue(q)
        elif VIRTIO_PCI_COMMON_Q_DESCLO <= o < VIRTIO_PCI_COMMON_CFG_SIZE and size in (4, 8) and o % size == 0:
            field = ("desc", "driver", "device")[(o - VIRTIO_PCI_COMMON_Q_DESCLO) // 8]
            old = getattr(q, field)
            if size == 8:
                new = value
            elif o % 8 == 0:
                new = (old & ~0xFFFF_FFFF) | value
            else:
                new = (old & 0xFFFF_FFFF) | (value << 32)
            setattr(q, field, new)

    # -- interrupts (§4.1.4.5, §4.1.5.1.3) ---------------------------------------

    def interrupt_queue(self, queue: Virtqueue) -> None:
        self.isr |= VIRTIO_PCI_ISR_QUEUE
        if self.msix is not None and self.msix.enabled:
            if queue.msix_vector != VIRTIO_MSI_NO_VECTOR:
                self.raise_interrupt(queue.msix_vector)
        else:
            self.raise_interrupt()

    def interrupt_config(self) -> None:
        self.isr |= VIRTIO_PCI_ISR_CONFIG
        if self.msix is not None and self.msix.enabled:
            if self.config_msix_vector != VIRTIO_MSI_NO_VECTOR:
                self.raise_interrupt(self.config_msix_vector)
        else:
            self.raise_interrupt()

    # -- VIRTIO_PCI_CAP_PCI_CFG (§4.1.4.9) ---------------------------------------

    def read(self, space: Space, cookie: int, offset: int, size: int) -> int:
        if space is Space.PCI and self._in_cfg_data(offset, size):
            with self._lock:
                access = self._cfg_window()
                if access is None:
                    return 0
                return self.bar_read(self.vbar, access[0], access[1])
        return super().read(space, cookie, offset, size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        super().config_write(offset, size, value)
        if self._in_cfg_data(offset, size):
            self.config.write(offset, size, value)
            access = self._cfg_window()
            if access is not None:
                self.bar_write(self.vbar, access[0], access[1], value & all_ones(access[1]))

    def _in_cfg_data(self, offset: int, size: int) -> bool:
        data = self.pci_cfg_cap + VIRTIO_PCI_CFG_DATA
        return offset == data and size in (1, 2, 4) and offset + size <= PCI_CFG_SPACE_EXP_SIZE

    def _cfg_window(self) -> tuple[int, int] | None:
        """(offset in BAR 0, length) the window names, if it is usable."""
        c, cap = self.config, self.pci_cfg_cap
        bar = c.get(cap + VIRTIO_PCI_CAP_BAR, 1)
        off = c.get(cap + VIRTIO_PCI_CAP_OFFSET, 4)
        length = c.get(cap + VIRTIO_PCI_CAP_LENGTH, 4)
        if bar != BAR_VIRTIO or length not in (1, 2, 4) or off % length or off + length > VIRTIO_BAR_SIZE:
            return None
        return off, length

