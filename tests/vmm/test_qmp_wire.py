"""QMP's wire protocol without sockets (vmm.qmp.wire), the command table's
argument checks (vmm.qmp.commands) and the access statistics (vmm.stats)."""

from __future__ import annotations

import json

import pytest

from ipc import Bus
from vmm.endpoint import DeviceFailed
from vmm.qmp.commands import COMMANDS, execute
from vmm.qmp.ctl import CtlError, format_tables, parse_arguments
from vmm.qmp.events import Event
from vmm.qmp.wire import JsonFramer, QmpError, Session
from vmm.stats import AccessStats

VERSION = {"qemu": {"major": 0, "minor": 1, "micro": 0}, "package": "test"}


def replies(data: bytes) -> list[dict]:
    assert data.endswith(b"\r\n") or not data
    return [json.loads(line) for line in data.split(b"\r\n") if line]


def session(execute=None) -> Session:
    return Session(execute or (lambda name, args: {"ran": name, "args": args}), VERSION)


def negotiated(execute=None) -> Session:
    s = session(execute)
    assert replies(s.receive_data(b'{"execute": "qmp_capabilities"}')) == [{"return": {}}]
    return s


# -- framing ---------------------------------------------------------------


def test_framer_splits_texts_without_newlines_and_across_feeds():
    f = JsonFramer()
    # qemu.qmp sends each request with no newline after it.
    assert f.feed(b'{"a": "x}\\"{["}{"b": [1, {"c": []}]}') == [b'{"a": "x}\\"{["}', b'{"b": [1, {"c": []}]}']
    assert f.feed(b'  {"a"') == []
    assert f.feed(b': "\\') == []            # an escape split across two feeds
    assert f.feed(b'""}') == [b'{"a": "\\""}']
    assert f.pending == 0
    # Top-level scalars end at whitespace or a bracket; strings at their quote.
    assert f.feed(b'5 true "s"[1]') == [b"5", b"true", b'"s"', b"[1]"]
    assert f.feed(b"}") == [b"}"]


def test_framer_refuses_oversized_and_deep_texts():
    f = JsonFramer(max_message=1000)
    f.feed(b'{"a": "' + b"x" * 600)
    assert f.error is None
    f.feed(b"x" * 600)
    assert f.error is not None and "longer than 1000" in str(f.error)
    assert f.feed(b'"}{"execute": "x"}') == []        # nothing more is taken
    deep = JsonFramer(max_nesting=8)
    deep.feed(b"[" * 9)
    assert deep.error is not None and "nesting" in str(deep.error)


# -- the session -----------------------------------------------------------


def test_greeting_is_qemus():
    g = json.loads(session().greeting())
    assert g == {"QMP": {"version": VERSION, "capabilities": []}}


