"""The sandbox of a device process, on real processes (no KVM here; the
VM-level tests are tests/vmm/test_sandbox.py).

A hostile model (devserver.sandbox.hostile) attacks its host on request,
under each built-in kind's allowlist and as a user model: every attack
fails with an error or kills the device (and the VMM names the system
call), never succeeds; a TCP listener and a Unix socket of the "VMM"
(this test) see no connection, nothing is created, this process is not
traced.  Then what /proc says about a sandboxed device: seccomp filter,
no_new_privs, no capabilities, its own uid and namespaces, only the kept
descriptors."""

from __future__ import annotations

import errno
import logging
import os
import socket
import sys

import pytest

from devserver.sandbox.hostile import ATTACKS
from devserver.sandbox.userns import DEVICE_UID_BASE
from ipc import Bus
from vmm.endpoint import DeviceFailed
from vmm.forkserver import ForkServer
from vmm.remote import DEVSERVER_COMMAND, RemoteEndpoint, RemoteOptions

from tests.waiting import poll

PIO = 0x6000
#: attack -> how the sandbox stops it: an errno, or the system call whose
#: seccomp kill the VMM reports.
STOPPED_BY = {
    "open_passwd": errno.EACCES,
    "open_vmm_mem": errno.EACCES,
    "list_root": errno.EACCES,
    "create_file": errno.EACCES,
    "tcp_connect": errno.EACCES,        # socket() answers EACCES
    "unix_connect": errno.EACCES,
    "vmm_environ": errno.EACCES,
    "execve": "execve",
    "fork": "clone",
    "ptrace_vmm": "ptrace",
    "kill_vmm": "kill",
    "mmap_exec": "mmap",
    "unshare": "unshare",
    "mount": "mount",
    "raise_rlimit": "prlimit64",
}
#: Built-in kinds (each served by the hostile model under its allowlist)
#: and a user model (common part plus the class's ``syscalls``).
USER_MODEL = "devserver.sandbox.hostile:Hostile"
KINDS = ["virtio-blk", "virtio-rng", "virtio-console", "serial", "echo", "pci-echo", USER_MODEL]


def hostile_command(kind: str) -> tuple[str, ...]:
    """A built-in kind: a device process serving the hostile model under
    that kind (its allowlist); the user model: the ordinary one."""
    if kind == USER_MODEL:
        return DEVSERVER_COMMAND
    return (sys.executable, "-m", "devserver.sandbox.hostile", kind)


def spawn_device(registry, kind: str, params: dict[str, str], owner: int = 2, name: str = "echo0",
                 **options) -> RemoteEndpoint:
    return RemoteEndpoint.spawn(kind, params, owner, name, registry, 1, RemoteOptions(**options))


@pytest.fixture(scope="module")
def forkserver():
    server = ForkServer.start()
    yield server
    server.close()


#: How the VMM starts a device process: exec'd, or forked by the fork
#: server (devserver.forkserver; the sandbox must hold the same).
LAUNCHERS = ["exec", "forkserver"]


@pytest.fixture(params=LAUNCHERS)
def launch(request) -> dict:
    """The RemoteOptions of the launcher; a forked device is checked to be
    the fork server's child (not an exec fallback)."""
    return {} if request.param == "exec" else {"forkserver": request.getfixturevalue("forkserver")}


def check_launcher(ep: RemoteEndpoint, launch: dict) -> None:
    from vmm import sandbox_report
    started = ep.sandbox.pids[0]
    parent = launch["forkserver"].pid if launch else os.getpid()
    assert sandbox_report._parent_of(started) == parent


