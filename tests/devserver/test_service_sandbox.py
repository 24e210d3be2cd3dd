"""A device run as a service is sandboxed like a spawned one: each VM
session is a process of its own, forked by the single-threaded listener
and sandboxed before the model is built (devserver/service.py).  Real
processes, no KVM: the test plays the VMM (attach_service) and a vCPU
(registry lookup, access through the slot).

What /proc says about a session's process; the hostile model's attacks
through a service (every one stopped; a seccomp kill ends the session
only, the service serves the next VM); ``--sandbox auto`` where new user
namespaces are refused (as a unit's ``RestrictNamespaces=`` does) and
``strict`` refusing there with one line."""

from __future__ import annotations

import logging
import os
import sys

import pytest

from devserver.sandbox.hostile import ATTACKS
from tests.devserver.servicekit import Service
from tests.devserver.test_sandbox import PIO, RESTRICTED, read_status, stopped, targets  # noqa: F401
from vmm.remote import RemoteOptions
from vmm.remote.connect import attach_service
from vmm.config import ConfigError

HOSTILE = "devserver.sandbox.hostile:Hostile"
LAYERS = ("preload", "userns", "namespaces", "fds", "caps", "landlock", "seccomp=kill")


def attach(registry, path, kind: str, params: dict[str, str] | None = None, owner: int = 2, name: str = "d0"):
    return attach_service(str(path), kind, params or {}, owner, name, registry, 1,
                          RemoteOptions(access_timeout=10.0))


def test_a_service_session_runs_sandboxed_in_its_own_process(tmp_path, services, registry):
    path = tmp_path / "echo.sock"
    svc = services.listen(f"echo,pio={PIO:#x}", path)
    pids = []
    for n in range(2):
        ep = attach(registry, path, "echo", owner=2 + n, name=f"e{n}")
        try:
            pid = ep.pid
            assert pid not in (svc.proc.pid, os.getpid()) and ep.reported_pid == pid
            assert ep.sandbox.layers == LAYERS and ep.sandbox.device_pid == pid
            st = read_status(pid)
            assert st["Seccomp"] == "2" and st["NoNewPrivs"] == "1"
            for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
                assert int(st[cap], 16) == 0, cap
            # In its own pid namespace, at its thread-id base: pid 1 there is the reaper.
            assert int(st["NSpid"].split()[-1]) % 1000 == 0 and st["NSpid"].split()[-1] != "1"
            for ns in ("user", "mnt", "pid", "net", "ipc", "uts", "cgroup"):
                mine = os.readlink(f"/proc/{pid}/ns/{ns}")
                assert mine != os.readlink(f"/proc/self/ns/{ns}"), ns
                assert mine != os.readlink(f"/proc/{svc.proc.pid}/ns/{ns}"), ns
            # The listener itself stays as it was: one thread, no filter.
            listener = read_status(svc.proc.pid)
            assert listener["Seccomp"] == "0" and listener["Threads"] == "1"
            pids.append(pid)
        finally:
            ep.close()
        svc.err.wait(lambda line, n=n: f"session {n + 1} " in line and "listening again" in line)
    assert pids[0] != pids[1]
    assert svc.stop() == 0


def hostile_service(tmp_path, services, targets, kind: str) -> tuple[Service, object]:   # noqa: F811
    """The hostile model served under ``kind``'s allowlist (or as a user model)."""
    path = tmp_path / "hostile.sock"
    spec = ",".join([kind] + [f"{k}={v}" for k, v in targets.items()])
    if kind == HOSTILE:
        return services.listen(spec, path), path
    return services.listen(spec, path, program=(sys.executable, "-m", "devserver.sandbox.hostile", kind)), path


@pytest.mark.parametrize("kind", [HOSTILE, "virtio-blk", "echo"])
def test_every_attack_through_a_service_is_stopped_and_the_service_goes_on(tmp_path, services, registry,
                                                                             targets, kind, caplog):  # noqa: F811
    caplog.set_level(logging.ERROR, logger="vmm")
    svc, path = hostile_service(tmp_path, services, targets, kind)
    owner = 2
    ep = attach(registry, path, kind, owner=owner, name="hostile0")
    kills = 0
    try:
        for name in ATTACKS:
            if not stopped(registry, ep, name):
                continue
            kills += 1
            # The session ends (SIGSYS, or the VMM's SIGKILL when it cut the
            # device off first); the listener goes on.
            svc.err.wait(lambda line, k=kills: f"session {k} " in line and " was killed by " in line
                         and "listening again" in line, what=f"session {kills} ending of {name}")
            ep.close()
            owner += 1          # the next attack on the next VM's fresh device, same service
            ep = attach(registry, path, kind, owner=owner, name="hostile0")
    finally:
        ep.close()
    assert svc.proc.poll() is None
    assert any("device hostile0 killed by seccomp: execve" == r.getMessage() for r in caplog.records)
    assert svc.stop() == 0


def test_auto_degrades_where_user_namespaces_are_refused_and_strict_refuses(tmp_path, services, registry):
    path = tmp_path / "r.sock"
    strict = services.listen(f"echo,pio={PIO:#x}", path, program=RESTRICTED)
    with pytest.raises(ConfigError, match=r"sandbox layer userns cannot be applied: .*Operation not permitted"):
        attach(registry, path, "echo")
    strict.err.wait(lambda line: "refused; listening again" in line)
    assert strict.proc.poll() is None
    assert strict.stop() == 0
    auto = services.listen(f"echo,pio={PIO:#x}", path, "--sandbox", "auto", program=RESTRICTED)
    ep = attach(registry, path, "echo")
    try:
        assert "userns" not in ep.sandbox.layers and "seccomp=kill" in ep.sandbox.layers
        st = read_status(ep.pid)
        assert st["Seccomp"] == "2" and st["NoNewPrivs"] == "1" and int(st["CapEff"], 16) == 0
        assert os.readlink(f"/proc/{ep.pid}/ns/user") == os.readlink("/proc/self/ns/user")
        assert os.readlink(f"/proc/{ep.pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
    finally:
        ep.close()
    auto.err.wait(lambda line: "sandbox=auto: layer userns is off" in line)
    assert auto.stop() == 0


def test_the_vmm_cannot_choose_a_service_devices_sandbox():
    from vmm.config import parse_device_spec
    for extra in ("sandbox=off", "seccomp=log"):
        with pytest.raises(ConfigError, match="the service's"):
            parse_device_spec(f"echo,connect=/nonexistent,{extra}")



