"""Model classes that are not usable, for tests/vmm/test_own_models.py
(``--device tests.vmm.own_models:NAME``)."""

from __future__ import annotations

from devices.base import Device, Space


class NotADevice:
    """Has the methods, is no subclass of devices.base.Device."""

    def read(self, space: Space, cookie: int, offset: int, size: int) -> int:
        return 0


class NoRead(Device):       # abstract: read() is missing
    def write(self, space: Space, cookie: int, offset: int, size: int, value: int) -> None:
        pass


class Crashes(Device):
    """A constructor with a bug (not a BadParameter)."""

    def __init__(self, host, **params: str):
        raise ZeroDivisionError("division by zero in __init__")

    def read(self, space: Space, cookie: int, offset: int, size: int) -> int:
        return 0

    def write(self, space: Space, cookie: int, offset: int, size: int, value: int) -> None:
        pass


not_a_class = 42