@pytest.fixture
def targets(tmp_path):
    """What the attacks aim at: a TCP listener, a Unix socket of ours, a
    directory; checked afterwards for any effect."""
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(8)
    tcp.setblocking(False)
    unix_path = str(tmp_path / "vmm.sock")
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind(unix_path)
    unix.listen(8)
    unix.setblocking(False)
    target_dir = tmp_path / "dir"
    target_dir.mkdir()
    params = {"pio": hex(PIO), "vmm_pid": str(os.getpid()), "port": str(tcp.getsockname()[1]),
              "unix": unix_path, "dir": str(target_dir)}
    yield params
    for s in (tcp, unix):
        with pytest.raises(BlockingIOError):
            s.accept()                  # nobody connected
        s.close()
    assert list(target_dir.iterdir()) == []
    assert not os.path.ismount(target_dir)
    with open("/proc/self/status") as f:
        assert "TracerPid:\t0\n" in f.read()


def spawn(registry, kind: str, params: dict[str, str], **kw) -> RemoteEndpoint:
    return spawn_device(registry, kind, params, name="hostile0", access_timeout=10.0,
                        command=hostile_command(kind), **kw)


def attack(registry, ep: RemoteEndpoint, name: str) -> int:
    """Run one attack; its errno (0: it succeeded).  DeviceFailed when the
    device died of it."""
    ref = registry.get(Bus.PIO, PIO, 4)
    assert ref is not None and ref.owner == ep.owner
    try:
        ep.access(0, int(Bus.PIO), ref.cookie, 0, 4, True, ATTACKS.index(name))
        return ep.access(0, int(Bus.PIO), ref.cookie, 4, 4, False, 0)
    finally:
        registry.put(ref)


def stopped(registry, ep: RemoteEndpoint, name: str) -> bool:
    """Run attack ``name`` and check it was stopped as STOPPED_BY says: an
    errno, or a seccomp kill of the device (then True)."""
    want = STOPPED_BY[name]
    if isinstance(want, int):
        assert attack(registry, ep, name) == want, name
        return False
    with pytest.raises(DeviceFailed):
        attack(registry, ep, name)
    assert ep.wait_exited(10.0)
    assert ep.failed is not None and f"killed by seccomp: {want}" in ep.failed, (name, ep.failed)
    return True


@pytest.mark.parametrize("kind, launcher", [(kind, "exec") for kind in KINDS] + [(USER_MODEL, "forkserver")])
def test_every_attack_is_stopped(registry, targets, kind, launcher, caplog, request):
    """Every attack under every kind's allowlist; the user model (run by
    the ordinary devserver, so the fork server can start it) also forked."""
    assert set(STOPPED_BY) == set(ATTACKS)
    caplog.set_level(logging.ERROR, logger="vmm")
    launch = {} if launcher == "exec" else {"forkserver": request.getfixturevalue("forkserver")}
    ep = spawn(registry, kind, targets, **launch)
    try:
        check_launcher(ep, launch)
        for name in ATTACKS:
            if not stopped(registry, ep, name):
                continue
            want = STOPPED_BY[name]
            assert any(f"device hostile0 killed by seccomp: {want}" == r.getMessage() for r in caplog.records)
            assert poll(lambda owner=ep.owner: not [r for r in registry.regions() if r.owner == owner])
            ep.close()
            ep = spawn(registry, kind, targets, **launch)     # the next attack on a fresh device
            check_launcher(ep, launch)
    finally:
        ep.close()


def test_seccomp_trap_names_the_call_and_the_python_line(registry, targets, capfd):
    ep = spawn(registry, "echo", targets, seccomp="trap")
    try:
        with pytest.raises(DeviceFailed):
            attack(registry, ep, "mount")
        assert ep.wait_exited(10.0)
        assert "killed by seccomp: mount" in (ep.failed or "")
    finally:
        ep.close()
    err = capfd.readouterr().err
    assert "seccomp: blocked system call mount (165)" in err
    assert "in attack_mount" in err         # the Python line, from the SIGSYS report


def test_seccomp_log_allows_and_the_sandbox_still_stops_it(registry, targets):
    """seccomp=log lets a call outside the list through (for writing a
    policy); the other layers still hold: mount fails (no such target in
    the empty root; no capability either)."""
    ep = spawn(registry, "echo", targets, seccomp="log")
    try:
        assert attack(registry, ep, "mount") in (errno.ENOENT, errno.EPERM)
        assert attack(registry, ep, "kill_vmm") in (errno.ESRCH, errno.EPERM)   # not in its pid namespace
        assert attack(registry, ep, "open_passwd") == errno.EACCES     # the rule still answers
        assert ep.failed is None
    finally:
        ep.close()


