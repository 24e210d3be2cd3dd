"""The pytest plugin (vmm.testing.plugin) as its users meet it: small test
projects written to a temporary directory and run by pytest in a
subprocess, with the plugin coming from its entry point."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import pytest

import vmm.testing.plugin

from ..conftest import needs_kvm

#: Whether this build has the fault wiring (Machine.faults, vmm.faults).
HAVE_FAULTS = importlib.util.find_spec("vmm.faults") is not None

GUEST = r"""
#include "guest.h"
#include "serial.h"

int guest_main(void)
{
    serial_init(COM1_BASE);
    serial_puts("hello from the guest\n");
    for (int i = 0; i < 8; i++)
        serial_printf("echo read %x\n", inl(0x1000));
    test_exit(5);
}
"""

NOISY = '''
import logging
from devices.echo import Echo

class Noisy(Echo):
    """The echo device, saying something in its log when it starts."""
    def start(self):
        logging.getLogger("noisy").warning("noisy: warming up on port %#x", 0x1000)
        super().start()
'''

PLAN = {"fault": [{"name": "odd", "device": "e", "point": "access", "dir": "read", "every": 2,
                   "action": "ones"}]}


def run_pytest(project: pathlib.Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args], cwd=project,
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def write(project: pathlib.Path, files: dict[str, str]) -> pathlib.Path:
    for name, text in files.items():
        (project / name).write_text(textwrap.dedent(text))
    return project


def sections(output: str) -> dict[str, str]:
    """A pytest failure report's sections: '---- title ----' and what follows."""
    out: dict[str, str] = {}
    parts = re.split(r"^-{3,} (.+?) -{3,}$", output, flags=re.M)
    for title, body in zip(parts[1::2], parts[2::2], strict=True):
        out[title.strip()] = body
    return out


def failing_project(tmp_path: pathlib.Path) -> pathlib.Path:
    faults = f"faults={PLAN!r}, seed=7," if HAVE_FAULTS else ""
    return write(tmp_path, {"guest.c": GUEST, "noisy.py": NOISY, "conftest.py": """
        import sys, pathlib
        sys.path.insert(0, str(pathlib.Path(__file__).parent))   # noisy:Noisy
    """, "test_fails.py": f"""
        def test_deliberately_fails(splitvmm, build_guest):
            vm = splitvmm(guest=build_guest(["guest.c"]), {faults}
                          devices=["noisy:Noisy,id=e,pio=0x1000", "virtio-rng,id=rng"])
            outcome = vm.run(timeout=120)
            vm.console.expect("echo read")
            assert outcome.status == 0, "this test fails on purpose"
    """})


