"""PCI functions of device models: the type-0 header, the capability
list, BARs that the guest sizes and moves, and MSI-X -- the part that
keeps the function's regions in the registry.  Register names and the
configuration bytes are in :mod:`devices.pci_config`, MSI-X in
:mod:`devices.pci_msix`.  Section numbers are those of the PCI Local Bus
Specification 3.0 ("PCI 3.0") unless PCIe is named.

A model subclasses :class:`PciDevice`, declares its BARs and capabilities
in ``__init__`` and serves its BAR regions in :meth:`PciDevice.bar_read` /
:meth:`PciDevice.bar_write`.  The base class claims the function's
configuration space on ``Space.PCI`` (4 KiB per function, keyed like
``ipc.pci_address``), serves it, and keeps the BAR regions in the registry
in step with the COMMAND register and the BARs (PCI 3.0 6.2.2, 6.2.5):

* a BAR region is registered while its decode bit (I/O or memory space)
  is set and its address is not 0 (0 means "not assigned");
* a write to a BAR while decode is on moves the region: the device
  releases the old range and claims the new one itself, inside the handler
  of that configuration write;
* writing all ones to a BAR dword is a sizing probe: the register reads
  back the size mask but the region stays where it was (as kvmtool does
  for guests that size with decode on); the next real address moves it;
* **overlaps** (two functions' BARs briefly on the same range while the
  guest reassigns them): the region that is in the registry stays, the
  newcomer's claim fails.  The BAR keeps the value the guest wrote (reads
  return it), a warning names the range, and the BAR is marked
  *conflicted*; the device retries the claim at its next configuration
  access, at every decode toggle, and from a retry thread every
  :data:`CONFLICT_RETRY` seconds until it succeeds -- so the region
  appears as soon as the other one moves away.  kvmtool instead switches
  off the *other* device's region for the duration; a device here cannot
  touch another owner's regions, and nothing is lost either way: while the
  conflict lasts, accesses go to the region that was there first.

**Interrupts** (:meth:`PciDevice.raise_interrupt`): with MSI-X enabled a
request goes to its MSI-X vector and INTx# is never used (PCI 3.0 6.8.2);
otherwise a model that declares an interrupt pin (``interrupt_pin = 1``,
INTA#; the only pin supported) uses INTx#, wired to the GSI the VMM gives
as ``intx_gsi=`` (vmm.layout, the swizzle), which the Interrupt Line
register is pre-set to as firmware would (PCI 3.0 6.2.4; 0xFF, "no
connection", without one).  INTx# models the level of a wire (PCI 3.0
6.2.3): the function's interrupt condition is set by a request and stays
set until the model's own acknowledge (:meth:`PciDevice.deassert_intx`,
e.g. pci-echo's REG_ACK); STATUS.Interrupt_Status (bit 3) shows it, also
while COMMAND.Interrupt_Disable (bit 10) is set.  The pin is driven while
the condition is set, Interrupt_Disable is clear and MSI-X is disabled;
each time that drive goes from off to on, one edge is sent through the
host's irqfd (``host.irq_line(gsi).trigger()``) -- so clearing
Interrupt_Disable (or disabling MSI-X) with the condition set delivers
it, and a request while the condition is already set sends nothing new.
A true level (re-delivery after the guest's EOI while the condition
lasts, for a level-triggered IOAPIC pin) needs KVM_IRQFD_FLAG_RESAMPLE,
which is not implemented: a guest driver must acknowledge the device in
its handler, before it can get the next INTx.
"""

from __future__ import annotations

import logging
import threading

