"""Per-device access statistics: how many accesses each device served, by
address space and direction, how many failed, and how long forwarding
took, as a log2 histogram (``query-stats`` of :mod:`vmm.qmp`).

:meth:`AccessStats.access` stands where the dispatcher hands an access to
the owner's endpoint (both exit loops, :mod:`vmm.dispatch` and
:mod:`vmm.vcpu`).  It is on the hot path, so it does little: two clock
reads, one dict look-up and three list increments.  Each vCPU writes only
its own cells (``per-vCPU x owner``), so no lock is taken and no count is
lost between vCPU threads; readers add the cells up.  The accesses the C
exit loop serves without the dispatcher -- forwarded to a device process
in C, or handed to an inline model as ``STEP_LOCAL`` -- are counted by C
in the owner's ``struct svmm_forward`` cell (:attr:`AccessStats.c_cells`,
the same layout, atomic adds), which readers add in too.

A cell is one flat list: the counts of the six (space, direction) pairs
(index ``bus * 2 + is_write``), the nanoseconds in total, the failures,
then ``HISTOGRAM_BUCKETS`` buckets where bucket ``b`` counts the accesses
that took ``[2**(b-1), 2**b)`` ns (``b = ns.bit_length()``).
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

from devices.record import record
from ipc import Bus
from vmm.endpoint import DeviceFailed, Endpoint

#: vCPU indexes the statistics have room for (KVM's limit here is 255).
MAX_VCPUS = 256
HISTOGRAM_BUCKETS = 64
_NSPACES = len(Bus)
_TOTAL_NS = 2 * _NSPACES
_FAILURES = _TOTAL_NS + 1
_HIST = _FAILURES + 1
_CELL = _HIST + HISTOGRAM_BUCKETS     # = SVMM_FWD_CELL of vmm/_vcpu.h (a C forward's cell)
_now = time.perf_counter_ns


@record
class DeviceStats:
    """What one device's accesses add up to (a snapshot)."""

    owner: int
    #: (bus, is_write) -> accesses
    counts: dict[tuple[Bus, bool], int]
    total_ns: int
    failures: int
    #: bucket b -> accesses that took [2**(b-1), 2**b) ns
    histogram: list[int]

    @property
    def accesses(self) -> int:
        return sum(self.counts.values())

    def percentile_ns(self, fraction: float) -> int | None:
        """Upper bound (exclusive, ns) of the log2 bucket that holds the
        ``fraction`` quantile of the forwarding latency; None when empty."""
        n = sum(self.histogram)
        if n == 0:
            return None
        rank = max(1, math.ceil(fraction * n))
        seen = 0
        for b, count in enumerate(self.histogram):
            seen += count
            if seen >= rank:
                return 1 << b
        return 1 << (len(self.histogram) - 1)

    def as_json(self) -> dict[str, Any]:
        """The ``query-stats`` form (QMP style: dashed keys)."""
        n = sum(self.histogram)
        return {
            "accesses": {bus.name.lower(): {"read": self.counts[(bus, False)], "write": self.counts[(bus, True)]}
                         for bus in Bus},
            "failures": self.failures,
            "latency": {
                "count": n,
                "mean-ns": self.total_ns // n if n else None,
                "p50-ns": self.percentile_ns(0.50),
                "p99-ns": self.percentile_ns(0.99),
                "histogram": [{"below-ns": 1 << b, "count": c} for b, c in enumerate(self.histogram) if c],
            },
        }


