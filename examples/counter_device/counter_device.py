"""A device model of one's own: a counter in port I/O space.

    vmm run --guest G.elf --device counter_device:Counter[,pio=PORT]

Four 32-bit registers at PORT (default 0x520):
+0 write: add the value to the sum; read: the sum (low 32 bits)
+4 read: the number of values added
+8 write: start again from zero
+C read: the pid of the process serving the device
"""

import threading

from devices.base import BadParameter, Device, DeviceHost, HostRefused, Space, Window, all_ones, parse_int

SUM, COUNT, CLEAR, PID = 0x0, 0x4, 0x8, 0xC


class Counter(Device):
    kind = "counter"

    def __init__(self, host: DeviceHost, **params: str):
        self.port = parse_int(self.kind, "pio", params.pop("pio", "0x520"))
        super().__init__(host, **params)          # any other key=value: BadParameter
        if not 0 <= self.port <= 0x10000 - 16:
            raise BadParameter(f"counter: pio={self.port:#x} does not fit the port space")
        self.total = self.count = 0
        self.lock = threading.Lock()              # two vCPUs may access at once

    @classmethod
    def windows(cls, params: dict[str, str]) -> list[Window]:
        """The 16 ports this model may claim: the VMM grants them at spawn
        and refuses accesses to any region of it outside them."""
        return [Window(Space.PIO, parse_int(cls.kind, "pio", params.get("pio", "0x520")), 16)]

    def start(self) -> None:
        self.host.claim(Space.PIO, self.port, 16)  # RegionBusy if someone has it

    def stop(self) -> None:
        try:
            self.host.release(Space.PIO, self.port)
        except HostRefused:                       # the VMM removed it already
            pass

    def read(self, space: Space, cookie: int, offset: int, size: int) -> int:
        with self.lock:
            if size == 4 and offset == SUM:
                return self.total & 0xFFFF_FFFF
            if size == 4 and offset == COUNT:
                return self.count
        if size == 4 and offset == PID:
            return self.host.process_id()
        return all_ones(size)                      # what an unclaimed port reads

    def write(self, space: Space, cookie: int, offset: int, size: int, value: int) -> None:
        with self.lock:
            if size == 4 and offset == SUM:
                self.total, self.count = self.total + value, self.count + 1
            elif size == 4 and offset == CLEAR:
                self.total = self.count = 0
