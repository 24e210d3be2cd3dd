"""The ``echo`` test device: a register file behind a PIO and an MMIO window.

``--device echo,pio=PORT,mmio=ADDR`` (either or both).  Both windows address
one 256-byte register file:

====== ======== ===========================================================
offset  access   meaning
====== ======== ===========================================================
0x00    r/w      scratch up to 0xEF; reads return what was last written
                 (little-endian, 0 at start); 1, 2, 4 bytes, 8 on MMIO
0xF0    r, 4     pid of the process serving the device
0xF4    r, 4     accesses served so far, this one included (mod 2**32)
0xF8    w, 4/8   move the window written to onto the given base; the
                 device does it itself, inside the handler of this write
====== ======== ===========================================================

The PIO window is 256 ports; the MMIO window is a 4 KiB page of which the
first 256 bytes count (the rest read all ones and drop writes).  Reads of
write-only or unknown registers, and accesses of a size the window does not
take, read all ones.
"""

from __future__ import annotations

import logging
import struct
import threading
from typing import Callable

import msgpack

from devices.base import (BadParameter, BadState, Device, DeviceHost, HostRefused, Space, Window, all_ones,
                          parse_int)
from devices.snapshot import U32, Fields, require

log = logging.getLogger(__name__)

ECHO_SCRATCH_END = 0xF0
ECHO_PID = 0xF0
ECHO_COUNT = 0xF4
ECHO_MOVE = 0xF8
ECHO_REGS = 0x100

PIO_WINDOW = 0x100
MMIO_WINDOW = 0x1000

COOKIE_PIO = 0
COOKIE_MMIO = 1

_SIZES = {Space.PIO: (1, 2, 4), Space.MMIO: (1, 2, 4, 8)}
#: Little-endian loads and stores of each access size on the scratch bytes
#: (a struct call is several times cheaper than int.from_bytes of a slice).
_UNPACK = {n: struct.Struct("<" + c).unpack_from for n, c in ((1, "B"), (2, "H"), (4, "I"), (8, "Q"))}
_PACK = {n: struct.Struct("<" + c).pack_into for n, c in ((1, "B"), (2, "H"), (4, "I"), (8, "Q"))}
#: The access counter in a packed snapshot (Echo.packed_snapshot): always
#: msgpack's uint32 form, 0xCE and four big-endian bytes.
_COUNT_BE = struct.Struct(">I").pack
_WINDOW = {Space.PIO: PIO_WINDOW, Space.MMIO: MMIO_WINDOW}
_LIMIT = {Space.PIO: 1 << 16, Space.MMIO: 1 << 64}
#: Where an echo window given inside them may move itself (register 0xF8):
#: ports 0x1000-0xBFFF and MMIO 0xD000_0000-0xDFFF_FFFF, clear of the
#: legacy ports, the VMM's ports and the PCI apertures (vmm.layout).  A
#: window given elsewhere is pinned to its parameter (moves are refused).
MOVE_AREA = {Space.PIO: (0x1000, 0xB000), Space.MMIO: (0xD000_0000, 0x1000_0000)}