class AccessStats:
    """The statistics of one VM's dispatcher."""

    def __init__(self) -> None:
        self._cells: list[dict[int, list[int]]] = [{} for _ in range(MAX_VCPUS)]
        #: owner -> the ``struct svmm_forward *`` whose ``cell`` counts the
        #: accesses the C exit loop forwarded itself (vmm/_vcpu.h; the
        #: same layout as a cell), or None.
        self.c_cells: dict[int, Any] = {}

    def access(self, endpoint: Endpoint, vcpu: int, bus: int, cookie: int, offset: int, size: int,
                is_write: bool, value: int) -> int:
        """``endpoint.access(...)``, counted and timed.  Called only from
        vCPU ``vcpu``'s own thread."""
        t0 = _now()
        try:
            value = endpoint.access(vcpu, bus, cookie, offset, size, is_write, value)
        except DeviceFailed:
            self._count(vcpu, endpoint.owner, bus * 2 + is_write, _now() - t0)[_FAILURES] += 1
            raise
        ns = _now() - t0
        cell = self._cells[vcpu].get(endpoint.owner)
        if cell is None:
            self._count(vcpu, endpoint.owner, bus * 2 + is_write, ns)
        else:
            cell[bus * 2 + is_write] += 1
            cell[_TOTAL_NS] += ns
            cell[_HIST + ns.bit_length()] += 1
        return value

    def timed(self, endpoint: Endpoint, vcpu: int, bus: int, is_write: bool, fn: Callable[..., int],
              *args: Any) -> int:
        """``fn(*args)`` counted and timed as one access of ``endpoint``
        (off the hot path: an access the C loop could not complete)."""
        t0 = _now()
        index = bus * 2 + is_write
        try:
            value = fn(*args)
        except DeviceFailed:
            self._count(vcpu, endpoint.owner, index, _now() - t0)[_FAILURES] += 1
            raise
        self._count(vcpu, endpoint.owner, index, _now() - t0)
        return value

    def access_batch(self, endpoint: Endpoint, vcpu: int,
                     writes: list[tuple[int, int, int, int, int]]) -> None:
        """``endpoint.access_batch(vcpu, writes)`` (drained coalesced MMIO
        writes), counted as that many writes, each taking its share of the
        batch's time.  Called only from vCPU ``vcpu``'s own thread."""
        t0 = _now()
        n = len(writes)
        index = int(Bus.MMIO) * 2 + 1
        try:
            endpoint.access_batch(vcpu, writes)
        except DeviceFailed:
            self._count(vcpu, endpoint.owner, index, _now() - t0)[_FAILURES] += 1
            raise
        ns = _now() - t0
        if not n:
            return
        cell = self._cell(vcpu, endpoint.owner)
        cell[index] += n
        cell[_TOTAL_NS] += ns
        cell[_HIST + min((ns // n).bit_length(), HISTOGRAM_BUCKETS - 1)] += n

    def _count(self, vcpu: int, owner: int, index: int, ns: int) -> list[int]:
        cell = self._cell(vcpu, owner)
        cell[index] += 1
        cell[_TOTAL_NS] += ns
        cell[_HIST + min(ns.bit_length(), HISTOGRAM_BUCKETS - 1)] += 1
        return cell

    def _cell(self, vcpu: int, owner: int) -> list[int]:
        cells = self._cells[vcpu]
        cell = cells.get(owner)
        if cell is None:
            cell = cells[owner] = [0] * _CELL
        return cell

    def device(self, owner: int) -> DeviceStats:
        """The sum over every vCPU for one owner (zeros if it saw nothing)."""
        total = [0] * _CELL
        for cells in self._cells:
            cell = cells.get(owner)
            if cell is not None:
                for i, v in enumerate(list(cell)):
                    total[i] += v
        c = self.c_cells.get(owner)
        if c is not None:
            for i in range(_CELL):
                total[i] += c.cell[i]
        return DeviceStats(
            owner=owner,
            counts={(bus, bool(w)): total[bus * 2 + w] for bus in Bus for w in (0, 1)},
            total_ns=total[_TOTAL_NS], failures=total[_FAILURES], histogram=total[_HIST:])

    def owners(self) -> set[int]:
        """Every owner that saw at least one access."""
        out: set[int] = set()
        for cells in self._cells:
            out.update(list(cells))
        out.update(o for o, c in list(self.c_cells.items()) if c is not None and any(c.cell[i] for i in range(_TOTAL_NS)))
        return out