def read_status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def test_proc_shows_the_sandbox(registry, launch):
    ep = spawn_device(registry, "echo", {"pio": "0x5000"}, **launch)
    try:
        check_launcher(ep, launch)
        assert ep.sandbox.layers == ("preload", "userns", "namespaces", "fds", "caps", "landlock", "seccomp=kill")
        pid = ep.pid
        assert pid != os.getpid() and ep.sandbox.device_pid == pid
        st = read_status(pid)
        assert st["Seccomp"] == "2"
        assert st["NoNewPrivs"] == "1"
        for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            assert int(st[cap], 16) == 0, cap
        uid = int(st["Uid"].split()[0])
        if os.geteuid() == 0:       # started by a root VMM: root only inside its own user namespace
            assert uid >= DEVICE_UID_BASE
        assert st["Uid"].split() == [str(uid)] * 4
        # its own pid namespace, where it is not pid 1 (a reaper is) but the first of its range
        from devserver.sandbox import namespaces
        assert st["NSpid"].split()[-1] == str(namespaces.tid_base(ep.owner))
        for ns in ("user", "mnt", "pid", "net", "ipc", "uts", "cgroup"):
            assert os.readlink(f"/proc/{pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}"), ns
        fds = {int(n): os.readlink(f"/proc/{pid}/fd/{n}") for n in os.listdir(f"/proc/{pid}/fd")}
        assert 0 not in fds and 1 not in fds                # stdin, stdout closed
        kept = {fd: t for fd, t in fds.items() if fd != 2}  # 2: stderr, to the VMM
        sockets = [t for t in kept.values() if t.startswith("socket:")]
        assert len(sockets) == 1                            # the control socket
        assert all(t.startswith(("socket:", "/dev/shm/", "/memfd:")) for t in kept.values()), kept
        with open(f"/proc/{pid}/limits") as f:
            limits = f.read()
        assert [ln.split()[4:6] for ln in limits.splitlines() if ln.startswith("Max core file size")] == [["0", "0"]]
    finally:
        ep.close()


RESTRICTED = (sys.executable, os.path.join(os.path.dirname(__file__), "restricted_device.py"))


