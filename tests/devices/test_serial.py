"""The 16550A model on its own, against a host with pipe consoles and a
recording interrupt line (the same behaviour is shown from a real guest,
through real KVM and a device process, in tests/vmm/test_serial.py)."""

from __future__ import annotations

import os
import time

import pytest

from devices.base import BadParameter, ConsoleFds, DeviceHost, NotOffered, Space
from devices.serial import (
    FIFO_SIZE,
    UART_FCR,
    UART_FCR_ENABLE_FIFO,
    UART_IER,
    UART_IER_MSI,
    UART_IER_RDI,
    UART_IER_RLSI,
    UART_IER_THRI,
    UART_IIR,
    UART_LCR,
    UART_LCR_DLAB,
    UART_LSR,
    UART_LSR_DR,
    UART_LSR_OE,
    UART_LSR_TEMT,
    UART_LSR_THRE,
    UART_MCR,
    UART_MCR_DTR,
    UART_MCR_LOOP,
    UART_MCR_OUT1,
    UART_MCR_OUT2,
    UART_MCR_RTS,
    UART_MSR,
    UART_RX,
    UART_SCR,
    UART_TX,
    Serial,
)
from tests.waiting import wait_for


class Line:
    def __init__(self):
        self.edges = 0

    def trigger(self):
        self.edges += 1


class Host(DeviceHost):
    """Registers regions, hands out an IRQ line and a pipe console."""

    def __init__(self, console: bool = True, irq: bool = True):
        self.regions = {}
        self.lines: dict[int, Line] = {}
        self.out_r = self.out_w = self.in_r = self.in_w = -1
        if console:
            self.out_r, self.out_w = os.pipe()
            self.in_r, self.in_w = os.pipe()
            os.set_blocking(self.out_r, False)
        self.irq = irq

    def claim(self, space, start, length, cookie=0):
        self.regions[(space, start)] = (length, cookie)

    def release(self, space, start):
        del self.regions[(space, start)]

    def process_id(self):
        return 1

    def irq_line(self, gsi):
        if not self.irq:
            raise NotOffered("no irqchip")
        return self.lines.setdefault(gsi, Line())

    def console(self):
        return ConsoleFds(self.out_w, self.in_r) if self.out_w >= 0 else None

    def output(self) -> bytes:
        try:
            return os.read(self.out_r, 4096)
        except BlockingIOError:
            return b""

    def close(self):
        for fd in (self.out_r, self.out_w, self.in_r, self.in_w):
            if fd >= 0:
                os.close(fd)


@pytest.fixture
def uart():
    host = Host()
    dev = Serial(host)
    dev.start()
    yield host, dev
    dev.stop()
    host.close()


def rd(dev, reg):
    return dev.read(Space.PIO, 0, reg, 1)


def wr(dev, reg, value):
    dev.write(Space.PIO, 0, reg, 1, value)


def test_parameters_and_region():
    host = Host(console=False)
    dev = Serial(host, pio="0x2f8", irq="3")
    dev.start()
    assert host.regions == {(Space.PIO, 0x2F8): (8, 0)}
    assert 3 in host.lines
    dev.stop()
    assert host.regions == {}
    for bad in ({"pio": "0xfffc"}, {"irq": "24"}, {"pio": "x"}, {"colour": "red"}):
        with pytest.raises(BadParameter):
            Serial(host, **bad)


def test_reset_values(uart):
    _, dev = uart
    assert rd(dev, UART_IER) == 0
    assert rd(dev, UART_IIR) == 0x01
    assert rd(dev, UART_LCR) == 0
    assert rd(dev, UART_MCR) == 0
    assert rd(dev, UART_LSR) == UART_LSR_THRE | UART_LSR_TEMT
    assert rd(dev, UART_MSR) == 0xB0        # DCD, DSR, CTS: a terminal is attached


