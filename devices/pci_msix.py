"""MSI-X: the capability's message control, the table and the PBA of a
function, and delivery through the host's MSI vectors (PCI 3.0 6.8.2)."""

from __future__ import annotations

import logging

from devices.base import BadParameter, DeviceHost, HostRefused, MsiVector, all_ones
from devices.pci_config import (
    MSIX_MAX_VECTORS,
    PCI_COMMAND,
    PCI_COMMAND_MASTER,
    PCI_MSIX_ENTRY_CTRL_MASKBIT,
    PCI_MSIX_ENTRY_LOWER_ADDR,
    PCI_MSIX_ENTRY_SIZE,
    PCI_MSIX_ENTRY_VECTOR_CTRL,
    PCI_MSIX_FLAGS,
    PCI_MSIX_FLAGS_ENABLE,
    PCI_MSIX_FLAGS_MASKALL,
    PCI_MSIX_PBA,
    PCI_MSIX_TABLE,
    Bar,
    ConfigSpace,
)
from devices.snapshot import Fields, require

log = logging.getLogger(__name__)


class MsiX:
    """The MSI-X capability, table and PBA of a function (PCI 3.0 6.8.2).

    Table entries start masked (6.8.2.9).  A vector raised while MSI-X is
    disabled, the function is masked (MASKALL) or the vector is masked sets
    its pending bit; it is delivered, and the bit cleared, as soon as all
    three allow it.  The host's MSI route of a vector is (re)programmed
    with the entry's address and data when the vector is unmasked, when
    the entry is written while unmasked, and before a delivery if they
    changed -- never on the raise hot path otherwise.  (A model with an
    INTx pin sends requests made while MSI-X is disabled to INTx instead:
    devices.pci.PciDevice.raise_interrupt.)
    """

    def __init__(self, config: ConfigSpace, host: DeviceHost, cap: int, nvectors: int, bar: Bar,
                 table_offset: int, pba_offset: int):
        if not 1 <= nvectors <= MSIX_MAX_VECTORS:
            raise BadParameter(f"MSI-X: {nvectors} vectors (1 to {MSIX_MAX_VECTORS})")
        self.config, self.host, self.cap, self.nvectors, self.bar = config, host, cap, nvectors, bar
        self.table_offset, self.pba_offset = table_offset, pba_offset
        self.table_size = nvectors * PCI_MSIX_ENTRY_SIZE
        self.pba_size = ((nvectors + 63) // 64) * 8
        if table_offset % 8 or pba_offset % 8 or max(table_offset + self.table_size,
                                                     pba_offset + self.pba_size) > bar.size:
            raise BadParameter("MSI-X: table or PBA misaligned or outside its BAR")
        if table_offset < pba_offset + self.pba_size and pba_offset < table_offset + self.table_size:
            raise BadParameter("MSI-X: table and PBA overlap")
        config.set(cap + PCI_MSIX_FLAGS, 2, nvectors - 1)
        config.set_wmask(cap + PCI_MSIX_FLAGS, 2, PCI_MSIX_FLAGS_MASKALL | PCI_MSIX_FLAGS_ENABLE)
        config.set(cap + PCI_MSIX_TABLE, 4, table_offset | bar.index)
        config.set(cap + PCI_MSIX_PBA, 4, pba_offset | bar.index)
        self.table = bytearray(self.table_size)
        for i in range(nvectors):
            self.table[i * 16 + PCI_MSIX_ENTRY_VECTOR_CTRL] = PCI_MSIX_ENTRY_CTRL_MASKBIT
        self.pending = 0
        self._routes: dict[int, tuple[int, int]] = {}
        self._vectors: dict[int, MsiVector] = {}
        self._no_host_logged = False
        #: Deliveries that had nowhere to go (no MSI support in the host).
        self.lost = 0
        self.delivered = 0

    # -- state -----------------------------------------------------------

    @property
    def control(self) -> int:
        return self.config.get(self.cap + PCI_MSIX_FLAGS, 2)

    @property
    def enabled(self) -> bool:
        return bool(self.control & PCI_MSIX_FLAGS_ENABLE)

    @property
    def function_masked(self) -> bool:
        return bool(self.control & PCI_MSIX_FLAGS_MASKALL)

    def masked(self, n: int) -> bool:
        return bool(self.table[n * 16 + PCI_MSIX_ENTRY_VECTOR_CTRL] & PCI_MSIX_ENTRY_CTRL_MASKBIT)

    def entry(self, n: int) -> tuple[int, int]:
        """(address, data) of table entry ``n``."""
        base = n * 16
        return (int.from_bytes(self.table[base:base + 8], "little"),
                int.from_bytes(self.table[base + 8:base + 12], "little"))

    def _deliverable(self, n: int) -> bool:
        """Enabled, bus mastering on (an MSI is a memory write; PCIe 6.0
        7.5.1.1.3), neither the function nor the vector masked."""
        return (self.enabled and not self.function_masked and not self.masked(n)
                and bool(self.config.get(PCI_COMMAND, 2) & PCI_COMMAND_MASTER))

    # -- the device side ---------------------------------------------------

    def raise_vector(self, n: int) -> bool:
        """Signal vector ``n``; True if delivered now, False if held
        pending (or out of range)."""
        if not 0 <= n < self.nvectors:
            log.warning("MSI-X: vector %d raised, the function has %d", n, self.nvectors)
            return False
        if not self._deliverable(n):
            self.pending |= 1 << n
            return False
        self._deliver(n)
        return True

    def _vector(self, n: int) -> MsiVector | None:
        vec = self._vectors.get(n)
        if vec is None:
            try:
                vec = self.host.msi_vector(n)
            except HostRefused as e:
                if not self._no_host_logged:
                    log.warning("MSI-X: vector %d: %s; vectors go nowhere", n, e)
                    self._no_host_logged = True
                return None
            self._vectors[n] = vec
        return vec

    def _program(self, n: int) -> MsiVector | None:
        vec = self._vector(n)
        if vec is None:
            return None
        route = self.entry(n)
        if self._routes.get(n) != route:
            try:
                vec.program(*route)
            except HostRefused as e:
                log.warning("MSI-X vector %d: cannot route %#x/%#x: %s", n, route[0], route[1], e)
                self._routes.pop(n, None)
                return None
            self._routes[n] = route
        return vec

    def _deliver(self, n: int) -> None:
        vec = self._program(n)
        if vec is None:
            self.lost += 1
            return
        vec.trigger()
        self.delivered += 1

    def _flush(self) -> None:
        """Deliver every pending vector that may now be delivered."""
        pending = self.pending
        n = 0
        while pending:
            if pending & 1 and self._deliverable(n):
                self.pending &= ~(1 << n)
                self._deliver(n)
            pending >>= 1
            n += 1

    def control_written(self) -> None:
        """MASKALL, ENABLE or bus mastering may have changed (a config write)."""
        if self.enabled and not self.function_masked:
            for n in range(self.nvectors):
                if not self.masked(n):
                    self._program(n)
            self._flush()

    # -- snapshot (devices.base.Device, "Snapshots") ------------------------

    def snapshot(self) -> dict:
        """Table, pending bits and counters (the capability's control
        register is in configuration space, devices.pci)."""
        return {"table": bytes(self.table), "pending": self.pending,
                "delivered": self.delivered, "lost": self.lost}

    def check(self, state: object, where: str) -> tuple[bytes, int, int, int]:
        """A snapshot's fields, checked (BadState): entries as the guest
        can write them (devices.pci_msix.MsiX.write), pending bits of
        existing vectors only."""
        f = Fields(state, where, ("table", "pending", "delivered", "lost"))
        table = f.blob("table", self.table_size)
        for n in range(self.nvectors):
            e = table[n * PCI_MSIX_ENTRY_SIZE:(n + 1) * PCI_MSIX_ENTRY_SIZE]
            require(not e[PCI_MSIX_ENTRY_LOWER_ADDR] & 0x3
                    and not e[PCI_MSIX_ENTRY_VECTOR_CTRL] & ~PCI_MSIX_ENTRY_CTRL_MASKBIT
                    and not any(e[PCI_MSIX_ENTRY_VECTOR_CTRL + 1:]),
                    f.name("table"), f"entry {n}: reserved bits set")
        pending = f.integer("pending", 0, (1 << self.nvectors) - 1)
        return table, pending, f.integer("delivered"), f.integer("lost")

    def load(self, checked: tuple[bytes, int, int, int]) -> None:
        table, self.pending, self.delivered, self.lost = checked
        self.table[:] = table
        self._routes.clear()

    def resume(self) -> None:
        """After a restore: ask the host again for the routes of the
        entries that may deliver (the VMM kept them; the same vector
        objects come back).  Nothing is delivered: pending bits stay
        until the guest's next unmask, as they would have."""
        if self.enabled and not self.function_masked:
            for n in range(self.nvectors):
                if not self.masked(n):
                    self._program(n)

    # -- the guest side: table and PBA in the BAR --------------------------

    def owns(self, offset: int) -> bool:
        return (self.table_offset <= offset < self.table_offset + self.table_size
                or self.pba_offset <= offset < self.pba_offset + self.pba_size)

    def read(self, offset: int, size: int) -> int:
        """Table and PBA take aligned DWORD and QWORD accesses (6.8.2);
        other accesses read all ones."""
        if size not in (4, 8) or offset % size:
            return all_ones(size)
        if self.table_offset <= offset and offset + size <= self.table_offset + self.table_size:
            at = offset - self.table_offset
            return int.from_bytes(self.table[at:at + size], "little")
        if self.pba_offset <= offset and offset + size <= self.pba_offset + self.pba_size:
            at = offset - self.pba_offset
            return (self.pending >> (8 * at)) & all_ones(size)
        return all_ones(size)

    def write(self, offset: int, size: int, value: int) -> None:
        """Table writes; the PBA is read-only (6.8.2.10)."""
        if size not in (4, 8) or offset % size:
            return
        if not (self.table_offset <= offset and offset + size <= self.table_offset + self.table_size):
            return
        at = offset - self.table_offset
        n = at // PCI_MSIX_ENTRY_SIZE
        was_masked = self.masked(n)
        data = (value & all_ones(size)).to_bytes(size, "little")
        for i, b in enumerate(data):
            field = (at + i) % PCI_MSIX_ENTRY_SIZE
            if field == PCI_MSIX_ENTRY_VECTOR_CTRL:
                b &= PCI_MSIX_ENTRY_CTRL_MASKBIT     # other bits reserved, read 0
            elif field > PCI_MSIX_ENTRY_VECTOR_CTRL:
                b = 0
            elif field == PCI_MSIX_ENTRY_LOWER_ADDR:
                b &= 0xFC                             # DWORD aligned: bits 1:0 read 0
            self.table[at + i] = b
        if not self.masked(n) and (was_masked or self.enabled):
            if self.enabled and not self.function_masked:
                self._program(n)
            self._flush()