from devices.base import BadParameter, BadState, Device, DeviceHost, HostRefused, Interrupt, Space, all_ones, parse_int
from devices.pci_config import (
    COMMAND_WRITABLE,
    MAX_SLOT,
    PCI_BASE_ADDRESS_IO_MASK,
    PCI_BASE_ADDRESS_MEM_MASK,
    PCI_CACHE_LINE_SIZE,
    PCI_CAP_ID_MSIX,
    PCI_CAP_LIST_ID,
    PCI_CAP_LIST_NEXT,
    PCI_CAP_MSIX_SIZEOF,
    PCI_CAPABILITY_LIST,
    PCI_CFG_SPACE_EXP_SIZE,
    PCI_CFG_SPACE_SIZE,
    PCI_CLASS_PROG,
    PCI_COMMAND,
    PCI_COMMAND_INTX_DISABLE,
    PCI_COMMAND_IO,
    PCI_COMMAND_MEMORY,
    PCI_DEVICE_ID,
    PCI_HEADER_TYPE,
    PCI_HEADER_TYPE_NORMAL,
    PCI_INTERRUPT_LINE,
    PCI_INTERRUPT_PIN,
    PCI_MSIX_FLAGS,
    PCI_NUM_BARS,
    PCI_REVISION_ID,
    PCI_STATUS,
    PCI_STATUS_CAP_LIST,
    PCI_STATUS_INTERRUPT,
    PCI_STD_HEADER_SIZEOF,
    PCI_SUBSYSTEM_ID,
    PCI_SUBSYSTEM_VENDOR_ID,
    PCI_VENDOR_ID,
    STATUS_W1C,
    Bar,
    BarKind,
    ConfigSpace,
    config_address,
)
from devices.pci_msix import MsiX
from devices.snapshot import Fields, require

__all__ = ["CONFLICT_RETRY", "COOKIE_CONFIG", "Bar", "BarKind", "MsiX", "PciDevice"]

log = logging.getLogger(__name__)

#: How often a conflicted BAR retries its claim (module docstring).
CONFLICT_RETRY = 0.02
#: Cookie of the configuration-space region (BAR regions use their index).
COOKIE_CONFIG = 0x100


