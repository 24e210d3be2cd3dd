"""Restarts (issue 10) when the device processes come from the fork server
(vmm.forkserver): the device killed again and again while the guest uses
it, every access exactly once; every new process is the fork server's
child, not an exec of the VMM's.  (The whole of tests/vmm/test_restart.py
also runs this way under SPLITVMM_FORKSERVER=1.)"""

from __future__ import annotations

import os

from tests.vmm.conftest import needs_kvm
from tests.vmm.test_restart import MMIO, PIO, pauses, run_echo_guest
from vmm import sandbox_report

pytestmark = needs_kvm
KILLS = 8


def test_echo_killed_restarts_from_the_fork_server(guest):
    parents: set[int] = set()
    server: list[int] = []

    def each_kill(i: int) -> None:
        ep = box[0]
        parents.add(sandbox_report._parent_of(ep.sandbox.pids[0]) or 0)

    box: list = []

    def on_run(m, ep) -> None:
        assert m.remote_options.forkserver is not None
        server.append(m.remote_options.forkserver.pid)
        box.append(ep)

    _m, ep, killer = run_echo_guest(
        guest, f"echo,id=e0,pio={PIO:#x},mmio={MMIO:#x},restart=on-failure,restart_burst=100",
        kills=KILLS, machine_kw={"forkserver": True}, before_kill=each_kill, on_run=on_run)
    assert ep.restarts == KILLS
    assert parents == set(server) and os.getpid() not in parents
    print(f"echo from the fork server: {KILLS} kills; {pauses(killer)}")
