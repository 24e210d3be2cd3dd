"""The fault engine of one device: counts the events of each armed point,
decides by trigger (or by a recorded trace) which ones fire, and records
the firings.

Numbering.  Each point has an event counter per device, 1-based, started
when the point is first armed on the engine and kept counting after its
faults are disarmed; a firing's ``event`` is that number, and replay keys on
(device, point, event).  Each fault also counts the events *it matches*
(its match keys, and the match values its action implies); its trigger
looks at that count: ``nth = N`` fires on the Nth, ``every = N`` on each
Nth, ``after = N`` on each one after the Nth, ``probability = P`` on each
with probability P, at most ``times`` times.  A fault's decisions depend
only on its own count, so never on other faults or on thread timing beyond
the order of the events themselves.  When several faults fire on one
event, the first armed is applied and the others are counted as shadowed
(their ``times`` are not used up).

The probability generator is counter-based (SplitMix64 indexed by the
count): fault ``name`` under ``seed`` has the state ``s`` = BLAKE2b with an
8-byte digest, key = ``seed`` as 8 bytes big-endian, data = the UTF-8 name,
read big-endian; its count ``n`` fires when ``mix64(s + n * 0x9E3779B97F4A7C15
mod 2**64) < floor(P * 2**64)``, ``mix64`` being SplitMix64's output function
-- the same answer in any process, thread or order, whatever else is armed.

Cost.  :attr:`FaultEngine.armed` maps each counted point to the function
that counts its events (compiled at arm time, replaced whole on
arm/disarm), so a caller's ``if "blk.write" in engine.armed`` is the whole
cost of a point with nothing armed; :meth:`FaultEngine.point` starts with
that lookup too.  An event that no armed fault's match keys select (a
fault armed elsewhere on the disk, say) costs its match tests and the
event counter's increment (an :func:`itertools.count`, atomic under the
GIL): no lock, no record.  Only an event some fault matches takes the
engine's lock, to count it for that fault and decide; only a firing builds
a :class:`Firing`.

Counted elsewhere.  A caller that serves a point's events in C
(virtio-blk's request loop, :mod:`devices.blkring`) may pass over the
events :meth:`FaultEngine.quiet` says no fault can take -- outside every
armed span of the point's match key, and fewer than the events no trigger
can select -- and hand them over in bulk with :meth:`FaultEngine.skip`,
which adds them to the point's numbering and to the counts of the faults
without match keys, exactly as one call per event would.  It registers
with :meth:`FaultEngine.counted_elsewhere` the lock its events are counted
under and the function that hands them over; every query, arm and disarm
then holds that lock and hands them over first, so what it reads is
complete and no passed-over event straddles a change of the faults.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from devices.faults.table import POINTS, Choice, FaultError, PointSpec, Span

if TYPE_CHECKING:
    import random

    from devices.faults.plan import Fault

# _blake2 (not hashlib, which loads OpenSSL), random and the plan parser are imported where they are
# used: every device model has an engine (the SILENT one at least), and a
# run without a plan never needs them (issue 15: start-up).

#: Where an engine sends its records (one JSON-able dict each): a
#: :class:`devices.faults.trace.TraceWriter`, or a device runtime's
#: forwarder to the VMM.  Called with the engine's lock not held.
Sink = Callable[[dict[str, Any]], None]

_M64 = 2**64 - 1
_GOLDEN = 0x9E3779B97F4A7C15


def name_state(seed: int, name: str) -> int:
    """The generator state of fault ``name`` under ``seed``."""
    from _blake2 import blake2b     # hashlib's, without hashlib loading OpenSSL (issue 15)

    h = blake2b(name.encode(), key=seed.to_bytes(8, "big"), digest_size=8)
    return int.from_bytes(h.digest(), "big")


def mix64(z: int) -> int:
    """SplitMix64's output function (Steele, Lea, Flood 2014)."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def uniform64(seed: int, name: str, count: int) -> int:
    """The generator's 64-bit value for count ``count`` of fault ``name``."""
    return mix64((name_state(seed, name) + count * _GOLDEN) & _M64)


def threshold(probability: float) -> int:
    """``floor(P * 2**64)``: a value below it fires (P = 1: every one)."""
    return int(probability * 2**64)


