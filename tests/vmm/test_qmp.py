"""The control socket on real KVM: QEMU's own clients (``qemu.qmp``'s
QMPClient and its legacy sync client, ``qmp-shell``) drive every command
of a running guest; stop really holds the vCPUs; bad clients lose only
their own connection (guest: tests/guests/spin.c)."""

from __future__ import annotations

import asyncio
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest
from qemu.qmp import ExecuteError, QMPClient
from qemu.qmp.legacy import QEMUMonitorProtocol

from tests.vmm.conftest import needs_kvm
from ipc import Bus
from vmm.config import parse_device_spec
from vmm.endpoint import VMM_OWNER
from vmm.machine import Machine
from vmm.outcome import Ending, Outcome
from vmm.qmp import QmpError
from vmm.qmp.server import MAX_CLIENTS
from tests.waiting import wait_for

pytestmark = needs_kvm

PIO, MMIO = 0x1000, 0xD000_0000
COUNTER, FLAG = 0x80_0000, 0x80_1000
ACCESSES = 200


class Vm:
    """A Machine running the spin guest on a thread, serving its socket."""

    def __init__(self, guest, sock_dir: str, placement: str, vcpus: int, accesses: int):
        self.path = os.path.join(sock_dir, "qmp.sock")
        self.machine = m = Machine(memory=32 << 20, vcpus=vcpus)
        try:
            m.load_pvh(guest("spin"), f"pio={PIO:#x} accesses={accesses} counter={COUNTER:#x} flag={FLAG:#x}")
            # restart=no: test_device_failed_event kills the device for good
            restart = ",restart=no" if placement == "isolated" else ""
            m.add_device(parse_device_spec(f"echo,id=echo0,pio={PIO:#x},mmio={MMIO:#x},process={placement}{restart}"))
            self.server = m.serve_api(self.path)
        except BaseException:
            m.close()
            raise
        self.outcome: Outcome | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.outcome = self.machine.run(timeout=240)

    def counters(self) -> list[int]:
        memory = self.machine.memory
        assert memory is not None
        return [memory.read_u64(COUNTER + 8 * i) for i in range(len(self.machine.vcpus))]

    def spinning(self) -> bool:
        """Every vCPU's counter moves (the guest runs)."""
        before = self.counters()
        return bool(wait_for(lambda: all(a > b for a, b in zip(self.counters(), before, strict=True)),
                             what="every vCPU's counter to move"))

    def stop(self) -> None:
        if self.thread.is_alive():
            self.machine.quit()
            self.thread.join(30)
        self.machine.close()


@pytest.fixture
def sock_dir():
    d = tempfile.mkdtemp(prefix="qmpt-", dir="/tmp")    # short: sun_path holds 108 bytes
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def vm(guest, sock_dir):
    made: list[Vm] = []

    def start(placement: str = "inline", vcpus: int = 2, accesses: int = 0) -> Vm:
        v = Vm(guest, sock_dir, placement, vcpus, accesses)
        made.append(v)
        return v
    yield start
    for v in made:
        v.stop()


async def connected(path: str) -> QMPClient:
    client = QMPClient("test")
    await client.connect(path)
    return client


async def next_event(client: QMPClient, name: str, timeout: float = 30.0) -> dict:
    async def find():
        async for event in client.events:
            if event["event"] == name:
                return event
    return await asyncio.wait_for(find(), timeout)


# -- QEMU's clients, every command ---------------------------------------------------


