"""The counter example (README, "Writing a device model") on real KVM,
through the real ``vmm run`` command, inline and in a device process.
The model is found as ``counter_device:Counter`` on PYTHONPATH, as a model
of one's own outside this repository would be, and the run happens in a
directory of its own, not here."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

from vmm import guests

HERE = pathlib.Path(__file__).resolve().parent
needs_kvm = pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK),
                               reason="no usable /dev/kvm on this machine")


@pytest.fixture(scope="module")
def counter_guest(tmp_path_factory) -> pathlib.Path:
    return guests.build([HERE / "guest.c"], tmp_path_factory.mktemp("counter-guest"))


def vmm_run(*args: str, cwd: pathlib.Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vmm.cli", "run", "--timeout", "60", *args],
                          env={**os.environ, "PYTHONPATH": str(HERE)}, cwd=cwd, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=120)


@needs_kvm
@pytest.mark.parametrize("placement", ["inline", "isolated"])
def test_counter_in_both_placements(counter_guest, placement, tmp_path):
    r = vmm_run("--guest", str(counter_guest), "--serial", "none",
                "--device", f"counter_device:Counter,pio=0x530,process={placement}",
                "--cmdline", "pio=0x530 n=1000", cwd=tmp_path)
    assert r.returncode == 0, r.stderr       # every check of guest.c passed
    # the summary names who served it: the VMM inline, a process of its own isolated
    m = re.search(r"VMM pid (\d+); counter0: pid (\d+)", r.stderr)
    assert m is not None, r.stderr
    assert (m.group(1) == m.group(2)) == (placement == "inline"), r.stderr


@pytest.mark.parametrize("params, words", [
    ("pio=0xfff8", "does not fit"),
    ("colour=red", "unknown parameter"),
])
def test_counter_rejects_bad_parameters(params, words, tmp_path):
    r = vmm_run("--guest", "/nonexistent.elf", "--device", f"counter_device:Counter,{params}", cwd=tmp_path)
    assert r.returncode == 2 and words in r.stderr, r.stderr