class RegisterFile:
    """The echo register file (the table above), without windows: shared
    by ``echo`` and ``pci-echo`` (devices.pci_echo).  Not locked; its
    owner serializes accesses.  ``sizes`` are the access sizes taken."""

    def __init__(self) -> None:
        self.scratch = bytearray(ECHO_SCRATCH_END)
        self.count = 0

    def snapshot(self) -> dict:
        return {"scratch": bytes(self.scratch), "count": self.count}

    @staticmethod
    def check(state: object, where: str) -> tuple[bytes, int]:
        """A snapshot's (scratch, count), checked (BadState)."""
        f = Fields(state, where, ("scratch", "count"))
        return f.blob("scratch", ECHO_SCRATCH_END), f.integer("count", 0, U32)

    def load(self, checked: tuple[bytes, int]) -> None:
        self.scratch[:], self.count = checked

    def read(self, offset: int, size: int, sizes: tuple[int, ...], pid: Callable[[], int]) -> int:
        """The register at ``offset``; ``pid()`` is asked only for ECHO_PID."""
        self.count = (self.count + 1) & 0xFFFFFFFF
        if size not in sizes or offset < 0 or offset + size > ECHO_REGS:
            return all_ones(size)
        if offset + size <= ECHO_SCRATCH_END:
            return _UNPACK[size](self.scratch, offset)[0]
        if offset == ECHO_PID and size == 4:
            return pid() & 0xFFFFFFFF
        if offset == ECHO_COUNT and size == 4:
            return self.count
        return all_ones(size)

    def write(self, offset: int, size: int, sizes: tuple[int, ...], value: int) -> int | None:
        """Apply a write; returns the new base a write to ECHO_MOVE asks
        for (the owner moves its window), else None."""
        self.count = (self.count + 1) & 0xFFFFFFFF
        if size not in sizes or offset < 0 or offset + size > ECHO_REGS:
            return None
        value &= all_ones(size)
        if offset + size <= ECHO_SCRATCH_END:
            _PACK[size](self.scratch, offset, value)
        elif offset == ECHO_MOVE and size in (4, 8):
            return value
        return None


