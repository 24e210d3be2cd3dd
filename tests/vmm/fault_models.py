"""A user's own model with a fault point of its own (tests/vmm/test_faults.py),
named ``tests.vmm.fault_models:Latch`` like any model of a user's.

``pio=PORT``: 4 ports, a 32-bit latch: a write stores the value, a read
returns it.  Its own point ``latch.store`` (match ``value``) takes the
action ``invert``: the write stores the value's complement instead.
"""

from __future__ import annotations

import threading

from devices.base import Device, DeviceHost, Space, Window, all_ones, parse_int
from devices.faults import ActionSpec, Int, PointSpec


class Latch(Device):
    kind = "latch"

    @classmethod
    def windows(cls, params: dict[str, str]) -> list[Window]:
        """Its 4 ports (vmm.windows: a user model declares what it claims)."""
        return [Window(Space.PIO, parse_int(cls.kind, "pio", params.get("pio", "0x2000")), 4)]
    fault_points = {
        "latch.store": PointSpec(events="each value written to the latch", match={"value": Int(0, 2**32 - 1)},
                                 actions={"invert": ActionSpec("the latch stores the value's complement")}),
    }

    def __init__(self, host: DeviceHost, **params: str):
        pio = params.pop("pio", "0x2000")
        super().__init__(host, **params)
        self.pio = parse_int(self.kind, "pio", pio)
        self.value = 0
        self._lock = threading.Lock()

    def start(self) -> None:
        self.host.claim(Space.PIO, self.pio, 4)

    def stop(self) -> None:
        try:
            self.host.release(Space.PIO, self.pio)
        except Exception:
            pass

    def read(self, space: Space, cookie: int, offset: int, size: int) -> int:
        with self._lock:
            return self.value & all_ones(size)

    def write(self, space: Space, cookie: int, offset: int, size: int, value: int) -> None:
        firing = self.fault_point("latch.store", value=value)
        if firing is not None and firing.action == "invert":
            firing.done(f"stored {~value & 0xFFFF_FFFF:#x} for {value:#x}")
            value = ~value & 0xFFFF_FFFF
        with self._lock:
            self.value = value
