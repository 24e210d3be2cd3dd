"""The ``serial`` device: a 16550A-compatible UART (COM1 by default).

``--device serial[,pio=0x3f8][,irq=4]``.  Eight byte-wide registers at
``pio`` (names as in Linux's ``include/uapi/linux/serial_reg.h``, behaviour
after the National Semiconductor PC16550D datasheet, "Register
Description" and Table II/IV):

====== ===== ======================================================
offset DLAB  register
====== ===== ======================================================
0      0     RBR (read: receive buffer) / THR (write: transmit)
1      0     IER: RDI, THRI, RLSI, MSI interrupt enables
0, 1   1     DLL, DLM: the divisor latch (baud = 115200 / divisor)
2            IIR (read) / FCR (write: FIFO enable, clear, trigger)
3            LCR: word format, set break, DLAB
4            MCR: DTR, RTS, OUT1, OUT2, LOOP
5            LSR: DR, OE, PE, FE, BI, THRE, TEMT, FIFO error
6            MSR: DCTS, DDSR, TERI, DDCD, CTS, DSR, RI, DCD
7            SCR: scratch
====== ===== ======================================================

The byte stream comes from the host (:meth:`DeviceHost.console`), the same
whether the model runs in the VMM or in its own process: transmitted bytes
are written to the console's output at once (so THRE and TEMT are always
set: the transmitter is never busy), received bytes are read from its input
into a 16-byte receive FIFO (one byte, the RBR, with FIFOs off) only while
there is room -- the input is flow-controlled instead of overrun.  A device
without a console drops what it sends and receives nothing.

Interrupts (IIR priority, highest first): receiver line status (an
overrun), received data available (FIFO at its trigger level, or any byte
with FIFOs off), character timeout (FIFO below its trigger level and the
input idle), THR empty, modem status.  The UART's interrupt output is gated
by MCR OUT2, as PC boards wire it, and each rising edge triggers the host's
``irq_line(irq)`` (ISA IRQ 4 for COM1).  A host without interrupt lines
gives a UART for polling guests.

Loopback (MCR LOOP): transmitted bytes go to the receiver instead of the
output, external input is disconnected, and MSR's CTS, DSR, RI, DCD follow
MCR's RTS, DTR, OUT1, OUT2.  Outside loopback the modem inputs say a
terminal is attached (CTS, DSR, DCD on; RI off).

Left out: parity, framing and break errors (a byte stream has none; LSR
PE/FE/BI and the FIFO-error bit stay 0, the set-break bit of LCR is stored
only), the baud rate's timing (bytes move as fast as the host moves them),
DMA mode, and the transmit FIFO (output is never held back).
"""

from __future__ import annotations

import collections
import logging
import os
import select
import threading

from devices.faults.apply import fault_bytes
from devices.faults.table import POINTS
from devices.base import (
    BadParameter,
    ConsoleFds,
    Device,
    DeviceHost,
    HostRefused,
    Interrupt,
    Space,
    Window,
    all_ones,
    parse_int,
)
from devices.snapshot import U8, U16, Fields, require

log = logging.getLogger(__name__)

# Register offsets (serial_reg.h).
UART_RX = 0      # in, DLAB=0
UART_TX = 0      # out, DLAB=0
UART_DLL = 0     # DLAB=1
UART_DLM = 1     # DLAB=1
UART_IER = 1
UART_IIR = 2     # in
UART_FCR = 2     # out
UART_LCR = 3
UART_MCR = 4
UART_LSR = 5
UART_MSR = 6
UART_SCR = 7
UART_REGS = 8

UART_IER_RDI = 0x01     # received data available
UART_IER_THRI = 0x02    # transmitter holding register empty
UART_IER_RLSI = 0x04    # receiver line status
UART_IER_MSI = 0x08     # modem status
UART_IER_MASK = 0x0F