def trigger_function(fault: Fault, seed: int) -> Callable[[int], bool]:
    """Whether the fault's trigger selects its ``count``-th matching event
    (``times`` aside)."""
    n = fault.arg
    if fault.trigger == "nth":
        return lambda count: count == n
    if fault.trigger == "every":
        return lambda count: count % n == 0
    if fault.trigger == "after":
        return lambda count: count > n
    if fault.trigger == "probability":
        limit, state = threshold(n), name_state(seed, fault.name)
        if limit == 0:
            return lambda count: False
        return lambda count: mix64((state + count * _GOLDEN) & _M64) < limit
    raise FaultError(f"fault {fault.name!r}: unknown trigger {fault.trigger!r}")


@dataclasses.dataclass(eq=False)
class Firing:
    """One fault firing on one event.  The caller applies ``action`` with
    ``params`` and then calls :meth:`done` with what it did; for an action
    that does not return (``crash``, ``exit``, ``die_holding_lock``,
    ``hang``) it calls :meth:`done` first."""

    device: str
    fault: str
    point: str
    #: The point's event number on this device (1-based): the replay key.
    event: int
    #: The fault's own count of matching events at this one (replay: 0).
    count: int
    action: str
    params: Mapping[str, Any]
    #: Per-device firing sequence, 1-based.
    seq: int
    #: ``time.monotonic_ns()`` of the decision (system-wide on Linux, so it
    #: orders firings of several processes for display).
    t: int
    detail: str | None = None
    #: The engine's seed (what :meth:`random` derives from).
    seed: int = 0
    _engine: FaultEngine | None = dataclasses.field(default=None, repr=False)

    def random(self) -> random.Random:
        """A generator for what the action makes up (``garbage`` bytes,
        which bits ``corrupt`` flips), seeded by (seed, fault, device,
        point, event): the same bytes in a rerun and in a replay."""
        import random

        from _blake2 import blake2b

        key = f"{self.fault}\0{self.device}\0{self.point}\0{self.event}".encode()
        h = blake2b(key, key=self.seed.to_bytes(8, "big"), digest_size=16)
        return random.Random(int.from_bytes(h.digest(), "big"))

    def done(self, detail: str = "") -> None:
        """Record the firing with ``detail`` (what was done) in the trace.
        Once; a second call is ignored."""
        engine, self._engine = self._engine, None
        if engine is not None:
            self.detail = detail
            engine._done(self)

    def record(self) -> dict[str, Any]:
        """The firing as a trace line (:mod:`devices.faults.trace`)."""
        return {"type": "fire", "seq": self.seq, "t": self.t, "device": self.device, "fault": self.fault,
                "point": self.point, "event": self.event, "action": self.action, "params": dict(self.params),
                "detail": self.detail if self.detail is not None else ""}


@dataclasses.dataclass
class FaultStatus:
    """A fault's counters (QMP ``query-faults``)."""

    fault: Fault
    events: int = 0         # matching events seen
    firings: int = 0
    shadowed: int = 0       # fired together with an earlier fault, not applied

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.fault.name, "device": self.fault.device, "point": self.fault.point,
                "action": self.fault.action, "events": self.events, "firings": self.firings,
                "shadowed": self.shadowed, "fault": self.fault.to_dict()}


@dataclasses.dataclass(frozen=True)
class Quiet:
    """What a caller counting a point's events itself may pass over
    without asking the engine (:meth:`FaultEngine.quiet`)."""

    #: The match key of :attr:`spans` (None: there are none).
    key: str | None
    #: Inclusive ``[lo, hi]`` spans of ``key``, one per armed fault that
    #: matches by that key alone: an event whose value lies in one may be
    #: taken by its fault, so it must be asked about (:attr:`FaultEngine.armed`).
    spans: tuple[tuple[int, int], ...]
    #: How many events in a row (outside the spans) no trigger can select:
    #: None for no limit, 0 when every event must be asked about.
    events: int | None


#: Passed-over events :meth:`FaultEngine.skip` takes from the point's
#: counter one by one (at C speed); more, and it starts a new counter.
_SKIP_IN_PLACE = 256


def _quiet_events(armed: _Armed) -> int | None:
    """How many more events a fault without match keys counts before its
    trigger may select one (None: never again)."""
    if armed.left == 0:
        return None
    fault, count = armed.fault, armed.status.events
    if fault.trigger == "probability":
        return None if threshold(fault.arg) == 0 else 0     # else any event may fire
    n = int(fault.arg)
    if fault.trigger == "nth":
        return n - count - 1 if count < n else None
    if fault.trigger == "every":
        return n - count % n - 1
    if fault.trigger == "after":
        return max(0, n - count)
    return 0                # a trigger this does not know: ask about every event


