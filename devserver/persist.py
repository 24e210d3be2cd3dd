"""The device side of the state segment (issue 10 §2): a model's snapshot
stored before each answer, virtqueues' inflight records, and a restarted
process resuming from both.

:class:`StateKeeper` is what the runtime (:mod:`devserver.runtime`) holds
when the VMM handed it a state segment (:class:`ipc.protocol.SetState`):

* :meth:`StateKeeper.bring_up` builds the running model: a fresh one's
  ``start()`` (and empty inflight records), or -- when the segment holds a
  snapshot -- the restored one (:func:`devices.base.resume`), with each
  enabled virtqueue put back where the inflight record says
  (:meth:`devices.virtio.core.VirtioCore.resume_inflight`): the used
  index is the guest's (the commit point, in guest RAM), the requests
  that were popped and not completed are served again first, in pop
  order, and none that the guest saw completed is run twice.  The snapshot is untrusted input: ``restore``
  checks it (:class:`devices.base.BadState`), the inflight record is
  checked by :meth:`ipc.inflight.InflightQueue.recover`; either refusal
  fails the start.
* :meth:`StateKeeper.answered` stores the snapshot with the access record
  (the VMM's access sequence number, the answer) before the runtime
  writes the answer into the slot; a snapshot equal to the last one
  stored is not written again (that access changed nothing, running it
  again is harmless; :mod:`ipc.accessseq`).

Completions are recorded lazily (:class:`QueueRecord`): the flags of the
returned heads are cleared just before the next pop, or when half a queue
is waiting.  So a death between a used-ring update and its interrupt
leaves the record behind the guest's used index, recovery sees those
heads as "dropped" (completed, never run again) and the restarted device
sends the queue's interrupt once more; an extra notification is harmless
to a virtio driver (it reads the used ring), a lost one is not.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable

from devices.base import BadState, Device, NoSnapshot, packs_snapshot
from devices.guestmem import GuestRam
from devices.virtio.core import VirtioCore
from devices.virtio.virtqueue import Virtqueue
from devserver.errors import StartFailed
from ipc.inflight import InflightError, InflightQueue
from ipc.state import SnapshotTooLarge, StateSegment

__all__ = ["StateKeeper", "QueueRecord"]

log = logging.getLogger(__name__)

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")


class QueueRecord:
    """:class:`devices.virtio.virtqueue.InflightHook` over one queue's
    :class:`ipc.inflight.InflightQueue`."""

    __slots__ = ("record", "_done", "_used", "_flush_at")

    def __init__(self, record: InflightQueue):
        self.record = record
        self._done: list[int] = []
        self._used = 0
        self._flush_at = max(1, record.max_size // 2)

    def flush(self) -> None:
        done = self._done
        if not done:
            return
        self._done = []
        if len(done) == 1:
            self.record.complete(done[0], self._used)
        else:
            self.record.complete_batch(done, self._used)

    def direct(self) -> InflightQueue:
        """The record itself, its pending completions written first, for a
        device's own C loop that pops and completes in it directly
        (devices.blkring.Ring.recording)."""
        self.flush()
        return self.record

    def popped(self, queue: int, head: int, last_avail: int) -> None:
        self.flush()
        self.record.pop(head)

    def pushed(self, queue: int, head: int, used_idx: int) -> None:
        self._done.append(head)
        self._used = used_idx
        if len(self._done) >= self._flush_at:
            self.flush()

    def enabled(self, queue: int, size: int) -> None:
        self._done.clear()
        self.record.reset(size)

    def clear(self) -> None:
        """A model from power-on: nothing is in flight."""
        self._done.clear()
        self.record.reset(self.record.max_size)


class StateKeeper:
    """One device process's use of its state segment (module docstring)."""

    def __init__(self, segment: StateSegment):
        self.segment = segment
        #: Snapshots written (an answer that changed nothing writes none).
        self.stores = 0
        #: Whether the running model came from a snapshot.
        self.restored = False
        self._records: dict[int, QueueRecord] = {}
        self._recovered: list[Virtqueue] = []
        self._broken = False
        #: While the running model gives its snapshot packed
        #: (devices.base.packs_snapshot): the model, its bound
        #: packed_snapshot and the segment's packed writer, with which
        #: :meth:`answered` stores before each answer; else None.
        self.fast: tuple[Device, Callable[[], bytes], Callable[[bytes, int, int], bool]] | None = None
        self._store_packed = segment.packed_writer()

    # -- bring-up ------------------------------------------------------------

    def bring_up(self, model: Device, *, fresh: bool = False) -> None:
        """Start ``model`` (just built): restored from the segment's
        snapshot if it holds one and not ``fresh`` (a reset asked for
        power-on), else from power-on.  Raises StartFailed."""
        snap = None if fresh else self.segment.read()
        self.fast = None
        self._hook_queues(model)
        if snap is None:
            for rec in self._records.values():
                rec.clear()
            model.start()
            self.restored = False
        else:
            try:
                model.restore(snap.state)
            except (BadState, NoSnapshot) as e:
                raise StartFailed(f"cannot restore snapshot {snap.number}: {e}") from None
            self._recover_queues(model)
            model.start()
            released = model.host.release_unadopted()
            if released:
                log.info("released %d region(s) the dead process held and the snapshot does not", released)
            self._notify_recovered(model)
            self.restored = True
            log.info("restored snapshot %d (last access %s)", snap.number,
                     snap.access.seq if snap.access else "none")
        self.store_now(model)
        if packs_snapshot(type(model)):
            self.fast = (model, model.packed_snapshot, self._store_packed)

    def _hook_queues(self, model: Device) -> None:
        self._records.clear()
        if not isinstance(model, VirtioCore):
            return
        sizes = self.segment.layout.queue_sizes
        for q in model.queues:
            if q.index < len(sizes) and q.max_size <= sizes[q.index]:
                rec = QueueRecord(self.segment.queue(q.index))
                self._records[q.index] = rec
                q.inflight = rec
            else:
                log.warning("queue %d (size %d) has no inflight record in the state segment; a restart "
                            "may lose or repeat its requests", q.index, q.max_size)

    def _recover_queues(self, model: Device) -> None:
        """Put every enabled queue of the restored ``model`` where the
        inflight record and the guest's used ring say (before start())."""
        if not isinstance(model, VirtioCore):
            return
        self._recovered = []
        try:
            mem = model.host.guest_memory()
        except Exception:
            return
        for q in model.queues:
            rec = self._records.get(q.index)
            if rec is None or not q.enabled:
                continue
            try:
                got = self._recover(model, q, rec.record, mem)
            except (InflightError, ValueError, BadState) as e:
                raise StartFailed(f"queue {q.index}: inflight record: {e}") from None
            if got:
                self._recovered.append(q)

    @staticmethod
    def _recover(model: VirtioCore, q: Virtqueue, record: InflightQueue, mem: GuestRam) -> bool:
        n = q.size
        used = q.device
        guest_used = mem.read_int(used + 2, 2)

        def used_head(i: int) -> int:
            return mem.read_int(used + 4 + 8 * (i % n), 4)

        r = record.recover(n, guest_used, used_head)
        model.resume_inflight(q.index, r.resubmit, r.last_avail_idx, r.used_idx)
        if r.resubmit or r.dropped:
            log.info("queue %d: %d request(s) run again, %d completed before the death", q.index,
                     len(r.resubmit), len(r.dropped))
        return bool(r.dropped)

    def _notify_recovered(self, model: Device) -> None:
        """The interrupt of each queue whose last completions the record
        had not caught up with (it may not have been sent)."""
        recovered, self._recovered = self._recovered, []
        if not recovered or not isinstance(model, VirtioCore):
            return
        mem = model.host.guest_memory()
        # The model's own lock (the doorbell thread may be serving a queue
        # already); VirtioCore offers no public way to notify.
        with model._lock:
            for q in recovered:
                model.used_notify(q, mem)

    # -- stores --------------------------------------------------------------

    def store_now(self, model: Device) -> None:
        """Store the model's snapshot outside an access (start, reset)."""
        self._store(model, None)

    def answered(self, model: Device, aseq: int, value: int) -> None:
        """Store the snapshot including access ``aseq`` answered with
        ``value``, before the answer goes out (the model lock is held)."""
        fast = self.fast
        if fast is not None and model is fast[0] and aseq:
            # the model packs its own snapshot (devices.base.Device.packed_snapshot)
            try:
                if fast[2](fast[1](), aseq, value):
                    self.stores += 1
            except Exception as e:
                self._fast_failed(model, aseq, value, e)
            return
        self._answered(model, aseq, value)

    def _fast_failed(self, model: Device, aseq: int, value: int, e: Exception) -> None:
        """The packed store before an answer raised ``e``: a model that
        keeps no snapshot after all is stored as :meth:`answered` stores
        the others (which logs it), from now on too; one that does not fit
        or is not bytes fails the access (RuntimeError); anything else is
        raised again."""
        if isinstance(e, NoSnapshot):
            self.fast = None
            self._answered(model, aseq, value)
            return
        if isinstance(e, (SnapshotTooLarge, TypeError)):
            raise RuntimeError(f"cannot store the snapshot: {e}") from None
        raise e

    def _answered(self, model: Device, aseq: int, value: int) -> None:
        if not aseq or self._broken:
            self._store(model, aseq, value)
            return
        # (_store's body for an answer: this runs before every answer)
        try:
            state = model.snapshot()
        except NoSnapshot:
            self._store(model, aseq, value)         # logs it, once
            return
        try:
            if self.segment.store_answer(state, aseq, value):
                self.stores += 1
        except (SnapshotTooLarge, TypeError) as e:
            raise RuntimeError(f"cannot store the snapshot: {e}") from None

    def _store(self, model: Device, aseq: int | None, value: int = 0) -> None:
        if self._broken:
            return
        try:
            state = model.snapshot()
        except NoSnapshot:
            self._broken = True
            log.warning("the model keeps no snapshot: a restart starts it from power-on")
            return
        try:
            if (self.segment.store_answer(state, aseq, value) if aseq
                    else self.segment.store(state, None, only_if_changed=True)):
                self.stores += 1
        except (SnapshotTooLarge, TypeError) as e:
            # The segment would go on holding an older state: the access
            # fails (and with it the device) rather than be lost later.
            raise RuntimeError(f"cannot store the snapshot: {e}") from None

    def close(self) -> None:
        for rec in self._records.values():
            try:
                rec.flush()
            except InflightError:
                pass
        self._records.clear()
        self.segment.close()