UART_IIR_NO_INT = 0x01
UART_IIR_MSI = 0x00
UART_IIR_THRI = 0x02
UART_IIR_RDI = 0x04
UART_IIR_RLSI = 0x06
UART_IIR_RX_TIMEOUT = 0x0C
UART_IIR_FIFO_ENABLED = 0xC0

UART_FCR_ENABLE_FIFO = 0x01
UART_FCR_CLEAR_RCVR = 0x02
UART_FCR_CLEAR_XMIT = 0x04
UART_FCR_DMA_SELECT = 0x08
UART_FCR_TRIGGER_MASK = 0xC0
#: Receive FIFO trigger levels of FCR bits 7:6.
FIFO_TRIGGER = {0x00: 1, 0x40: 4, 0x80: 8, 0xC0: 14}

UART_LCR_DLAB = 0x80
UART_LCR_SBC = 0x40

UART_MCR_DTR = 0x01
UART_MCR_RTS = 0x02
UART_MCR_OUT1 = 0x04
UART_MCR_OUT2 = 0x08
UART_MCR_LOOP = 0x10
UART_MCR_MASK = 0x1F

UART_LSR_DR = 0x01
UART_LSR_OE = 0x02
UART_LSR_PE = 0x04
UART_LSR_FE = 0x08
UART_LSR_BI = 0x10
UART_LSR_THRE = 0x20
UART_LSR_TEMT = 0x40
UART_LSR_FIFOE = 0x80
UART_LSR_BRK_ERROR_BITS = UART_LSR_OE | UART_LSR_PE | UART_LSR_FE | UART_LSR_BI

UART_MSR_DCTS = 0x01
UART_MSR_DDSR = 0x02
UART_MSR_TERI = 0x04
UART_MSR_DDCD = 0x08
UART_MSR_CTS = 0x10
UART_MSR_DSR = 0x20
UART_MSR_RI = 0x40
UART_MSR_DCD = 0x80
UART_MSR_ANY_DELTA = 0x0F

FIFO_SIZE = 16
#: Divisor after reset (the datasheet leaves it undefined): 9600 baud.
DEFAULT_DIVISOR = 12
#: The PC's UART clock (1.8432 MHz) over 16.
BAUD_BASE = 115200
DEFAULT_PIO = 0x3F8
DEFAULT_IRQ = 4
#: A terminal is attached: what the modem inputs say outside loopback.
_EXTERNAL_MSR = UART_MSR_DCD | UART_MSR_DSR | UART_MSR_CTS
#: How long a blocked console output may hold up a transmit (then dropped).
OUTPUT_DEADLINE = 1.0


