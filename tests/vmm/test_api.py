"""vmm.Machine as a Python API on real KVM: the captured console and
expect, add_device by text and keywords, start/wait, and teardown of
everything the machine started, also when the with block fails."""

from __future__ import annotations

import os
import time

import pytest

import vmm
from vmm import guests
from vmm.config import ConfigError, parse_device_spec
from vmm.console import ExpectTimeout
from vmm.endpoint import VmmError

from .conftest import GUEST_SOURCES, needs_kvm
from .procs import children

pytestmark = needs_kvm


@pytest.fixture(scope="module")
def api_guest(tmp_path_factory):
    return guests.build([guests.HERE / "serial.c", GUEST_SOURCES / "api.c"], tmp_path_factory.mktemp("api"),
                        name="api")


def test_run_and_console(api_guest):
    with vmm.Machine(memory="32M", serial="capture") as m:
        m.load(api_guest.read_bytes(), "lines=5 code=3")
        outcome = m.run(timeout=60)
        assert outcome.ending is vmm.Ending.TEST_EXIT and outcome.status == 7     # (3 << 1) | 1, as vmm run
        assert m.console.expect(r"api: line (\d+)\n").group(1) == "0"
        assert m.console.expect(r"api: line (\d+)\n").group(1) == "1"      # each expect goes on from the last
        m.console.expect("api: done")
        assert m.console.text.count("api: line") == 5 and m.console.data.endswith(b"api: done\n")
        # the run is over and its output read: no waiting out the timeout
        t = time.monotonic()
        with pytest.raises(ExpectTimeout, match=r"'never printed'; the run ended; output"):
            m.console.expect("never printed", timeout=60)
        assert time.monotonic() - t < 10
        assert [d["id"] for d in m.query_devices()] == ["serial0"]     # COM1, added for the console


def test_background_run_and_wait(api_guest):
    with vmm.Machine(memory="32M", serial="capture") as m:
        m.load(api_guest, "forever=1")
        m.start(timeout=120)
        m.console.expect(r"api: line 20\n")
        assert m.running and m.query_status()["status"] == "running"
        with pytest.raises(TimeoutError):
            m.wait(0.1)                      # still running: the run goes on
        with pytest.raises(ExpectTimeout, match="0.2 s passed"):
            m.console.expect("api: done", timeout=0.2)
        m.quit()
        assert m.wait(60).status == 12 and not m.running
        with pytest.raises(VmmError, match="runs once"):
            m.start()


def test_add_device_forms(api_guest, tmp_path):
    with vmm.Machine(memory="32M", devices=["echo,id=e1,pio=0x1000"]) as m:
        m.add_device("echo", id="e2", pio=0x1200, process="inline")
        m.add_device(parse_device_spec("echo,id=e3,pio=0x1400"))
        disk = m.scratch_image("1M")
        m.add_device("virtio-blk", path=disk, id="blk", readonly=True)
        assert [d["id"] for d in m.query_devices()] == ["e1", "e2", "e3", "blk"]
        assert m.query_devices()[1]["placement"] == "inline"
        with pytest.raises(ConfigError, match="already used"):
            m.add_device("echo", id="e1", pio=0x1600)
        with pytest.raises(TypeError):
            m.add_device(parse_device_spec("echo,id=e4,pio=0x1800"), pio=1)
        assert m.console is None                 # serial="none": no console, no COM1
        assert disk.stat().st_size == 1 << 20
    assert not disk.exists()


def test_close_stops_everything_also_when_the_block_fails(api_guest):
    before_fds, before_kids = set(os.listdir("/proc/self/fd")), children()
    with pytest.raises(RuntimeError, match="the test failed"):
        with vmm.Machine(memory="32M", serial="capture") as m:
            m.load(api_guest, "forever=1")
            m.add_device("virtio-rng", id="rng")
            disk = m.scratch_image()
            m.start()
            m.console.expect(r"api: line 5\n")
            assert len(children() - before_kids) == 2          # rng and COM1
            raise RuntimeError("the test failed")
    assert m.outcome is not None and m.outcome.ending is vmm.Ending.QUIT
    assert children(spares=True) == before_kids
    assert not disk.exists()
    assert set(os.listdir("/proc/self/fd")) == before_fds