def test_strict_refuses_with_one_line_naming_the_layer(registry):
    """A layer that cannot be applied (here: new user namespaces refused,
    as a unit's RestrictNamespaces= does) stops a strict device with one
    line naming the layer; auto goes on without it (a plain switch to the
    device's uid instead)."""
    with pytest.raises(DeviceFailed, match=r"sandbox layer userns cannot be applied: .*Operation not permitted"):
        spawn_device(registry, "echo", {"pio": "0x5000"}, command=RESTRICTED)
    ep = spawn_device(registry, "echo", {"pio": "0x5000"}, sandbox="auto", command=RESTRICTED)
    try:
        assert "userns" not in ep.sandbox.layers and "uid" in ep.sandbox.layers
        assert "seccomp=kill" in ep.sandbox.layers
        st = read_status(ep.pid)
        assert st["Seccomp"] == "2" and int(st["CapEff"], 16) == 0 and int(st["CapBnd"], 16) == 0
        if os.geteuid() == 0:
            assert int(st["Uid"].split()[0]) >= DEVICE_UID_BASE
        assert os.readlink(f"/proc/{ep.pid}/ns/user") == os.readlink("/proc/self/ns/user")
        assert os.readlink(f"/proc/{ep.pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
    finally:
        ep.close()
    ep = spawn_device(registry, "echo", {"pio": "0x5000"}, sandbox="off")
    try:
        assert ep.sandbox.layers == ()
        assert read_status(ep.pid)["Seccomp"] == "0"
    finally:
        ep.close()


def test_thread_ids_tell_sandboxed_devices_apart(registry, launch):
    """The registry lock word holds the holder's thread id in its own pid
    namespace; each device runs as the child of its namespace's pid 1 (a
    reaper), from its own range of ids, so the VMM's lock watch can name
    the device of any thread, the main one too, and no thread is 1."""
    from devserver.sandbox import namespaces
    from vmm import sandbox_report

    eps = [spawn_device(registry, "echo", {"pio": "0x5000"}, **launch),
           spawn_device(registry, "echo", {"pio": "0x5100"}, 3, "echo1", **launch),
           spawn_device(registry, "echo", {"pio": "0x5200"}, 4, "echo2", **launch)]
    try:
        for ep in eps:
            check_launcher(ep, launch)
        for ep in eps:       # the control thread starts just after Ready
            assert poll(lambda ep=ep: len(sandbox_report._ns_tids(ep.pid)) > 1)
        ids = [sandbox_report._ns_tids(ep.pid) for ep in eps]
        for ep, mine in zip(eps, ids, strict=True):
            status = read_status(ep.pid)
            main = int(status["NSpid"].split()[-1])
            assert main == namespaces.tid_base(ep.owner) == min(mine), (main, mine)
            assert 1 not in mine
            assert all(namespaces.tid_base(ep.owner) <= t < namespaces.tid_base(ep.owner) + namespaces.TID_RANGE
                       for t in mine)
            # the device's parent is pid 1 of its namespace, whose parent the VMM started
            inner = sandbox_report._parent_of(ep.pid)
            assert inner is not None and read_status(inner)["NSpid"].split()[-1] == "1"
            assert sandbox_report._parent_of(inner) == ep.sandbox.pids[0]
            # pid 1 runs no device code and is locked down as the outer reaper is
            st = read_status(inner)
            assert st["Seccomp"] == "2" and int(st["CapEff"], 16) == 0, st
            inner_fds = [n for n in os.listdir(f"/proc/{inner}/fd") if n != "2"]     # 2: stderr
            assert len(inner_fds) == 1, inner_fds           # the pipe the device's status leaves on
            assert os.readlink(f"/proc/{inner}/fd/{inner_fds[0]}").startswith("pipe:")
            for tid in mine:
                assert sandbox_report.device_of_ns_tid(eps, tid) is ep
        assert len(set.union(*ids)) == sum(map(len, ids))      # disjoint
        assert sandbox_report.device_of_ns_tid(eps, 1) is None     # only reapers are 1
    finally:
        for ep in eps:
            ep.close()


def _private_kib(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line and not line[0].isdigit())
    return int(fields["Private_Clean"].split()[0]) + int(fields["Private_Dirty"].split()[0])


def test_the_reapers_are_the_small_program_locked_down(registry, launch):
    """Both reapers exec devserver/_reaper instead of staying forked
    interpreters that keep a copy of the pages the device writes (issue 15
    §2): each holds little of its own and runs under its own seccomp
    filter with no capabilities.  No process of the device
    maps OpenSSL (hashlib would load it)."""
    from devserver.sandbox import namespaces
    from vmm import sandbox_report

    ep = spawn_device(registry, "echo", {"pio": "0x5000"}, **launch)
    try:
        check_launcher(ep, launch)
        outer = ep.sandbox.pids[0]
        inner = sandbox_report._parent_of(ep.pid)
        assert inner is not None and sandbox_report._parent_of(inner) == outer
        for pid in (outer, inner):
            assert os.path.samefile(f"/proc/{pid}/exe", namespaces.PROGRAM)
            st = read_status(pid)
            assert st["Seccomp"] == "2" and st["NoNewPrivs"] == "1", st
            for cap in ("CapInh", "CapPrm", "CapEff", "CapAmb"):
                assert int(st[cap], 16) == 0, (pid, cap)
            assert _private_kib(pid) < 1024, pid
        for pid in (ep.pid, *([launch["forkserver"].pid] if launch else [])):
            with open(f"/proc/{pid}/maps") as f:
                assert "libcrypto" not in f.read(), pid
    finally:
        ep.close()
