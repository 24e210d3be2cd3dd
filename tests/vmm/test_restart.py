"""Devices killed and started again while a guest keeps using them (issue
10 §2-§3), on real KVM with real device processes: the guest sees no
error and no wrong value, every access completes exactly once with
respect to the device's state (guests: tests/guests/restart_*.c)."""

from __future__ import annotations

import os
import random
import signal
import threading
import time

import pytest

from ipc import Bus
from tests.vmm.conftest import needs_kvm
from vmm.config import parse_device_spec
from vmm.machine import Machine
from vmm.outcome import Ending

pytestmark = needs_kvm

PIO, MMIO = 0x1000, 0xD000_0000
STOP = 0x3F0
STATS = 0x20_0000
KILLS = 20


def wait_for(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.002)


class Killer(threading.Thread):
    """SIGKILLs the device ``kills`` times at random moments, each time
    once it serves again and the guest has made progress."""

    def __init__(self, machine: Machine, ep, kills: int, progress, seed: int = 1,
                 before_kill=None):
        super().__init__(daemon=True)
        self.m, self.ep, self.kills, self.progress = machine, ep, kills, progress
        self.rng = random.Random(seed)
        self.before_kill = before_kill
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.pauses: list[float] = []

    def run(self) -> None:
        try:
            for i in range(self.kills):
                seen = self.progress()
                wait_for(lambda s=seen: self.progress() > s + 20, 60, "guest progress")
                time.sleep(self.rng.uniform(0, 0.03))
                pid, restarts = self.ep.pid, self.ep.restarts
                if self.before_kill is not None:
                    self.before_kill(i)
                os.kill(pid, signal.SIGKILL)
                wait_for(lambda r=restarts: self.ep.restarts > r or self.ep.failed, 30, "the restart")
                assert self.ep.failed is None, self.ep.failed
                self.pauses.append(self.ep.last_restart)
        except BaseException as e:
            self.error = e
        finally:
            self.done.set()


def test_echo_killed_20_times_every_access_exactly_once(guest):
    with Machine(memory=32 << 20, vcpus=1) as m:
        m.load_pvh(guest("restart_echo"), f"pio={PIO:#x} mmio={MMIO:#x} stop={STOP:#x} stats={STATS:#x}")
        ep = m.add_device(parse_device_spec(f"echo,id=e0,pio={PIO:#x},mmio={MMIO:#x},restart=on-failure,"
                                            "restart_burst=100"))
        events: list = []
        m.events.subscribe(events.append)
        killer = Killer(m, ep, KILLS, lambda: m.memory.read_u64(STATS + 8))
        m.add_handler(Bus.PIO, STOP, 1, read=lambda vcpu, off, size: 1 if killer.done.is_set() else 0)
        killer.start()
        outcome = m.run(timeout=240)
        killer.join(10)
        made, rounds, count = (m.memory.read_u64(STATS + 8 * i) for i in range(3))
        assert killer.error is None, repr(killer.error)
        assert outcome.ending is Ending.POWER_OFF, f"{outcome} after {rounds} rounds, {made} accesses, count {count}"
        assert ep.restarts == KILLS and ep.failed is None
        # The counter the device keeps equals the guest's own count exactly.
        assert count == made
        assert m.registry.check() == []
        print(f"echo: {KILLS} kills, {rounds} rounds, {made} accesses; restart ms "
              f"median {sorted(killer.pauses)[len(killer.pauses) // 2] * 1000:.1f} "
              f"max {max(killer.pauses) * 1000:.1f}")
