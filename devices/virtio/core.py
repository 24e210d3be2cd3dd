"""The transport-independent core of a virtio device: feature negotiation,
device status and reset, and the queue loop (virtio 1.2 §2, §3.1).

:class:`VirtioCore` is a mixin of a transport (:class:`devices.virtio.pci.
VirtioPciDevice`), which provides the device lock (``_lock``), the
selected-queue registers and the interrupts (:meth:`VirtioCore.
interrupt_queue`, :meth:`VirtioCore.interrupt_config`).  A device model
implements :meth:`handle` (one request) and, when it needs to, the hooks:

* :meth:`wants_requests` -- the per-queue hook: whether the device takes
  requests from a queue now.  A queue the device fills on its own
  initiative (virtio-console's receiveq0: only while input waits) says no
  while it has nothing to give, and the buffers stay on the ring until
  :meth:`process_queue` is called again;
* :meth:`fail_request`, :meth:`device_reset`, :meth:`device_config` /
  :meth:`device_config_write`.

Feature negotiation (§2.2, §3.1.1): the device offers VIRTIO_F_VERSION_1
plus its own features; FEATURES_OK stays clear when the driver accepted
something not offered or not VERSION_1 (a modern-only device).  Device
status and reset (§2.1, §2.4): writing 0 resets the device;
DEVICE_NEEDS_RESET is set (and a configuration-change interrupt sent,
§2.1.2) when the driver breaks a ring as a whole or enables a queue whose
size or addresses cannot be used; queues are then left alone until reset.
"""

from __future__ import annotations

import abc
import logging
import threading
from collections.abc import Sequence

from devices.faults.engine import FaultEngine
from devices.faults.hook import SILENT
from devices.guestmem import GuestMemoryFault, GuestRam
from devices.snapshot import U8, Fields, require
from devices.virtio.spec import (
    VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
)
from devices.virtio.virtqueue import HELD, Chain, QueueBroken, Virtqueue

log = logging.getLogger(__name__)

#: Failed requests per queue (until reset) logged as warnings; then debug.
LOGGED_FAILURES = 10
#: What :meth:`VirtioCore.handle` returns for a request that must never
#: complete (the ``hang`` action of a fault, devices.faults).
NEVER = -1


