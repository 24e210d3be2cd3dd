"""The VMM's registry: an anonymous memfd whose size is sealed, shared with
device processes by descriptor."""

from __future__ import annotations

import errno
import os

import pytest

from ipc import Bus, Registry


def test_sealed_registry_cannot_be_resized_by_a_device():
    with Registry.create_sealed(capacity=64) as reg:
        reg.register(Bus.MMIO, 0xD0000000, 0x1000, owner=3, cookie=9)
        pid = os.fork()
        if pid == 0:  # the device: it has the fd, and tries to shrink it
            code = 0
            try:
                os.ftruncate(reg.fd, 0)
                code = 1
            except OSError as e:
                code = 0 if e.errno == errno.EPERM else 2
            try:
                with Registry.from_fd(reg.fd) as mine:
                    mine.register(Bus.PIO, 0x60, 4, owner=3)
            except Exception:
                code = 3
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert os.fstat(reg.fd).st_size > 0
        with reg.get(Bus.MMIO, 0xD0000010, 4) as ref:     # still mapped, no SIGBUS
            assert (ref.owner, ref.cookie, ref.offset) == (3, 9, 0x10)
        with reg.get(Bus.PIO, 0x61) as ref:              # what the device registered
            assert ref.owner == 3
        assert reg.check() == []


def test_sealed_registry_leaves_nothing_named():
    before = set(os.listdir("/dev/shm"))
    reg = Registry.create_sealed(capacity=16)
    fd = reg.fd
    assert set(os.listdir("/dev/shm")) == before
    reg.close()
    with pytest.raises(OSError):
        os.fstat(fd)


@pytest.mark.parametrize("capacity", [0, -1, 2**21])
def test_sealed_registry_bad_capacity(capacity):
    with pytest.raises(ValueError):
        Registry.create_sealed(capacity=capacity)
