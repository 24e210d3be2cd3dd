"""examples/python_api/run_demo.py runs as a user runs it, and says what
the guest did."""

import os
import pathlib
import subprocess
import sys

import pytest

HERE = pathlib.Path(__file__).resolve().parent


@pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="no usable /dev/kvm on this machine")
def test_run_demo(tmp_path):
    r = subprocess.run([sys.executable, str(HERE / "run_demo.py")], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300, stdin=subprocess.DEVNULL,
                       env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "the guest read " in r.stdout and "the guest verified sectors" in r.stdout
    assert "power off" in r.stdout and "vmm run would exit with 0" in r.stdout
    disk = r.stdout.split("the guest verified sectors ")[1].split(" of ")[1].split()[0]
    assert disk.endswith(".img") and not os.path.exists(disk)     # the scratch image went with the machine
