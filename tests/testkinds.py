"""TEST-ONLY device kinds: devices that misbehave on request.

Not for anything but tests.  They are models like a user's own, named
``--device tests.testkinds:FaultEcho`` / ``tests.testkinds:IrqEcho``
(:data:`FAULT_ECHO`, :data:`IRQ_ECHO`; :mod:`devices.kinds`), so they reach
a device process the way any out-of-tree model does.  ``fault-echo``
reaches into the device-process runtime (its control socket, its
registry mapping), which no real model does: it finds the runtime of its
process itself (:func:`_device_server`); the runtime has no test hooks.

``fault-echo``: the ``echo`` device (:mod:`devices.echo`, same parameters
and registers) plus a fault register at offset 0xFC of either window:

======================  ===================================================
access at 0xFC           what the device does
======================  ===================================================
write 4 bytes, value 1   sends bytes that are not a frame on its control
                         socket (:data:`FAULT_GARBAGE_FRAMING`)
write 2                  sends a frame whose body is not msgpack
write 3                  sends a well-formed message of an unknown type
write 4                  a thread of the device takes the registry lock
                         and keeps it; the write is answered once it holds
                         it (:data:`FAULT_HOG`)
write 5                  the same, ``hog_delay_ms`` after the write was
                         answered (:data:`FAULT_HOG_LATER`)
write 6                  the thread serving the write -- the process's
                         main thread -- takes the registry lock, answers
                         the write and goes on serving, holding it
                         (:data:`FAULT_HOG_MAIN`)
read 4 bytes             answers only after ``stall_ms`` milliseconds (a
                         device hanging in its handler), then reads the
                         access count
======================  ===================================================

Other values and sizes at 0xFC are ignored (writes) or read all ones.
Extra parameters: ``stall_ms=`` (1 to 600000, default 30000) and
``hog_delay_ms=`` (0 to 60000, default 50).  Every fault is logged at
WARNING as a test hook.

``irq-echo``: raises interrupts on the guest's request, through whatever
host it runs on (a device process, or inline when a test registers the
class).  ``pio=PORT``: 64 ports; ``pin=GSI`` (optional): ask for that
line already in ``start()``, as a UART does.  4-byte accesses:

======  =====  ============================================================
offset  access  meaning
======  =====  ============================================================
0x00    w       ask the host for irqchip input (GSI) value (irq_line)
0x04    w       trigger that line
0x08    w       latch an MSI address (low 32 bits)
0x0C    w       latch an MSI data value
0x10    w       program MSI vector ``value`` with the latched address/data
0x14    w       trigger MSI vector ``value``
0x18    w       unprogram MSI vector ``value``
0x1C    r       1 if the last request was refused (the error is logged),
                else 0
0x20    r       pid of the serving process
======  =====  ============================================================

Requests are made inside the handler of the write, as an MSI-X table
write would make them.

``coalesce-sum`` and ``pci-coalesce-sum`` (:data:`COALESCE_SUM`,
:data:`PCI_COALESCE_SUM`): add up what the guest writes to a coalesced
MMIO window (a plain window, or a PCI BAR the guest moves), with an
order-sensitive hash, for the coalesced-MMIO tests and benchmark (their
class docstrings list the registers).
"""

from __future__ import annotations

import gc
import logging
import struct
import threading
import time

from devices.base import BadParameter, Device, DeviceHost, HostRefused, Space, Window, all_ones, parse_int
from devices.echo import ECHO_COUNT, MOVE_AREA, Echo
from devices.pci import PciDevice
from devices.pci_config import Bar, BarKind

log = logging.getLogger(__name__)

#: The ``--device`` TYPE of each kind.
FAULT_ECHO = "tests.testkinds:FaultEcho"
IRQ_ECHO = "tests.testkinds:IrqEcho"
COALESCE_SUM = "tests.testkinds:CoalesceSum"
PCI_COALESCE_SUM = "tests.testkinds:PciCoalesceSum"

FAULT_REG = 0xFC
FAULT_GARBAGE_FRAMING = 1
FAULT_GARBAGE_MSGPACK = 2
FAULT_GARBAGE_UNKNOWN = 3
FAULT_HOG = 4
FAULT_HOG_LATER = 5
FAULT_HOG_MAIN = 6


def _frame(body: bytes) -> bytes:
    return struct.pack("<I", len(body)) + body


#: What each garbage fault sends (one packet each).
GARBAGE = {
    FAULT_GARBAGE_FRAMING: b"\xff\xff\xff\x7fthis is not a frame",
    FAULT_GARBAGE_MSGPACK: _frame(b"\xc1\xc1\xc1"),
    FAULT_GARBAGE_UNKNOWN: _frame(b"\x81\xa4type\xa9no-such-m"),
}