def test_qemu_qmp_client_drives_every_command(vm):
    v = vm("isolated", accesses=ACCESSES)
    m = v.machine

    async def session():
        c = await connected(v.path)
        assert c.greeting.QMP.version["package"].startswith("splitvmm")
        names = {x["name"] for x in await c.execute("query-commands")}
        assert {"query-status", "query-devices", "query-regions", "query-stats", "stop", "cont", "quit",
                "qmp_capabilities"} <= names

        # The vCPU threads are started in the background: wait until both run.
        deadline = time.monotonic() + 30
        while True:
            status = await c.execute("query-status")
            ids = [x.get("thread-id") for x in status["vcpus"]]
            if None not in ids and ids == [v.thread.native_id for v in m.vcpus]:
                break
            assert time.monotonic() < deadline, status
            await asyncio.sleep(0.01)
        assert status["status"] == "running" and status["running"] is True
        assert [x["state"] for x in status["vcpus"]] == ["running", "running"]
        assert status["vcpus"][1]["thread-id"] == m.vcpus[1].thread.native_id

        # The guest writes and reads the echo scratch register ACCESSES times.
        async def stats():
            return (await c.execute("query-stats", {"device": "echo0"}))[0]
        deadline = time.monotonic() + 60
        while (s := await stats())["accesses"]["pio"]["read"] < ACCESSES:
            assert time.monotonic() < deadline, s
            await asyncio.sleep(0.02)
        assert s["accesses"]["pio"] == {"read": ACCESSES, "write": ACCESSES}
        assert s["accesses"]["mmio"] == {"read": 0, "write": 0}
        lat = s["latency"]
        assert lat["count"] == 2 * ACCESSES == sum(b["count"] for b in lat["histogram"])
        assert 0 < lat["p50-ns"] <= lat["p99-ns"] and lat["mean-ns"] > 0
        assert all(b["below-ns"] & (b["below-ns"] - 1) == 0 for b in lat["histogram"])   # powers of two

        (dev,) = await c.execute("query-devices")
        endpoint = m.endpoints[dev["owner"]]
        assert dev == {"id": "echo0", "kind": "echo", "placement": "isolated", "owner": endpoint.owner,
                       "pid": endpoint.pid, "state": "running", "reason": None,
                       "accesses": 2 * ACCESSES, "failures": 0, "restarts": 0, "last-cause": None,
                       "sandbox": ["preload", "userns", "namespaces", "fds", "caps", "landlock", "seccomp=kill"]}
        assert dev["pid"] != os.getpid()

        regions = await c.execute("query-regions")
        live = {(r.bus.name.lower(), r.start, r.length, r.owner) for r in m.registry.regions()}
        assert {(r["bus"], r["start"], r["length"], r["owner"]) for r in regions} == live
        mine = await c.execute("query-regions", {"device": "echo0"})
        assert {(r["bus"], r["start"], r["length"]) for r in mine} == {("pio", PIO, 0x100), ("mmio", MMIO, 0x1000)}
        assert all(r["refcount"] == 0 and r["removing"] is False and r["device"] == "echo0" for r in mine)
        assert [r["start"] for r in await c.execute("query-regions", {"bus": "mmio", "device": "echo0"})] == [MMIO]

        with pytest.raises(ExecuteError) as e:
            await c.execute("query-stats", {"device": "nope"})
        assert e.value.error_class == "DeviceNotFound"

        assert await c.execute("stop") == {}
        await next_event(c, "STOP")
        status = await c.execute("query-status")
        assert status["status"] == "paused" and status["running"] is False
        assert {x["state"] for x in status["vcpus"]} == {"paused"}
        assert await c.execute("cont") == {}
        await next_event(c, "RESUME")
        assert (await c.execute("query-status"))["status"] == "running"

        assert await c.execute("quit") == {}
        shutdown = await next_event(c, "SHUTDOWN")
        assert shutdown["data"]["reason"] == "host-qmp-quit" and shutdown["data"]["status"] == 12
        assert set(shutdown["timestamp"]) == {"seconds", "microseconds"}
        await c.disconnect()

    asyncio.run(session())
    v.thread.join(30)
    assert v.outcome is not None and v.outcome.ending is Ending.QUIT


def test_legacy_sync_client(vm):
    v = vm()
    qmp = QEMUMonitorProtocol(v.path)
    try:
        greeting = qmp.connect()
        assert greeting["QMP"]["capabilities"] == []
        assert qmp.cmd("query-status")["status"] == "running"
        assert qmp.cmd("stop") == {}
        assert [e["event"] for e in qmp.get_events(wait=10.0)] == ["STOP"]
        assert qmp.cmd("cont") == {}
        assert qmp.pull_event(wait=10.0)["event"] == "RESUME"
        reply = qmp.cmd_obj({"execute": "no-such", "id": "x1"})
        assert reply == {"error": {"class": "CommandNotFound", "desc": "The command no-such has not been found"},
                         "id": "x1"}
    finally:
        qmp.close()
    assert v.spinning()


