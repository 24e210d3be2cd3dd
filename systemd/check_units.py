#!/usr/bin/env python3
"""Check the unit files of systemd/ (``make check-units``; CI runs it).

1. ``systemd-analyze verify`` on an instance of every unit, with the
   examples' drop-ins, and FAIL on any line it prints: it exits 0 on
   warnings such as "Unknown key", so its output is the verdict.
2. ``systemd-analyze security --offline=yes``: the device service's
   overall exposure must be at most :data:`MAX_EXPOSURE`.

``verify`` also checks that every ``ExecStart=`` program exists and is
executable.  A fresh clone has no ``/opt/splitvmm``, and nothing here may
touch the host's systemd, so both commands run with ``--root`` on a
temporary tree: the host's own units (for ``sysinit.target`` and friends),
ours under ``etc/systemd/system``, the example configuration under
``etc/splitvmm``, and for each ``ExecStart=`` program a stand-in script --
after checking that it names one of the package's console scripts
(``[project.scripts]`` of pyproject.toml), installed under
:data:`INSTALL_BIN` as the README says.  No systemd instance is started.

Usage: check_units.py [--units DIR]   (DIR defaults to this script's folder)
"""

from __future__ import annotations

import argparse
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent
#: Where the README installs the package (python3 -m venv /opt/splitvmm).
INSTALL_BIN = "/opt/splitvmm/bin"
MAX_EXPOSURE = 1.0
#: The instances checked: every template, named as the examples name them.
INSTANCES = ("splitvmm-device@demo-blk.socket", "splitvmm-device@demo-blk.service",
             "splitvmm-device@demo-rng.service", "splitvmm-vm@demo.service")
SECURITY_UNIT = "splitvmm-device@demo-blk.service"
#: Where the host keeps its units (Debian: /usr/lib/systemd/system; /lib is a link).
HOST_UNITS = ("/usr/lib/systemd/system", "/lib/systemd/system")
_EXEC = re.compile(r"^\s*Exec\w+\s*=\s*[-@:+!]*(\S+)", re.M)
_EXPOSURE = re.compile(r"Overall exposure level for (\S+): (\d+(?:\.\d+)?)")


class CheckFailed(Exception):
    pass


def console_scripts() -> set[str]:
    with open(REPO / "pyproject.toml", "rb") as f:
        return set(tomllib.load(f)["project"]["scripts"])


def build_root(units: pathlib.Path, root: pathlib.Path) -> None:
    host = next((pathlib.Path(p) for p in HOST_UNITS if pathlib.Path(p).is_dir()), None)
    if host is None:
        raise CheckFailed(f"no host unit directory ({' or '.join(HOST_UNITS)})")
    shutil.copytree(host, root / "usr/lib/systemd/system", symlinks=True)
    system = root / "etc/systemd/system"
    system.mkdir(parents=True)
    unit_files = sorted(p for p in units.iterdir() if p.suffix in (".service", ".socket"))
    if not unit_files:
        raise CheckFailed(f"no unit files in {units}")
    scripts = console_scripts()
    for unit in unit_files:
        shutil.copy(unit, system / unit.name)
        for program in _EXEC.findall(unit.read_text()):
            path = pathlib.PurePosixPath(program)
            if str(path.parent) != INSTALL_BIN or path.name not in scripts:
                raise CheckFailed(f"{unit.name}: {program} is not one of the package's console scripts "
                                  f"in {INSTALL_BIN} ({', '.join(sorted(scripts))})")
            stand_in = root / program.lstrip("/")
            stand_in.parent.mkdir(parents=True, exist_ok=True)
            stand_in.write_text("#!/bin/sh\necho 'check_units.py stand-in: never run' >&2\nexit 1\n")
            stand_in.chmod(0o755)
    examples = units / "examples"
    if examples.is_dir():
        for item in examples.iterdir():
            if item.name.endswith(".d") and item.is_dir():
                shutil.copytree(item, system / item.name)
            elif item.is_dir():
                shutil.copytree(item, root / "etc/splitvmm" / item.name)


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise CheckFailed(f"{cmd[0]} is not installed (the unit checks need systemd's tools)") from None


def verify(root: pathlib.Path) -> None:
    cmd = ["systemd-analyze", "verify", f"--root={root}", "--man=no", *INSTANCES]
    r = run(cmd)
    lines = [line for line in (r.stdout + r.stderr).splitlines() if line.strip()]
    if r.returncode != 0 or lines:
        detail = "\n".join(f"  {line}" for line in lines) or "  (no output)"
        raise CheckFailed(f"systemd-analyze verify: status {r.returncode}, {len(lines)} line(s):\n{detail}")
    print(f"verify: {len(INSTANCES)} unit(s) clean: {', '.join(INSTANCES)}")


def security(root: pathlib.Path) -> float:
    cmd = ["systemd-analyze", "security", "--offline=yes", f"--root={root}", "--no-pager",
           f"--threshold={int(MAX_EXPOSURE * 10)}", SECURITY_UNIT]
    r = run(cmd)
    out = r.stdout + r.stderr
    m = _EXPOSURE.search(out)
    if m is None:
        raise CheckFailed(f"systemd-analyze security printed no overall exposure (status {r.returncode}):\n{out}")
    exposure = float(m.group(2))
    open_items = [line.strip() for line in out.splitlines() if line.lstrip().startswith("✗")]
    if exposure > MAX_EXPOSURE or r.returncode != 0:
        detail = "\n".join(f"  {line}" for line in open_items)
        raise CheckFailed(f"{SECURITY_UNIT}: exposure {exposure} (at most {MAX_EXPOSURE}; "
                          f"status {r.returncode}); open items:\n{detail}")
    print(f"security: {SECURITY_UNIT} exposure {exposure} (at most {MAX_EXPOSURE}); "
          f"{len(open_items)} open item(s): " + "; ".join(i.split()[1] for i in open_items))
    return exposure


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--units", type=pathlib.Path, default=HERE, help="folder of the units (default: systemd/)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="splitvmm-units-") as tmp:
        root = pathlib.Path(tmp)
        try:
            build_root(args.units.resolve(), root)
            verify(root)
            security(root)
        except CheckFailed as e:
            print(f"check-units: FAILED: {e}", file=sys.stderr)
            return 1
    print("check-units: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
