"""Hot unplug and replug on real KVM (QMP device_del / device_add), seen
from a guest that rescans PCI (tests/guests/hotplug.c): the removed
device reads all ones, the others keep working, a new one takes the free
slot, and nothing is left behind -- regions, processes, descriptors."""

from __future__ import annotations

import os

import pytest

from vmm import guests
from vmm.machine import Machine
from vmm.qmp import QmpError

from .conftest import GUEST_SOURCES, needs_kvm
from .procs import children

pytestmark = needs_kvm


@pytest.fixture(scope="module")
def hotplug_guest(tmp_path_factory):
    return guests.build([guests.HERE / "serial.c", guests.HERE / "pci.c", GUEST_SOURCES / "hotplug.c"],
                        tmp_path_factory.mktemp("hotplug"), name="hotplug")


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def echoes(m: Machine) -> list[str]:
    return [d["id"] for d in m.query_devices() if d["kind"] == "pci-echo"]


def healthy(m: Machine, slots: str) -> None:
    """A report line after this point where exactly ``slots`` (e.g.
    "01 02") answer, each without a bad read."""
    assert m.console is not None
    want = r"round \d+:" + "".join(rf" {s} ok=[1-9]\d* bad=0;" for s in slots.split()) + "\n"
    m.console.expect(want, timeout=60)


@pytest.mark.parametrize("placement", ["isolated", "inline"])
def test_unplug_and_replug(hotplug_guest, placement):
    with Machine(memory="64M", serial="capture") as m:
        m.load(hotplug_guest)
        m.add_device("pci-echo", id="a", process=placement)
        m.add_device("pci-echo", id="b", process=placement)
        m.start(timeout=240)
        m.console.expect(r"add 01 00025356")
        m.console.expect(r"add 02 00025356")
        healthy(m, "01 02")
        regions = m.query_regions()
        fds = open_fds()
        kids = children()

        deleted = []
        m.events.subscribe(lambda e: deleted.append(e.data) if e.name == "DEVICE_DELETED" else None)
        m.qmp("device_del", id="b")
        # surprise removal: configuration space and the old BAR read all ones
        m.console.expect(r"del 02 cfg=ffffffff bar0=ffffffff\n")
        healthy(m, "01")
        assert deleted == [{"device": "b", "path": "/machine/peripheral/b"}]
        assert m.query_regions(device="a") != []
        assert all(r["device"] != "b" for r in m.query_regions())
        assert echoes(m) == ["a"]
        assert all(d["state"] == "running" for d in m.query_devices())
        if placement == "isolated":
            assert len(children()) == len(kids) - 1

        # replug: the free slot 2 again, found by the guest's rescan
        m.qmp("device_add", driver="pci-echo", id="c", process=placement)
        m.console.expect(r"add 02 00025356 bar0=")
        healthy(m, "01 02")
        assert echoes(m) == ["a", "c"]
        # the same regions as before, the new device's under its own owner
        strip = [(r["bus"], r["start"], r["length"], r["device"]) for r in regions]
        now = [(r["bus"], r["start"], r["length"], r["device"]) for r in m.query_regions()]
        assert now == [(b, s, n, "c" if d == "b" else d) for b, s, n, d in strip]
        assert len(children()) == len(kids)

        # unplug and replug again and again: no descriptor, region or process leaks
        for i in range(3):
            m.qmp("device_del", id="c" if i == 0 else f"c{i}")
            m.console.expect(r"del 02 cfg=ffffffff bar0=ffffffff\n")
            m.qmp("device_add", driver="pci-echo", id=f"c{i + 1}", process=placement)
            m.console.expect(r"add 02 00025356 bar0=")
        healthy(m, "01 02")
        assert len(m.query_regions()) == len(regions)
        assert len(children()) == len(kids)
        assert open_fds() == fds
        assert m.running


def test_device_del_errors(hotplug_guest):
    with Machine(memory="64M", serial="capture") as m:
        m.load(hotplug_guest)
        m.add_device("pci-echo", id="a")
        with pytest.raises(QmpError) as e:
            m.qmp("device_del", id="nope")
        assert e.value.error_class == "DeviceNotFound"
        with pytest.raises(QmpError) as e:
            m.qmp("device_add", driver="pci-echo", id="a")
        assert "already used" in e.value.desc
        with pytest.raises(QmpError) as e:
            m.qmp("device_add", driver="no-such-kind")
        assert e.value.error_class == "GenericError"
        with pytest.raises(QmpError) as e:
            m.qmp("device_add", driver="pci-echo", slot=[1])
        assert "Invalid parameter type" in e.value.desc
        # a refused device_add leaves its id and slot free
        with pytest.raises(QmpError):
            m.qmp("device_add", driver="pci-echo", id="b", vectors="many")
        m.qmp("device_add", driver="pci-echo", id="b")
        assert echoes(m) == ["a", "b"]
        slots = sorted(r["start"] >> 15 & 0x1F for r in m.query_regions(bus="pci") if r["device"] != "vmm")
        assert slots == [1, 2]


def test_through_the_control_socket_with_vmm_ctl(hotplug_guest, tmp_path):
    import subprocess
    import sys

    def ctl(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "vmm.cli", "ctl", str(sock), *args], capture_output=True,
                              text=True, timeout=60, stdin=subprocess.DEVNULL)

    sock = tmp_path / "vm.sock"
    with Machine(memory="64M", serial="capture") as m:
        m.load(hotplug_guest)
        m.add_device("pci-echo", id="a")
        m.serve_api(sock)
        m.start(timeout=240)
        m.console.expect(r"add 01 00025356")
        r = ctl("device_add", "driver=pci-echo", "id=b", "process=inline")
        assert r.returncode == 0, r.stderr
        m.console.expect(r"add 02 00025356")
        healthy(m, "01 02")
        r = ctl("device_del", "id=a")
        assert r.returncode == 0, r.stderr
        m.console.expect(r"del 01 cfg=ffffffff bar0=ffffffff\n")
        healthy(m, "02")
        r = ctl("device_del", "id=a")
        assert r.returncode == 1 and "DeviceNotFound: Device 'a' not found" in r.stderr
    help_text = subprocess.run([sys.executable, "-m", "vmm.cli", "ctl", "--help"], capture_output=True, text=True,
                               timeout=60).stdout
    assert "device_add" in help_text and "device_del" in help_text