def test_scratch_and_divisor_latch(uart):
    _, dev = uart
    wr(dev, UART_SCR, 0x5A)
    assert rd(dev, UART_SCR) == 0x5A
    wr(dev, UART_LCR, UART_LCR_DLAB | 3)
    wr(dev, 0, 0x01)
    wr(dev, 1, 0x02)
    assert (rd(dev, 0), rd(dev, 1)) == (0x01, 0x02)
    assert dev.divisor == 0x0201
    wr(dev, UART_LCR, 3)
    assert rd(dev, UART_IER) == 0            # the latch is not IER
    wr(dev, UART_IER, 0xFF)
    assert rd(dev, UART_IER) == 0x0F
    assert dev.divisor == 0x0201


def test_non_byte_accesses_read_all_ones(uart):
    _, dev = uart
    assert dev.read(Space.PIO, 0, UART_LSR, 2) == 0xFFFF
    dev.write(Space.PIO, 0, UART_SCR, 4, 0x12345678)
    assert rd(dev, UART_SCR) == 0


def test_output_byte_for_byte(uart):
    host, dev = uart
    for b in range(256):
        wr(dev, UART_TX, b)
    assert host.output() == bytes(range(256))
    assert rd(dev, UART_LSR) & (UART_LSR_THRE | UART_LSR_TEMT) == UART_LSR_THRE | UART_LSR_TEMT


def test_input_fills_the_fifo_and_waits_for_room(uart):
    host, dev = uart
    wr(dev, UART_FCR, UART_FCR_ENABLE_FIFO)
    os.write(host.in_w, bytes(range(40)))
    wait_for(lambda: len(dev.rx) == FIFO_SIZE)
    # An observation window, not synchronisation: in 50 ms more the reader
    # must take nothing beyond a full FIFO.
    time.sleep(0.05)
    assert len(dev.rx) == FIFO_SIZE          # flow-controlled, no overrun
    assert not rd(dev, UART_LSR) & UART_LSR_OE
    got = []
    deadline = time.monotonic() + 5
    while len(got) < 40 and time.monotonic() < deadline:
        if rd(dev, UART_LSR) & UART_LSR_DR:
            got.append(rd(dev, UART_RX))
    assert bytes(got) == bytes(range(40))


def test_without_fifo_one_byte_at_a_time(uart):
    host, dev = uart
    os.write(host.in_w, b"ab")
    wait_for(lambda: rd(dev, UART_LSR) & UART_LSR_DR)
    assert len(dev.rx) == 1
    assert rd(dev, UART_RX) == ord("a")
    wait_for(lambda: rd(dev, UART_LSR) & UART_LSR_DR)
    assert rd(dev, UART_RX) == ord("b")


def test_loopback_and_modem_status(uart):
    host, dev = uart
    wr(dev, UART_MCR, UART_MCR_LOOP)
    assert rd(dev, UART_MSR) == 0x0B         # CTS, DSR, DCD fell
    wr(dev, UART_TX, 0xA5)
    assert host.output() == b""              # not on the line
    assert rd(dev, UART_RX) == 0xA5
    wr(dev, UART_MCR, UART_MCR_LOOP | UART_MCR_DTR | UART_MCR_RTS | UART_MCR_OUT1 | UART_MCR_OUT2)
    assert rd(dev, UART_MSR) == 0xFB
    assert rd(dev, UART_MSR) == 0xF0
    wr(dev, UART_MCR, UART_MCR_LOOP | UART_MCR_DTR | UART_MCR_RTS | UART_MCR_OUT2)
    assert rd(dev, UART_MSR) == 0xB4         # trailing edge of RI
    # External input waits while in loopback, and arrives after.
    os.write(host.in_w, b"z")
    time.sleep(0.05)        # an observation window: the byte must not arrive in it
    assert not rd(dev, UART_LSR) & UART_LSR_DR
    wr(dev, UART_MCR, 0)
    wait_for(lambda: rd(dev, UART_LSR) & UART_LSR_DR)
    assert rd(dev, UART_RX) == ord("z")


