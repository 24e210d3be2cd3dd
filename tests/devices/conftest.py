"""Fixtures of the device-model tests: a small registry for the snapshot
tests and guarded guest RAM (tests/devices/test_virtio.py's GuardedRam)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ipc import Registry
from tests.conftest import segment_name


@pytest.fixture
def registry() -> Iterator[Registry]:
    """A new registry of capacity 64 (the snapshot tests' restarts share it)."""
    reg = Registry.create(segment_name("snap"), capacity=64)
    yield reg
    reg.unlink()
    reg.close()


@pytest.fixture
def guarded():
    """Guest RAM with guard pages around it, released after the test."""
    from tests.devices.test_virtio import GuardedRam
    g = GuardedRam()
    yield g
    g.ram.release()
