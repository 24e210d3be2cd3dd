"""The control protocol, driven with no sockets (sans-I/O)."""

from __future__ import annotations

import dataclasses
import struct

import msgpack
import pytest
from hypothesis import given, settings, strategies as st

from ipc.protocol import (FEATURES, MAX_FDS, MAX_FRAME, NEED_DATA, Connection, ConnectionClosed,
                          DeviceConfig, Error, Hello, LocalProtocolError, MemRegion, Ready,
                          RemoteProtocolError, Reset, ResetDone, Role, SetMemTable, SetRegistry,
                          SetSlots, Shutdown, Start, State, Welcome, negotiate)

CONFIG = DeviceConfig(kind="echo", params={"pio": "0x1000"}, owner=2, name="echo0", nvcpus=2)


def frame(obj) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    return struct.pack("<I", len(body)) + body


def deliver(src: Connection, dst: Connection, msg):
    data, fds = src.send(msg)
    dst.receive_data(data, fds)
    return dst.next_event()


def pair() -> tuple[Connection, Connection]:
    return Connection(Role.VMM), Connection(Role.DEVICE)


def to_configuring() -> tuple[Connection, Connection]:
    vmm, dev = pair()
    hello = deliver(vmm, dev, Hello())
    deliver(dev, vmm, negotiate(hello))
    return vmm, dev


def test_full_conversation_carries_fds():
    vmm, dev = to_configuring()
    assert vmm.state is dev.state is State.CONFIGURING
    assert deliver(vmm, dev, CONFIG) == CONFIG
    got = deliver(vmm, dev, SetRegistry(fd=10))
    assert got == SetRegistry(fd=10)
    data, fds = vmm.send(SetSlots(fd=11, nslots=2, poll_ns=100_000))
    assert fds == [11]
    dev.receive_data(data, [42])           # the receiver's numbers win
    assert dev.next_event() == SetSlots(fd=42, nslots=2, poll_ns=100_000)
    mem = SetMemTable(fd=12, regions=(MemRegion(0, 1 << 20, 0), MemRegion(1 << 32, 4096, 1 << 20)))
    assert deliver(vmm, dev, mem) == mem
    assert deliver(vmm, dev, Start()) == Start()
    assert deliver(dev, vmm, Ready(pid=1234)) == Ready(pid=1234)
    assert vmm.state is dev.state is State.RUNNING
    assert deliver(vmm, dev, Reset()) == Reset()
    assert deliver(dev, vmm, ResetDone()) == ResetDone()
    assert deliver(vmm, dev, Shutdown()) == Shutdown()
    assert dev.state is State.CLOSING
    dev.receive_data(b"")
    assert isinstance(dev.next_event(), ConnectionClosed)
    assert dev.take_unclaimed_fds() == []


def test_bytes_one_at_a_time():
    vmm, dev = pair()
    data, _ = vmm.send(Hello(features=frozenset({"reset"})))
    for b in data[:-1]:
        dev.receive_data(bytes([b]))
        assert dev.next_event() is NEED_DATA
    dev.receive_data(data[-1:])
    assert dev.next_event() == Hello(features=frozenset({"reset"}))


def test_negotiation():
    w = negotiate(Hello(version=7, features=frozenset({"reset", "future-thing"})))
    assert w == Welcome(version=1, features=frozenset({"reset"}))
    vmm, dev = pair()
    deliver(vmm, dev, Hello(features=frozenset()))
    # A welcome naming a feature the VMM never offered is the device's error.
    vmm.receive_data(frame({"type": "welcome", "version": 1, "features": ["reset"]}))
    with pytest.raises(RemoteProtocolError, match="never offered"):
        vmm.next_event()


def test_welcome_with_higher_version_is_rejected():
    vmm, _ = pair()
    vmm.send(Hello())
    vmm.receive_data(frame({"type": "welcome", "version": 2, "features": []}))
    with pytest.raises(RemoteProtocolError, match="version"):
        vmm.next_event()