class VirtioCore(abc.ABC):
    """Status, features and queues of a virtio device (module docstring)."""

    kind: str
    #: One maximum size per queue.
    queue_sizes: tuple[int, ...] = ()
    #: The device's own feature bits (VIRTIO_F_VERSION_1 is added).
    device_features = 0
    _lock: threading.RLock
    fault_engine: FaultEngine = SILENT

    def init_core(self) -> None:
        """Set up the queues and the negotiation state (the transport's
        ``__init__`` calls it)."""
        self.features = (1 << VIRTIO_F_VERSION_1) | self.device_features
        self.queues = [Virtqueue(i, n) for i, n in enumerate(self.queue_sizes)]
        self._mem: GuestRam | None = None

    def reset_core(self) -> None:
        """Device reset (§2.4): everything the driver set goes back."""
        self.status = 0
        self.driver_features = 0
        self.config_generation = 0
        self.broken: str | None = None
        for q in self.queues:
            q.reset()
        self.device_reset()

    # -- snapshot (devices.base.Device, "Snapshots") ------------------------

    def core_state(self) -> dict:
        """Status, features and queues (lock held)."""
        return {"status": self.status, "features": self.features, "driver_features": self.driver_features,
                "config_generation": self.config_generation, "broken": self.broken,
                "queues": [q.snapshot() for q in self.queues]}

    def check_core_state(self, state: object, where: str, mem: GuestRam | None, nvectors: int) -> dict:
        """:meth:`core_state`'s dict, checked (BadState): the same
        features offered, a status the driver could have reached
        (DRIVER_OK needs FEATURES_OK, FEATURES_OK an accepted feature
        set; DEVICE_NEEDS_RESET exactly while broken), usable queues."""
        f = Fields(state, where, ("status", "features", "driver_features", "config_generation", "broken",
                                  "queues"))
        require(f.integer("features") == self.features, f.name("features"),
                f"the snapshot offered {f.state['features']:#x}, this device offers {self.features:#x}")
        status = f.integer("status", 0, U8)
        driver = f.integer("driver_features")
        require(not status & VIRTIO_CONFIG_S_DRIVER_OK or bool(status & VIRTIO_CONFIG_S_FEATURES_OK),
                f.name("status"), "DRIVER_OK without FEATURES_OK")
        require(not status & VIRTIO_CONFIG_S_FEATURES_OK
                or (not driver & ~self.features and bool(driver >> VIRTIO_F_VERSION_1 & 1)),
                f.name("driver_features"), f"{driver:#x} accepted (offered {self.features:#x})")
        broken = f.optional("broken", f.text)
        require((broken is not None) == bool(status & VIRTIO_CONFIG_S_NEEDS_RESET), f.name("broken"),
                "DEVICE_NEEDS_RESET disagrees with the reason")
        entries = f.items("queues", len(self.queues))
        queues = [q.check(e, f"{f.name('queues')}[{q.index}]", mem, nvectors)
                  for q, e in zip(self.queues, entries, strict=True)]
        return {"status": status, "driver_features": driver, "broken": broken, "queues": queues,
                "config_generation": f.integer("config_generation", 0, U8)}

    def load_core_state(self, checked: dict) -> None:
        self.status, self.driver_features = checked["status"], checked["driver_features"]
        self.config_generation, self.broken = checked["config_generation"], checked["broken"]
        for q, v in zip(self.queues, checked["queues"], strict=True):
            q.load(v)

    def resume_inflight(self, queue: int, heads: Sequence[int], last_avail: int, used_idx: int) -> None:
        """What the in-flight record recovered for queue ``queue``, given
        after :meth:`restore` and before ``start()``, which serves
        ``heads`` again before anything new
        (:meth:`devices.virtio.virtqueue.Virtqueue.resume_inflight`;
        BadState when it does not fit the restored queue)."""
        require(type(queue) is int and 0 <= queue < len(self.queues), "inflight", f"no queue {queue!r}")
        with self._lock:
            self.queues[queue].resume_inflight(heads, last_avail, used_idx)

    def device_state(self) -> object:
        """The device model's own guest-visible state, plain data (lock
        held); None: nothing beyond the transport's."""
        return None

    def check_device_state(self, state: object, where: str) -> object:
        """Check :meth:`device_state`'s value (BadState, no change);
        returns what :meth:`load_device_state` takes."""
        require(state is None, where, "this device keeps no state of its own")
        return None

    def load_device_state(self, checked: object) -> None:
        """Apply what :meth:`check_device_state` returned (lock held)."""

    # -- for device models ---------------------------------------------------

    def device_reset(self) -> None:
        """Put device-specific state back to its power-on values."""

    def device_config(self) -> bytes:
        """The device-specific configuration structure."""
        return b""

    def device_config_write(self, offset: int, size: int, value: int) -> None:
        """A driver write into the device-specific configuration."""

    @abc.abstractmethod
    def handle(self, queue: Virtqueue, chain: Chain, mem: GuestRam) -> int:
        """Serve one valid request; returns the bytes written into its
        device-writable buffers.  May raise GuestMemoryFault."""

    def fail_request(self, queue: Virtqueue, chain: Chain, mem: GuestRam) -> int:
        """A request whose chain broke a rule (``chain.error``): what to
        write back; by default nothing (used length 0)."""
        return 0

    def wants_requests(self, queue: Virtqueue) -> bool:
        """Whether to take a request from ``queue`` now (lock held;
        default: always).  Asked before each one."""
        return True

    def config_changed(self) -> None:
        """Tell the driver the device configuration changed (§4.1.4.5)."""
        with self._lock:
            self.config_generation = (self.config_generation + 1) & 0xFF
            self.interrupt_config()

    # -- for the transport -------------------------------------------------------

    @abc.abstractmethod
    def interrupt_queue(self, queue: Virtqueue) -> None:
        """Used buffers on ``queue``: interrupt the driver (lock held)."""

    @abc.abstractmethod
    def interrupt_config(self) -> None:
        """A configuration change (or NEEDS_RESET): interrupt the driver."""

    def status_write(self, value: int) -> None:
        """The driver wrote the device status (§2.1, §3.1.1)."""
        if value == 0:
            log.debug("%s: reset by the driver", self.kind)
            self.reset()
            return
        new = value & ~VIRTIO_CONFIG_S_NEEDS_RESET | (self.status & VIRTIO_CONFIG_S_NEEDS_RESET)
        if new & VIRTIO_CONFIG_S_FEATURES_OK and not self.status & VIRTIO_CONFIG_S_FEATURES_OK:
            extra = self.driver_features & ~self.features
            if extra or not self.driver_features >> VIRTIO_F_VERSION_1 & 1:
                log.warning("%s: FEATURES_OK refused: driver features %#x (offered %#x; VERSION_1 is required)",
                            self.kind, self.driver_features, self.features)
                new &= ~VIRTIO_CONFIG_S_FEATURES_OK
        if new & VIRTIO_CONFIG_S_DRIVER_OK and not new & VIRTIO_CONFIG_S_FEATURES_OK:
            new &= ~VIRTIO_CONFIG_S_DRIVER_OK
        was_ok = self.status & VIRTIO_CONFIG_S_DRIVER_OK
        self.status = new
        if new & VIRTIO_CONFIG_S_DRIVER_OK and not was_ok:
            for q in self.queues:
                self.process_queue(q)

    @abc.abstractmethod
    def reset(self) -> None:
        """The whole device reset: the core's and the transport's state."""

    def features_locked(self) -> bool:
        """§2.2.1: no feature changes after FEATURES_OK."""
        return bool(self.status & VIRTIO_CONFIG_S_FEATURES_OK)

    def enable_queue(self, q: Virtqueue) -> None:
        """The driver enabled ``q`` (§2.7): check its layout first."""
        if self._mem is None:
            self.needs_reset(f"queue {q.index} enabled, but the device has no guest memory")
            return
        why = q.check_layout(self._mem)
        if why is not None:
            self.needs_reset(why)
            return
        q.enable()

    # -- the data path ----------------------------------------------------------

    def needs_reset(self, why: str) -> None:
        """The driver broke the device's state: DEVICE_NEEDS_RESET and a
        configuration-change notification (§2.1.2); queues stop."""
        if self.broken is None:
            log.warning("%s: device needs reset: %s", self.kind, why)
        self.broken = why
        self.status |= VIRTIO_CONFIG_S_NEEDS_RESET
        self.interrupt_config()

    def process_queue(self, q: Virtqueue) -> None:
        """Serve what the driver made available on ``q`` (lock held), while
        :meth:`wants_requests` says yes.  Bounded: at most 4 * size
        requests per call.  Completions are published in batches
        (:meth:`Virtqueue.push_many`: the elements, then ``used->idx``
        once) -- at the latest when the avail ring has nothing more, so a
        batch is what one doorbell brought -- with one interrupt per call."""
        mem = self.queue_ready(q)
        if mem is None:
            return
        served = 0
        batch: list[tuple[int, int]] = []
        heads: set[int] = set()
        engine = self.fault_engine
        try:
            for _ in range(4 * q.size):
                if not self.wants_requests(q):
                    break
                chain = q.pop(mem, heads)
                if chain is None or chain is HELD:
                    if batch:           # publish, then look again: the driver may have added more
                        q.push_many(mem, batch)
                        served += len(batch)
                        batch, heads = [], set()
                        continue
                    break
                if chain.error is not None:
                    self.count_failed(q, chain)
                    written = self._guarded(self.fail_request, q, chain, mem)
                else:
                    written = self._guarded(self.handle, q, chain, mem)
                    q.served += 1
                if written == NEVER:        # a fault's hang: the request never completes
                    continue
                if "queue.complete" in engine.armed:
                    q.push_many(mem, batch)
                    served += len(batch) + 1
                    batch, heads = [], set()
                    complete_faulted(engine, q, mem, chain.head, written)
                else:
                    batch.append((chain.head, written))
                    heads.add(chain.head)
                    if len(batch) >= q.size:
                        q.push_many(mem, batch)
                        served += len(batch)
                        batch, heads = [], set()
            q.push_many(mem, batch)
            served += len(batch)
        except (QueueBroken, GuestMemoryFault) as e:
            try:                            # what was served is returned before the queue stops
                q.push_many(mem, batch)
            except GuestMemoryFault:
                pass
            self.needs_reset(str(e))
            return
        if served:
            self.used_notify(q, mem)

    def count_failed(self, q: Virtqueue, chain: Chain) -> None:
        """Log and count a request whose chain broke a rule; only the first
        few per queue at WARNING, so a hostile driver cannot flood the log."""
        log.log(logging.WARNING if q.failed < LOGGED_FAILURES else logging.DEBUG,
                "%s: queue %d: request %d failed: %s", self.kind, q.index, chain.head, chain.error)
        q.failed += 1

    def queue_ready(self, q: Virtqueue) -> GuestRam | None:
        """Guest RAM if queue ``q`` may be used now (lock held), else None."""
        mem = self._mem
        if (mem is None or not q.enabled or self.broken is not None
                or not self.status & VIRTIO_CONFIG_S_DRIVER_OK):
            return None
        return mem

    def used_notify(self, q: Virtqueue, mem: GuestRam) -> None:
        """Used buffers were added to ``q``: interrupt the driver unless it
        asked not to (§2.7.7; lock held)."""
        try:
            if not q.wants_interrupt(mem):
                return
        except GuestMemoryFault as e:
            self.needs_reset(str(e))
            return
        self.interrupt_queue(q)

    def _guarded(self, fn, q: Virtqueue, chain: Chain, mem: GuestRam) -> int:
        try:
            return fn(q, chain, mem)
        except GuestMemoryFault as e:       # validated, but be safe
            log.warning("%s: queue %d: request %d: %s", self.kind, q.index, chain.head, e)
            q.failed += 1
            return 0
        except Exception:                   # a bug in the model fails the request, not the device
            log.exception("%s: queue %d: request %d", self.kind, q.index, chain.head)
            q.failed += 1
            return 0


def complete_faulted(engine: FaultEngine, q: Virtqueue, mem: GuestRam, head: int, written: int) -> None:
    """Push one completion through the ``queue.complete`` point
    (devices.faults): ``bad_id`` names a descriptor that is not the
    chain's head (the head + 1, modulo the size), ``bad_len`` reports 16
    MiB more than was written, ``duplicate`` pushes the element twice."""
    firing = engine.point("queue.complete", queue=q.index)
    if firing is None:
        q.push(mem, head, written)
        return
    if firing.action == "bad_id":
        bad = (head + 1) % q.size
        q.push(mem, bad, written)
        firing.done(f"queue {q.index}: used element names {bad}, not head {head}")
    elif firing.action == "bad_len":
        q.push(mem, head, written + (16 << 20))
        firing.done(f"queue {q.index}: head {head} reported {written + (16 << 20)} bytes, not {written}")
    elif firing.action == "duplicate":
        q.push(mem, head, written)
        q.push(mem, head, written)
        firing.done(f"queue {q.index}: head {head} completed twice")
    else:
        q.push(mem, head, written)
        firing.done("not applied")
