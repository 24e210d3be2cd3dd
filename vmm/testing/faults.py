"""Fault plans for the pytest plugin: where a test's plan (a path or a
dict in the plan's form) becomes a file ``vmm run --faults`` takes, and
how a machine is given it (``Machine.faults``, :mod:`vmm.faults`).

The one place the plugin touches the fault wiring of the machine.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from vmm.config import DeviceSpec

if TYPE_CHECKING:
    from vmm.machine import Machine

#: What a test may give as a plan.
PlanSource = str | os.PathLike[str] | Mapping[str, Any]


class FaultsUnavailable(Exception):
    """This build of splitvmm has no fault wiring on its machines."""


def plan_file(source: PlanSource, directory: pathlib.Path) -> pathlib.Path:
    """The plan as a file: a path as it is (made absolute), a dict written
    to ``directory/plan.json`` (``vmm run --faults`` reads ``.json`` as JSON)."""
    if isinstance(source, Mapping):
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "plan.json"
        path.write_text(json.dumps(dict(source), indent=2, sort_keys=True) + "\n")
        return path
    return pathlib.Path(source).resolve()


def configure(machine: Machine, specs: Sequence[DeviceSpec], plan: pathlib.Path, seed: int | None,
              trace: pathlib.Path) -> int:
    """Load ``plan`` (``seed`` instead of its own, if given), check it
    against the devices about to be added, and configure the machine's
    faults with the trace written to ``trace``; before any device is
    added.  Returns the seed in force.  Raises the plan's error
    (:class:`devices.faults.PlanError`), or :class:`FaultsUnavailable`."""
    faults = getattr(machine, "faults", None)
    if faults is None:
        raise FaultsUnavailable("this splitvmm has no fault injection on its machines (Machine.faults)")
    from devices.faults.plan import load_plan
    from vmm.faults import check_plan, device_points

    by_name = {spec.name: spec for spec in specs}
    loaded = load_plan(plan, devices=device_points(by_name), seed=seed)
    check_plan(loaded, by_name, source=str(plan))
    faults.configure(loaded, trace=str(trace), devices=list(by_name))
    return int(loaded.seed)
