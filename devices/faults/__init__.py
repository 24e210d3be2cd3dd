"""Fault injection for device models: seeded, replayable fault plans.

The parts, each its own module, all placement-independent (this package
imports nothing of :mod:`vmm`, :mod:`ipc` or :mod:`devserver`; an engine runs
where its device runs, inline or in a device process):

- :mod:`~devices.faults.table` -- :data:`POINTS`, the one table of points,
  their match keys, actions and parameters.
- :mod:`~devices.faults.plan` -- the plan (TOML, or the same fields as JSON
  for QMP ``fault-arm``), validated completely, with a digest.
- :mod:`~devices.faults.engine` -- :class:`FaultEngine`, one per device:
  triggers, firings, arm/disarm, counters; :class:`ReplayEngine`.
- :mod:`~devices.faults.trace` -- the JSON Lines trace: write, read, merge,
  digest.
- :mod:`~devices.faults.hook` -- :class:`FaultPoints`, the model side
  (``fault_point``) and how a model declares points of its own.
- :mod:`~devices.faults.apply` -- what a firing does at the points a host
  serves (``access``, ``process``, ``irq``, the byte streams), shared by
  the inline endpoint and the device-process runtime.

Wiring, in short: the VMM loads the plan once
(``load_plan(path, devices={id: Model.all_fault_points()}, seed=override)``),
hands each device ``plan.for_device(id)``, ``plan.seed`` and ``plan.digest``;
the device's host builds ``FaultEngine(id, faults, seed=..., points=...,
sink=TraceWriter(...))`` (or ``ReplayEngine(id, read_trace(t).for_device(id))``
for ``--fault-replay``) and ``model.attach_faults(engine)``.  In this tree
:mod:`vmm.faults` does the VMM's part and sends an isolated device its
share in a ``FaultControl`` message; records come back as ``FaultFired``.
"""

from typing import TYPE_CHECKING

from devices.lazy import lazy_exports

__all__ = [
    "ActionSpec", "COMMON_POINTS", "Choice", "Devices", "Fault", "FaultEngine", "FaultError", "FaultPoints",
    "FaultStatus", "Firing", "Int", "Number", "POINTS", "Plan", "PlanError", "PointSpec", "ReplayEngine", "SILENT",
    "Sink", "Span", "TableError", "Trace", "TraceError", "TraceWriter", "canonical_json", "check_points",
    "load_plan", "loads_plan", "merge_traces", "next_name", "parse_fault", "parse_plan", "read_trace",
    "trace_digest", "uniform64",
]

if TYPE_CHECKING:
    from devices.faults.engine import FaultEngine, FaultStatus, Firing, ReplayEngine, Sink, uniform64
    from devices.faults.hook import SILENT, FaultPoints
    from devices.faults.plan import (
        Devices, Fault, Plan, PlanError, canonical_json, load_plan, loads_plan, next_name, parse_fault,
        parse_plan,
    )
    from devices.faults.table import (
        COMMON_POINTS, POINTS, ActionSpec, Choice, FaultError, Int, Number, PointSpec, Span, TableError,
        check_points,
    )
    from devices.faults.trace import Trace, TraceError, TraceWriter, merge_traces, read_trace, trace_digest

# The names above, imported from their module when first asked for: every
# device model imports the engine and the hook (devices.base), and a run
# without a plan needs neither the plan parser nor the trace (start-up,
# issue 15).
_MODULE_OF = {
    **dict.fromkeys(("FaultEngine", "FaultStatus", "Firing", "ReplayEngine", "Sink", "uniform64"), "engine"),
    **dict.fromkeys(("SILENT", "FaultPoints"), "hook"),
    **dict.fromkeys(("Devices", "Fault", "Plan", "PlanError", "canonical_json", "load_plan", "loads_plan",
                     "next_name", "parse_fault", "parse_plan"), "plan"),
    **dict.fromkeys(("COMMON_POINTS", "POINTS", "ActionSpec", "Choice", "FaultError", "Int", "Number",
                     "PointSpec", "Span", "TableError", "check_points"), "table"),
    **dict.fromkeys(("Trace", "TraceError", "TraceWriter", "merge_traces", "read_trace", "trace_digest"),
                    "trace"),
}


__getattr__, __dir__ = lazy_exports(globals(), _MODULE_OF)