class FaultEcho(Echo):
    """``echo`` with a test-only fault register (module docstring)."""

    kind = "fault-echo"

    def __init__(self, host: DeviceHost, **params: str):
        self.stall_ms = self._bounded(params.pop("stall_ms", "30000"), "stall_ms", 1, 600_000)
        self.hog_delay_ms = self._bounded(params.pop("hog_delay_ms", "50"), "hog_delay_ms", 0, 60_000)
        super().__init__(host, **params)
        self._hog: threading.Thread | None = None

    def _bounded(self, text: str, key: str, low: int, high: int) -> int:
        value = parse_int(self.kind, key, text)
        if not low <= value <= high:
            raise BadParameter(f"{self.kind}: {key}={value} (expected {low} to {high})")
        return value

    @property
    def _server(self):
        """The runtime of this device process (None inline)."""
        return _device_server()

    def read(self, space: Space, cookie: int, offset: int, size: int) -> int:
        if offset != FAULT_REG:
            return super().read(space, cookie, offset, size)
        if size != 4:
            return all_ones(size)
        log.warning("test hook: stalling this read for %d ms", self.stall_ms)
        time.sleep(self.stall_ms / 1000)        # the fault itself: a handler that hangs
        return super().read(space, cookie, ECHO_COUNT, 4)

    def write(self, space: Space, cookie: int, offset: int, size: int, value: int) -> None:
        if offset != FAULT_REG:
            return super().write(space, cookie, offset, size, value)
        if size != 4 or self._server is None:
            return None
        if value in GARBAGE:
            server = self._server
            log.warning("test hook: sending garbage (fault %d) on the control socket", value)
            with server._send_lock:
                server.channel.sock.send(GARBAGE[value])
        elif value in (FAULT_HOG, FAULT_HOG_LATER) and self._hog is None:
            self._start_hog(0.0 if value == FAULT_HOG else self.hog_delay_ms / 1000)
        elif value == FAULT_HOG_MAIN and self._hog is None:
            from ipc._registry_c import lib

            self._hog = threading.current_thread()
            rc = lib.svm_reg_lock_for_test(self._server.registry._h, 10_000_000_000)
            log.warning("test hook: thread %d (%s) took the registry lock (code %d) and keeps it",
                        threading.get_native_id(), threading.current_thread().name, rc)
        return None

    def _start_hog(self, delay: float) -> None:
        from ipc._registry_c import lib

        registry = self._server.registry
        holding = threading.Event()

        def hog() -> None:
            if delay:
                time.sleep(delay)               # the fault's timing (hog_delay_ms), not a wait
            rc = lib.svm_reg_lock_for_test(registry._h, 10_000_000_000)
            log.warning("test hook: thread %d took the registry lock (code %d) and keeps it",
                        threading.get_native_id(), rc)
            holding.set()
            threading.Event().wait()      # until the process is killed

        self._hog = threading.Thread(target=hog, name="lock-hog", daemon=True)
        self._hog.start()
        if not delay:
            holding.wait(15)


IRQ_PIN = 0x00
IRQ_PIN_TRIGGER = 0x04
IRQ_MSI_ADDRESS = 0x08
IRQ_MSI_DATA = 0x0C
IRQ_MSI_PROGRAM = 0x10
IRQ_MSI_TRIGGER = 0x14
IRQ_MSI_UNPROGRAM = 0x18
IRQ_STATUS = 0x1C
IRQ_PID = 0x20
IRQ_WINDOW = 0x40