#: What :attr:`FaultEngine.armed` maps a point to: called with the event's
#: match values, it counts the event and returns the firing or None.
Hit = Callable[[Mapping[str, Any]], "Firing | None"]
#: A compiled match test: true if the event's match values select the fault.
Test = Callable[[Mapping[str, Any]], bool]


class _Armed:
    """A fault armed on an engine, with its counters and compiled match test."""

    __slots__ = ("fault", "status", "test", "span", "selects", "left")

    def __init__(self, fault: Fault, spec: PointSpec, seed: int):
        self.fault = fault
        self.status = FaultStatus(fault)
        #: None: the fault has no match keys and takes every event.
        self.test = compile_match(fault.match, spec)
        #: (key, lo, hi) when the fault's one match key is a span (the
        #: ``blk.*`` points' ``sector``): the point's Hit tests it inline.
        self.span: tuple[str, int, int] | None = None
        if len(fault.match) == 1:
            (key, value), = fault.match.items()
            if isinstance(spec.match[key], Span):
                self.span = (key, value[0], value[1])
        self.selects = trigger_function(fault, seed)
        self.left = fault.times       # None: unlimited


def compile_match(match: Mapping[str, Any], spec: PointSpec) -> Test | None:
    """One function testing every key of ``match`` (a fault's, canonical)
    against an event's match values; None for no keys.  A key the event
    lacks raises KeyError."""
    tests = [_compile_key(key, spec.match[key], value) for key, value in match.items()]
    if not tests:
        return None
    if len(tests) == 1:
        return tests[0]
    all_tests = tuple(tests)

    def every(m: Mapping[str, Any]) -> bool:
        for test in all_tests:
            if not test(m):
                return False
        return True
    return every


def _compile_key(key: str, kind: object, value: Any) -> Test:
    if isinstance(kind, Span):
        lo, hi = value
        return lambda m: lo <= m[key] <= hi
    if isinstance(kind, Choice):
        accepted = kind.accepted(value)
        return lambda m: m[key] in accepted
    return lambda m: m[key] == value


def _missing(point: str, error: KeyError) -> FaultError:
    return FaultError(f"point {point!r} hit without its match key {error.args[0]!r}")


