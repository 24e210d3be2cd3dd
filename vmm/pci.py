"""The PCI host bridge: configuration mechanism #1 on ports 0xCF8/0xCFC,
the bridge's own function 00:00.0, and where PCI devices sit.

Configuration mechanism #1 (PCI Local Bus 3.0, 3.2.2.3.2):

* CONFIG_ADDRESS (0xCF8) is latched by a full dword write and returned by
  a full dword read; bit 31 enables configuration cycles, bits 30:24 and
  1:0 are reserved and read 0.  Accesses of other sizes to 0xCF8-0xCFB
  "are executed as normal I/O transactions": nothing claims them, so they
  read all ones and writes are dropped.  This is what Linux's
  ``pci_check_type1()`` (arch/x86/pci/direct.c) expects: its ``outb(0x01,
  0xCFB)`` leaves CONFIG_ADDRESS alone, then a dword written must read
  back the same.
* CONFIG_DATA (0xCFC-0xCFF) takes byte, word and dword accesses at any
  offset; with the enable bit set the access goes to register
  ``(CONFIG_ADDRESS & 0xFC) + (port - 0xCFC)`` of the addressed function,
  looked up in the registry's ``Bus.PCI`` and served by whichever endpoint
  claimed that function (inline model, device process, or the VMM for
  the bridge) through the same :meth:`vmm.dispatch.Dispatcher.access`
  as port I/O and MMIO.  An absent function, another bus, or the enable
  bit clear: all ones on reads (master abort), writes dropped.

The host bridge 00:00.0 is class 0x0600 with splitvmm's own IDs
(:data:`BRIDGE_VENDOR_ID`:``BRIDGE_DEVICE_ID``; 0x5356 is "SV", not a
PCI-SIG assignment).  Each PCI device's INTA# is wired to GSI
``16 + slot % 4`` (:func:`vmm.layout.pci_intx_gsi`), passed to the model as
``intx_gsi=`` at placement.  Not here: the extended (ECAM/MMCONFIG) mechanism,
mechanism #2, other buses and bridges.
"""

from __future__ import annotations

import dataclasses
import logging

from devices import pci_config as model
from devices.base import all_ones
from devices.pci import PciDevice
from devices.pci_config import ConfigSpace
from ipc import Bus, pci_address
from vmm import layout
from vmm.dispatch import Dispatcher
from vmm.endpoint import ConfigError
from vmm.local import VmmHandlers

TYPE_CHECKING = False       # mypy takes it as typing's
if TYPE_CHECKING:
    from vmm.config import DeviceSpec

log = logging.getLogger(__name__)

BRIDGE_VENDOR_ID = 0x5356
BRIDGE_DEVICE_ID = 0x0001
#: Base class 06 (bridge), subclass 00 (host bridge), prog-if 00.
BRIDGE_CLASS = 0x060000

CONFIG_ENABLE = 1 << 31
#: Bits of CONFIG_ADDRESS that hold a value: enable, bus, device,
#: function, register (bits 30:24 and 1:0 read 0).
CONFIG_ADDRESS_MASK = 0x80FF_FFFC


def bridge_config() -> ConfigSpace:
    c = ConfigSpace()
    c.set(model.PCI_VENDOR_ID, 2, BRIDGE_VENDOR_ID)
    c.set(model.PCI_DEVICE_ID, 2, BRIDGE_DEVICE_ID)
    c.set(model.PCI_COMMAND, 2, model.PCI_COMMAND_MEMORY | model.PCI_COMMAND_IO)
    c.set(model.PCI_CLASS_PROG, 3, BRIDGE_CLASS)
    c.set(model.PCI_HEADER_TYPE, 1, model.PCI_HEADER_TYPE_NORMAL)
    c.set(model.PCI_SUBSYSTEM_VENDOR_ID, 2, BRIDGE_VENDOR_ID)
    c.set(model.PCI_SUBSYSTEM_ID, 2, BRIDGE_DEVICE_ID)
    c.set_wmask(model.PCI_CACHE_LINE_SIZE, 1, 0xFF)
    c.set_wmask(model.PCI_INTERRUPT_LINE, 1, 0xFF)
    return c


