"""Fault points in a device model: the mixin :class:`devices.base.Device`
takes, so every model (the built-in ones and a user's) has ``fault_point``.

A model gets the points ``access`` and ``process`` for free: its host (the
device runtime, inline or in a device process) hits them around each
access it serves.  A model's other points are named in its class attribute
``fault_points``: a mapping of point name to :class:`~devices.faults.table.PointSpec`,
the table's own entries for built-in points, a new spec for a point of its
own.  Writing a model with a point of its own::

    from devices.base import Device
    from devices.faults import ActionSpec, Int, Number, PointSpec, POINTS

    class Watchdog(Device):
        kind = "my-watchdog"
        fault_points = {
            "irq": POINTS["irq"],                     # a built-in point it also raises
            "watchdog.kick": PointSpec(               # a point of its own
                events="each kick the guest writes",
                match={"value": Int(0, 0xFFFF)},      # keys each event carries, for plans to match
                actions={
                    "ignore": ActionSpec("the kick is not seen"),
                    "late": ActionSpec("the kick is seen ms late", {"ms": Number(0, 10_000)}),
                }),
        }

        def write(self, space, cookie, offset, size, value):
            firing = self.fault_point("watchdog.kick", value=value)
            if firing is not None and firing.action == "ignore":
                firing.done(f"kick {value:#x} ignored")
                return
            ...

and a plan arms it like any other point (``point = "watchdog.kick"``,
``action = "late"``, ``ms = 50``, ``value = 7``).  The names of the own
points should carry the model's prefix (``watchdog.``); parameters and match
keys may not reuse a plan's own keys (``name``, ``device``, ``nth`` ...):
:func:`~devices.faults.table.check_points` checks the class when it is
defined.

``fault_point`` returns None unless the host attached an engine with a
fault armed at that point; otherwise a :class:`~devices.faults.engine.Firing`
the model applies and reports with :meth:`~devices.faults.engine.Firing.done`.
Its cost with nothing armed: a method call and one dict test; a hot path may
test ``name in self.fault_engine.armed`` itself first.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from devices.faults.engine import FaultEngine, Firing
from devices.faults.table import COMMON_POINTS, POINTS, PointSpec, TableError, check_points


class _SilentEngine(FaultEngine):
    """The engine of a model its host gave none: nothing is ever armed."""

    def __init__(self) -> None:
        super().__init__("(none)", points={})

    def _arm(self, fault: Any) -> None:
        raise TableError("this model has no fault engine attached (FaultPoints.attach_faults)")

    def counted_elsewhere(self, lock: Any, hand_over: Any) -> None:
        pass            # shared by every model, and nothing is counted here


#: Shared by every model without an engine; it cannot be armed.
SILENT = _SilentEngine()


class FaultPoints:
    """Mixin of device models: the points a model has and the hook to hit
    them.  The host calls :meth:`attach_faults` with the device's engine
    (built with ``points=type(model).all_fault_points()``) before the guest
    runs."""

    #: The model's points besides ``access`` and ``process``.
    fault_points: ClassVar[Mapping[str, PointSpec]] = {}
    #: The engine hits go to.
    fault_engine: FaultEngine = SILENT

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("fault_points")
        if own is not None:
            for name in COMMON_POINTS:
                if name in own and own[name] is not POINTS[name]:
                    raise TableError(f"{cls.__name__}: point {name!r} is every model's; do not redefine it")
            check_points(own)

    @classmethod
    def all_fault_points(cls) -> dict[str, PointSpec]:
        """Every point the model has: ``access``, ``process`` and its own
        (what the plan parser takes as that device's points)."""
        points = {name: POINTS[name] for name in COMMON_POINTS}
        points.update(cls.fault_points)
        return points

    def attach_faults(self, engine: FaultEngine) -> None:
        """Send this model's hits to ``engine`` (the host, once)."""
        self.fault_engine = engine

    def fault_point(self, name: str, /, **match: Any) -> Firing | None:
        """One event at point ``name`` with its match values; the firing to
        apply, or None (nothing armed there, or nothing fires)."""
        armed = self.fault_engine.armed
        if name not in armed:
            return None
        return armed[name](match)
