"""What the pytest plugin knows of each machine a test made, and what it
reports: the serial console, each device's log, the fault trace,
``query-devices`` and ``query-regions``, and the ``vmm run`` command line
that reproduces the run -- as report sections of a failed test, and as
files (``--splitvmm-keep DIR``)."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shlex
import sys
from typing import TYPE_CHECKING

from vmm.config import DeviceSpec

if TYPE_CHECKING:
    from vmm.machine import Machine

#: A section longer than this is cut to its end (the end is what failed).
MAX_SECTION = 64 * 1024


@dataclasses.dataclass
class MachineRecord:
    """One machine of a test and how it was made."""

    machine: Machine
    #: 1, 2, ... in the order the test made them.
    index: int
    #: Where its files go (device logs live there from the start).
    directory: pathlib.Path
    guest: pathlib.Path | None = None
    cmdline: str = ""
    memory: str = ""
    vcpus: int = 1
    serial: str = "capture"
    plan: pathlib.Path | None = None
    seed: int | None = None
    trace: pathlib.Path | None = None

    # -- what is reported -----------------------------------------------------

    def command(self) -> str:
        """One line of ``vmm run`` that runs the same guest with the same
        devices, plan and seed."""
        m = self.machine
        roots = _import_roots(m.device_specs.values())
        env = [f"PYTHONPATH={os.pathsep.join(roots)}"] if roots else []
        args = env + ([sys.executable, "-m", "vmm.cli", "run"] if _no_vmm_script() else ["vmm", "run"])
        args += ["--guest", str(self.guest) if self.guest else "GUEST.elf"]
        if self.memory:
            args += ["--memory", self.memory]
        if self.vcpus != 1:
            args += ["--vcpus", str(self.vcpus)]
        if self.cmdline:
            args += ["--cmdline", self.cmdline]
        for _owner, spec in sorted(m.device_specs.items()):
            if spec is not m.default_serial:
                args += ["--device", spec_text(spec)]
        if self.serial == "none":
            args += ["--serial", "none"]
        if self.plan is not None:
            args += ["--faults", str(self.plan)]
            if self.seed is not None:
                args += ["--fault-seed", str(self.seed)]
        if m.run_timeout is not None:
            args += ["--timeout", f"{m.run_timeout:g}"]
        return shlex.join(args)

    def console(self) -> str:
        c = self.machine.console
        if c is None:
            return "(no console: serial=\"none\")"
        if c.mode.kind != "capture":
            return f"(console not captured: serial={c.mode})"
        return c.text

    def device_logs(self) -> list[tuple[str, str]]:
        out = []
        for _owner, spec in sorted(self.machine.device_specs.items()):
            path = self.machine.device_logs.get(spec.name)
            if path is None:
                out.append((spec.name, f"({spec.placement}: its log is the VMM's, in the captured log)"))
                continue
            try:
                text = path.read_text(errors="replace")
            except OSError as e:
                text = f"(cannot read {path}: {e.strerror})"
            out.append((spec.name, text or "(empty)"))
        return out

    def fault_trace(self) -> str:
        """The plan, the seed, the firings per fault and every trace record
        so far (from the machine: the trace file is complete only once the
        machine is closed)."""
        if self.plan is None:
            return "(no fault plan)"
        faults = getattr(self.machine, "faults", None)
        head = f"plan {self.plan}, seed {self.seed}\n"
        if faults is None:
            return head + "(this machine has no fault wiring)"
        head += f"{faults.summary() or 'no firings'}\n"
        records = faults.trace()
        return head + ("\n".join(json.dumps(r, sort_keys=True) for r in records) if records else "(no records)")

    def query(self, command: str) -> tuple[str, object]:
        """(table text, JSON value) of a query command, now."""
        from vmm.qmp.commands import COMMANDS
        from vmm.qmp.ctl import format_tables

        try:
            value = self.machine.qmp(command)
        except Exception as e:  # the machine may be half torn down; say so in the report
            return f"({command} failed: {type(e).__name__}: {e})", None
        table = COMMANDS[command].table
        return (format_tables(table(value)) if table is not None else json.dumps(value, indent=2)), value

    def sections(self, many: bool) -> list[tuple[str, str]]:
        """The report sections of this machine (titles say which machine
        when the test made several)."""
        tag = f" [machine {self.index}]" if many else ""
        out = [(f"splitvmm serial console{tag}", self.console())]
        out += [(f"splitvmm device log: {name}{tag}", text) for name, text in self.device_logs()]
        out.append((f"splitvmm fault trace{tag}", self.fault_trace()))
        out.append((f"splitvmm query-devices{tag}", self.query("query-devices")[0]))
        out.append((f"splitvmm query-regions{tag}", self.query("query-regions")[0]))
        out.append((f"splitvmm reproduce{tag}", self.command()))
        return [(title, _cut(text)) for title, text in out]

    def save(self) -> None:
        """Everything of :meth:`sections` as files in :attr:`directory`
        (device logs are there already, under devices/)."""
        d = self.directory
        d.mkdir(parents=True, exist_ok=True)
        c = self.machine.console
        if c is not None and c.mode.kind == "capture":
            (d / "console.txt").write_bytes(c.data)
        for command in ("query-devices", "query-regions"):
            text, value = self.query(command)
            (d / f"{command}.txt").write_text(text + "\n")
            if value is not None:
                (d / f"{command}.json").write_text(json.dumps(value, indent=2) + "\n")
        (d / "faults.txt").write_text(self.fault_trace() + "\n")
        (d / "reproduce.sh").write_text(f"#!/bin/sh\n{self.command()}\n")


def spec_text(spec: DeviceSpec) -> str:
    """A spec as ``--device`` text (with its id, placement or service
    socket, and every parameter, the PCI slot included)."""
    where = [f"connect={spec.connect}" if spec.connect is not None else f"process={spec.placement}"]
    if spec.placement != "inline":
        where += [f"{k}={v}" for k, v, default in (("sandbox", spec.sandbox, "strict"),
                                                    ("seccomp", spec.seccomp, "kill")) if v != default]
    return ",".join([spec.kind, f"id={spec.name}", *where, *(f"{k}={v}" for k, v in spec.params)])


def _import_roots(specs) -> list[str]:
    """Where the ``MODULE:CLASS`` models of these specs were imported from
    (a ``vmm run`` elsewhere needs them on PYTHONPATH)."""
    from devices import kinds

    roots: list[str] = []
    for spec in specs:
        if kinds.is_qualified(spec.kind):
            try:
                root = kinds.import_root(kinds.resolve(spec.kind))
            except kinds.ModelNotFound:
                continue
            if root is not None and root not in roots:
                roots.append(root)
    return roots


def _cut(text: str) -> str:
    if len(text) <= MAX_SECTION:
        return text
    return f"[... {len(text) - MAX_SECTION} characters cut ...]\n" + text[-MAX_SECTION:]


def _no_vmm_script() -> bool:
    """Whether ``vmm`` is not on PATH (then the module form is given)."""
    import shutil
    return shutil.which("vmm") is None