class IrqEcho(Device):
    """Interrupts on request (module docstring)."""

    kind = "irq-echo"

    @classmethod
    def windows(cls, params: dict[str, str]) -> list[Window]:
        return [Window(Space.PIO, parse_int(cls.kind, "pio", params["pio"]), IRQ_WINDOW)] if "pio" in params else []

    def __init__(self, host: DeviceHost, **params: str):
        pio = params.pop("pio", None)
        pin = params.pop("pin", None)
        super().__init__(host, **params)
        self.start_pin = None if pin is None else parse_int(self.kind, "pin", pin)
        if pio is None:
            raise BadParameter(f"{self.kind}: pio= is required")
        self.pio = parse_int(self.kind, "pio", pio)
        if not 0 <= self.pio <= 0x10000 - IRQ_WINDOW:
            raise BadParameter(f"{self.kind}: pio={self.pio:#x} is out of range")
        self.line = None
        self.vectors: dict = {}
        self.address = 0
        self.data = 0
        self.refused = 0

    def start(self) -> None:
        if self.start_pin is not None:
            self.line = self.host.irq_line(self.start_pin)
        self.host.claim(Space.PIO, self.pio, IRQ_WINDOW)

    def stop(self) -> None:
        try:
            self.host.release(Space.PIO, self.pio)
        except HostRefused as e:
            log.debug("irq-echo: release: %s", e)

    def read(self, space: Space, cookie: int, offset: int, size: int) -> int:
        if size == 4 and offset == IRQ_STATUS:
            return self.refused
        if size == 4 and offset == IRQ_PID:
            return self.host.process_id()
        return all_ones(size)

    def write(self, space: Space, cookie: int, offset: int, size: int, value: int) -> None:
        if size != 4:
            return
        try:
            self._write(offset, value)
            self.refused = 0
        except HostRefused as e:
            log.warning("irq-echo: request refused: %s", e)
            self.refused = 1

    def _write(self, offset: int, value: int) -> None:
        if offset == IRQ_PIN:
            self.line = self.host.irq_line(value)
        elif offset == IRQ_PIN_TRIGGER and self.line is not None:
            self.line.trigger()
        elif offset == IRQ_MSI_ADDRESS:
            self.address = value
        elif offset == IRQ_MSI_DATA:
            self.data = value
        elif offset == IRQ_MSI_PROGRAM:
            vector = self.vectors.get(value) or self.host.msi_vector(value)
            vector.program(self.address, self.data)
            self.vectors[value] = vector
        elif offset == IRQ_MSI_TRIGGER and value in self.vectors:
            self.vectors[value].trigger()
        elif offset == IRQ_MSI_UNPROGRAM and value in self.vectors:
            self.vectors.pop(value).unprogram()



def _device_server():
    """The :class:`devserver.runtime.DeviceServer` running in this process,
    or None (an inline model)."""
    from devserver.runtime import DeviceServer

    return next((o for o in gc.get_objects() if isinstance(o, DeviceServer)), None)


SUM_WINDOW = 0x1000
SUM_ADD = 0x00
SUM_COUNT = 0x08
SUM_TOTAL = 0x10
SUM_HASH = 0x18
SUM_RESET = 0x20
SUM_MOVE = 0x28
SUM_PID = 0x30
#: FNV-1a, 64 bits: the hash of the written values is order-sensitive.
FNV_OFFSET = 0xCBF2_9CE4_8422_2325
FNV_PRIME = 0x100_0000_01B3
U64 = (1 << 64) - 1


