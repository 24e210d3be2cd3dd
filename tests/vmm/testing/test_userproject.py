"""examples/userproject run as its user runs it: ``pytest`` in its own
directory, the plugin found through its entry point, a seed sweep on the
command line."""

from __future__ import annotations

import pathlib
import subprocess
import sys

from ..conftest import REPO, needs_kvm

PROJECT = REPO / "examples" / "userproject"


@needs_kvm
def test_the_user_project_passes_through_the_plugin(tmp_path: pathlib.Path):
    r = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-v", "--splitvmm-seeds", "1-3",
                        "--basetemp", str(tmp_path / "t")], cwd=PROJECT, capture_output=True, text=True,
                       timeout=900, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"rootdir: {PROJECT}" in r.stdout          # its own project, not this repository's run
    for seed in (1, 2, 3):
        assert f"test_driver_retries_glitches[seed{seed}]" in r.stdout
    assert "test_driver_reads_every_sample[isolated] PASSED" in r.stdout
    assert "test_in_the_background PASSED" in r.stdout