@pytest.mark.parametrize("data, match", [
    (struct.pack("<I", 0), "frame length 0"),
    (struct.pack("<I", MAX_FRAME + 1), "frame length"),
    (struct.pack("<I", 3) + b"\xc1\xc1\xc1", "not valid msgpack"),
    (frame([1, 2, 3]), "not a map"),
    (frame({"type": 5}), "not a map"),
    (frame({"type": "launch-missiles"}), "unknown message type"),
    (frame({"type": "hello", "version": 1, "features": [], "extra": 1}), "unknown field"),
    (frame({"type": "hello", "version": 1}), "missing field"),
    (frame({"type": "hello", "version": "1", "features": []}), "bad version"),
    (frame({"type": "ready", "pid": 1}), "sent by the device"),
    (frame({"type": "start"}), "not allowed in state"),
])
def test_device_side_rejects_garbage(data, match):
    dev = Connection(Role.DEVICE)
    dev.receive_data(data)
    with pytest.raises(RemoteProtocolError, match=match):
        dev.next_event()
    with pytest.raises(RemoteProtocolError):   # stays broken
        dev.next_event()


def test_missing_fd_is_a_remote_error():
    vmm, dev = to_configuring()
    data, _ = vmm.send(SetRegistry(fd=3))
    dev.receive_data(data, [])
    with pytest.raises(RemoteProtocolError, match="needs 1 descriptor"):
        dev.next_event()


def test_extra_fds_are_refused_and_returned():
    vmm, dev = to_configuring()
    data, _ = vmm.send(SetRegistry(fd=3))
    dev.receive_data(data, [50, 51])
    with pytest.raises(RemoteProtocolError, match="more than set-registry carries"):
        dev.next_event()
    assert sorted(dev.take_unclaimed_fds()) == [50, 51]


def test_fds_with_a_message_that_carries_none_are_returned():
    vmm, dev = to_configuring()
    data, _ = vmm.send(CONFIG)
    dev.receive_data(data, [60])
    with pytest.raises(RemoteProtocolError):
        dev.next_event()
    assert dev.take_unclaimed_fds() == [60]


def test_invalid_fd_message_returns_its_fd():
    vmm, dev = to_configuring()
    dev.receive_data(frame({"type": "set-slots", "nslots": 0, "poll_ns": 0, "adaptive": True}), [70])
    with pytest.raises(RemoteProtocolError, match="bad set-slots"):
        dev.next_event()
    assert dev.take_unclaimed_fds() == [70]


def test_fd_message_in_wrong_state_returns_its_fd():
    dev = Connection(Role.DEVICE)
    dev.receive_data(frame({"type": "set-registry"}), [80])
    with pytest.raises(RemoteProtocolError, match="not allowed"):
        dev.next_event()
    assert dev.take_unclaimed_fds() == [80]


def test_end_of_stream_inside_a_frame():
    vmm, dev = pair()
    data, _ = vmm.send(Hello())
    dev.receive_data(data[:-2])
    dev.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="end of stream"):
        dev.next_event()


def test_local_errors():
    vmm, dev = pair()
    with pytest.raises(LocalProtocolError, match="not allowed"):
        vmm.send(Start())
    with pytest.raises(LocalProtocolError, match="sent by the device"):
        vmm.send(Ready(pid=5))
    vmm, dev = to_configuring()
    vmm.send(CONFIG)
    with pytest.raises(LocalProtocolError, match="twice"):
        vmm.send(CONFIG)
    with pytest.raises(LocalProtocolError, match="start before set-registry, set-slots"):
        vmm.send(Start())


def test_start_before_config_is_a_remote_error():
    vmm, dev = to_configuring()
    dev.receive_data(frame({"type": "start"}))
    with pytest.raises(RemoteProtocolError, match="start before"):
        dev.next_event()


def test_features_gate_messages():
    vmm, dev = pair()
    deliver(vmm, dev, Hello(features=frozenset()))
    deliver(dev, vmm, Welcome(features=frozenset()))
    with pytest.raises(LocalProtocolError, match="mem-table"):
        vmm.send(SetMemTable(fd=3, regions=(MemRegion(0, 4096, 0),)))