class PciDevice(Device):
    """Base of PCI device models (see the module docstring).

    Parameters every PCI model takes: ``slot=N`` (device number on bus 0,
    1-31; the VMM picks one if absent), and -- set by the VMM, which owns
    the guest's address map -- ``mmio_window=ADDR`` and ``io_window=PORT``,
    where the device pre-assigns its BARs (naturally aligned, in index
    order); without them the BARs start unassigned (0); and
    ``intx_gsi=N``, the GSI (irqchip input) its INTA# is wired to (used
    only by a model whose ``interrupt_pin`` is 1; module docstring).
    """

    vendor_id = 0xFFFF
    device_id = 0xFFFF
    class_code = 0xFF0000
    revision = 0
    subsystem_vendor_id = 0
    subsystem_id = 0
    #: Interrupt Pin register (PCI 3.0 6.2.4): 0 none, 1 INTA# (others
    #: are not supported: single-function models only).
    interrupt_pin = 0

    def __init__(self, host: DeviceHost, **params: str):
        slot = params.pop("slot", None)
        mmio_window = params.pop("mmio_window", None)
        io_window = params.pop("io_window", None)
        intx_gsi = params.pop("intx_gsi", None)
        super().__init__(host, **params)
        self.slot = 0 if slot is None else parse_int(self.kind, "slot", slot)
        if slot is not None and not 1 <= self.slot <= MAX_SLOT:
            raise BadParameter(f"{self.kind}: slot={self.slot} (1 to {MAX_SLOT}; 0 is the host bridge)")
        self.mmio_window = None if mmio_window is None else parse_int(self.kind, "mmio_window", mmio_window)
        self.io_window = None if io_window is None else parse_int(self.kind, "io_window", io_window)
        self.intx_gsi = None if intx_gsi is None else parse_int(self.kind, "intx_gsi", intx_gsi)
        if self.intx_gsi is not None and not 0 <= self.intx_gsi < 0xFF:
            raise BadParameter(f"{self.kind}: intx_gsi={self.intx_gsi} (0 to 254)")
        if self.interrupt_pin not in (0, 1):
            raise BadParameter(f"{self.kind}: interrupt pin {self.interrupt_pin} (0 or 1: INTA#)")
        self.config = ConfigSpace()
        self.bars: list[Bar | None] = [None] * PCI_NUM_BARS
        self.msix: MsiX | None = None
        self._last_cap = 0
        self._cap_end = PCI_STD_HEADER_SIZEOF
        # RLock: a handler of this device may call back into it (a retry).
        self._lock = threading.RLock()
        self._retry: threading.Thread | None = None
        self._stopped = threading.Event()
        self._claimed_config: int | None = None
        self._intx_line: Interrupt | None = None
        #: The function's INTx interrupt condition (STATUS.Interrupt_Status).
        self._intx_pending = False
        #: INTx# as last driven (module docstring).
        self._intx_out = False
        #: INTx edges sent, and those with no line to go to.
        self.intx_sent = 0
        self.intx_lost = 0
        #: Set by :meth:`restore`: :meth:`start` re-takes, not assigns.
        self.restored = False
        c = self.config
        c.set(PCI_VENDOR_ID, 2, self.vendor_id)
        c.set(PCI_DEVICE_ID, 2, self.device_id)
        c.set_wmask(PCI_COMMAND, 2, COMMAND_WRITABLE)
        c.set_w1cmask(PCI_STATUS, 2, STATUS_W1C)
        c.set(PCI_REVISION_ID, 1, self.revision)
        c.set(PCI_CLASS_PROG, 3, self.class_code)
        c.set_wmask(PCI_CACHE_LINE_SIZE, 1, 0xFF)
        c.set(PCI_HEADER_TYPE, 1, PCI_HEADER_TYPE_NORMAL)
        c.set(PCI_SUBSYSTEM_VENDOR_ID, 2, self.subsystem_vendor_id)
        c.set(PCI_SUBSYSTEM_ID, 2, self.subsystem_id)
        c.set_wmask(PCI_INTERRUPT_LINE, 1, 0xFF)
        c.set(PCI_INTERRUPT_PIN, 1, self.interrupt_pin)
        if self.interrupt_pin:
            # What firmware would leave there (PCI 3.0 6.2.4): the GSI of
            # the wire, or 0xFF "unknown / no connection" on x86.
            c.set(PCI_INTERRUPT_LINE, 1, 0xFF if self.intx_gsi is None else self.intx_gsi)

    # -- declaring the function (from a subclass's __init__) --------------

    def add_bar(self, index: int, kind: BarKind, size: int, prefetchable: bool = False,
                coalesce: bool = False) -> Bar:
        """Declare BAR ``index`` (a 64-bit one takes ``index + 1`` too);
        ``coalesce``: a memory BAR whose guest writes the host may queue
        (coalesced MMIO, :meth:`DeviceHost.claim`), wherever it moves."""
        if coalesce and kind is BarKind.IO:
            raise BadParameter(f"{self.kind}: BAR {index}: only memory BARs can be coalesced")
        min_size = 4 if kind is BarKind.IO else 16
        max_size = 256 if kind is BarKind.IO else (1 << 31 if kind is BarKind.MEM32 else 1 << 63)
        if size < min_size or size > max_size or size & (size - 1):
            raise BadParameter(f"{self.kind}: BAR {index} size {size:#x} (a power of two, "
                               f"{min_size:#x} to {max_size:#x})")
        bar = Bar(index, kind, size, prefetchable and kind is not BarKind.IO, coalesce=coalesce)
        last = index + (1 if kind is BarKind.MEM64 else 0)
        if not 0 <= index or last >= PCI_NUM_BARS or any(self.bars[i] for i in range(index, last + 1)):
            raise BadParameter(f"{self.kind}: BAR {index} is taken or out of range")
        self.bars[index] = bar
        if kind is BarKind.MEM64:
            self.bars[index + 1] = bar
        c = self.config
        c.set(bar.offset, 4, bar.flags)
        if kind is BarKind.IO:
            # 16-bit I/O decode: the upper half is hardwired to 0 (x86 has
            # 64 Ki ports), so a region never leaves the port space.
            c.set_wmask(bar.offset, 4, ~(size - 1) & PCI_BASE_ADDRESS_IO_MASK & 0xFFFF)
        else:
            mask = ~(size - 1) & ((1 << 64) - 1)
            c.set_wmask(bar.offset, 4, mask & PCI_BASE_ADDRESS_MEM_MASK)
            if kind is BarKind.MEM64:
                c.set_wmask(bar.offset + 4, 4, mask >> 32)
        return bar

    def add_capability(self, cap_id: int, length: int) -> int:
        """Append a capability of ``length`` bytes (ID and next pointer
        included) to the list; returns its offset (PCI 3.0 6.7)."""
        at = (self._cap_end + 3) & ~3
        if at + length > PCI_CFG_SPACE_SIZE:
            raise BadParameter(f"{self.kind}: no room for capability {cap_id:#x}")
        c = self.config
        c.set(at + PCI_CAP_LIST_ID, 1, cap_id)
        if self._last_cap:
            c.set(self._last_cap + PCI_CAP_LIST_NEXT, 1, at)
        else:
            c.set(PCI_CAPABILITY_LIST, 1, at)
            c.set(PCI_STATUS, 2, c.get(PCI_STATUS, 2) | PCI_STATUS_CAP_LIST)
        self._last_cap = at
        self._cap_end = at + length
        return at

    def add_msix(self, nvectors: int, bar_index: int, table_offset: int, pba_offset: int) -> MsiX:
        bar = self.bars[bar_index]
        if bar is None or bar.index != bar_index or bar.kind is BarKind.IO:
            raise BadParameter(f"{self.kind}: MSI-X needs memory BAR {bar_index}")
        cap = self.add_capability(PCI_CAP_ID_MSIX, PCI_CAP_MSIX_SIZEOF)
        self.msix = MsiX(self.config, self.host, cap, nvectors, bar, table_offset, pba_offset)
        return self.msix

    def _preassign(self) -> None:
        """Place the BARs in the windows the VMM gave, naturally aligned."""
        cursor = {Space.MMIO: self.mmio_window, Space.PIO: self.io_window}
        for i, bar in enumerate(self.bars):
            at = cursor[bar.space] if bar is not None else None
            if bar is None or bar.index != i or at is None:
                continue
            base = (at + bar.size - 1) & ~(bar.size - 1)
            cursor[bar.space] = base + bar.size
            self._set_bar_address(bar, base)

    # -- BAR values ----------------------------------------------------------

    def bar_address(self, bar: Bar) -> int:
        lo = self.config.get(bar.offset, 4)
        if bar.kind is BarKind.IO:
            return lo & PCI_BASE_ADDRESS_IO_MASK
        addr = lo & PCI_BASE_ADDRESS_MEM_MASK
        if bar.kind is BarKind.MEM64:
            addr |= self.config.get(bar.offset + 4, 4) << 32
        return addr

    def _set_bar_address(self, bar: Bar, addr: int) -> None:
        self.config.set(bar.offset, 4, (addr & 0xFFFF_FFFF) | bar.flags)
        if bar.kind is BarKind.MEM64:
            self.config.set(bar.offset + 4, 4, addr >> 32)

    # -- Device interface ----------------------------------------------------

    @property
    def config_base(self) -> int:
        return config_address(0, self.slot, 0)

    def start(self) -> None:
        if self.slot == 0:
            raise BadParameter(f"{self.kind}: no slot= given (the VMM assigns one)")
        if not self.restored:
            self._preassign()
        self._connect_intx()
        self.host.adopt(Space.PCI, self.config_base, PCI_CFG_SPACE_EXP_SIZE, COOKIE_CONFIG)
        self._claimed_config = self.config_base
        with self._lock:
            if self.restored:
                self._readopt()
            else:
                # Firmware-like start: decode on, so pre-assigned BARs work at once.
                self.config.set(PCI_COMMAND, 2, PCI_COMMAND_IO | PCI_COMMAND_MEMORY)
                self._sync_all()

    def _readopt(self) -> None:
        """Start after :meth:`restore` (lock held): adopt the BAR regions
        the snapshot says are registered (one another device took
        meanwhile becomes a conflict, retried as usual), let the model
        move what it keeps at BAR addresses (:meth:`bar_moved`), ask for
        the MSI routes again.  INTx# stays as it was driven: no edge."""
        for i, bar in enumerate(self.bars):
            if bar is None or bar.index != i:
                continue
            if bar.mapped is not None:
                try:
                    self.host.adopt(bar.space, bar.mapped, bar.size, bar.index)
                except HostRefused as e:
                    log.warning("%s: BAR %d %s %#x+%#x cannot be taken over (%s); retried",
                                self.kind, i, bar.space.name, bar.mapped, bar.size, e)
                    bar.mapped, bar.conflict = None, bar.mapped
            self.bar_moved(bar)
        if self.msix is not None:
            self.msix.resume()
        if self.conflicted():
            self._start_retry()

    # -- snapshot (devices.base.Device, "Snapshots") ------------------------

    #: Read-only configuration bits the device itself changes, by offset
    #: (STATUS.Interrupt_Status); every other read-only bit of a snapshot
    #: must be what this model (with these parameters) was built with.
    VOLATILE_CONFIG = {PCI_STATUS: PCI_STATUS_INTERRUPT}

    def snapshot(self) -> dict:
        """Configuration space, the BAR regions, INTx and MSI-X state, and
        the subclass's own (:meth:`model_state`)."""
        with self._lock:
            bars: list[dict | None] = [
                {"mapped": b.mapped, "conflict": b.conflict} if b is not None and b.index == i else None
                for i, b in enumerate(self.bars)]
            return {"config": bytes(self.config.data), "bars": bars,
                    "intx": {"pending": self._intx_pending, "sent": self.intx_sent, "lost": self.intx_lost},
                    "msix": None if self.msix is None else self.msix.snapshot(),
                    "model": self.model_state()}

    def restore(self, state: dict) -> None:
        if self.restored or self._claimed_config is not None:
            raise BadState(f"{self.kind}: restore is for a freshly built model, before start()")
        f = Fields(state, self.kind, ("config", "bars", "intx", "msix", "model"))
        config = self._check_config(f)
        bars = self._check_bars(f, config)
        intx = f.sub("intx", ("pending", "sent", "lost"))
        pending = intx.flag("pending")
        sent, lost = intx.integer("sent"), intx.integer("lost")
        status = int.from_bytes(config[PCI_STATUS:PCI_STATUS + 2], "little")
        require(bool(status & PCI_STATUS_INTERRUPT) == (pending and bool(self.interrupt_pin)),
                f.name("intx"), "STATUS.Interrupt_Status disagrees with the interrupt condition")
        if self.msix is None:
            require(f.state["msix"] is None, f.name("msix"), "this function has no MSI-X")
            msix = None
        else:
            msix = self.msix.check(f.state["msix"], f.name("msix"))
        model = self.check_model_state(f.state["model"], f.name("model"))
        with self._lock:
            self.config.data[:] = config
            for bar, (mapped, conflict) in bars:
                bar.mapped, bar.conflict = mapped, conflict
            self._intx_pending, self.intx_sent, self.intx_lost = pending, sent, lost
            if self.msix is not None and msix is not None:
                self.msix.load(msix)
            c = self.config
            self._intx_out = (pending and bool(self.interrupt_pin)
                              and not c.get(PCI_COMMAND, 2) & PCI_COMMAND_INTX_DISABLE
                              and not (self.msix is not None and self.msix.enabled))
            self.load_model_state(model)
            self.restored = True

    def _check_config(self, f: Fields) -> bytes:
        config = f.blob("config", PCI_CFG_SPACE_SIZE)
        fresh, wmask = self.config.data, self.config.wmask
        for at in range(PCI_CFG_SPACE_SIZE):
            fixed = ~(wmask[at] | self.VOLATILE_CONFIG.get(at & ~1, 0) >> (8 * (at & 1))) & 0xFF
            if (config[at] ^ fresh[at]) & fixed:
                raise BadState(f"{f.name('config')}: byte {at:#x} is {config[at]:#04x}, read-only bits "
                               f"{fixed:#04x} of this function are {fresh[at]:#04x}")
        return config

    def _check_bars(self, f: Fields, config: bytes) -> list[tuple[Bar, tuple[int | None, int | None]]]:
        entries = f.items("bars", PCI_NUM_BARS)
        command = int.from_bytes(config[PCI_COMMAND:PCI_COMMAND + 2], "little")
        out: list[tuple[Bar, tuple[int | None, int | None]]] = []
        for i, (bar, entry) in enumerate(zip(self.bars, entries, strict=True)):
            where = f"{f.name('bars')}[{i}]"
            if bar is None or bar.index != i:
                require(entry is None, where, "no BAR starts here")
                continue
            b = Fields(entry, where, ("mapped", "conflict"))
            limit = 1 << 16 if bar.kind is BarKind.IO else 1 << (32 if bar.kind is BarKind.MEM32 else 64)
            got = []
            for key in ("mapped", "conflict"):
                at = None if b.state[key] is None else b.integer(key, 1, limit - bar.size)
                require(at is None or at % bar.size == 0, b.name(key), f"not aligned to {bar.size:#x}")
                require(at is None or bool(command & bar.decode_bit), b.name(key), "decoding is off")
                got.append(at)
            mapped, conflict = got
            require(mapped is None or conflict is None, where, "both registered and waiting")
            out.append((bar, (mapped, conflict)))
        spans = sorted((bar.space, m, m + bar.size) for bar, (m, _c) in out if m is not None)
        for (s1, _a1, e1), (s2, a2, _e2) in zip(spans, spans[1:], strict=False):
            require(s1 != s2 or e1 <= a2, f.name("bars"), f"two BAR regions overlap at {a2:#x}")
        return out

    # -- for subclasses: their own state (devices.base.Device, "Snapshots") --

    def model_state(self) -> dict | None:
        """The subclass's own guest-visible state (lock held)."""
        return None

    def check_model_state(self, state: object, where: str) -> object:
        """Check :meth:`model_state`'s value (BadState); returns what
        :meth:`load_model_state` takes.  Must change nothing."""
        if state is not None:
            raise BadState(f"{where}: this model keeps no state of its own")
        return None

    def load_model_state(self, checked: object) -> None:
        """Apply what :meth:`check_model_state` returned (lock held)."""

    def _connect_intx(self) -> None:
        """Ask the host for the irqfd of the INTA# wire (at start, before
        the guest can see the function)."""
        if not self.interrupt_pin:
            return
        if self.intx_gsi is None:
            log.info("%s: no intx_gsi given; INTx goes nowhere", self.kind)
            return
        try:
            self._intx_line = self.host.irq_line(self.intx_gsi)
        except HostRefused as e:
            log.warning("%s: no interrupt line %d (%s); INTx goes nowhere", self.kind, self.intx_gsi, e)

    def stop(self) -> None:
        self._stopped.set()
        with self._lock:
            for i, bar in enumerate(self.bars):
                if bar is not None and bar.index == i:
                    bar.conflict = None
                    self._unmap(bar)
            if self._claimed_config is not None:
                self._release(Space.PCI, self._claimed_config)
                self._claimed_config = None

    def read(self, space: Space, cookie: int, offset: int, size: int) -> int:
        with self._lock:
            if space is Space.PCI:
                self._retry_conflicts()
                if offset + size > PCI_CFG_SPACE_EXP_SIZE:
                    return all_ones(size)
                return self.config.read(offset, size)
            bar = self._bar_of(cookie)
            if bar is None:
                return all_ones(size)
            if self.msix is not None and bar is self.msix.bar and self.msix.owns(offset):
                return self.msix.read(offset, size)
            return self.bar_read(bar, offset, size)

    def write(self, space: Space, cookie: int, offset: int, size: int, value: int) -> None:
        with self._lock:
            if space is Space.PCI:
                if offset + size <= PCI_CFG_SPACE_EXP_SIZE:
                    self.config_write(offset, size, value & all_ones(size))
                self._retry_conflicts()
                return
            bar = self._bar_of(cookie)
            if bar is None:
                return
            if self.msix is not None and bar is self.msix.bar and self.msix.owns(offset):
                self.msix.write(offset, size, value)
                return
            self.bar_write(bar, offset, size, value & all_ones(size))

    def _bar_of(self, cookie: int) -> Bar | None:
        if 0 <= cookie < PCI_NUM_BARS:
            bar = self.bars[cookie]
            if bar is not None and bar.index == cookie:
                return bar
        return None

    # -- for subclasses --------------------------------------------------------

    def bar_read(self, bar: Bar, offset: int, size: int) -> int:
        """A read in BAR ``bar``'s region (the lock is held)."""
        return all_ones(size)

    def bar_write(self, bar: Bar, offset: int, size: int, value: int) -> None:
        """A write in BAR ``bar``'s region (the lock is held)."""

    def bar_moved(self, bar: Bar) -> None:
        """BAR ``bar``'s region changed: registered at a new address
        (``bar.mapped``), or unregistered (``bar.mapped`` is None) -- the
        guest moved the BAR, toggled decoding, or a conflicted claim
        succeeded at last.  Called with the lock held, inside the handler
        of the configuration access that caused it (or on the retry
        thread); a model moves what it keeps at BAR addresses (e.g.
        ioeventfds) here.  Not called at :meth:`stop`."""

    # -- interrupts (module docstring) -------------------------------------------

    def raise_interrupt(self, vector: int = 0) -> None:
        """An interrupt request: MSI-X vector ``vector`` while MSI-X is
        enabled; otherwise INTx# (the interrupt condition is set until
        :meth:`deassert_intx`); a model with MSI-X and no pin holds the
        vector pending instead (devices.pci_msix)."""
        with self._lock:
            msix = self.msix
            if msix is not None and (msix.enabled or not self.interrupt_pin):
                msix.raise_vector(vector)
            elif self.interrupt_pin:
                self._intx_pending = True
                self._update_intx()
            else:
                log.debug("%s: interrupt raised with neither MSI-X nor INTx", self.kind)

    def deassert_intx(self) -> None:
        """The device's interrupt condition is acknowledged: clears
        STATUS.Interrupt_Status and stops driving INTx#."""
        with self._lock:
            self._intx_pending = False
            self._update_intx()

    @property
    def intx_pending(self) -> bool:
        return self._intx_pending

    def _update_intx(self) -> None:
        """Show the condition in STATUS and send an edge when INTx# goes
        from off to on (lock held)."""
        if not self.interrupt_pin:
            return
        c = self.config
        status = c.get(PCI_STATUS, 2)
        if self._intx_pending:
            c.set(PCI_STATUS, 2, status | PCI_STATUS_INTERRUPT)
        else:
            c.set(PCI_STATUS, 2, status & ~PCI_STATUS_INTERRUPT)
        out = (self._intx_pending and not c.get(PCI_COMMAND, 2) & PCI_COMMAND_INTX_DISABLE
               and not (self.msix is not None and self.msix.enabled))
        if out and not self._intx_out:
            line = self._intx_line
            if line is None:
                self.intx_lost += 1
            else:
                line.trigger()
                self.intx_sent += 1
        self._intx_out = out

    # -- configuration writes --------------------------------------------------

    def config_write(self, offset: int, size: int, value: int) -> None:
        """A guest write to configuration space; moves or (un)maps BAR
        regions as it requires (lock held)."""
        c = self.config
        old_command = c.get(PCI_COMMAND, 2)
        c.write(offset, size, value)
        end = offset + size
        if offset < PCI_COMMAND + 2 and end > PCI_COMMAND and c.get(PCI_COMMAND, 2) != old_command:
            self._sync_all()
        for i, bar in enumerate(self.bars):
            if bar is None or bar.index != i or not (offset < bar.offset + bar.width and end > bar.offset):
                continue
            if self._is_sizing_probe(bar, offset, size, value):
                continue
            self._sync(bar)
        msix = self.msix
        if msix is not None and (offset < msix.cap + PCI_MSIX_FLAGS + 2 and end > msix.cap + PCI_MSIX_FLAGS
                                 or c.get(PCI_COMMAND, 2) != old_command):
            msix.control_written()
        self._update_intx()

    @staticmethod
    def _is_sizing_probe(bar: Bar, offset: int, size: int, value: int) -> bool:
        """All ones written over a whole BAR dword: a size probe."""
        for dword in range(bar.offset, bar.offset + bar.width, 4):
            if (offset <= dword and dword + 4 <= offset + size
                    and (value >> (8 * (dword - offset))) & 0xFFFF_FFFF == 0xFFFF_FFFF):
                return True
        return False

    # -- keeping regions in step -------------------------------------------------

    def _wanted(self, bar: Bar) -> int | None:
        if not self.config.get(PCI_COMMAND, 2) & bar.decode_bit:
            return None
        addr = self.bar_address(bar)
        return addr or None

    def _sync_all(self) -> None:
        for i, bar in enumerate(self.bars):
            if bar is not None and bar.index == i:
                self._sync(bar)

    def _sync(self, bar: Bar) -> None:
        """Make the registered region match the BAR and COMMAND."""
        want = self._wanted(bar)
        if bar.mapped == want:
            bar.conflict = None
            return
        self._unmap(bar)
        bar.conflict = None
        if want is not None:
            try:
                self._claim_bar(bar, want)
                bar.mapped = want
            except HostRefused as e:  # RegionBusy, RegionTableFull
                bar.conflict = want
                log.warning("%s: BAR %d %s %#x+%#x cannot be registered (%s); the BAR keeps the "
                            "value, the region is registered once the range is free",
                            self.kind, bar.index, bar.space.name, want, bar.size, e)
                self._start_retry()
        self.bar_moved(bar)

    def _claim_bar(self, bar: Bar, base: int) -> None:
        if bar.coalesce:
            self.host.claim(bar.space, base, bar.size, bar.index, coalesce=True)
        else:
            self.host.claim(bar.space, base, bar.size, bar.index)

    def _unmap(self, bar: Bar) -> None:
        if bar.mapped is not None:
            self._release(bar.space, bar.mapped)
            bar.mapped = None

    def _release(self, space: Space, start: int) -> None:
        try:
            self.host.release(space, start)
        except HostRefused as e:  # RegionNotHeld: reaped already (the VMM cut us off)
            log.debug("%s: releasing %s %#x: %s", self.kind, space.name, start, e)

    def conflicted(self) -> int:
        """Bit mask of the BARs waiting for their range to be free."""
        return sum(1 << i for i, b in enumerate(self.bars) if b is not None and b.index == i
                   and b.conflict is not None)

    def _retry_conflicts(self) -> None:
        for i, bar in enumerate(self.bars):
            if bar is not None and bar.index == i and bar.conflict is not None:
                try:
                    self._claim_bar(bar, bar.conflict)
                except HostRefused as e:  # still taken (RegionBusy)
                    log.debug("%s: BAR %d at %#x: still %s", self.kind, i, bar.conflict, e)
                    continue
                log.info("%s: BAR %d registered at %#x, the range is free now", self.kind, i, bar.conflict)
                bar.mapped, bar.conflict = bar.conflict, None
                self.bar_moved(bar)

    def _start_retry(self) -> None:
        if self._retry is not None and self._retry.is_alive():
            return
        self._retry = threading.Thread(target=self._retry_loop, name=f"{self.kind}-bar-retry", daemon=True)
        self._retry.start()

    def _retry_loop(self) -> None:
        while not self._stopped.wait(CONFLICT_RETRY):
            with self._lock:
                if self._stopped.is_set():
                    return
                self._retry_conflicts()
                if not self.conflicted():
                    self._retry = None
                    return