def test_qmp_shell_works_unchanged(vm):
    v = vm()
    shell = os.path.join(os.path.dirname(sys.executable), "qmp-shell")
    r = subprocess.run([shell, v.path], input="query-status\nquery-regions bus=pio device=echo0\n",
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "Connected to QEMU 0.1.0" in r.stdout
    assert "'status': 'running'" in r.stdout or '"status": "running"' in r.stdout, r.stdout
    assert str(PIO) in r.stdout


# -- stop and cont ---------------------------------------------------------------


def _syscall(tid: int) -> int:
    """The system call thread ``tid`` of this process sits in (-1: running)."""
    with open(f"/proc/self/task/{tid}/syscall") as f:
        first = f.read().split()[0]
    return -1 if first == "running" else int(first)


SYS_IOCTL, SYS_FUTEX = 16, 202


def test_stop_holds_every_vcpu_out_of_kvm_run(vm):
    v = vm(vcpus=2)
    m = v.machine
    seen: list[str] = []
    m.events.subscribe(lambda e: seen.append(e.name))
    assert v.spinning()
    tids = [t.thread.native_id for t in m.vcpus]

    assert m.pause() is True
    assert m.query_status()["status"] == "paused"
    # Each vCPU thread waits on its condition (a futex), not in KVM_RUN.
    for tid in tids:
        wait_for(lambda tid=tid: _syscall(tid) == SYS_FUTEX, what=f"vCPU thread {tid} waiting on a futex")
    frozen = v.counters()
    time.sleep(0.3)          # an observation window, not synchronisation: nothing may move in it
    assert v.counters() == frozen, "a paused guest made progress"
    assert all(_syscall(tid) == SYS_FUTEX for tid in tids)
    assert m.pause() is False            # already paused: no second STOP

    assert m.resume() is True
    assert v.spinning()
    assert all(a > b for a, b in zip(v.counters(), frozen, strict=True))
    assert m.resume() is False
    assert seen == ["STOP", "RESUME"]

    # The guest is intact: it still ends the run when told to.
    m.memory.write(FLAG, (0x2A).to_bytes(8, "little"))
    v.thread.join(30)
    assert v.outcome.ending is Ending.TEST_EXIT and v.outcome.value == 0x2A
    assert seen == ["STOP", "RESUME", "SHUTDOWN"]
    assert m.query_status()["status"] == "shutdown"
    with pytest.raises(QmpError):
        m.qmp("cont")


def test_paused_before_the_run_starts_paused(guest):
    with Machine(memory=32 << 20, vcpus=1) as m:
        m.load_pvh(guest("spin"), f"counter={COUNTER:#x} flag={FLAG:#x}")
        assert m.query_status()["status"] == "prelaunch"
        assert m.pause() is True
        result = []
        t = threading.Thread(target=lambda: result.append(m.run(timeout=120)), daemon=True)
        t.start()
        wait_for(lambda: m.vcpus[0].thread.native_id is not None and _syscall(m.vcpus[0].thread.native_id) == SYS_FUTEX,
                 what="vCPU 0 parked before its first KVM_RUN")
        time.sleep(0.2)      # an observation window: the guest must not start in it
        assert m.memory.read_u64(COUNTER) == 0
        assert m.resume() is True
        wait_for(lambda: m.memory.read_u64(COUNTER) > 0, what="the guest to start")
        m.memory.write(FLAG, (1).to_bytes(8, "little"))
        t.join(30)
        assert result[0].ending is Ending.TEST_EXIT


def test_machine_methods_match_the_socket(vm):
    v = vm(accesses=10)
    m = v.machine
    wait_for(lambda: m.query_stats(device="echo0")[0]["accesses"]["pio"]["read"] == 10, what="10 reads")
    (dev,) = m.query_devices()
    assert dev["placement"] == "inline" and dev["pid"] == os.getpid() and dev["accesses"] == 20
    assert {r["device"] for r in m.query_regions(bus="pio")} >= {"echo0", "vmm"}
    with pytest.raises(QmpError) as e:
        m.qmp("query-regions", bus=1)
    assert e.value.desc == "Invalid parameter type for 'bus', expected: string"
    with pytest.raises(QmpError) as e:
        m.qmp("query-regions", bus="isa")
    assert e.value.desc == "Parameter 'bus' does not accept value 'isa'"


def test_query_regions_is_live_refcount_and_removing(guest):
    # A VMM handler holds the guest's first access while the test looks:
    # the region is referenced (refcount 1); unregistered meanwhile, it
    # stays listed as removing until that access's put frees the slot.
    port = 0x2000
    entered, release = threading.Event(), threading.Event()

    def write(vcpu, offset, size, value):
        entered.set()
        assert release.wait(60)

    with Machine(memory=32 << 20, vcpus=1) as m:
        m.add_handler(Bus.PIO, port, 4, write=write)
        m.load_pvh(guest("spin"), f"pio={port:#x} accesses=1 counter={COUNTER:#x} flag={FLAG:#x}")
        result = []
        t = threading.Thread(target=lambda: result.append(m.run(timeout=120)), daemon=True)
        t.start()
        assert entered.wait(60)
        (r,) = [x for x in m.query_regions(bus="pio") if x["start"] == port]
        assert (r["refcount"], r["removing"], r["device"]) == (1, False, "vmm")
        m.registry.unregister(Bus.PIO, port, owner=VMM_OWNER)
        (r,) = [x for x in m.query_regions(bus="pio") if x["start"] == port]
        assert (r["refcount"], r["removing"]) == (1, True)
        release.set()
        wait_for(lambda: not [x for x in m.query_regions(bus="pio") if x["start"] == port],
                 what="the slot to be freed at the last put")
        t.join(30)
        # The read-back found nobody at the port: all ones, the guest's check 1.
        assert result[0].ending is Ending.TEST_EXIT and result[0].value == 1


def test_device_failed_event(vm):
    v = vm("isolated")

    async def session():
        c = await connected(v.path)
        (dev,) = await c.execute("query-devices")
        os.kill(dev["pid"], signal.SIGKILL)
        event = await next_event(c, "DEVICE_FAILED")
        assert event["data"]["device"] == "echo0" and event["data"]["kind"] == "echo"
        (dev,) = await c.execute("query-devices")
        assert dev["state"] == "failed" and dev["reason"]
        assert (await c.execute("query-regions", {"device": "echo0"})) == []   # reaped
        assert (await c.execute("query-status"))["status"] == "running"
        await c.disconnect()

    asyncio.run(session())
    assert v.spinning()


# -- bad clients -------------------------------------------------------------------


class Raw:
    """A plain socket client: greeting read, optionally negotiated."""

    def __init__(self, path: str, negotiate: bool = True):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(path)
        self.file = self.sock.makefile("rb")
        self.greeting = self.read()
        if negotiate:
            self.send(b'{"execute": "qmp_capabilities"}')
            assert self.read() == {"return": {}}

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read(self) -> dict:
        line = self.file.readline()
        assert line.endswith(b"\r\n"), line
        return json.loads(line)

    def eof(self) -> bool:
        return self.file.readline() == b""

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def healthy(v: Vm) -> None:
    """The VM runs on and a new client is served."""
    other = Raw(v.path)
    other.send(b'{"execute": "query-status", "id": 1}')
    assert other.read()["return"]["status"] == "running"
    other.close()
    assert v.spinning()


def test_not_json(vm):
    v = vm()
    c = Raw(v.path)
    c.send(b'{"execute": "query-status", "id": 1,,}\n')
    error = c.read()["error"]
    assert error["class"] == "GenericError" and error["desc"].startswith("JSON parse error")
    c.send(b'{"execute": "query-status", "id": 2}')      # the same connection goes on
    assert c.read()["id"] == 2
    c.close()
    healthy(v)


def test_a_json_value_that_is_not_an_object(vm):
    v = vm()
    c = Raw(v.path)
    for text in (b'[{"execute": "stop"}]', b'"stop"', b"42\n", b"null\n"):
        c.send(text)
        assert c.read() == {"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}}
    c.close()
    healthy(v)


def test_unknown_command_and_commands_before_negotiation(vm):
    v = vm()
    c = Raw(v.path, negotiate=False)
    c.send(b'{"execute": "query-status", "id": "early"}')
    assert c.read() == {"error": {"class": "CommandNotFound", "desc": "Expecting capabilities negotiation "
                                  "with 'qmp_capabilities'"}, "id": "early"}
    c.send(b'{"execute": "qmp_capabilities"}')
    assert c.read() == {"return": {}}
    c.send(b'{"execute": "system_reset", "id": 3}')
    assert c.read() == {"error": {"class": "CommandNotFound",
                                  "desc": "The command system_reset has not been found"}, "id": 3}
    c.close()
    healthy(v)


def test_wrong_argument_types_and_unknown_arguments(vm):
    v = vm()
    c = Raw(v.path)
    cases = [
        (b'{"execute": "query-stats", "arguments": {"device": 7}, "id": 1}',
         "Invalid parameter type for 'device', expected: string"),
        (b'{"execute": "query-regions", "arguments": {"bus": ["pio"]}, "id": 2}',
         "Invalid parameter type for 'bus', expected: string"),
        (b'{"execute": "stop", "arguments": {"now": true}, "id": 3}', "Parameter 'now' is unexpected"),
        (b'{"execute": "query-status", "arguments": "all", "id": 4}',
         "QMP input member 'arguments' must be an object"),
    ]
    for request, desc in cases:
        c.send(request)
        reply = c.read()
        assert reply["error"] == {"class": "GenericError", "desc": desc}, reply
    c.close()
    assert v.machine.run_state == "running"      # the stop with a bad argument did not run
    healthy(v)


def test_a_line_over_1_mib(vm):
    v = vm()
    c = Raw(v.path)
    big = b'{"execute": "query-status", "arguments": {"x": "' + b"a" * (1 << 20) + b'"}}\n'
    try:
        c.send(big)
    except (BrokenPipeError, ConnectionResetError):
        pass        # the server may close before it has taken all of it
    reply = c.read()
    assert reply["error"]["class"] == "GenericError" and "longer than 1048576 bytes" in reply["error"]["desc"]
    assert c.eof()
    c.close()
    healthy(v)


def test_a_client_that_never_reads_is_dropped(vm):
    v = vm()
    c = Raw(v.path)
    reader = Raw(v.path)           # a well-behaved client meanwhile
    c.sock.setblocking(False)
    request = b'{"execute": "query-regions"}' * 64
    dropped = False
    deadline = time.monotonic() + 120
    while not dropped and time.monotonic() < deadline:
        try:
            c.sock.send(request)
        except BlockingIOError:   # wait until the server has read some (or dropped us)
            select.select([], [c.sock], [], max(0.0, deadline - time.monotonic()))
        except (BrokenPipeError, ConnectionResetError):
            dropped = True
    assert dropped, "the server kept a client that never reads"
    assert v.server.dropped == 1
    reader.send(b'{"execute": "query-status", "id": 1}')
    assert reader.read()["return"]["status"] == "running"
    reader.close()
    c.close()
    healthy(v)


def test_many_clients_at_once(vm):
    v = vm()

    async def session():
        clients = [await connected(v.path) for _ in range(MAX_CLIENTS)]
        statuses = await asyncio.gather(*(c.execute("query-status") for c in clients))
        assert {s["status"] for s in statuses} == {"running"}
        # One more is refused in one clean line, and the others go on.
        extra = Raw.__new__(Raw)
        extra.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        extra.sock.settimeout(30)
        extra.sock.connect(v.path)
        extra.file = extra.sock.makefile("rb")
        refusal = extra.read()
        assert refusal["error"]["class"] == "GenericError" and "too many clients" in refusal["error"]["desc"]
        assert extra.eof()
        extra.close()
        assert v.server.refused == 1
        assert (await clients[5].execute("query-status"))["status"] == "running"
        await clients[0].disconnect()
        wait_for(lambda: v.server.clients == MAX_CLIENTS - 1, what="a slot to free")
        again = await connected(v.path)          # a freed slot is usable again
        assert (await again.execute("query-status"))["status"] == "running"
        for c in [again, *clients[1:]]:
            await c.disconnect()

    asyncio.run(session())
    healthy(v)


def test_a_client_that_vanishes_mid_command(vm):
    v = vm()
    before = v.server.accepted
    # A whole command, then gone before the reply; a half command, then gone.
    for data in (b'{"execute": "query-regions", "id": 1}', b'{"execute": "query-sta'):
        c = Raw(v.path)
        c.send(data)
        c.sock.shutdown(socket.SHUT_RDWR)
        c.close()
    # A command that changes state still takes effect; its reply goes nowhere.
    c = Raw(v.path)
    c.send(b'{"execute": "stop"}')
    c.close()
    wait_for(lambda: v.machine.run_state == "paused", what="the stop to run")
    v.machine.resume()
    wait_for(lambda: v.server.clients == 0, what="the vanished clients to be dropped")
    assert v.server.accepted == before + 3
    healthy(v)