class Serial(Device):
    kind = "serial"
    fault_points = {"serial.tx": POINTS["serial.tx"], "serial.rx": POINTS["serial.rx"], "irq": POINTS["irq"]}

    @classmethod
    def windows(cls, params: dict[str, str]) -> list[Window]:
        """Its 8 ports (COM1's unless ``pio=`` says otherwise)."""
        pio = params.get("pio")
        return [Window(Space.PIO, DEFAULT_PIO if pio is None else parse_int(cls.kind, "pio", pio), UART_REGS, 0)]

    def __init__(self, host: DeviceHost, **params: str):
        pio = params.pop("pio", None)
        irq = params.pop("irq", None)
        super().__init__(host, **params)
        self.pio = DEFAULT_PIO if pio is None else parse_int(self.kind, "pio", pio)
        if not 0 <= self.pio <= 0x10000 - UART_REGS:
            raise BadParameter(f"serial: pio={self.pio:#x} does not leave 8 ports below 0x10000")
        self.irq = DEFAULT_IRQ if irq is None else parse_int(self.kind, "irq", irq)
        if not 0 <= self.irq < 24:
            raise BadParameter(f"serial: irq={self.irq} (expected 0 to 23, an IOAPIC input)")
        self._cond = threading.Condition(threading.Lock())
        self._interrupt: Interrupt | None = None
        self._console: ConsoleFds | None = None
        self._reader: threading.Thread | None = None
        self._wake_r = self._wake_w = -1
        self._stopping = False
        self._out_broken = False
        self._started = False
        self._reset_registers()

    def _reset_registers(self) -> None:
        """The power-on state (PC16550D Table IV, "UART Reset Configuration")."""
        self.ier = 0
        self.lcr = 0
        self.mcr = 0
        self.fcr = 0
        self.scr = 0
        self.divisor = DEFAULT_DIVISOR
        self.lsr = UART_LSR_THRE | UART_LSR_TEMT
        self.msr = _EXTERNAL_MSR
        self.rbr = 0
        self.rx: collections.deque[int] = collections.deque()
        self.thr_pending = False     # THRE interrupt source (cleared by IIR read / THR write)
        self.rx_idle = False         # no more input arrived: the character timeout has passed
        self._level = False          # the interrupt output, as last driven
        #: Console input read but not yet taken by the receiver (it had no
        #: room, or went into loopback, after the read): in the snapshot.
        self.rx_held = b""

    # -- life ----------------------------------------------------------------

    def start(self) -> None:
        self._started = True
        self.host.adopt(Space.PIO, self.pio, UART_REGS, 0)   # devices.base, "Snapshots"
        try:
            self._interrupt = self.host.irq_line(self.irq)
        except HostRefused as e:
            log.info("serial: no interrupt line %d on this host (%s); polling only", self.irq, e)
        self._console = self.host.console()
        if self._console is not None and self._console.input >= 0:
            self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
            self._reader = threading.Thread(target=self._read_input, name="serial-input", daemon=True)
            self._reader.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._reader is not None:
            try:
                os.write(self._wake_w, b"x")
            except OSError:
                pass
            self._reader.join(2.0)
            if self._reader.is_alive():
                log.warning("serial: the input thread did not stop")
            else:
                os.close(self._wake_r)
                os.close(self._wake_w)
            self._reader = None
        try:
            self.host.release(Space.PIO, self.pio)
        except HostRefused as e:  # the VMM may already have reaped it
            log.debug("serial: releasing ports at %#x: %s", self.pio, e)

    # -- snapshot (devices.base.Device, "Snapshots") ------------------------

    _STATE = ("ier", "lcr", "mcr", "fcr", "scr", "divisor", "lsr", "msr", "rbr", "rx", "rx_held",
              "thr_pending", "rx_idle", "level")

    def snapshot(self) -> dict:
        with self._cond:
            return {"ier": self.ier, "lcr": self.lcr, "mcr": self.mcr, "fcr": self.fcr, "scr": self.scr,
                    "divisor": self.divisor, "lsr": self.lsr, "msr": self.msr, "rbr": self.rbr,
                    "rx": bytes(self.rx), "rx_held": self.rx_held, "thr_pending": self.thr_pending,
                    "rx_idle": self.rx_idle, "level": self._level}

    def restore(self, state: dict) -> None:
        require(not self._started, self.kind, "restore is for a freshly built model, before start()")
        f = Fields(state, self.kind, self._STATE)
        ier = f.integer("ier", 0, UART_IER_MASK)
        lcr, scr, rbr = f.integer("lcr", 0, U8), f.integer("scr", 0, U8), f.integer("rbr", 0, U8)
        mcr = f.integer("mcr", 0, UART_MCR_MASK)
        fcr = f.integer("fcr", 0, U8)
        require(fcr & ~(UART_FCR_ENABLE_FIFO | UART_FCR_DMA_SELECT | UART_FCR_TRIGGER_MASK) == 0
                and (fcr == 0 or fcr & UART_FCR_ENABLE_FIFO), f.name("fcr"), f"{fcr:#x} is not a FIFO state")
        divisor = f.integer("divisor", 0, U16)
        lsr, msr = f.integer("lsr", 0, U8), f.integer("msr", 0, U8)
        rx = f.blob("rx", max_length=FIFO_SIZE if fcr & UART_FCR_ENABLE_FIFO else 1)
        held = f.blob("rx_held", max_length=FIFO_SIZE)
        require(lsr & (UART_LSR_THRE | UART_LSR_TEMT) == UART_LSR_THRE | UART_LSR_TEMT
                and not lsr & (UART_LSR_PE | UART_LSR_FE | UART_LSR_BI | UART_LSR_FIFOE),
                f.name("lsr"), f"{lsr:#x}: the transmitter is never busy, no parity/framing/break errors")
        require(bool(lsr & UART_LSR_DR) == bool(rx), f.name("lsr"), "DR disagrees with the receive FIFO")
        want_msr = self._modem_inputs(mcr)
        require(msr & ~UART_MSR_ANY_DELTA == want_msr, f.name("msr"),
                f"{msr:#x}: the modem inputs are {want_msr:#x} with MCR {mcr:#x}")
        thr_pending, rx_idle, level = f.flag("thr_pending"), f.flag("rx_idle"), f.flag("level")
        with self._cond:
            self.ier, self.lcr, self.mcr, self.fcr, self.scr = ier, lcr, mcr, fcr, scr
            self.divisor, self.lsr, self.msr, self.rbr = divisor, lsr, msr, rbr
            self.rx = collections.deque(rx)
            self.rx_held = held
            self.thr_pending, self.rx_idle = thr_pending, rx_idle
            # The interrupt output as the old process left it: an edge it
            # sent is not sent again (the guest had it).
            self._level = level
            self._cond.notify_all()

    # -- accesses ------------------------------------------------------------

    def read(self, space: Space, cookie: int, offset: int, size: int) -> int:
        if size != 1 or not 0 <= offset < UART_REGS:
            return all_ones(size)
        with self._cond:
            value = self._read(offset)
            self._update_irq()
            return value

    def write(self, space: Space, cookie: int, offset: int, size: int, value: int) -> None:
        if size != 1 or not 0 <= offset < UART_REGS:
            return
        with self._cond:
            self._write(offset, value & 0xFF)
            self._update_irq()

    def _read(self, offset: int) -> int:
        dlab = self.lcr & UART_LCR_DLAB
        if offset == UART_RX:
            return self.divisor & 0xFF if dlab else self._read_rbr()
        if offset == UART_IER:
            return self.divisor >> 8 if dlab else self.ier
        if offset == UART_IIR:
            iir = self._iir()
            if iir & 0x0F == UART_IIR_THRI:
                self.thr_pending = False   # reading IIR clears a THRE interrupt it reports
            return iir
        if offset == UART_LCR:
            return self.lcr
        if offset == UART_MCR:
            return self.mcr
        if offset == UART_LSR:
            lsr = self.lsr
            self.lsr &= ~UART_LSR_BRK_ERROR_BITS
            return lsr
        if offset == UART_MSR:
            msr = self.msr
            self.msr &= ~UART_MSR_ANY_DELTA
            return msr
        return self.scr

    def _write(self, offset: int, value: int) -> None:
        dlab = self.lcr & UART_LCR_DLAB
        if offset == UART_TX:
            if dlab:
                self.divisor = (self.divisor & 0xFF00) | value
            else:
                self._transmit(value)
        elif offset == UART_IER:
            if dlab:
                self.divisor = (self.divisor & 0x00FF) | value << 8
            else:
                old, self.ier = self.ier, value & UART_IER_MASK
                # Enabling THRI while the THR is empty interrupts at once.
                if self.ier & ~old & UART_IER_THRI and self.lsr & UART_LSR_THRE:
                    self.thr_pending = True
        elif offset == UART_FCR:
            self._write_fcr(value)
        elif offset == UART_LCR:
            if (self.lcr ^ value) & UART_LCR_DLAB and value & UART_LCR_DLAB == 0:
                log.debug("serial: %d baud, LCR %#04x", BAUD_BASE // max(self.divisor, 1), value)
            self.lcr = value
        elif offset == UART_MCR:
            old, self.mcr = self.mcr, value & UART_MCR_MASK
            if (old ^ self.mcr) & UART_MCR_LOOP:
                self._cond.notify_all()    # external input reconnected or cut
            self._set_modem_inputs()
        elif offset == UART_LSR or offset == UART_MSR:
            pass    # read-only here ("factory test" writes are not modelled)
        else:
            self.scr = value

    def _write_fcr(self, value: int) -> None:
        if (value ^ self.fcr) & UART_FCR_ENABLE_FIFO:
            value |= UART_FCR_CLEAR_RCVR | UART_FCR_CLEAR_XMIT   # toggling FIFO mode clears both
        if value & UART_FCR_CLEAR_RCVR:
            self.rx.clear()
            self.lsr &= ~UART_LSR_DR
            self.rx_idle = False
            self._cond.notify_all()
        # The transmit FIFO is always empty: nothing to clear.
        self.fcr = value & (UART_FCR_ENABLE_FIFO | UART_FCR_DMA_SELECT | UART_FCR_TRIGGER_MASK)
        if not self.fcr & UART_FCR_ENABLE_FIFO:
            self.fcr = 0
        self._cond.notify_all()            # the receiver's room changed

    # -- receive ----------------------------------------------------------------

    @property
    def fifo_enabled(self) -> bool:
        return bool(self.fcr & UART_FCR_ENABLE_FIFO)

    def _room(self) -> int:
        return (FIFO_SIZE if self.fifo_enabled else 1) - len(self.rx)

    def _read_rbr(self) -> int:
        if self.rx:
            self.rbr = self.rx.popleft()
            if not self.rx:
                self.lsr &= ~UART_LSR_DR
            elif self._timeout_pending():
                self._level = False    # the timeout indication restarts: a new edge
            self._cond.notify_all()
        return self.rbr

    def _receive(self, byte: int) -> None:
        """One character completes in the receiver (lock held)."""
        if self._room() > 0:
            self.rx.append(byte)
        elif self.fifo_enabled:
            self.lsr |= UART_LSR_OE        # FIFO full: the new character is lost
        else:
            self.rx[-1] = byte             # RBR overwritten
            self.lsr |= UART_LSR_OE
        self.lsr |= UART_LSR_DR
        self.rx_idle = False

    def _transmit(self, byte: int) -> None:
        self.thr_pending = False
        self._update_irq()                 # THR written: a THRE interrupt drops ...
        if self.mcr & UART_MCR_LOOP:
            self._receive(byte)
            self.rx_idle = True            # nothing follows it on the line
        elif "serial.tx" in self.fault_engine.armed:
            self._output(fault_bytes(self.fault_engine, "serial.tx", bytes((byte,))))
        else:
            self._output(bytes((byte,)))
        self.thr_pending = True            # ... and comes back once the byte is out

    def _output(self, data: bytes) -> None:
        console = self._console
        if console is None or console.output < 0 or self._out_broken:
            return
        while data:
            try:
                n = os.write(console.output, data)
            except BlockingIOError:
                if not select.select([], [console.output], [], OUTPUT_DEADLINE)[1]:
                    log.warning("serial: console output blocked for %g s; byte dropped", OUTPUT_DEADLINE)
                    return
                continue
            except OSError as e:
                log.warning("serial: console output failed (%s); output is dropped from now on", e)
                self._out_broken = True
                return
            data = data[n:]

    def _read_input(self) -> None:
        """The input thread: move console input into the receiver while it
        has room and is not in loopback (bytes read meanwhile wait), until
        end of input or stop."""
        assert self._console is not None
        fd = self._console.input
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while True:
            with self._cond:
                while not self._stopping and (self._room() <= 0 or self.mcr & UART_MCR_LOOP):
                    self._cond.wait()
                if self._stopping:
                    return
                held = self.rx_held
                if held:
                    n = self._room()
                    for b in held[:n]:
                        self._receive(b)
                    self.rx_held = held = held[n:]
                    self.rx_idle = not held and not select.select([fd], [], [], 0)[0]
                    self._update_irq()
                    continue
                room = self._room()
            events = dict(poller.poll())
            if self._wake_r in events:
                return
            if not events.get(fd):
                continue
            try:
                data = os.read(fd, room)
            except BlockingIOError:
                continue
            except OSError as e:
                log.info("serial: console input failed: %s", e)
                return
            if not data:
                log.debug("serial: end of console input")
                return
            if "serial.rx" in self.fault_engine.armed:     # the line's faults (devices.faults)
                data = fault_bytes(self.fault_engine, "serial.rx", data)
            with self._cond:
                self.rx_held += data

    # -- interrupts ---------------------------------------------------------

    def _timeout_pending(self) -> bool:
        return (self.fifo_enabled and self.rx_idle and 0 < len(self.rx)
                < FIFO_TRIGGER[self.fcr & UART_FCR_TRIGGER_MASK])

    def _iir(self) -> int:
        """The highest-priority pending interrupt (PC16550D Table IV)."""
        fifo = UART_IIR_FIFO_ENABLED if self.fifo_enabled else 0
        ier = self.ier
        if ier & UART_IER_RLSI and self.lsr & UART_LSR_BRK_ERROR_BITS:
            return fifo | UART_IIR_RLSI
        if ier & UART_IER_RDI and self.rx:
            if not self.fifo_enabled or len(self.rx) >= FIFO_TRIGGER[self.fcr & UART_FCR_TRIGGER_MASK]:
                return fifo | UART_IIR_RDI
            if self._timeout_pending():
                return fifo | UART_IIR_RX_TIMEOUT
        if ier & UART_IER_THRI and self.thr_pending:
            return fifo | UART_IIR_THRI
        if ier & UART_IER_MSI and self.msr & UART_MSR_ANY_DELTA:
            return fifo | UART_IIR_MSI
        return fifo | UART_IIR_NO_INT

    def _update_irq(self) -> None:
        """Drive the interrupt output (pending and OUT2); an edge upward
        triggers the host's interrupt line."""
        level = not self._iir() & UART_IIR_NO_INT and bool(self.mcr & UART_MCR_OUT2)
        rising = level and not self._level
        self._level = level
        if rising and self._interrupt is not None:
            self._interrupt.trigger()

    @staticmethod
    def _modem_inputs(m: int) -> int:
        """MSR bits 7:4 with MCR ``m``: looped back, or a terminal."""
        if m & UART_MCR_LOOP:
            return ((UART_MSR_CTS if m & UART_MCR_RTS else 0) | (UART_MSR_DSR if m & UART_MCR_DTR else 0)
                    | (UART_MSR_RI if m & UART_MCR_OUT1 else 0) | (UART_MSR_DCD if m & UART_MCR_OUT2 else 0))
        return _EXTERNAL_MSR

    def _set_modem_inputs(self) -> None:
        """MSR bits 7:4 from the modem inputs, and their delta bits."""
        new = self._modem_inputs(self.mcr)
        old = self.msr
        changed = old ^ new
        delta = old & UART_MSR_ANY_DELTA
        if changed & UART_MSR_CTS:
            delta |= UART_MSR_DCTS
        if changed & UART_MSR_DSR:
            delta |= UART_MSR_DDSR
        if changed & UART_MSR_DCD:
            delta |= UART_MSR_DDCD
        if old & UART_MSR_RI and not new & UART_MSR_RI:
            delta |= UART_MSR_TERI         # trailing edge of RI
        self.msr = new | delta