def test_iir_priorities(uart):
    _, dev = uart
    wr(dev, UART_MCR, UART_MCR_LOOP)
    rd(dev, UART_MSR)
    wr(dev, UART_FCR, UART_FCR_ENABLE_FIFO | 0x06)
    wr(dev, UART_IER, UART_IER_THRI)
    assert rd(dev, UART_IIR) == 0xC2
    assert rd(dev, UART_IIR) == 0xC1
    wr(dev, UART_IER, UART_IER_RDI | UART_IER_THRI | UART_IER_RLSI | UART_IER_MSI)
    wr(dev, UART_MCR, UART_MCR_LOOP | UART_MCR_RTS)     # delta CTS
    assert rd(dev, UART_IIR) == 0xC0
    for i in range(FIFO_SIZE + 1):
        wr(dev, UART_TX, i)
    assert rd(dev, UART_IIR) == 0xC6                    # overrun first
    assert rd(dev, UART_LSR) & UART_LSR_OE
    assert rd(dev, UART_IIR) == 0xC4                    # then data
    assert [rd(dev, UART_RX) for _ in range(FIFO_SIZE)] == list(range(FIFO_SIZE))
    assert rd(dev, UART_IIR) == 0xC2                    # then THRE
    assert rd(dev, UART_IIR) == 0xC0                    # then modem status
    rd(dev, UART_MSR)
    assert rd(dev, UART_IIR) == 0xC1
    wr(dev, UART_FCR, UART_FCR_ENABLE_FIFO | 0x02 | 0xC0)  # trigger 14
    wr(dev, UART_TX, 1)
    assert rd(dev, UART_IIR) == 0xCC                    # character timeout


@pytest.mark.parametrize("trigger, level", [(0x00, 1), (0x40, 4), (0x80, 8), (0xC0, 14)])
def test_fifo_trigger_levels(uart, trigger, level):
    _, dev = uart
    wr(dev, UART_MCR, UART_MCR_LOOP)
    wr(dev, UART_FCR, UART_FCR_ENABLE_FIFO | 0x02 | trigger)
    wr(dev, UART_IER, UART_IER_RDI)
    for i in range(level - 1):
        wr(dev, UART_TX, i)
        dev.rx_idle = False                             # more is on its way
        assert rd(dev, UART_IIR) == 0xC1
    wr(dev, UART_TX, 0xFF)
    assert rd(dev, UART_IIR) == 0xC4


def test_interrupt_edges_need_out2(uart):
    host, dev = uart
    line = host.lines[4]
    wr(dev, UART_IER, UART_IER_THRI)
    assert line.edges == 0                   # OUT2 off: the output is gated
    wr(dev, UART_MCR, UART_MCR_OUT2)
    assert line.edges == 1                   # THRE was pending: an edge now
    rd(dev, UART_IIR)                        # clears THRE
    wr(dev, UART_TX, ord("x"))               # sent at once: THRE again
    assert line.edges == 2
    wr(dev, UART_TX, ord("y"))               # pending still: a new edge all the same
    assert line.edges == 3
    wr(dev, UART_IER, UART_IER_RDI)
    rd(dev, UART_IIR)
    os.write(host.in_w, b"k")
    wait_for(lambda: line.edges == 4)
    assert rd(dev, UART_IIR) == 0x04
    assert rd(dev, UART_RX) == ord("k")
    assert rd(dev, UART_IIR) == 0x01


def test_works_without_irq_lines_or_console():
    host = Host(console=False, irq=False)
    dev = Serial(host)
    dev.start()
    wr(dev, UART_IER, UART_IER_THRI)
    wr(dev, UART_MCR, UART_MCR_OUT2)
    wr(dev, UART_TX, 0x41)                   # dropped
    assert rd(dev, UART_IIR) == 0x02
    dev.stop()


def test_end_of_input_and_stop(uart):
    host, dev = uart
    os.close(host.in_w)
    host.in_w = -1
    wait_for(lambda: not dev._reader.is_alive())
    assert not rd(dev, UART_LSR) & UART_LSR_DR
