"""The sandbox under a running guest, on real KVM (guest:
tests/guests/hostile.c): the guest asks the hostile test device
(devserver.sandbox.hostile, as a user's model: ``MODULE:CLASS``) for an attack on its host; the sandbox stops
it -- an error, or the device killed by seccomp with the call named --
and the VM goes on with its other device.  This test runs as root (CI
does): the VMM that starts the devices is root, and the sandbox holds."""

from __future__ import annotations

import errno
import logging
import os

import pytest

from devserver.sandbox.hostile import ATTACKS
from tests.vmm.conftest import needs_kvm
from vmm.config import parse_device_spec
from vmm.machine import Machine
from vmm.outcome import Ending
from vmm.remote import RemoteEndpoint

pytestmark = needs_kvm
HOSTILE, ECHO = 0x6000, 0x7000
GONE = 0x7E


def run(guest, attack: str, tmp_path) -> tuple[int, RemoteEndpoint]:
    with Machine(memory=16 << 20) as m:
        m.load_pvh(guest("hostile"), f"hostile={HOSTILE} echo={ECHO} attack={ATTACKS.index(attack)}")
        m.add_device(parse_device_spec(f"echo,pio={ECHO:#x},mmio=0xd0000000"))
        ep = m.add_device(parse_device_spec(f"devserver.sandbox.hostile:Hostile,id=evil,pio={HOSTILE:#x},"
                                            f"vmm_pid={os.getpid()},dir={tmp_path}"))
        outcome = m.run(timeout=60)
        assert outcome.ending is Ending.TEST_EXIT, outcome
        assert isinstance(ep, RemoteEndpoint)
        return outcome.value, ep


@pytest.mark.parametrize("attack, stopped", [
    ("open_passwd", errno.EACCES), ("create_file", errno.EACCES),
    ("execve", "execve"), ("ptrace_vmm", "ptrace"), ("mount", "mount"),
])
def test_an_attack_from_guest_input_is_stopped_and_the_vm_goes_on(guest, tmp_path, caplog, attack, stopped):
    caplog.set_level(logging.ERROR, logger="vmm")
    value, ep = run(guest, attack, tmp_path)
    if isinstance(stopped, int):
        assert value == stopped
        assert ep.sandbox.layers[-1] == "seccomp=kill"
    else:
        assert value == GONE                    # the device died of it; echo still answered
        assert f"killed by seccomp: {stopped}" in (ep.failed or "")
        assert f"device evil killed by seccomp: {stopped}" in [r.getMessage() for r in caplog.records]
    assert list(tmp_path.iterdir()) == []