class FaultEngine:
    """The faults of one device.  Thread-safe: :meth:`point` may be called
    from several threads (vCPUs, queue workers) while :meth:`arm` and
    :meth:`disarm` run.

    ``faults`` are armed from the start (the plan's, already validated for
    this device: :meth:`devices.faults.plan.Plan.for_device`); ``points``
    is the table their points come from (a model's own points added);
    ``sink`` receives a record per firing (on :meth:`Firing.done`) and per
    run-time arm/disarm.
    """

    #: point -> the function that counts and decides its events (a
    #: :data:`Hit`, compiled at arm time from the point's faults); every
    #: counted point is a key (counting only, once its faults are
    #: disarmed).  Replaced, never changed in place, so a reader needs no lock.
    armed: Mapping[str, Hit]

    def __init__(self, device: str, faults: Iterable[Fault] = (), *, seed: int = 0,
                 points: Mapping[str, PointSpec] = POINTS, sink: Sink | None = None):
        self.device = device
        self.seed = seed
        self.points = points
        self.sink = sink
        self.armed = {}
        self._lock = threading.Lock()
        #: point -> its event counter (next() is the event's number).
        self._events: dict[str, itertools.count[int]] = {}
        #: point -> its faults in arm order (changed under the lock).
        self._table: dict[str, tuple[_Armed, ...]] = {}
        self._faults: dict[str, _Armed] = {}
        self._seq = 0
        self._pending: dict[int, Firing] = {}
        #: Called (no arguments) after each arm and disarm, e.g. to re-route
        #: interrupts (devices.faults.apply.attach_engine).
        self.on_change: list[Callable[[], None]] = []
        #: (lock, hand_over) of :meth:`counted_elsewhere`, or None.
        self._elsewhere: tuple[Any, Callable[[], None]] | None = None
        for fault in faults:
            self._arm(fault)

    # -- run time ---------------------------------------------------------

    def point(self, name: str, /, **match: Any) -> Firing | None:
        """One event at point ``name`` with its match values (every match
        key of the point, e.g. ``sector=``); the firing, or None.  A hot
        path may call ``engine.armed[name]`` with a dict of the values
        itself (one keyword dict the fewer)."""
        armed = self.armed
        if name not in armed:
            return None
        return armed[name](match)

    # -- events counted elsewhere -------------------------------------------

    def counted_elsewhere(self, lock: Any, hand_over: Callable[[], None]) -> None:
        """Some events of this engine's points are counted outside it
        (virtio-blk's C loop): under ``lock`` (reentrant: a
        ``threading.RLock``), and handed over by ``hand_over()`` (which
        calls :meth:`skip`).  :meth:`query`, :meth:`events`, :meth:`arm`
        and :meth:`disarm` then hold ``lock`` and call ``hand_over`` first.
        One caller per engine (a later call replaces the earlier)."""
        self._elsewhere = (lock, hand_over)

    @contextlib.contextmanager
    def _all_counted(self) -> Iterator[None]:
        """Every event counted elsewhere handed over, and no more counted
        there until the block ends."""
        elsewhere = self._elsewhere
        if elsewhere is None:
            yield
            return
        lock, hand_over = elsewhere
        with lock:
            hand_over()
            yield

    def quiet(self, point: str) -> Quiet:
        """What a caller counting ``point``'s events itself may pass over
        and hand over later with :meth:`skip`, as the faults stand now:
        an event outside the returned spans, while fewer than its
        ``events`` were passed over (each event asked about meanwhile
        that fired nothing uses up one more; a firing changes it)."""
        with self._lock:
            return self._quiet_locked(point)

    def _quiet_locked(self, point: str) -> Quiet:
        key: str | None = None
        spans: list[tuple[int, int]] = []
        events: int | None = None
        for armed in self._table.get(point, ()):
            if armed.test is None:
                n = _quiet_events(armed)
                if n is not None:
                    events = n if events is None else min(events, n)
            elif armed.span is not None and key in (None, armed.span[0]):
                key, lo, hi = armed.span
                spans.append((lo, hi))
            else:               # other keys, or spans of two keys: ask about every event
                return Quiet(None, (), 0)
        return Quiet(key, tuple(spans), events)

    def skip(self, point: str, n: int) -> None:
        """Count ``n`` events of ``point`` that were passed over (what
        :meth:`quiet` allowed): the point's numbering goes on past them and
        each fault without match keys counts them, as ``n`` calls of its
        :data:`Hit` that fire nothing would.  Events of a point not counted
        yet are not numbered (as there).  Raises :class:`FaultError` if a
        trigger could have selected one of them.  The point's events must
        not be counted meanwhile (the caller holds what serialises them)."""
        if n <= 0:
            return
        with self._lock:
            counter = self._events.get(point)
            if counter is None:
                return
            allowed = self._quiet_locked(point).events
            if allowed is not None and n > allowed:
                raise FaultError(f"{self.device}/{point}: {n} events passed over, but a trigger may "
                                 f"select one after {allowed}")
            for armed in self._table.get(point, ()):
                if armed.test is None:
                    armed.status.events += n
            if n <= _SKIP_IN_PLACE:
                collections.deque(itertools.islice(counter, n), maxlen=0)
            else:       # a new counter, and the Hit that counts with it
                self._events[point] = itertools.count(self._events_now(point) + 1 + n)
                self._publish(point)

    def _compile(self, name: str) -> Hit:
        """The :data:`Hit` of point ``name`` for its faults now armed: the
        events no fault's match test takes are only counted, lock-free; the
        others are counted and decided under the lock (:meth:`_decide`)."""
        count = self._events[name].__next__
        tests = tuple(armed.test for armed in self._table[name])
        decide = self._decide

        if not tests:
            def counted(match: Mapping[str, Any]) -> Firing | None:
                count()
                return None
            return counted
        if None in tests:       # a fault takes every event
            return lambda match: decide(name, match)
        span = self._table[name][0].span if len(tests) == 1 else None
        if span is not None:
            key, lo, hi = span

            def one_span(match: Mapping[str, Any]) -> Firing | None:
                try:
                    value = match[key]
                except KeyError as e:
                    raise _missing(name, e) from None
                if lo <= value <= hi:
                    return decide(name, match)
                count()
                return None
            return one_span
        if len(tests) == 1:
            test = tests[0]
            assert test is not None

            def one(match: Mapping[str, Any]) -> Firing | None:
                try:
                    taken = test(match)
                except KeyError as e:
                    raise _missing(name, e) from None
                if taken:
                    return decide(name, match)
                count()
                return None
            return one

        def several(match: Mapping[str, Any]) -> Firing | None:
            try:
                for test in tests:
                    if test(match):         # type: ignore[misc]
                        return decide(name, match)
            except KeyError as e:
                raise _missing(name, e) from None
            count()
            return None
        return several

    def _decide(self, name: str, match: Mapping[str, Any]) -> Firing | None:
        """Count and decide an event some fault may take, with the faults
        armed at this moment."""
        lock = self._lock
        lock.acquire()          # (cheaper than a with statement, on every counted event)
        try:
            event = next(self._events[name])
            chosen: Firing | None = None
            for armed in self._table[name]:
                if armed.test is not None:
                    try:
                        if not armed.test(match):
                            continue
                    except KeyError as e:
                        raise _missing(name, e) from None
                status = armed.status
                count = status.events = status.events + 1
                if armed.left == 0 or not armed.selects(count):
                    continue
                if chosen is not None:
                    status.shadowed += 1
                    continue
                status.firings += 1
                if armed.left is not None:
                    armed.left -= 1
                fault = armed.fault
                chosen = self._firing(fault.name, name, event, count, fault.action, fault.params)
            if chosen is not None:
                self._pending[chosen.seq] = chosen
            return chosen
        finally:
            lock.release()

    def _firing(self, fault: str, point: str, event: int, count: int, action: str,
                params: Mapping[str, Any]) -> Firing:
        self._seq += 1
        return Firing(device=self.device, fault=fault, point=point, event=event, count=count, action=action,
                      params=params, seq=self._seq, t=time.monotonic_ns(), seed=self.seed, _engine=self)

    def _done(self, firing: Firing) -> None:
        with self._lock:
            self._pending.pop(firing.seq, None)
        if self.sink is not None:
            self.sink(firing.record())

    def flush(self) -> None:
        """Record the firings whose caller never called :meth:`Firing.done`
        (at teardown), with detail "(not reported)"."""
        with self._lock:
            pending, self._pending = list(self._pending.values()), {}
        for firing in sorted(pending, key=lambda f: f.seq):
            firing.done("(not reported)")

    # -- arming -----------------------------------------------------------

    def arm(self, fault: Fault) -> None:
        """Arm ``fault`` (validated: :func:`devices.faults.plan.parse_fault`)
        while running; its point's numbering starts now if it was not
        counted yet."""
        with self._all_counted():
            self._arm(fault)
            event = self._events_now(fault.point)
        for hook in self.on_change:
            hook()
        if self.sink is not None:
            self.sink({"type": "arm", "t": time.monotonic_ns(), "device": self.device, "fault": fault.name,
                       "point": fault.point, "event": event, "plan": fault.to_dict()})

    def _arm(self, fault: Fault) -> None:
        if fault.device != self.device:
            raise FaultError(f"fault {fault.name!r} is for device {fault.device!r}, not {self.device!r}")
        spec = self.points.get(fault.point)
        if spec is None:
            raise FaultError(f"fault {fault.name!r}: device {self.device!r} has no point {fault.point!r}")
        armed = _Armed(fault, spec, self.seed)
        with self._lock:
            if fault.name in self._faults:
                raise FaultError(f"fault {fault.name!r} is already armed on {self.device!r}")
            self._faults[fault.name] = armed
            self._events.setdefault(fault.point, itertools.count(1))
            self._table[fault.point] = self._table.get(fault.point, ()) + (armed,)
            self._publish(fault.point)

    def _publish(self, point: str) -> None:
        """Recompile ``point``'s :data:`Hit` and publish a new
        :attr:`armed` (the lock held)."""
        table = dict(self.armed)
        table[point] = self._compile(point)
        self.armed = table

    def disarm(self, name: str) -> FaultStatus:
        """Disarm the fault called ``name``; its final counters.  Its point
        keeps counting (so later event numbers stay those of the run)."""
        with self._all_counted(), self._lock:
            armed = self._faults.pop(name, None)
            if armed is None:
                raise FaultError(f"no fault {name!r} armed on {self.device!r}")
            point = armed.fault.point
            self._table[point] = tuple(a for a in self._table[point] if a is not armed)
            self._publish(point)
            event = self._events_now(point)
        for hook in self.on_change:
            hook()
        if self.sink is not None:
            self.sink({"type": "disarm", "t": time.monotonic_ns(), "device": self.device, "fault": name,
                       "point": point, "event": event})
        return armed.status

    # -- queries ----------------------------------------------------------

    def query(self) -> list[FaultStatus]:
        """Every armed fault's counters, in arm order (copies)."""
        with self._all_counted(), self._lock:
            return [dataclasses.replace(a.status) for a in self._faults.values()]

    def events(self, point: str) -> int:
        """How many events of ``point`` were counted (0 if never armed)."""
        with self._all_counted():
            return self._events_now(point)

    def _events_now(self, point: str) -> int:
        """:meth:`events` without handing over what is counted elsewhere."""
        counter = self._events.get(point)
        # An itertools.count shows its next value ("count(6)") without
        # taking it.
        return 0 if counter is None else int(repr(counter)[6:-1]) - 1

    def faults(self) -> list[Fault]:
        with self._lock:
            return [a.fault for a in self._faults.values()]