class Echo(Device):
    kind = "echo"

    def __init__(self, host: DeviceHost, **params: str):
        pio = params.pop("pio", None)
        mmio = params.pop("mmio", None)
        super().__init__(host, **params)
        if pio is None and mmio is None:
            raise BadParameter("echo: needs pio=PORT, mmio=ADDR or both")
        self.base: dict[Space, int] = {}
        if pio is not None:
            self.base[Space.PIO] = self._check_base(Space.PIO, parse_int(self.kind, "pio", pio))
        if mmio is not None:
            self.base[Space.MMIO] = self._check_base(Space.MMIO, parse_int(self.kind, "mmio", mmio))
        self.regs = RegisterFile()
        # Two vCPUs may hit the device at once (inline placement, or two
        # request slots in a device process): keep the register file and
        # the window bases consistent.
        self._lock = threading.Lock()
        self._started = False
        self._process_id = host.process_id      # (bound once: read asks for it on every access)
        #: packed_snapshot's encoding around the counter: (head, tail, the
        #: scratch bytes it holds); None once a window moved or a restore.
        self._packed: tuple[bytes, bytes, bytes] | None = None

    @classmethod
    def windows(cls, params: dict[str, str]) -> list[Window]:
        """Each window the ``pio=``/``mmio=`` parameter names: its move
        area (:data:`MOVE_AREA`) when it starts inside it, else pinned."""
        out = []
        for space, key in ((Space.PIO, "pio"), (Space.MMIO, "mmio")):
            if key not in params:
                continue
            base = parse_int(cls.kind, key, params[key])
            area_start, area_len = MOVE_AREA[space]
            cookie = cls._cookie(space)
            if area_start <= base and base + _WINDOW[space] <= area_start + area_len:
                out.append(Window(space, area_start, area_len, cookie, region_max=_WINDOW[space]))
            else:
                out.append(Window(space, base, _WINDOW[space], cookie))
        return out

    def _check_base(self, space: Space, base: int) -> int:
        if base < 0 or base + _WINDOW[space] > _LIMIT[space]:
            raise BadParameter(f"echo: {space.name} window at {base:#x} does not fit the address space")
        if space is Space.MMIO and base % MMIO_WINDOW:
            raise BadParameter(f"echo: mmio={base:#x} is not 4 KiB aligned")
        return base

    def start(self) -> None:
        # adopt: a restored model finds its windows still registered
        # (devices.base.Device, "Snapshots"); on a fresh start it claims.
        self._started = True
        for space, base in self.base.items():
            self.host.adopt(space, base, _WINDOW[space], self._cookie(space))

    # -- snapshot (devices.base.Device, "Snapshots") ------------------------

    def snapshot(self) -> dict:
        with self._lock:
            return {"regs": self.regs.snapshot(),
                    "pio": self.base.get(Space.PIO), "mmio": self.base.get(Space.MMIO)}

    def packed_snapshot(self) -> bytes:
        """:meth:`snapshot` packed (devices.base.Device.packed_snapshot):
        the device process stores it before every answer and every access
        changes the counter, so only the counter is packed each time; the
        rest is packed again when the scratch bytes differ from those in
        the cached encoding, or after a move or a restore."""
        self._lock.acquire()
        try:
            regs, cached = self.regs, self._packed
            if cached is None or cached[2] != regs.scratch:
                cached = self._packed = self._pack_around_count()
            return cached[0] + _COUNT_BE(regs.count) + cached[1]
        finally:
            self._lock.release()

    def _pack_around_count(self) -> tuple[bytes, bytes, bytes]:
        """The encoding of snapshot()'s map before and after the counter's
        four bytes (lock held); the same keys in the same order."""
        p = msgpack.Packer(use_bin_type=True, autoreset=True)
        scratch = bytes(self.regs.scratch)
        head = b"".join((p.pack_map_header(3), p.pack("regs"), p.pack_map_header(2), p.pack("scratch"),
                         p.pack(scratch), p.pack("count"), b"\xce"))
        tail = b"".join((p.pack("pio"), p.pack(self.base.get(Space.PIO)),
                         p.pack("mmio"), p.pack(self.base.get(Space.MMIO))))
        return head, tail, scratch

    def restore(self, state: dict) -> None:
        require(not self._started, self.kind, "restore is for a freshly built model, before start()")
        f = Fields(state, self.kind, ("regs", "pio", "mmio"))
        regs = RegisterFile.check(f.state["regs"], f.name("regs"))
        base: dict[Space, int] = {}
        for space, key in ((Space.PIO, "pio"), (Space.MMIO, "mmio")):
            at = f.optional(key, f.integer)
            if (at is None) != (space not in self.base):
                raise BadState(f"{f.name(key)}: the snapshot {'has' if at is not None else 'lacks'} "
                               f"a {space.name} window, the parameters do not")
            if at is not None:
                try:
                    base[space] = self._check_base(space, at)
                except BadParameter as e:
                    raise BadState(f"{f.name(key)}: {e}") from None
        with self._lock:
            self.regs.load(regs)
            self.base = base
            self._packed = None

    def stop(self) -> None:
        for space, base in list(self.base.items()):
            try:
                self.host.release(space, base)
            except HostRefused as e:  # the VMM may already have reaped it
                log.debug("echo: releasing %s window at %#x: %s", space.name, base, e)

    @staticmethod
    def _cookie(space: Space) -> int:
        return COOKIE_PIO if space is Space.PIO else COOKIE_MMIO

    # (acquire/try/release rather than "with": ~50 ns less per access)

    def read(self, space: Space, cookie: int, offset: int, size: int) -> int:
        self._lock.acquire()
        try:
            return self.regs.read(offset, size, _SIZES.get(space, ()), self._process_id)
        finally:
            self._lock.release()

    def write(self, space: Space, cookie: int, offset: int, size: int, value: int) -> None:
        self._lock.acquire()
        try:
            new = self.regs.write(offset, size, _SIZES.get(space, ()), value)
            if new is not None:
                self._move(space, new)
        finally:
            self._lock.release()

    def _move(self, space: Space, new: int) -> None:
        """Move this window; called with the lock held, from the handler of
        the very access that asked for it."""
        old = self.base.get(space)
        if old is None or new == old:
            return
        try:
            self._check_base(space, new)
        except BadParameter as e:
            log.warning("%s; window stays at %#x", e, old)
            return
        window, cookie = _WINDOW[space], self._cookie(space)
        self.host.release(space, old)
        try:
            self.host.claim(space, new, window, cookie)
        except HostRefused as e:
            log.warning("echo: cannot move %s window to %#x (%s); it stays at %#x", space.name, new, e, old)
            self.host.claim(space, old, window, cookie)
            return
        self.base[space] = new
        self._packed = None
