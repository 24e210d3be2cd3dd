"""Machine.add_devices: device processes start up in parallel, come up in
the order given, and a failure kills the ones not yet up."""

from __future__ import annotations


import pytest

from ipc import Bus
from tests.vmm.conftest import needs_kvm
from vmm import cli
from vmm.config import parse_device_spec
from vmm.endpoint import DeviceFailed, VMM_OWNER
from vmm.machine import Machine
from vmm.remote import endpoint as remote_endpoint
from .procs import children


@needs_kvm
def test_every_process_starts_before_the_first_handshake(monkeypatch):
    events: list[str] = []
    launch, finish = remote_endpoint.RemoteEndpoint.launch.__func__, remote_endpoint.Launched.finish

    def logged_launch(cls, kind, params, owner, name, *a, **kw):
        events.append(f"launch {name}")
        return launch(cls, kind, params, owner, name, *a, **kw)

    def logged_finish(self):
        ep = finish(self)
        events.append(f"ready {ep.name}")
        return ep

    monkeypatch.setattr(remote_endpoint.RemoteEndpoint, "launch", classmethod(logged_launch))
    monkeypatch.setattr(remote_endpoint.Launched, "finish", logged_finish)
    before = children()
    # restart=no: no warm spares beside the devices (a spare between its
    # fork and exec cannot be told from a device process)
    with Machine(memory=16 << 20) as m:
        specs = [parse_device_spec(f"echo,id=e{i},pio={0x1000 + 0x100 * i:#x},restart=no") for i in range(3)]
        specs.insert(1, parse_device_spec("echo,id=inl,pio=0x2000,process=inline"))
        eps = m.add_devices([(s, None) for s in specs])
        assert [ep.name for ep in eps] == ["e0", "inl", "e1", "e2"]
        assert events == ["launch e0", "launch e1", "launch e2", "ready e0", "ready e1", "ready e2"]
        # One child per device process (under a sandbox, its launcher; the
        # device itself may be the launcher's child in a pid namespace).
        assert len(children() - before) == 3
        owners = {r.owner for r in m.registry.regions() if r.bus == Bus.PIO and 0x1000 <= r.start <= 0x2000}
        assert owners == {ep.owner for ep in eps}


@needs_kvm
def test_a_failure_kills_the_processes_not_yet_up():
    before = children()
    seen: list[tuple[str, str]] = []
    with Machine(memory=16 << 20) as m:
        specs = [parse_device_spec("echo,id=a,pio=0x1000,restart=no"),
                 parse_device_spec("echo,id=b,pio=0x1000,restart=no"),      # the same ports: fails at its handshake
                 parse_device_spec("echo,id=c,pio=0x1200,restart=no")]      # launched, never handshaken
        with pytest.raises(DeviceFailed):
            m.add_devices([(s, None) for s in specs], on_error=lambda spec, e: seen.append((spec.name, str(e))))
        assert [name for name, _ in seen] == ["b"]
        up = [ep for owner, ep in m.endpoints.items() if owner != VMM_OWNER]
        assert [ep.name for ep in up] == ["a"]
        # c was killed and reaped by add_devices itself (no wait needed), b by
        # its failed handshake: only a's process (or its sandbox launcher) is left.
        assert len(children() - before) == 1
    assert children(spares=True) == before


@needs_kvm
def test_the_default_serial_losing_its_ports_is_explained(capsys, guest):
    # An isolated device listed first takes COM1's ports; the default serial
    # (added last) fails in its handshake: one line that says why.
    status = cli.main(["run", "--guest", str(guest("hello")), "--device", "echo,pio=0x3f8"])
    err = capsys.readouterr().err
    assert status == 2, err
    assert err.count("\n") == 1 and "--serial none, or serial=\"none\" in Python, leaves them free" in err, err