class ReplayEngine(FaultEngine):
    """An engine whose decisions come from a trace: the firing recorded for
    (this device, point, event number) fires again, with its fault name,
    action and parameters; nothing else does.  Triggers and match keys are
    not consulted, so the replay holds when the guest's timing (and so
    which request got which sector) differs.  :meth:`arm` is refused.

    ``firings`` are the recorded firings of this device
    (:meth:`devices.faults.trace.Trace.for_device`), ``seed`` the trace's
    (so :meth:`Firing.random` makes up the same bytes)."""

    def __init__(self, device: str, firings: Iterable[Mapping[str, Any]], *, seed: int = 0,
                 sink: Sink | None = None):
        super().__init__(device, seed=seed, sink=sink)
        self._script: dict[tuple[str, int], Mapping[str, Any]] = {}
        statuses: dict[str, FaultStatus] = {}
        for f in firings:
            if f["device"] != device:
                raise FaultError(f"replay of {device!r} given a firing of {f['device']!r}")
            key = (f["point"], f["event"])
            if key in self._script:
                raise FaultError(f"replay: two firings at {device}/{key[0]} event {key[1]}")
            self._script[key] = f
            self._events.setdefault(f["point"], itertools.count(1))
            if f["fault"] not in statuses:
                statuses[f["fault"]] = FaultStatus(_replayed_fault(f))
        self._statuses = statuses
        #: point -> its scripted event numbers, ascending (for :meth:`quiet`).
        self._scripted = {point: sorted(e for p, e in self._script if p == point) for point in self._events}
        self.armed = {point: self._replay_hit(point) for point in self._events}

    def _compile(self, name: str) -> Hit:
        return self._replay_hit(name)

    def _quiet_locked(self, point: str) -> Quiet:
        now = self._events_now(point)
        ahead = [e for e in self._scripted.get(point, ()) if e > now]
        return Quiet(None, (), ahead[0] - now - 1 if ahead else None)

    def _replay_hit(self, name: str) -> Hit:
        count = self._events[name].__next__
        script = self._script

        def hit(match: Mapping[str, Any]) -> Firing | None:
            event = count()
            f = script.get((name, event))
            return None if f is None else self._replayed(name, event, f)
        return hit

    def _replayed(self, name: str, event: int, f: Mapping[str, Any]) -> Firing:
        with self._lock:
            status = self._statuses[f["fault"]]
            status.events += 1
            status.firings += 1
            firing = self._firing(f["fault"], name, event, 0, f["action"], f["params"])
            self._pending[firing.seq] = firing
            return firing

    def arm(self, fault: Fault) -> None:
        raise FaultError(f"device {self.device!r} replays a trace: arming {fault.name!r} is refused")

    def disarm(self, name: str) -> FaultStatus:
        raise FaultError(f"device {self.device!r} replays a trace: disarming {name!r} is refused")

    def query(self) -> list[FaultStatus]:
        with self._all_counted(), self._lock:
            return [dataclasses.replace(s) for s in self._statuses.values()]

    def faults(self) -> list[Fault]:
        return [s.fault for s in self._statuses.values()]


def _replayed_fault(f: Mapping[str, Any]) -> Fault:
    """What a replay knows of a fault: its name, device, point, action and
    parameters; the trigger is the trace itself."""
    from devices.faults.plan import Fault

    return Fault(name=f["fault"], device=f["device"], point=f["point"], trigger="replay", arg=0, times=None,
                 action=f["action"], params=dict(f["params"]), match={})