def test_error_and_shutdown_from_any_state():
    vmm, dev = to_configuring()
    deliver(vmm, dev, CONFIG)
    assert deliver(dev, vmm, Error("bad parameter")) == Error("bad parameter")
    assert vmm.state is State.FAILED
    assert deliver(vmm, dev, Shutdown()) == Shutdown()
    # An answer crossing the shutdown on the wire is accepted.
    vmm2, dev2 = to_configuring()
    for m in (CONFIG, SetRegistry(fd=1), SetSlots(fd=2, nslots=1, poll_ns=0), Start()):
        deliver(vmm2, dev2, m)
    vmm2.send(Shutdown())
    assert deliver(dev2, vmm2, Ready(pid=9)) == Ready(pid=9)


@pytest.mark.parametrize("make", [
    lambda: DeviceConfig(kind="", params={}, owner=2, name="x", nvcpus=1),
    lambda: DeviceConfig(kind="echo", params={"a": 1}, owner=2, name="x", nvcpus=1),
    lambda: DeviceConfig(kind="echo", params={}, owner=0, name="x", nvcpus=1),
    lambda: DeviceConfig(kind="echo", params={}, owner=2, name="x\n", nvcpus=1),
    lambda: DeviceConfig(kind="echo", params={}, owner=2, name="x", nvcpus=0),
    lambda: SetSlots(fd=-1, nslots=1, poll_ns=0),
    lambda: SetSlots(fd=3, nslots=1, poll_ns=-5),
    lambda: SetMemTable(fd=3, regions=()),
    lambda: SetMemTable(fd=3, regions=(MemRegion(0, 8192, 0), MemRegion(4096, 4096, 0))),
    lambda: MemRegion((1 << 64) - 1, 2, 0),
    lambda: Ready(pid=0),
    lambda: Error(""),
    lambda: Hello(features=frozenset({1})),
])
def test_messages_validate_themselves(make):
    with pytest.raises(ValueError):
        make()


def test_messages_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        CONFIG.owner = 3  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        del CONFIG.owner  # type: ignore[misc]


def test_messages_are_dataclasses_with_their_arguments():
    # Shared methods (devices.record), the behaviour of dataclass(frozen=True).
    assert [f.name for f in dataclasses.fields(SetSlots)] == ["fd", "nslots", "poll_ns", "adaptive", "move"]
    assert SetSlots(3, 2, 0) == SetSlots(fd=3, nslots=2, poll_ns=0, adaptive=True, move=False)
    assert SetSlots(3, 2, 0) != SetSlots(3, 2, 1) and SetSlots(3, 2, 0) != SetRegistry(fd=3)
    assert hash(Ready(pid=5, sandbox=("seccomp",))) == hash(Ready(5, ("seccomp",)))
    assert repr(MemRegion(0, 4096, 0)) == "MemRegion(guest_addr=0, size=4096, offset=0)"
    assert dataclasses.asdict(SetMemTable(fd=3, regions=(MemRegion(0, 4096, 0),))) == \
        {"fd": 3, "regions": ({"guest_addr": 0, "size": 4096, "offset": 0},)}
    changed = dataclasses.replace(CONFIG, name="echo1")
    assert changed.name == "echo1" and changed.params == CONFIG.params
    with pytest.raises(ValueError, match="nvcpus"):
        dataclasses.replace(CONFIG, nvcpus=0)      # replace() validates too
    for bad in (lambda: SetSlots(3, 2, 0, True, False, 9), lambda: SetSlots(3, nslots=2),
                lambda: SetSlots(3, 2, 0, fd=4), lambda: SetSlots(3, 2, 0, colour=1)):
        with pytest.raises(TypeError):
            bad()


def test_limits_are_sane():
    assert 1 <= MAX_FDS <= 8
    assert "reset" in FEATURES


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.integers(0, 3))
def test_random_bytes_never_escape_as_other_errors(data, nfds):
    dev = Connection(Role.DEVICE)
    fds = list(range(100, 100 + nfds))
    dev.receive_data(data, fds)
    dev.receive_data(b"")
    claimed = []
    try:
        while True:
            ev = dev.next_event()
            if isinstance(ev, ConnectionClosed):
                break
            claimed.extend(ev.fds())
    except RemoteProtocolError:
        pass
    # Every descriptor is either carried by a message or handed back.
    assert sorted(claimed + dev.take_unclaimed_fds()) == fds
