"""Fixtures shared by the whole suite."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from ipc import Registry
from tests.devserver.servicekit import Services


def segment_name(tag: str = "t") -> str:
    """A fresh POSIX shared-memory name, unique to this test run."""
    return f"/svmtest-{tag}-{os.getpid()}-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def registry_name():
    """A unique segment name; whatever is left under it is unlinked after."""
    name = segment_name()
    yield name
    try:
        import posix_ipc

        posix_ipc.unlink_shared_memory(name)
    except Exception:
        pass


@pytest.fixture
def registry(registry_name):
    """A new, empty registry of the default capacity (4096)."""
    with Registry.create(registry_name) as reg:
        yield reg
        reg.unlink()


@pytest.fixture
def small_registry(registry_name):
    """A new, empty registry of capacity 16 (to reach 'full' quickly)."""
    with Registry.create(registry_name, capacity=16) as reg:
        yield reg
        reg.unlink()


@pytest.fixture
def services(tmp_path) -> Iterator[Services]:
    """Device services a test starts (tests/devserver/servicekit.py):
    ``services.listen(spec, path)``, ``.activated``, ``.supervised`` and
    ``.notify()``; all stopped and closed at the test's end."""
    kit = Services(tmp_path)
    try:
        yield kit
    finally:
        kit.close()