class _Sums:
    """What the coalesce-sum kinds add up (count, sum, FNV-1a hash)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.count = self.total = 0
        self.hash = FNV_OFFSET

    def add(self, value: int) -> None:
        self.count += 1
        self.total = (self.total + value) & U64
        self.hash = ((self.hash ^ value) * FNV_PRIME) & U64

    def read(self, offset: int, size: int, pid: int) -> int:
        value = {SUM_COUNT: self.count, SUM_TOTAL: self.total, SUM_HASH: self.hash,
                 SUM_PID: pid}.get(offset, 0)
        return value & all_ones(size)


class CoalesceSum(Device):
    """``coalesce-sum``: adds up what the guest writes, for the coalesced
    MMIO tests and benchmark (vmm.coalesce).

    ``mmio=ADDR``: a 4 KiB window, claimed with ``coalesce=True`` unless
    ``coalesce=off``; ``plain=ADDR`` (optional): a second 4 KiB window,
    never coalesced, feeding the same sums.  Registers of either window:

    ======  ======  ==========================================================
    offset  access  meaning
    ======  ======  ==========================================================
    0x00    w       add the value (any size): count += 1, sum += value,
                    hash = (hash ^ value) * FNV prime (FNV-1a over values)
    0x08    r       count
    0x10    r       sum (mod 2**64)
    0x18    r       hash (starts at the FNV offset basis)
    0x20    w       reset count, sum and hash
    0x28    w       move the ``mmio=`` window to ``value`` (release, claim)
    0x30    r       pid of the serving process
    ======  ======  ==========================================================

    Reads of fewer than 8 bytes return the low bytes; other offsets read 0.
    """

    kind = "coalesce-sum"

    @classmethod
    def windows(cls, params: dict[str, str]) -> list[Window]:
        """``mmio=`` moves itself (register 0x28) in echo's MMIO move area;
        ``plain=`` is pinned."""
        out = []
        if "mmio" in params:
            start, length = MOVE_AREA[Space.MMIO]
            base = parse_int(cls.kind, "mmio", params["mmio"])
            if start <= base < start + length:
                out.append(Window(Space.MMIO, start, length, 0, region_max=SUM_WINDOW))
            else:
                out.append(Window(Space.MMIO, base, SUM_WINDOW, 0))
        if "plain" in params:
            out.append(Window(Space.MMIO, parse_int(cls.kind, "plain", params["plain"]), SUM_WINDOW, 1))
        return out

    def __init__(self, host: DeviceHost, mmio: str | None = None, plain: str | None = None,
                 coalesce: str = "on", **params: str):
        super().__init__(host, **params)
        if mmio is None:
            raise BadParameter(f"{self.kind}: mmio= is required")
        if coalesce not in ("on", "off"):
            raise BadParameter(f"{self.kind}: coalesce={coalesce!r} (on or off)")
        self.base = parse_int(self.kind, "mmio", mmio)
        self.plain = None if plain is None else parse_int(self.kind, "plain", plain)
        self.coalesce = coalesce == "on"
        self.sums = _Sums()

    def start(self) -> None:
        self.host.claim(Space.MMIO, self.base, SUM_WINDOW, 0, coalesce=self.coalesce)
        if self.plain is not None:
            self.host.claim(Space.MMIO, self.plain, SUM_WINDOW, 1)

    def read(self, space: Space, cookie: int, offset: int, size: int) -> int:
        return self.sums.read(offset, size, self.host.process_id())

    def write(self, space: Space, cookie: int, offset: int, size: int, value: int) -> None:
        if offset == SUM_ADD:
            self.sums.add(value)
        elif offset == SUM_RESET:
            self.sums.reset()
        elif offset == SUM_MOVE and cookie == 0 and size == 8 and value != self.base:
            self.host.release(Space.MMIO, self.base)
            try:
                self.host.claim(Space.MMIO, value, SUM_WINDOW, 0, coalesce=self.coalesce)
            except HostRefused as e:
                log.warning("coalesce-sum: cannot move to %#x: %s; staying at %#x", value, e, self.base)
                self.host.claim(Space.MMIO, self.base, SUM_WINDOW, 0, coalesce=self.coalesce)
                return
            self.base = value

    def stop(self) -> None:
        for start in (self.base, self.plain):
            if start is not None:
                try:
                    self.host.release(Space.MMIO, start)
                except HostRefused:    # reaped already (the VMM cut us off)
                    pass


class PciCoalesceSum(PciDevice):
    """``pci-coalesce-sum``: the registers of ``coalesce-sum`` (0x00-0x30,
    without the move register) behind BAR 0, a 4 KiB 32-bit memory BAR
    declared with ``coalesce=True``: the guest moves it by reprogramming
    the BAR, and the coalesced zone moves with it.  IDs 0x1234:0x5c01."""

    kind = "pci-coalesce-sum"
    vendor_id = 0x1234
    device_id = 0x5C01

    def __init__(self, host: DeviceHost, **params: str):
        super().__init__(host, **params)
        self.add_bar(0, BarKind.MEM32, SUM_WINDOW, coalesce=True)
        self.sums = _Sums()

    def bar_read(self, bar: Bar, offset: int, size: int) -> int:
        return self.sums.read(offset, size, self.host.process_id())

    def bar_write(self, bar: Bar, offset: int, size: int, value: int) -> None:
        if offset == SUM_ADD:
            self.sums.add(value)
        elif offset == SUM_RESET:
            self.sums.reset()


#: The ``--device`` TYPE of the squatter kind.
SQUATTER = "tests.testkinds:Squatter"
#: Squatter registers (4 bytes each; the class docstring).
SQUATTER_WINDOW = 0x40
SQUATTER_ADDR_LO, SQUATTER_ADDR_HI, SQUATTER_LEN, SQUATTER_OWNER = 0x00, 0x04, 0x08, 0x0C
SQUATTER_COOKIE, SQUATTER_BUS, SQUATTER_CMD, SQUATTER_STATUS = 0x10, 0x14, 0x18, 0x1C
SQUATTER_CAPTURED = 0x20
SQUATTER_CMD_REGISTER, SQUATTER_CMD_EVICT, SQUATTER_CMD_RESTORE, SQUATTER_CMD_DROP = 1, 2, 3, 4
#: OWNER value meaning "the owner of the region evicted last".
SQUATTER_OWNER_EVICTED = 0xFFFF_FFFF
#: What a squatting region reads (a capture, if it ever reached the model).
SQUATTER_MARK = 0x6B6B_6B6B


class Squatter(Device):
    """``squatter``: a hostile device that uses the shared registry against its
    siblings, on the guest's command (tests of vmm.windows and
    docs/DESIGN-registry-trust.md).  ``pio=PORT``: its own 64 ports,
    the only window it is granted:

    ======  ======  ==========================================================
    offset  access  meaning
    ======  ======  ==========================================================
    0x00    w       ADDR low dword of the target address
    0x04    w       ADDR high dword
    0x08    w       LEN
    0x0C    w       OWNER to register as (0: its own; 0xFFFFFFFF: the owner
                    of the region evicted last -- a forged owner)
    0x10    w       COOKIE
    0x14    w       BUS (0 PIO, 1 MMIO, 2 PCI)
    0x18    w       CMD: 1 register ADDR+LEN on BUS as OWNER/COOKIE straight
                    in the registry; 2 evict: unregister every region that
                    overlaps ADDR+LEN on BUS, whoever owns it; 3 restore
                    what 2 evicted, under the owners it had; 4 drop every
                    region 1 registered
    0x1C    r       STATUS of the last command: 0 done, 1 conflict, 2 not
                    found, 3 other error; after 2: how many were evicted
    0x20    r       CAPTURED: accesses that reached this model through a
                    region other than its own ports (must stay 0)
    ======  ======  ==========================================================

    Any access through such a region reads :data:`SQUATTER_MARK`.
    """

    kind = "squatter"

    @classmethod
    def windows(cls, params: dict[str, str]) -> list[Window]:
        return [Window(Space.PIO, parse_int(cls.kind, "pio", params["pio"]), SQUATTER_WINDOW, 0)] \
            if "pio" in params else []

    def __init__(self, host: DeviceHost, **params: str):
        pio = params.pop("pio", None)
        super().__init__(host, **params)
        if pio is None:
            raise BadParameter(f"{self.kind}: pio= is required")
        self.pio = parse_int(self.kind, "pio", pio)
        self.regs = [0] * 8
        self.status = 0
        self.captured = 0
        self.evicted: list = []
        self.evicted_owner = 0
        self.mine: list[tuple[int, int, int]] = []
        self._lock = threading.Lock()

    def start(self) -> None:
        self.host.claim(Space.PIO, self.pio, SQUATTER_WINDOW, 0)

    def read(self, space: Space, cookie: int, offset: int, size: int) -> int:
        with self._lock:
            if space is not Space.PIO or cookie != 0:
                self.captured += 1
                return SQUATTER_MARK & all_ones(size)
            if offset == SQUATTER_STATUS:
                return self.status
            if offset == SQUATTER_CAPTURED:
                return self.captured
            return all_ones(size)

    def write(self, space: Space, cookie: int, offset: int, size: int, value: int) -> None:
        with self._lock:
            if space is not Space.PIO or cookie != 0:
                self.captured += 1
                return
            if offset == SQUATTER_CMD:
                self.status = self._command(value)
            elif offset < SQUATTER_CMD and offset % 4 == 0:
                self.regs[offset // 4] = value

    def _command(self, cmd: int) -> int:
        from ipc import Bus, RegionConflict, RegionNotFound, RegistryError
        registry = self.host.registry        # type: ignore[attr-defined]  # both hosts have it
        addr = self.regs[0] | self.regs[1] << 32
        length, owner, cookie, bus = self.regs[2], self.regs[3], self.regs[4], Bus(self.regs[5])
        try:
            if cmd == SQUATTER_CMD_REGISTER:
                if owner == SQUATTER_OWNER_EVICTED:
                    owner = self.evicted_owner
                owner = owner or self.host.owner   # type: ignore[attr-defined]
                registry.register(bus, addr, length, owner, cookie)
                self.mine.append((bus, addr, owner))
            elif cmd == SQUATTER_CMD_EVICT:
                hit = [r for r in registry.regions() if r.bus == bus and not r.removing
                       and r.start < addr + length and addr < r.start + r.length]
                for r in hit:
                    registry.unregister(r.bus, r.start, r.owner)
                self.evicted = hit
                if hit:
                    self.evicted_owner = hit[-1].owner
                return len(hit)
            elif cmd == SQUATTER_CMD_RESTORE:
                for r in self.evicted:
                    registry.register(r.bus, r.start, r.length, r.owner, r.cookie)
                self.evicted = []
            elif cmd == SQUATTER_CMD_DROP:
                for b, start, o in self.mine:
                    registry.unregister(b, start, o)
                self.mine = []
            else:
                return 3
        except RegionConflict:
            return 1
        except RegionNotFound:
            return 2
        except (RegistryError, ValueError) as e:
            log.warning("squatter: command %d: %s", cmd, e)
            return 3
        return 0