@needs_kvm
def test_a_failure_reports_every_section_and_a_command_that_reproduces_it(tmp_path):
    project = failing_project(tmp_path)
    r = run_pytest(project)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "this test fails on purpose" in r.stdout
    got = sections(r.stdout)
    assert "hello from the guest" in got["splitvmm serial console"]
    assert got["splitvmm serial console"].count("echo read") == 8
    # each device's log: the model's own line in its process's log
    assert "noisy: warming up on port 0x1000" in got["splitvmm device log: e"]
    assert {"splitvmm device log: rng", "splitvmm device log: serial0"} <= set(got)
    # the queries at the end, as tables
    assert re.search(r"^e\s+noisy:Noisy\s+isolated\s+\d+\s+running", got["splitvmm query-devices"], re.M)
    assert re.search(r"^rng\s+virtio-rng", got["splitvmm query-devices"], re.M)
    assert re.search(r"^pio\s+0x1000\s+0x100\s+\d+\s+e\s", got["splitvmm query-regions"], re.M)
    assert "splitvmm fault trace" in got
    line = got["splitvmm reproduce"].strip()
    assert line.count("\n") == 0 and " run --guest " in line
    assert "--device noisy:Noisy,id=e,process=isolated,pio=0x1000" in line
    assert "--timeout 120" in line
    if HAVE_FAULTS:
        assert "--fault-seed 7" in line and "--faults " in line
        trace = got["splitvmm fault trace"]
        assert trace.count('"fault": "odd"') == 4 or trace.count('"fault":"odd"') == 4, trace
    else:
        assert "(no fault plan)" in got["splitvmm fault trace"]
    # the line runs the same guest with the same devices (its own model
    # found through the PYTHONPATH it sets), elsewhere: the same status
    assert line.startswith(f"PYTHONPATH={project} ")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PATH"] = f"{pathlib.Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    again = subprocess.run(line, shell=True, cwd=tmp_path.parent, capture_output=True, text=True, timeout=180,
                           stdin=subprocess.DEVNULL, env=env)
    assert again.returncode == 11, again.stderr          # test_exit(5)
    assert again.stdout.count("echo read") == 8


@needs_kvm
def test_keep_writes_everything_for_passing_tests(tmp_path):
    project = write(tmp_path / "p", {"guest.c": GUEST, "test_passes.py": """
        def test_passes(splitvmm, build_guest):
            vm = splitvmm(guest=build_guest(["guest.c"]), devices=["echo,id=e,pio=0x1000"])
            assert vm.run(timeout=120).status == 11
            vm.console.expect("hello from the guest")
    """}) if (tmp_path / "p").mkdir() is None else None
    keep = tmp_path / "kept"
    r = run_pytest(project, "--splitvmm-keep", str(keep))
    assert r.returncode == 0, r.stdout + r.stderr
    [machine] = list(keep.glob("*/machine1"))
    assert "test_passes" in machine.parent.name
    assert "hello from the guest" in (machine / "console.txt").read_text()
    assert (machine / "devices" / "e.log").exists() and (machine / "devices" / "serial0.log").exists()
    assert "pio" in (machine / "query-regions.txt").read_text()
    assert '"id": "e"' in (machine / "query-devices.json").read_text()
    assert f"--guest {machine / 'guest.elf'} " in (machine / "reproduce.sh").read_text()
    assert (machine / "faults.txt").read_text().strip() == "(no fault plan)"


SEEDED = """
    import pytest

    def test_seeded(fault_seed):
        print("seed", fault_seed)

    def test_unseeded():
        pass
"""


def test_seeds_parametrize_tests_that_use_fault_seed(tmp_path):
    write(tmp_path, {"test_seeds.py": SEEDED})
    r = run_pytest(tmp_path, "--collect-only", "-q", "--splitvmm-seeds", "3-5")
    assert r.returncode == 0, r.stdout + r.stderr
    ids = [line for line in r.stdout.splitlines() if "::" in line]
    assert ids == ["test_seeds.py::test_seeded[seed3]", "test_seeds.py::test_seeded[seed4]",
                   "test_seeds.py::test_seeded[seed5]", "test_seeds.py::test_unseeded"]
    r = run_pytest(tmp_path, "-q", "-s", "--splitvmm-seed", "9")
    assert r.returncode == 0 and "seed 9" in r.stdout and "2 passed" in r.stdout, r.stdout
    r = run_pytest(tmp_path, "-q", "-s")
    assert "seed None" in r.stdout and "2 passed" in r.stdout, r.stdout


@pytest.mark.parametrize("args, words", [
    (["--splitvmm-seeds", "5-3"], "5-3: 3 < 5"),
    (["--splitvmm-seeds", "7"], "not a range A-B"),
    (["--splitvmm-seed", "x"], "not a seed"),
    (["--splitvmm-seed", "1", "--splitvmm-seeds", "1-2"], "exclude each other"),
])
def test_bad_seed_options(tmp_path, args, words):
    write(tmp_path, {"test_seeds.py": SEEDED})
    r = run_pytest(tmp_path, "-q", *args)
    assert r.returncode == 4 and words in r.stderr, r.stderr


def test_without_kvm_machine_tests_skip_and_the_rest_runs(tmp_path):
    write(tmp_path, {"conftest.py": """
        import vmm.testing.plugin
        vmm.testing.plugin.KVM_DEVICE = "/nonexistent/kvm"     # a machine without KVM
    """, "test_mixed.py": """
        def test_needs_a_vm(splitvmm):
            splitvmm()

        def test_plain(build_guest):
            assert callable(build_guest)
    """})
    r = run_pytest(tmp_path, "-q", "-rs")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 passed, 1 skipped" in r.stdout
    assert "splitvmm: no usable /nonexistent/kvm on this machine" in r.stdout


def test_registered_once_through_its_entry_point(request):
    """The repository's own run gets the plugin from the entry point alone
    (a second registration would fail at start-up)."""
    assert request.config.pluginmanager.get_plugin("splitvmm") is vmm.testing.plugin
