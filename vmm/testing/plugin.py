"""The pytest plugin ``splitvmm`` (entry point ``pytest11``): VMs for
people's own guest-driver and device-model tests.

* ``splitvmm(guest=..., devices=[...], faults=..., vcpus=1, memory="64M",
  cmdline="", seed=None, serial="capture", **machine_options)`` -- a
  factory fixture returning a :class:`vmm.Machine` with the guest loaded
  and the devices added (not started: ``machine.run(timeout)`` or
  ``machine.start()``); every machine is closed at teardown, pass or fail.
* ``build_guest(["guest.c", ...], name=None, defines=None)`` -- a
  freestanding test guest built with the project's guest library
  (:mod:`vmm.guests`: the runtime and the serial, PCI and virtio drivers;
  paths relative to the test file), cached for the session; returns the
  ELF's path.
* ``@pytest.mark.splitvmm_faults(PLAN)`` -- a plan file's path or a dict in
  the plan's form, for every machine of the test without ``faults=``.
* ``fault_seed`` -- the seed of ``--splitvmm-seed N`` or, with
  ``--splitvmm-seeds A-B``, one per run of the test (``[seed3]`` in its
  id); None without either (the plan's own seed).  Machines of the test
  use it unless given ``seed=``.
* Without a usable ``/dev/kvm`` a test using ``splitvmm`` is skipped,
  with that reason.
* A failed test's report gets, per machine: the serial console, each
  device's log, the fault trace, ``query-devices`` and ``query-regions``
  at the end, and the ``vmm run`` line that reproduces it.
  ``--splitvmm-keep DIR`` keeps all of it on disk for every test.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import shutil
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import pytest

from vmm.testing import faults as plans
from vmm.testing.report import MachineRecord

#: The KVM device whose absence skips the tests.
KVM_DEVICE = "/dev/kvm"

_RECORDS = pytest.StashKey[list[MachineRecord]]()


def kvm_reason() -> str | None:
    """Why VMs cannot run here, or None when they can."""
    if not os.access(KVM_DEVICE, os.R_OK | os.W_OK):
        return f"splitvmm: no usable {KVM_DEVICE} on this machine"
    return None


# -- options and markers -------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("splitvmm", "splitvmm virtual machines")
    group.addoption("--splitvmm-seed", type=_seed, metavar="N", default=None,
                    help="the fault seed of every machine (fixture fault_seed)")
    group.addoption("--splitvmm-seeds", type=_seed_range, metavar="A-B", default=None,
                    help="run each test that uses fault_seed once per seed from A to B")
    group.addoption("--splitvmm-keep", metavar="DIR", default=None,
                    help="keep console, device logs, fault trace, queries and the reproducing command "
                         "of every machine in DIR, for passing tests too")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "splitvmm_faults(plan): the fault plan (a path, or a dict in the plan's "
                                       "form) of every machine this test makes")
    if config.getoption("--splitvmm-seed") is not None and config.getoption("--splitvmm-seeds") is not None:
        raise pytest.UsageError("--splitvmm-seed and --splitvmm-seeds exclude each other")


def _seed(text: str) -> int:
    try:
        n = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a seed (an integer)") from None
    if not 0 <= n < 2**64:
        raise argparse.ArgumentTypeError(f"seed {text} is not in 0..2**64-1")
    return n


def _seed_range(text: str) -> range:
    a, sep, b = text.partition("-")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r} is not a range A-B")
    lo, hi = _seed(a), _seed(b)
    if hi < lo:
        raise argparse.ArgumentTypeError(f"seed range {text}: {hi} < {lo}")
    if hi - lo >= 10_000:
        raise argparse.ArgumentTypeError(f"seed range {text}: more than 10000 seeds")
    return range(lo, hi + 1)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "fault_seed" not in metafunc.fixturenames:
        return
    config = metafunc.config
    seeds = config.getoption("--splitvmm-seeds")
    one = config.getoption("--splitvmm-seed")
    if seeds is None and one is not None:
        seeds = [one]
    if seeds is not None:
        metafunc.parametrize("fault_seed", list(seeds), ids=[f"seed{s}" for s in seeds])


@pytest.fixture
def fault_seed() -> int | None:
    """The seed of this run (None: the plan's own; see --splitvmm-seed[s])."""
    return None


# -- guests ----------------------------------------------------------------------


@pytest.fixture(scope="session")
def _splitvmm_guest_cache(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return tmp_path_factory.mktemp("splitvmm-guests")


@pytest.fixture
def build_guest(request: pytest.FixtureRequest, _splitvmm_guest_cache: pathlib.Path):
    """build_guest(["guest.c", ...], name=None, defines=None) -> ELF path."""
    from vmm import guests

    base = request.path.parent

    def build(sources: Sequence[str | os.PathLike[str]] | str | os.PathLike[str], name: str | None = None,
              defines: Mapping[str, object] | None = None) -> pathlib.Path:
        if isinstance(sources, (str, os.PathLike)):
            sources = [sources]
        paths = [p if p.is_absolute() else base / p for p in map(pathlib.Path, sources)]
        return guests.build([*paths, *guests.LIBRARY], _splitvmm_guest_cache, name=name or paths[0].stem,
                            defines=defines)
    return build


# -- machines ----------------------------------------------------------------------


def _node_dir(node: pytest.Item) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", node.nodeid).strip("_")[:200]


@pytest.fixture
def splitvmm(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """splitvmm(guest=..., devices=[...], faults=..., vcpus=1, memory="64M") -> Machine."""
    reason = kvm_reason()
    if reason is not None:
        pytest.skip(reason)
    from vmm.config import parse_device_spec
    from vmm.machine import Machine

    records: list[MachineRecord] = []
    request.node.stash[_RECORDS] = records
    keep = request.config.getoption("--splitvmm-keep")
    marker = request.node.get_closest_marker("splitvmm_faults")
    test_seed = request.node.callspec.params.get("fault_seed") if hasattr(request.node, "callspec") else None
    if test_seed is None:
        test_seed = request.config.getoption("--splitvmm-seed")

    def make(guest: str | os.PathLike[str] | bytes | None = None, devices: Sequence[str] = (),
             faults: plans.PlanSource | None = None, vcpus: int = 1, memory: str | int = "64M",
             cmdline: str = "", seed: int | None = None, serial: str = "capture", **options: Any) -> Machine:
        index = len(records) + 1
        if keep is not None:
            directory = pathlib.Path(keep).resolve() / _node_dir(request.node) / f"machine{index}"
            directory.mkdir(parents=True, exist_ok=True)
        else:
            directory = tmp_path_factory.mktemp(f"splitvmm-m{index}")
        if faults is None and marker is not None:
            if len(marker.args) != 1:
                raise pytest.UsageError("splitvmm_faults takes one argument: a plan's path or a dict")
            faults = marker.args[0]
        if seed is None:
            seed = test_seed
        taken: set[str] = set()
        specs = [parse_device_spec(text, taken) for text in devices]
        machine = Machine(memory=memory, vcpus=vcpus, serial=serial, log_dir=directory / "devices", **options)
        record = MachineRecord(machine, index, directory, cmdline=cmdline,
                               memory=memory if isinstance(memory, str) else str(memory), vcpus=vcpus,
                               serial=serial)
        records.append(record)      # closed at teardown from here on, whatever fails next
        if isinstance(guest, bytes):
            record.guest = directory / "guest.elf"
            record.guest.write_bytes(guest)
        elif guest is not None and keep is not None:    # kept with the rest: the command stays true
            record.guest = directory / "guest.elf"
            shutil.copyfile(guest, record.guest)
        elif guest is not None:
            record.guest = pathlib.Path(guest).resolve()
        specs = machine.with_default_serial(specs)      # COM1 too, so that a plan may name it
        if faults is not None:
            record.plan = plans.plan_file(faults, directory)
            record.trace = directory / "faults.jsonl"
            try:
                record.seed = plans.configure(machine, specs, record.plan, seed, record.trace)
            except plans.FaultsUnavailable as e:
                pytest.skip(str(e))
        if record.guest is not None:
            machine.load(record.guest, cmdline)
        for spec in specs:
            machine.add_device(spec)
        return machine

    yield make
    errors = []
    for record in records:
        try:
            record.machine.close()
        except Exception as e:      # close the others all the same
            errors.append(e)
    if errors:
        raise errors[0]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):
    outcome = yield
    report = outcome.get_result()
    records = item.stash.get(_RECORDS, None)
    if not records or report.when != "call":
        return
    keep = item.config.getoption("--splitvmm-keep") is not None
    if report.failed:
        for record in records:
            for title, text in record.sections(len(records) > 1):
                report.sections.append((title, text))
    if report.failed or keep:
        for record in records:
            record.save()
        if report.failed:
            report.sections.append(("splitvmm files", "\n".join(str(r.directory) for r in records)))
