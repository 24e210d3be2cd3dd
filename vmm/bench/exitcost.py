"""What one forwarded access costs in CPU, piece by piece:
``python -m vmm.bench.exitcost [--loops N]`` prints JSON.

The wall-clock figures of :mod:`vmm.bench` swing with the machine's load
(two cores shared by several people here); the CPU time a thread spends on
each piece of the path does not, much.  So this measures, with
``time.thread_time_ns`` and the best of several rounds, each piece of a
4-byte port read of the ``echo`` device's scratch register:

* ``vmm``: the VMM's Python per access --
  ``inline_local_ns``: what the vCPU loop runs for an inline access
  (``STEP_LOCAL``, :meth:`vmm.vcpu.VcpuThread._loop_fast`: the access
  fields unpacked from the C context, the model's ``read`` called, the
  value masked), of which ``inline_model_read_ns`` is the echo model's
  ``read``; ``c_count_ns``: the C loop counting that access in the
  device's statistics (a clock read and the cell's atomic adds, through
  ``svmm_account``; the hand-out takes one more clock read, ~20 ns);
  ``inline_forward_ns``: :meth:`vmm.dispatch.Dispatcher.forward` to the
  same echo, the path an inline access takes while a fault is armed on
  its ``access`` or ``process`` point (the access statistics in Python,
  :meth:`vmm.local.LocalEndpoint.access`, the model);
  ``isolated_forward_ns``: the same to an echo in its own process, through
  :class:`vmm.remote.RemoteEndpoint` and :class:`ipc.SlotCaller`, with
  the device's answer taken as immediate: the C call into the slots is
  swapped for one that answers at once for the measurement (its own cost,
  ``stand_in_call_ns``, is taken off), so the figure is the Python on the
  VMM's side of a hand-off and nothing of the device's.  The C exit loop
  forwards an isolated access itself (``vmm/_vcpu.c``, ``svmm_forward``):
  this Python runs only for the first access to a device, while its
  forward is off (restarting, paused) and for PCI config and batches;
* ``device``: the device runtime's Python per access, in this process on
  the same model and a real state segment -- ``request_ns`` (a request
  copied out of the slot into a tuple and its fields into locals, as
  :meth:`ipc.slots.SlotServer.answer_next_raw` and the serving loop do),
  ``model_read_ns``, ``snapshot_ns`` (the echo's packed snapshot,
  :meth:`devices.echo.Echo.packed_snapshot`, the form the runtime stores;
  ``dict_snapshot_ns`` is its ``snapshot()`` dict, for comparison),
  ``state_store_ns`` (the snapshot taken and stored before the
  answer, as the serving loop does through
  :meth:`devserver.persist.StateKeeper.answered` for every access that
  changes the state: the echo's access counter does on every read; the
  comparison with the last payload, the checksum and the stores into the
  segment are one call into C, ``svs_state_store_packed``).

Not in here: the KVM exit itself (:mod:`vmm.bench`'s bare C runner), the
C loop's registry get and put, the GIL taken back after each KVM_RUN, the
vCPU loop's Python outside its STEP_LOCAL branch, and the hand-off between
the two processes (spin, poll, futex: ``handoff_per_access`` in
:mod:`vmm.bench`).
Code run right after a KVM exit on the nested PVM host also runs with cold
caches and TLB, so in a guest run each piece costs more than here.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Callable

from devices.base import Space
from devices.echo import Echo
from devserver.host import RemoteHost
from devserver.persist import StateKeeper
from ipc import Registry
from ipc import slots as slots_module
from ipc.state import StateSegment
from vmm import kvm
from vmm._kvm_c import ffi as _kvm_ffi
from vmm._kvm_c import lib as _kvm_lib
from vmm.dispatch import Dispatcher
from vmm.local import LocalEndpoint
from vmm.vcpu import SPACES

PORT = 0x1000
SCRATCH = 0x10
OWNER = 3


def _cpu_ns(fn: Callable[[], object], loops: int, rounds: int = 5) -> float:
    """Best-of-``rounds`` thread CPU time of one ``fn()``, in ns."""
    for _ in range(max(1, loops // 20)):
        fn()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.thread_time_ns()
        for _ in range(loops):
            fn()
        best = min(best, (time.thread_time_ns() - t0) / loops)
    return best


def _region(registry: Registry) -> tuple[int, int]:
    """(cookie, offset) of the scratch register's region (looked up once)."""
    ref = registry.get(int(Space.PIO), PORT + SCRATCH, 4)
    if ref is None:
        raise RuntimeError(f"the echo device claimed no port at {PORT:#x}")
    registry.put(ref)
    return ref.cookie, ref.offset


class _AnswerAtOnce:
    """Stands in for the slots' C library during the measurement: every
    call is answered at once with 0 (everything else is the real one)."""

    def __init__(self, real):
        self._real = real

    def __getattr__(self, name: str):
        return getattr(self._real, name)

    def svs_call(self, h, slot, space, cookie, offset, size, is_write, value, aseq, spin_ns, slice_ns,
                 timeout_ns, out) -> int:
        out[0] = 0
        return 0


