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

Feature negotiation (§2.2, §3.1.1): the device offers VIRTIO_F_VERSION_1
plus its own features; FEATURES_OK stays clear when the driver accepted
something not offered or not VERSION_1 (this is a modern-only device).
Device status and reset (§2.1, §4.1.4.3.1): writing 0 resets the device;
DEVICE_NEEDS_RESET is set (and a configuration-change interrupt sent,
§2.1.2) when the driver breaks a ring as a whole or enables a queue whose
size or addresses cannot be used; queues are then left alone until reset.

Notifications: the device asks its host for one ioeventfd per queue at the
queue's notify address (a doorbell KVM signals with no exit), polls them
on its own thread, and moves them when the guest moves BAR 0; an MMIO
write that reaches the device anyway (no ioeventfd) is served the same.
Completions go out as the queue's MSI-X vector (or INTx, acknowledged by
reading the ISR).  Queues are processed under the device's lock.
"""

from __future__ import annotations

import abc
import logging
import os
import select
import struct
import threading

from devices.base import DeviceHost, HostRefused, Space, all_ones
from devices.guestmem import GuestMemoryFault, GuestRam
from devices.pci import Bar, BarKind, PciDevice
from devices.pci_config import PCI_CFG_SPACE_EXP_SIZE
from devices.virtio.virtqueue import Chain, QueueBroken, Virtqueue

log = logging.getLogger(__name__)

VIRTIO_PCI_VENDOR_ID = 0x1AF4
VIRTIO_PCI_DEVICE_ID_BASE = 0x1040         # §4.1.2.1: 0x1040 + device ID
VIRTIO_PCI_SUBSYSTEM_ID_BASE = 0x40

# §2.1 Device Status Field
VIRTIO_CONFIG_S_ACKNOWLEDGE = 1
VIRTIO_CONFIG_S_DRIVER = 2
VIRTIO_CONFIG_S_DRIVER_OK = 4
VIRTIO_CONFIG_S_FEATURES_OK = 8
VIRTIO_CONFIG_S_NEEDS_RESET = 0x40
VIRTIO_CONFIG_S_FAILED = 0x80

# §6 Reserved Feature Bits
VIRTIO_F_INDIRECT_DESC = 28
VIRTIO_F_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32
VIRTIO_F_ACCESS_PLATFORM = 33
VIRTIO_F_RING_PACKED = 34

# §4.1.4 Virtio Structure PCI Capabilities
PCI_CAP_ID_VNDR = 0x09
VIRTIO_PCI_CAP_COMMON_CFG = 1
VIRTIO_PCI_CAP_NOTIFY_CFG = 2
VIRTIO_PCI_CAP_ISR_CFG = 3
VIRTIO_PCI_CAP_DEVICE_CFG = 4
VIRTIO_PCI_CAP_PCI_CFG = 5
# struct virtio_pci_cap field offsets
VIRTIO_PCI_CAP_LEN = 2
VIRTIO_PCI_CAP_CFG_TYPE = 3
VIRTIO_PCI_CAP_BAR = 4
VIRTIO_PCI_CAP_ID = 5
VIRTIO_PCI_CAP_OFFSET = 8
VIRTIO_PCI_CAP_LENGTH = 12
VIRTIO_PCI_CAP_SIZEOF = 16
VIRTIO_PCI_NOTIFY_CAP_MULT = 16            # notify_off_multiplier
VIRTIO_PCI_NOTIFY_CAP_SIZEOF = 20
VIRTIO_PCI_CFG_DATA = 16                   # pci_cfg_data of virtio_pci_cfg_cap
VIRTIO_PCI_CFG_CAP_SIZEOF = 20

# §4.1.4.3 struct virtio_pci_common_cfg
VIRTIO_PCI_COMMON_DFSELECT = 0x00
VIRTIO_PCI_COMMON_DF = 0x04
VIRTIO_PCI_COMMON_GFSELECT = 0x08
VIRTIO_PCI_COMMON_GF = 0x0C
VIRTIO_PCI_COMMON_MSIX = 0x10
VIRTIO_PCI_COMMON_NUMQ = 0x12
VIRTIO_PCI_COMMON_STATUS = 0x14
VIRTIO_PCI_COMMON_CFGGENERATION = 0x15
VIRTIO_PCI_COMMON_Q_SELECT = 0x16
VIRTIO_PCI_COMMON_Q_SIZE = 0x18
VIRTIO_PCI_COMMON_Q_MSIX = 0x1A
VIRTIO_PCI_COMMON_Q_ENABLE = 0x1C
VIRTIO_PCI_COMMON_Q_NOFF = 0x1E
VIRTIO_PCI_COMMON_Q_DESCLO = 0x20
VIRTIO_PCI_COMMON_Q_DESCHI = 0x24
VIRTIO_PCI_COMMON_Q_AVAILLO = 0x28
VIRTIO_PCI_COMMON_Q_AVAILHI = 0x2C
VIRTIO_PCI_COMMON_Q_USEDLO = 0x30
VIRTIO_PCI_COMMON_Q_USEDHI = 0x34
VIRTIO_PCI_COMMON_CFG_SIZE = 0x38          # the virtio 1.0 structure

VIRTIO_MSI_NO_VECTOR = 0xFFFF
VIRTIO_PCI_ISR_QUEUE = 1
VIRTIO_PCI_ISR_CONFIG = 2

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

#: Failed requests per queue (until reset) logged as warnings; then debug.
LOGGED_FAILURES = 10

_COMMON = struct.Struct("<IIIIHHBBHHHHHQQQ")
assert _COMMON.size == VIRTIO_PCI_COMMON_CFG_SIZE


class VirtioPciDevice(PciDevice):
    """Base of virtio-pci device models.

    A subclass sets ``virtio_id``, ``class_code``, ``queue_sizes`` (one
    maximum size per queue) and ``device_features``, and implements
    :meth:`handle` (one request) and, if it has any, the device-specific
    configuration (:meth:`device_config`, :meth:`device_config_write`).
    """

    virtio_id = 0
    queue_sizes: tuple[int, ...] = ()
    device_features = 0
    vendor_id = VIRTIO_PCI_VENDOR_ID
    revision = 1
    subsystem_vendor_id = VIRTIO_PCI_VENDOR_ID
    interrupt_pin = 1

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        cls.device_id = VIRTIO_PCI_DEVICE_ID_BASE + cls.virtio_id
        cls.subsystem_id = VIRTIO_PCI_SUBSYSTEM_ID_BASE + cls.virtio_id

    def __init__(self, host: DeviceHost, **params: str):
        super().__init__(host, **params)
        self.features = (1 << VIRTIO_F_VERSION_1) | self.device_features
        self.queues = [Virtqueue(i, n) for i, n in enumerate(self.queue_sizes)]
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
        self._doorbells: dict[int, object] = {}     # queue -> Doorbell
        self._doorbell_base: int | None = None
        self._doorbells_failed = False
        self._wake = -1            # made in start(): a model built only to validate holds no fd
        self._notifier: threading.Thread | None = None
        self._mem: GuestRam | None = None
        self._reset_state()

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

    def _reset_state(self) -> None:
        """Device reset (§2.4): everything the driver set goes back."""
        self.status = 0
        self.device_feature_select = 0
        self.driver_feature_select = 0
        self.driver_features = 0
        self.config_msix_vector = VIRTIO_MSI_NO_VECTOR
        self.config_generation = 0
        self.queue_select = 0
        self.isr = 0
        self.broken: str | None = None
        for q in self.queues:
            q.reset()
        self.device_reset()

    # -- for subclasses ----------------------------------------------------

    def device_reset(self) -> None:
        """Put device-specific state back to its power-on values."""

    def device_config(self) -> bytes:
        """The device-specific configuration structure."""
        return b""

    def device_config_write(self, offset: int, size: int, value: int) -> None:
        """A driver write into the device-specific configuration."""

    @abc.abstractmethod
    def handle(self, queue: Virtqueue, chain: Chain, mem: GuestRam) -> int:
        """Serve one valid request; returns the bytes written into its
        device-writable buffers.  May raise GuestMemoryFault."""

    def fail_request(self, queue: Virtqueue, chain: Chain, mem: GuestRam) -> int:
        """A request whose chain broke a rule (``chain.error``): what to
        write back; by default nothing (used length 0)."""
        return 0

    def config_changed(self) -> None:
        """Tell the driver the device configuration changed (§4.1.4.5)."""
        with self._lock:
            self.config_generation = (self.config_generation + 1) & 0xFF
            self._config_interrupt()

    # -- life ----------------------------------------------------------------

    def start(self) -> None:
        try:
            self._mem = self.host.guest_memory()
        except HostRefused as e:
            log.warning("%s: no guest memory (%s); queues cannot be used", self.kind, e)
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        super().start()
        self._notifier = threading.Thread(target=self._notify_loop, name=f"{self.kind}-notify", daemon=True)
        self._notifier.start()

    def stop(self) -> None:
        self._stopped.set()
        self._kick_notifier()
        if self._notifier is not None and self._notifier is not threading.current_thread():
            self._notifier.join(5.0)
        with self._lock:
            self._drop_doorbells()
        super().stop()
        if self._wake >= 0:
            os.close(self._wake)
            self._wake = -1

    # -- doorbells -------------------------------------------------------------

    def _sync(self, bar: Bar) -> None:
        super()._sync(bar)
        if bar is self.vbar:
            self._rebind_doorbells()

    def _retry_conflicts(self) -> None:
        super()._retry_conflicts()
        self._rebind_doorbells()

    def _rebind_doorbells(self) -> None:
        """Keep one ioeventfd per queue at its notify address while BAR 0
        is registered (lock held; also inside the BAR write's handler)."""
        base = self.vbar.mapped
        if base == self._doorbell_base:
            return
        self._drop_doorbells()
        if base is None or self._doorbells_failed or self._stopped.is_set():
            return
        for q in self.queues:
            addr = base + NOTIFY_OFFSET + q.index * NOTIFY_OFF_MULTIPLIER
            try:
                self._doorbells[q.index] = self.host.ioeventfd(Space.MMIO, addr, NOTIFY_LENGTH)
            except HostRefused as e:
                log.info("%s: no ioeventfd for queue %d (%s); notifications come as MMIO writes",
                         self.kind, q.index, e)
                self._doorbells_failed = True
                break
        self._doorbell_base = base
        self._kick_notifier()

    def _kick_notifier(self) -> None:
        if self._wake >= 0:
            os.eventfd_write(self._wake, 1)

    def _drop_doorbells(self) -> None:
        bells, self._doorbells = self._doorbells, {}
        self._doorbell_base = None
        for bell in bells.values():
            try:
                bell.remove()
            except HostRefused as e:  # the host is going away
                log.debug("%s: removing a doorbell: %s", self.kind, e)

    def _notify_loop(self) -> None:
        """Poll the doorbells; process the queue whose bell rang."""
        while not self._stopped.is_set():
            with self._lock:
                watched = {bell.fd: q for q, bell in self._doorbells.items() if bell.fd >= 0}
            poller = select.poll()
            poller.register(self._wake, select.POLLIN)
            for fd in watched:
                poller.register(fd, select.POLLIN)
            try:
                events = poller.poll(1000)
            except (OSError, ValueError):
                continue
            for fd, ev in events:
                if fd == self._wake:
                    _drain(fd)              # the doorbells changed: look again
                    continue
                if ev & select.POLLNVAL:
                    continue
                with self._lock:
                    q = watched.get(fd)
                    bell = self._doorbells.get(q) if q is not None else None
                    if bell is None or bell.fd != fd:
                        continue            # moved or dropped since we looked
                    rung = _drain(fd)       # the eventfd sums the guest's writes
                    if rung:
                        self.notifies_eventfd += rung
                        self._process(self.queues[q])

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
            self._process(self.queues[(offset - NOTIFY_OFFSET) // NOTIFY_OFF_MULTIPLIER])

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
            if self.status & VIRTIO_CONFIG_S_FEATURES_OK or self.driver_feature_select >= 2:
                return          # §2.2.1: no feature changes after FEATURES_OK
            shift = 32 * self.driver_feature_select
            self.driver_features = (self.driver_features & ~(0xFFFF_FFFF << shift)) | (value << shift)
        elif o == VIRTIO_PCI_COMMON_MSIX and size == 2:
            self.config_msix_vector = self._msix_vector_value(value)
        elif o == VIRTIO_PCI_COMMON_STATUS and size == 1:
            self._status_write(value)
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
                self._enable(q)
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

    def _status_write(self, value: int) -> None:
        if value == 0:
            log.debug("%s: reset by the driver", self.kind)
            self._reset_state()
            self.deassert_intx()
            return
        new = value & ~VIRTIO_CONFIG_S_NEEDS_RESET | (self.status & VIRTIO_CONFIG_S_NEEDS_RESET)
        if new & VIRTIO_CONFIG_S_FEATURES_OK and not self.status & VIRTIO_CONFIG_S_FEATURES_OK:
            extra = self.driver_features & ~self.features
            if extra or not self.driver_features >> VIRTIO_F_VERSION_1 & 1:
                log.warning("%s: FEATURES_OK refused: driver features %#x (offered %#x; VERSION_1 is required)",
                            self.kind, self.driver_features, self.features)
                new &= ~VIRTIO_CONFIG_S_FEATURES_OK
        if new & VIRTIO_CONFIG_S_DRIVER_OK and not new & VIRTIO_CONFIG_S_FEATURES_OK:
            new &= ~VIRTIO_CONFIG_S_DRIVER_OK
        was_ok = self.status & VIRTIO_CONFIG_S_DRIVER_OK
        self.status = new
        if new & VIRTIO_CONFIG_S_DRIVER_OK and not was_ok:
            for q in self.queues:
                self._process(q)

    def _enable(self, q: Virtqueue) -> None:
        if self._mem is None:
            self.needs_reset(f"queue {q.index} enabled, but the device has no guest memory")
            return
        why = q.check_layout(self._mem)
        if why is not None:
            self.needs_reset(why)
            return
        q.enabled = True
        q.last_avail = q.used_idx = 0

    # -- the data path ----------------------------------------------------------

    def needs_reset(self, why: str) -> None:
        """The driver broke the device's state: DEVICE_NEEDS_RESET and a
        configuration-change notification (§2.1.2); queues stop."""
        if self.broken is None:
            log.warning("%s: device needs reset: %s", self.kind, why)
        self.broken = why
        self.status |= VIRTIO_CONFIG_S_NEEDS_RESET
        self._config_interrupt()

    def _config_interrupt(self) -> None:
        self.isr |= VIRTIO_PCI_ISR_CONFIG
        if self.msix is not None and self.msix.enabled:
            if self.config_msix_vector != VIRTIO_MSI_NO_VECTOR:
                self.raise_interrupt(self.config_msix_vector)
        else:
            self.raise_interrupt()

    def _process(self, q: Virtqueue) -> None:
        """Serve what the driver made available on ``q`` (lock held).
        Bounded: at most 4 * size requests per call."""
        mem = self.queue_ready(q)
        if mem is None:
            return
        done = 0
        try:
            for _ in range(4 * q.size):
                chain = q.pop(mem)
                if chain is None:
                    break
                if chain.error is not None:
                    self.count_failed(q, chain)
                    written = self._guarded(self.fail_request, q, chain, mem)
                else:
                    written = self._guarded(self.handle, q, chain, mem)
                    q.served += 1
                q.push(mem, chain.head, written)
                done += 1
        except (QueueBroken, GuestMemoryFault) as e:
            self.needs_reset(str(e))
            return
        if done:
            self.used_notify(q, mem)

    def count_failed(self, q: Virtqueue, chain: Chain) -> None:
        """Log and count a request whose chain broke a rule; only the first
        few per queue at WARNING, so a hostile driver cannot flood the log."""
        log.log(logging.WARNING if q.failed < LOGGED_FAILURES else logging.DEBUG,
                "%s: queue %d: request %d failed: %s", self.kind, q.index, chain.head, chain.error)
        q.failed += 1

    def queue_ready(self, q: Virtqueue) -> GuestRam | None:
        """Guest RAM if queue ``q`` may be used now (lock held), else None."""
        mem = self._mem
        if (mem is None or not q.enabled or self.broken is not None
                or not self.status & VIRTIO_CONFIG_S_DRIVER_OK):
            return None
        return mem

    def used_notify(self, q: Virtqueue, mem: GuestRam) -> None:
        """Used buffers were added to ``q``: interrupt the driver unless it
        asked not to (§2.7.7; lock held)."""
        try:
            if not q.wants_interrupt(mem):
                return
        except GuestMemoryFault as e:
            self.needs_reset(str(e))
            return
        self.isr |= VIRTIO_PCI_ISR_QUEUE
        if self.msix is not None and self.msix.enabled:
            if q.msix_vector != VIRTIO_MSI_NO_VECTOR:
                self.raise_interrupt(q.msix_vector)
        else:
            self.raise_interrupt()

    def _guarded(self, fn, q: Virtqueue, chain: Chain, mem: GuestRam) -> int:
        try:
            return fn(q, chain, mem)
        except GuestMemoryFault as e:       # validated, but be safe
            log.warning("%s: queue %d: request %d: %s", self.kind, q.index, chain.head, e)
            q.failed += 1
            return 0
        except Exception:                   # a bug in the model fails the request, not the device
            log.exception("%s: queue %d: request %d", self.kind, q.index, chain.head)
            q.failed += 1
            return 0

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


def _drain(fd: int) -> int:
    try:
        return os.eventfd_read(fd)
    except (BlockingIOError, OSError):
        return 0
