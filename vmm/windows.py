"""Owner windows: the guest ranges the VMM granted each registry owner, kept
in the VMM's private memory and checked on every lookup (both exit loops).

The registry lives in shared memory that every device process can write,
so what it says about a region -- owner, cookie, start, length -- is
input.  A region is honoured only when it lies in a window the VMM
granted its owner (same bus, same cookie; pinned windows: starting at the
window's start), otherwise it is *refused*: the access completes as if
nobody claimed it (reads all ones, writes dropped), the region is logged
once and ``query-regions`` shows it refused.  So a device can make
accesses miss, never capture an address the VMM did not grant it.

What each owner is granted (see docs/DESIGN-registry-trust.md):

* the VMM (:data:`vmm.endpoint.VMM_OWNER`): the regions of its own
  handlers, pinned; and an access that misses, or hits a refused region,
  inside one of them is served by the VMM all the same (its handler is
  found here, whatever a device did to the registry);
* a PCI function: its 4 KiB of configuration space (cookie
  ``COOKIE_CONFIG``) and one pinned window per BAR (cookie = BAR index)
  at the address the guest programmed, as long as the declared size, and
  only inside the PCI apertures of :mod:`vmm.layout`.  The BARs' kinds and
  sizes are read once, right after the device started and before the guest
  runs (a firmware-style sizing probe, :meth:`PciFunction.probe`); after
  that the VMM tracks the guest's own configuration writes, which it sees
  on their way to the device (:meth:`OwnerWindows.config_write`), and
  never reads a BAR from the device again.  While a write that moves a BAR
  is being served both the old and the new address are granted, so the
  device's re-registration inside that handler never races the window;
* any other model: what its class declares from its parameters
  (:meth:`devices.base.Device.windows`), evaluated in the VMM at spawn.

The C exit loop reads the same table (``struct svmm_windows`` of
``vmm/_vcpu.h``, written here under a seqlock); the Python loop calls the
same C check (one rule, one implementation).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
from typing import Callable, Iterator

from devices.record import record
from devices.base import Window
from ipc import Bus, RegionRecord, pci_address
from vmm import layout
from vmm._kvm_c import ffi, lib

log = logging.getLogger(__name__)

MAX_OWNERS = lib.SVMM_MAX_OWNERS
MAX_WINDOWS = lib.SVMM_MAX_WINDOWS
PINNED = lib.SVMM_WIN_PINNED
ANY_COOKIE = lib.SVMM_WIN_ANY_COOKIE

#: PCI configuration space of one function, and the cookie devices.pci
#: registers it with (BAR regions use their index).
PCI_CONFIG_SIZE = 0x1000
COOKIE_CONFIG = 0x100
PCI_BAR0 = 0x10
PCI_COMMAND = 0x04
NUM_BARS = 6
#: Where a BAR may be: the PCI apertures (vmm.layout).
APERTURES = {
    Bus.PIO: ((layout.PCI_IO_APERTURE, layout.PCI_IO_APERTURE_END),),
    Bus.MMIO: ((layout.PCI_MMIO32_APERTURE, layout.PCI_MMIO32_APERTURE_END),
               (layout.PCI_MMIO64_APERTURE, layout.PCI_MMIO64_APERTURE_END)),
}
#: Largest BAR the VMM grants (the 64-bit aperture is larger, but no model
#: needs more; a hostile declaration gains nothing beyond this).
MAX_BAR = {Bus.PIO: 0x100, Bus.MMIO: 1 << 32}


class WindowError(ValueError):
    """A window that cannot be granted (bad range, too many)."""


@record
class Grant:
    """One window as the VMM keeps it."""

    bus: Bus
    start: int
    length: int
    cookie: int | None = None
    region_max: int | None = None

    def describe(self) -> str:
        where = f"{self.bus.name} {self.start:#x}+{self.length:#x}"
        if self.region_max is not None:
            where += f" (area, regions up to {self.region_max:#x})"
        return where if self.cookie is None else f"{where} cookie {self.cookie:#x}"


def inside_aperture(bus: Bus, start: int, length: int) -> bool:
    return any(lo <= start and start + length <= hi for lo, hi in APERTURES.get(bus, ()))


@dataclasses.dataclass
class Bar:
    """A BAR as the VMM knows it: declared at start, placed by the guest."""

    index: int
    bus: Bus
    size: int
    is64: bool
    #: The BAR's dwords as the guest wrote them (masked like the device).
    lo: int = 0
    hi: int = 0

    @property
    def wmask(self) -> int:
        mask = ~(self.size - 1) & ((1 << 64) - 1)
        if self.bus is Bus.PIO:
            return mask & 0xFFFC
        return mask & (0xFFFF_FFFF_FFFF_FFF0 if self.is64 else 0xFFFF_FFF0)

    @property
    def address(self) -> int:
        return ((self.hi << 32) | self.lo) & self.wmask

    @property
    def width(self) -> int:
        return 8 if self.is64 else 4


class PciFunction:
    """The BARs of one PCI function, from its sizing probe onwards."""

    def __init__(self, owner: int, slot: int):
        self.owner = owner
        self.slot = slot
        self.bars: list[Bar] = []

    @property
    def config_key(self) -> int:
        return pci_address(0, self.slot, 0)

    def probe(self, read: Callable[[int, int], int], write: Callable[[int, int, int], object]) -> None:
        """Size the BARs as firmware does (PCI 3.0 6.2.5.1): read, write all
        ones, read the mask, restore.  Called once, before the guest runs;
        what the device answers is checked (power-of-two sizes, no larger
        than :data:`MAX_BAR`) and a BAR that fails the check is not granted."""
        i = 0
        while i < NUM_BARS:
            at = PCI_BAR0 + 4 * i
            lo = read(at, 4)
            write(at, 4, 0xFFFF_FFFF)
            mask = read(at, 4)
            write(at, 4, lo)
            if mask in (0, 0xFFFF_FFFF) and lo in (0, 0xFFFF_FFFF):
                i += 1
                continue
            if mask & 1:                         # I/O space
                bar = Bar(i, Bus.PIO, ((~(mask & 0xFFFC)) & 0xFFFF) + 1, False, lo=lo & 0xFFFC)
            elif (mask >> 1) & 3 == 2 and i + 1 < NUM_BARS:   # 64-bit memory
                hi = read(at + 4, 4)
                write(at + 4, 4, 0xFFFF_FFFF)
                mask_hi = read(at + 4, 4)
                write(at + 4, 4, hi)
                full = (mask_hi << 32) | (mask & 0xFFFF_FFF0)
                bar = Bar(i, Bus.MMIO, ((~full) & ((1 << 64) - 1)) + 1, True, lo=lo & 0xFFFF_FFF0, hi=hi)
            else:
                bar = Bar(i, Bus.MMIO, ((~(mask & 0xFFFF_FFF0)) & 0xFFFF_FFFF) + 1, False, lo=lo & 0xFFFF_FFF0)
            if bar.size & (bar.size - 1) or not bar.size <= MAX_BAR[bar.bus] or bar.size < 4:
                log.warning("PCI slot %d BAR %d: size %#x declared at start is not grantable; the BAR "
                            "gets no window", self.slot, i, bar.size)
            else:
                self.bars.append(bar)
            i += 2 if bar.is64 else 1

    def write(self, offset: int, size: int, value: int) -> set[int]:
        """Apply a guest configuration write to the BAR values the VMM
        tracks; the BAR indices whose window is to follow (devices.pci's
        rules: a dword of all ones is a sizing probe and moves nothing; a
        COMMAND write re-syncs every BAR)."""
        moved: set[int] = set()
        end = offset + size
        if offset < PCI_COMMAND + 2 and end > PCI_COMMAND:
            moved.update(b.index for b in self.bars)
        for bar in self.bars:
            base = PCI_BAR0 + 4 * bar.index
            if not (offset < base + bar.width and end > base):
                continue
            probe = False
            regs = [bar.lo, bar.hi]
            wmask = [bar.wmask & 0xFFFF_FFFF, bar.wmask >> 32]
            for dword in range(bar.width // 4):
                at = base + 4 * dword
                if offset <= at and at + 4 <= end and (value >> (8 * (at - offset))) & 0xFFFF_FFFF == 0xFFFF_FFFF:
                    probe = True
                for byte in range(4):
                    pos = at + byte
                    if offset <= pos < end:
                        b = (value >> (8 * (pos - offset))) & 0xFF
                        m = (wmask[dword] >> (8 * byte)) & 0xFF
                        regs[dword] = (regs[dword] & ~(0xFF << (8 * byte))) | ((b & m) << (8 * byte))
            bar.lo, bar.hi = regs
            if not probe:
                moved.add(bar.index)
        return moved


class OwnerWindows:
    """Every owner's windows, in Python and in the C table the exit loop
    reads.  Thread-safe; changes are rare (spawn, BAR moves)."""

    def __init__(self, vmm_owner: int):
        self.vmm_owner = vmm_owner
        #: The C table, ``struct svmm_windows *`` (kept alive here).
        self.table = ffi.new("struct svmm_windows *")
        self.table.vmm_owner = vmm_owner
        self._lock = threading.RLock()
        #: owner -> key -> grant
        self._grants: dict[int, dict[object, Grant]] = {}
        self._pci: dict[int, PciFunction] = {}
        self._pci_by_slot: dict[int, PciFunction] = {}
        self._refused_seen: set[tuple[int, int]] = set()
        #: accesses that found a refused region (Python loop and drains;
        #: the C loop counts its own in ``ctx.refused``).
        self.refused = 0
        self._check = lib.svmm_windows_check

    # -- granting ------------------------------------------------------------

    def grant(self, owner: int, key: object, grant: Grant) -> None:
        if not 0 <= owner < MAX_OWNERS:
            raise WindowError(f"owner {owner}: windows are kept for owners below {MAX_OWNERS}")
        if grant.length <= 0 or grant.start < 0 or grant.start + grant.length > (1 << 64):
            raise WindowError(f"window {grant.describe()} is empty or wraps")
        with self._lock:
            self._grants.setdefault(owner, {})[key] = grant
            self._store()

    def revoke(self, owner: int, key: object | None = None) -> None:
        """Take back one window of ``owner`` (``key``) or all of them."""
        with self._lock:
            grants = self._grants.get(owner)
            if grants is None:
                return
            if key is None:
                del self._grants[owner]
                fn = self._pci.pop(owner, None)
                if fn is not None:
                    self._pci_by_slot.pop(fn.slot, None)
            else:
                grants.pop(key, None)
            self._store()

    def grant_model(self, owner: int, windows: list[Window]) -> None:
        """The windows a model's class declared (devices.base.Window)."""
        for n, w in enumerate(windows):
            self.grant(owner, ("model", n), Grant(Bus(int(w.space)), w.start, w.length, w.cookie, w.region_max))

    def grant_pci(self, owner: int, slot: int) -> PciFunction:
        """The configuration space of function ``slot``.0 (BARs follow with
        :meth:`grant_bars`)."""
        fn = PciFunction(owner, slot)
        with self._lock:
            self._pci[owner] = fn
            self._pci_by_slot[slot] = fn
            self.grant(owner, "config", Grant(Bus.PCI, fn.config_key, PCI_CONFIG_SIZE, COOKIE_CONFIG))
        return fn

    def grant_bars(self, fn: PciFunction) -> None:
        """Windows for the BARs found by the probe, at their addresses."""
        with self._lock:
            for bar in fn.bars:
                self._place_bar(fn, bar, "bar")

    def _place_bar(self, fn: PciFunction, bar: Bar, key: str) -> None:
        addr = bar.address
        if addr and inside_aperture(bar.bus, addr, bar.size):
            self._grants.setdefault(fn.owner, {})[(key, bar.index)] = Grant(bar.bus, addr, bar.size, bar.index)
        else:
            self._grants.setdefault(fn.owner, {}).pop((key, bar.index), None)
        self._store()

    @contextlib.contextmanager
    def config_write(self, key: int, size: int, value: int) -> Iterator[None]:
        """Around the forwarding of a guest configuration write to register
        ``key`` (a ``Bus.PCI`` address): a BAR it moves is granted at its
        new address before the device sees the write and loses the old one
        once the device has served it."""
        slot, offset = (key >> 15) & 0x1F, key & 0xFFF
        fn = self._pci_by_slot.get(slot) if key >> 20 == 0 and (key >> 12) & 7 == 0 else None
        if fn is None:
            yield
            return
        with self._lock:
            moved = [b for b in fn.bars if b.index in fn.write(offset, size, value)]
            for bar in moved:
                self._place_bar(fn, bar, "moving")
        try:
            yield
        finally:
            with self._lock:
                for bar in moved:
                    self._place_bar(fn, bar, "bar")
                    self._grants.get(fn.owner, {}).pop(("moving", bar.index), None)
                if moved:
                    self._store()

    def _store(self) -> None:
        first = ffi.new("uint32_t[]", MAX_OWNERS)
        count = ffi.new("uint32_t[]", MAX_OWNERS)
        entries: list[Grant] = []
        for owner, grants in sorted(self._grants.items()):
            first[owner] = len(entries)
            count[owner] = len(grants)
            entries.extend(grants.values())
        if len(entries) > MAX_WINDOWS:
            raise WindowError(f"{len(entries)} windows: at most {MAX_WINDOWS}")
        w = ffi.new("struct svmm_window[]", max(1, len(entries)))
        for i, g in enumerate(entries):
            w[i].bus = int(g.bus)
            w[i].flags = (PINNED if g.region_max is None else 0) | (ANY_COOKIE if g.cookie is None else 0)
            w[i].start = g.start
            w[i].length = g.length
            w[i].max_len = g.length if g.region_max is None else g.region_max
            w[i].cookie = 0 if g.cookie is None else g.cookie
        lib.svmm_windows_store(self.table, first, count, w, len(entries))

    # -- checking --------------------------------------------------------------

    def allows(self, bus: int, start: int, length: int, owner: int, cookie: int) -> bool:
        """True when the region is inside one of ``owner``'s windows (the C
        exit loop's check)."""
        return bool(self._check(self.table, bus, start, length, owner, cookie))

    def vmm_window(self, bus: int, addr: int, size: int) -> tuple[int, int] | None:
        """(cookie, offset) of the VMM's own window holding the access."""
        for g in list(self._grants.get(self.vmm_owner, {}).values()):
            if g.bus == bus and g.start <= addr and addr + size <= g.start + g.length:
                return (0 if g.cookie is None else g.cookie), addr - g.start
        return None

    def note_refused(self, bus: int, start: int, length: int, owner: int, cookie: int, slot: int,
                     generation: int) -> None:
        """Log a refused region, once per slot tenant."""
        self.refused += 1
        key = (slot, generation)
        if key in self._refused_seen:
            return
        self._refused_seen.add(key)
        log.warning("refused region %s %#x+%#x of owner %d (cookie %#x, slot %d): outside the windows "
                    "the VMM granted that owner; accesses to it complete as unclaimed",
                    Bus(bus).name, start, length, owner, cookie, slot)

    def is_refused(self, r: RegionRecord) -> bool:
        return not self.allows(int(r.bus), r.start, r.length, r.owner, r.cookie)

    def describe(self, owner: int) -> list[str]:
        """``owner``'s windows, for ``query-regions`` and logs."""
        with self._lock:
            return [g.describe() for g in self._grants.get(owner, {}).values()]