def test_negotiation_comes_first_with_qemus_errors():
    s = session()
    assert replies(s.receive_data(b'{"execute": "query-status", "id": 7}')) == [
        {"error": {"class": "CommandNotFound",
                   "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}, "id": 7}]
    assert not s.negotiated
    assert replies(s.receive_data(b'{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}')) == [
        {"error": {"class": "GenericError", "desc": "Capability 'oob' not available"}}]
    assert replies(s.receive_data(b'{"execute": "qmp_capabilities", "arguments": {}, "id": "n"}')) == [
        {"return": {}, "id": "n"}]
    assert replies(s.receive_data(b'{"execute": "qmp_capabilities"}')) == [
        {"error": {"class": "CommandNotFound",
                   "desc": "Capabilities negotiation is already complete, command ignored"}}]


def test_requests_and_bad_envelopes():
    s = negotiated()
    out = replies(s.receive_data(
        b'{"execute": "x", "arguments": {"k": 1}, "id": {"any": ["json"]}}'
        b'not-json [1, 2] {"id": 1} {"execute": 5, "id": 2} {"execute": "x", "arguments": [], "id": 3}'
        b'{"execute": "x", "extra": 1, "id": 4} {"exec-oob": "x", "id": 5} {"execute": "x", "n": NaN}\n'))
    assert out[0] == {"return": {"ran": "x", "args": {"k": 1}}, "id": {"any": ["json"]}}
    assert out[1]["error"]["class"] == "GenericError" and out[1]["error"]["desc"].startswith("JSON parse error")
    assert out[2] == {"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}}
    assert out[3] == {"error": {"class": "GenericError", "desc": "QMP input lacks member 'execute'"}, "id": 1}
    assert out[4]["error"]["desc"] == "QMP input member 'execute' must be a string" and out[4]["id"] == 2
    assert out[5]["error"]["desc"] == "QMP input member 'arguments' must be an object" and out[5]["id"] == 3
    assert out[6]["error"]["desc"] == "QMP input member 'extra' is unexpected" and out[6]["id"] == 4
    assert out[7]["error"]["class"] == "GenericError" and out[7]["id"] == 5
    assert out[8]["error"]["desc"].startswith("JSON parse error")
    assert len(out) == 9


def test_handler_failures_become_error_replies():
    def execute(name, args):
        if name == "boom":
            raise RuntimeError("broken")
        if name == "odd":
            return {1, 2}             # not JSON
        raise QmpError("DeviceNotFound", "Device 'x' not found")
    s = negotiated(execute)
    out = replies(s.receive_data(b'{"execute": "boom"}{"execute": "odd"}{"execute": "dev", "id": 1}'))
    assert out[0]["error"] == {"class": "GenericError", "desc": "boom: RuntimeError: broken"}
    assert out[1]["error"]["class"] == "GenericError"
    assert out[2] == {"error": {"class": "DeviceNotFound", "desc": "Device 'x' not found"}, "id": 1}


def test_oversized_request_answers_then_asks_to_close():
    s = negotiated()
    out = s.receive_data(b'{"execute": "a"}{"execute": "b", "arguments": {"x": "' + b"y" * (1 << 20))
    first, error = replies(out)
    assert first["return"]["ran"] == "a"          # what came before is still answered
    assert error["error"]["class"] == "GenericError" and "closing" in error["error"]["desc"]
    assert s.closing
    assert s.receive_data(b'{"execute": "c"}') == b""


def test_events_only_in_command_mode():
    s = session()
    ev = Event("STOP", {}, 1_700_000_000_123_456)
    assert s.event(ev) == b""
    s.receive_data(b'{"execute": "qmp_capabilities"}')
    assert replies(s.event(ev)) == [{"event": "STOP", "timestamp": {"seconds": 1_700_000_000,
                                                                     "microseconds": 123_456}}]
    assert replies(s.event(Event("DEVICE_FAILED", {"device": "d"}, 5)))[0]["data"] == {"device": "d"}


# -- the command table's checks ------------------------------------------------


def test_table_checks_arguments_like_qemu():
    # No machine is needed: the checks come before the handler runs.
    with pytest.raises(QmpError) as e:
        execute(None, "no-such-command")
    assert (e.value.error_class, e.value.desc) == ("CommandNotFound", "The command no-such-command has not been found")
    with pytest.raises(QmpError) as e:
        execute(None, "query-stats", {"device": 5})
    assert e.value.desc == "Invalid parameter type for 'device', expected: string"
    with pytest.raises(QmpError) as e:
        execute(None, "query-stats", {"device": True})
    assert e.value.desc == "Invalid parameter type for 'device', expected: string"
    with pytest.raises(QmpError) as e:
        execute(None, "query-status", {"verbose": True})
    assert e.value.desc == "Parameter 'verbose' is unexpected"
    for name, command in COMMANDS.items():
        assert command.name == name and command.help


def test_ctl_arguments_typed_from_the_table():
    assert parse_arguments("query-regions", ["bus=mmio", "device=blk"]) == {"bus": "mmio", "device": "blk"}
    assert parse_arguments("unknown", ["x=1"]) == {"x": "1"}
    with pytest.raises(CtlError):
        parse_arguments("query-regions", ["bus"])
    assert format_tables([(("a", "bb"), [(1, None), ("long", 2)])]) == "a     bb\n1     -\nlong  2"


# -- statistics ----------------------------------------------------------------


class _Endpoint:
    owner = 7
    name = "d"

    def __init__(self):
        self.fail = False

    def access(self, vcpu, space, cookie, offset, size, is_write, value):
        if self.fail:
            raise DeviceFailed("gone")
        return 0x55


def test_stats_count_by_space_direction_and_vcpu():
    stats = AccessStats()
    ep = _Endpoint()
    for vcpu in (0, 3):
        assert stats.access(ep, vcpu, int(Bus.MMIO), 0, 0, 4, False, 0) == 0x55
        stats.access(ep, vcpu, int(Bus.PIO), 0, 0, 1, True, 1)
    stats.access(ep, 1, int(Bus.PCI), 0, 0, 4, 1, 1)     # the C loop passes ints
    ep.fail = True
    with pytest.raises(DeviceFailed):
        stats.access(ep, 0, int(Bus.PIO), 0, 0, 1, False, 0)
    d = stats.device(7)
    assert d.counts[(Bus.MMIO, False)] == 2 and d.counts[(Bus.PIO, True)] == 2
    assert d.counts[(Bus.PCI, True)] == 1 and d.counts[(Bus.PIO, False)] == 1
    assert d.accesses == 6 and d.failures == 1
    assert sum(d.histogram) == 6
    j = d.as_json()
    assert j["accesses"]["mmio"] == {"read": 2, "write": 0}
    assert j["latency"]["count"] == 6 and j["latency"]["p50-ns"] <= j["latency"]["p99-ns"]
    assert stats.owners() == {7}
    assert stats.device(8).accesses == 0 and stats.device(8).percentile_ns(0.5) is None


def test_percentiles_come_from_log2_buckets():
    from vmm.stats import DeviceStats

    hist = [0] * 64
    hist[10] = 98       # [512, 1024) ns
    hist[20] = 2        # [512 Ki, 1 Mi) ns
    d = DeviceStats(owner=1, counts={}, total_ns=0, failures=0, histogram=hist)
    assert d.percentile_ns(0.5) == 1024
    assert d.percentile_ns(0.98) == 1024
    assert d.percentile_ns(0.99) == 1 << 20