class PciHost:
    """Mechanism #1, the host bridge, and device-number bookkeeping."""

    def __init__(self, dispatcher: Dispatcher, handlers: VmmHandlers):
        self.dispatcher = dispatcher
        #: CONFIG_ADDRESS: one register for the machine, as on hardware
        #: (the guest serializes its users).
        self.config_address = 0
        self.bridge = bridge_config()
        self._slots: set[int] = {0}
        handlers.add(Bus.PIO, layout.PCI_CONFIG_ADDRESS, 4, self._address_read, self._address_write)
        handlers.add(Bus.PIO, layout.PCI_CONFIG_DATA, 4, self._data_read, self._data_write)
        handlers.add(Bus.PCI, pci_address(0, 0, 0), model.PCI_CFG_SPACE_EXP_SIZE,
                     self._bridge_read, self._bridge_write)

    # -- mechanism #1 ------------------------------------------------------

    def _address_read(self, vcpu: int, offset: int, size: int) -> int:
        if offset == 0 and size == 4:
            return self.config_address
        return all_ones(size)

    def _address_write(self, vcpu: int, offset: int, size: int, value: int) -> None:
        if offset == 0 and size == 4:
            self.config_address = value & CONFIG_ADDRESS_MASK

    def _target(self, offset: int) -> int | None:
        addr = self.config_address
        if not addr & CONFIG_ENABLE:
            return None
        return pci_address((addr >> 16) & 0xFF, (addr >> 11) & 0x1F, (addr >> 8) & 0x7,
                           (addr & 0xFC) + offset)

    def _data_read(self, vcpu: int, offset: int, size: int) -> int:
        key = self._target(offset)
        if key is None:
            return all_ones(size)
        return self.dispatcher.access(vcpu, Bus.PCI, key, size, False, 0)

    def _data_write(self, vcpu: int, offset: int, size: int, value: int) -> None:
        key = self._target(offset)
        if key is None:
            return
        windows = self.dispatcher.windows
        if windows is None:
            self.dispatcher.access(vcpu, Bus.PCI, key, size, True, value)
            return
        # The VMM sees where the guest puts each BAR on the way to the
        # device, and moves the BAR's window with it (vmm.windows).
        with windows.config_write(key, size, value):
            self.dispatcher.access(vcpu, Bus.PCI, key, size, True, value)

    def probe_bars(self, owner: int, slot: int) -> None:
        """Size the BARs of the function in ``slot`` (started, the guest not
        yet running) and grant their windows (vmm.windows)."""
        windows = self.dispatcher.windows
        if windows is None:
            return
        fn = windows.grant_pci(owner, slot)
        base = fn.config_key
        access = self.dispatcher.access
        fn.probe(lambda off, size: access(0, Bus.PCI, base + off, size, False, 0),
                 lambda off, size, value: access(0, Bus.PCI, base + off, size, True, value))
        windows.grant_bars(fn)

    # -- the bridge's own function -------------------------------------------

    def _bridge_read(self, vcpu: int, offset: int, size: int) -> int:
        return self.bridge.read(offset, size)

    def _bridge_write(self, vcpu: int, offset: int, size: int, value: int) -> None:
        self.bridge.write(offset, size, value)

    # -- devices ---------------------------------------------------------------

    def place(self, spec: DeviceSpec) -> DeviceSpec:
        """A PCI device's spec with its device number (``slot=``, the
        lowest free one unless given), its windows for pre-assigned BARs
        and the GSI its INTA# is wired to (``intx_gsi=``, the swizzle of
        vmm.layout); other specs unchanged."""
        if not issubclass(spec.model_class, PciDevice):
            return spec
        params = spec.param_dict()
        if "slot" in params:
            try:
                slot = int(params["slot"], 0)
            except ValueError:
                raise ConfigError(f"device {spec.name}: slot={params['slot']!r} is not a number") from None
            if slot in self._slots:
                raise ConfigError(f"device {spec.name}: slot {slot} is taken")
        else:
            free = [n for n in range(1, model.MAX_SLOT + 1) if n not in self._slots]
            if not free:
                raise ConfigError(f"device {spec.name}: every PCI slot is taken")
            slot = free[0]
        if not 1 <= slot <= model.MAX_SLOT:
            raise ConfigError(f"device {spec.name}: slot={slot} (1 to {model.MAX_SLOT})")
        self._slots.add(slot)
        params["slot"] = str(slot)
        params.setdefault("mmio_window", hex(layout.PCI_MMIO_WINDOW + slot * layout.PCI_MMIO_PER_SLOT))
        params.setdefault("io_window", hex(layout.PCI_IO_WINDOW + slot * layout.PCI_IO_PER_SLOT))
        params.setdefault("intx_gsi", str(layout.pci_intx_gsi(slot)))
        return dataclasses.replace(spec, params=tuple(params.items()))

    def release(self, spec: DeviceSpec) -> None:
        """Free the slot of a placed spec (its device was unplugged), so a
        device added later may take it; other specs: nothing."""
        slot = spec.param_dict().get("slot")
        if slot is not None and issubclass(spec.model_class, PciDevice):
            self._slots.discard(int(slot, 0))