def _local(d: Dispatcher, local: LocalEndpoint, cookie: int, offset: int, loops: int) -> dict:
    """The STEP_LOCAL pieces on a C context holding a 4-byte port read."""
    ctx = _kvm_ffi.new("struct svmm_vcpu *")
    ctx.bus, ctx.size, ctx.is_write, ctx.owner, ctx.cookie, ctx.offset = int(Space.PIO), 4, 0, OWNER, cookie, offset
    view = _kvm_ffi.buffer(ctx)
    unpack, at = kvm._LOCAL.unpack_from, kvm.LOCAL_AT
    d.look_at_forward(OWNER)
    reads, writes = d.local_reads, d.local_writes
    mask = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFF_FFFF, 8: 0xFFFF_FFFF_FFFF_FFFF}
    spaces = SPACES

    def step() -> int:
        # the STEP_LOCAL branch of VcpuThread._loop_fast (its try, which
        # costs nothing until something raises, left out)
        bus, size, is_write, value, owner, cookie, offset = unpack(view, at)
        out = 0
        if is_write:
            writes[owner](spaces[bus], cookie, offset, size, value)
        else:
            out = reads[owner](spaces[bus], cookie, offset, size) & mask[size]
        return out

    read = local.model_read
    pio = Space.PIO
    account = _kvm_lib.svmm_account

    def count(fwd) -> Callable[[], None]:
        def run() -> None:
            ctx.acct = fwd
            account(ctx)
        return run

    # the same calls with nothing to count, taken off
    counted = _cpu_ns(count(local.c_forward), loops) - _cpu_ns(count(_kvm_ffi.NULL), loops)
    return {"inline_local_ns": round(_cpu_ns(step, loops)),
            "inline_model_read_ns": round(_cpu_ns(lambda: read(pio, cookie, offset, 4), loops)),
            "c_count_ns": round(counted)}


def _vmm(loops: int) -> dict:
    from vmm.remote import RemoteEndpoint
    registry = Registry.create_sealed()
    out: dict = {}
    try:
        local = LocalEndpoint.create(Echo, {"pio": hex(PORT)}, OWNER, "echo-inline", registry)
        d = Dispatcher(registry, {OWNER: local})
        cookie, offset = _region(registry)
        out.update(_local(d, local, cookie, offset, loops))
        out["inline_forward_ns"] = round(_cpu_ns(
            lambda: d.forward(0, int(Space.PIO), OWNER, cookie, offset, 4, False, 0), loops))
        local.model.stop()
    finally:
        registry.close()
    registry = Registry.create_sealed()
    try:
        remote = RemoteEndpoint.spawn("echo", {"pio": hex(PORT)}, OWNER, "echo-isolated", registry, 1)
        try:
            d = Dispatcher(registry, {OWNER: remote})
            cookie, offset = _region(registry)
            real = slots_module.lib
            stand_in = _AnswerAtOnce(real)
            slots_module.lib = stand_in
            try:
                full = _cpu_ns(lambda: d.forward(0, int(Space.PIO), OWNER, cookie, offset, 4, False, 0), loops)
                ffi_out = slots_module.ffi.new("uint64_t[1]")
                call = _cpu_ns(lambda: stand_in.svs_call(None, 0, 0, 0, 0, 4, 0, 0, 1, 0, 0, 0, ffi_out),
                               loops)
            finally:
                slots_module.lib = real
            out["isolated_forward_ns"] = round(full - call)
            out["stand_in_call_ns"] = round(call)
        finally:
            remote.close()
    finally:
        registry.close()
    return out


def _device(loops: int) -> dict:
    registry = Registry.create_sealed()
    segment = StateSegment.create()
    try:
        model = Echo(RemoteHost(registry, OWNER), pio=hex(PORT))
        keeper = StateKeeper(segment)
        keeper.bring_up(model)
        pio = Space.PIO
        raw = bytes(slots_module.ffi.sizeof("struct svs_request"))
        unpack = slots_module._unpack_request
        aseq = [1]
        answered = keeper.answered

        def store() -> None:
            aseq[0] += 1
            model.regs.count += 1                 # what a read does to the state
            answered(model, aseq[0], 0)         # the serving loop's store before the answer

        def request() -> int:
            # what the serving loop does with SlotServer.answer_next_raw's tuple
            slot, seq, space, size, is_write, _, cookie, offset, value, aseq = unpack(raw)
            return slot

        out = {
            "request_ns": round(_cpu_ns(request, loops)),
            "model_read_ns": round(_cpu_ns(lambda: model.read(pio, 0, SCRATCH, 4), loops)),
            "snapshot_ns": round(_cpu_ns(model.packed_snapshot, loops)),
            "dict_snapshot_ns": round(_cpu_ns(model.snapshot, loops)),
            "state_store_ns": round(_cpu_ns(store, loops)),
        }
        model.stop()
        return out
    finally:
        segment.close()
        registry.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vmm.bench.exitcost", description=__doc__.split("\n\n")[0])
    ap.add_argument("--loops", type=int, default=20000, help="calls per round (default 20000)")
    args = ap.parse_args(argv)
    if args.loops < 1:
        ap.error("--loops must be at least 1")
    report: dict = {"benchmark": "CPU per forwarded 4-byte port read, piece by piece (thread CPU time, "
                                 "best of 5 rounds)",
                    "unit": "ns", "loops": args.loops,
                    "loadavg_before": [round(x, 2) for x in os.getloadavg()]}
    report["vmm"] = _vmm(args.loops)
    report["device"] = dev = _device(args.loops)
    dev["serve_python_ns"] = dev["request_ns"] + dev["model_read_ns"] + dev["state_store_ns"]
    json.dump(report, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
