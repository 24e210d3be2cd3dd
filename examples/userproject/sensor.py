"""A device model of the user's own: a temperature sensor in port I/O.

    --device sensor:Sensor[,pio=PORT]

Two 32-bit registers at PORT (default 0x540):
+0 write: select sample N; read: that sample, in milli-degrees Celsius
   (20000 + 10 N: the sensor warms up by a hundredth of a degree a sample)
+4 read: how many samples were read so far
"""

import threading

from devices.base import BadParameter, Device, DeviceHost, HostRefused, Space, Window, all_ones, parse_int

SAMPLE, COUNT = 0x0, 0x4


class Sensor(Device):
    kind = "sensor"

    def __init__(self, host: DeviceHost, **params: str):
        self.port = parse_int(self.kind, "pio", params.pop("pio", "0x540"))
        super().__init__(host, **params)
        if not 0 <= self.port <= 0x10000 - 8:
            raise BadParameter(f"sensor: pio={self.port:#x} does not fit the port space")
        self.index = self.reads = 0
        self.lock = threading.Lock()

    @classmethod
    def windows(cls, params: dict[str, str]) -> list[Window]:
        """The 8 ports the VMM lets this model be reached at."""
        return [Window(Space.PIO, parse_int(cls.kind, "pio", params.get("pio", "0x540")), 8)]

    def start(self) -> None:
        self.host.claim(Space.PIO, self.port, 8)

    def stop(self) -> None:
        try:
            self.host.release(Space.PIO, self.port)
        except HostRefused:
            pass

    def read(self, space: Space, cookie: int, offset: int, size: int) -> int:
        if size != 4:
            return all_ones(size)
        with self.lock:
            if offset == SAMPLE:
                self.reads += 1
                return 20000 + 10 * self.index
            if offset == COUNT:
                return self.reads
        return all_ones(size)

    def write(self, space: Space, cookie: int, offset: int, size: int, value: int) -> None:
        if size == 4 and offset == SAMPLE:
            with self.lock:
                self.index = value
