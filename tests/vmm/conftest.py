"""Fixtures of the VMM tests: KVM presence, guests built once per session,
and a watch on /dev/shm."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

from vmm import guests

REPO = pathlib.Path(__file__).resolve().parents[2]
GUEST_SOURCES = REPO / "tests" / "guests"

needs_kvm = pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK),
                               reason="no usable /dev/kvm on this machine")


@pytest.fixture(scope="session")
def guest_cache(tmp_path_factory) -> pathlib.Path:
    return tmp_path_factory.mktemp("guests")


@pytest.fixture(scope="session")
def guest(guest_cache):
    """guest("echo") -> path of tests/guests/echo.c built as a PVH ELF."""
    def build(name: str) -> pathlib.Path:
        return guests.build([GUEST_SOURCES / f"{name}.c"], guest_cache)
    return build


def shm_segments() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith("splitvmm-")}


def vmm_run(*args: str, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    """``vmm run ARGS`` as a separate process (the real exit status); stdin
    is /dev/null unless given (so a run never takes the terminal of the
    person running the tests into raw mode, see vmm.console)."""
    if "input" not in kw:
        kw.setdefault("stdin", subprocess.DEVNULL)
    return subprocess.run([sys.executable, "-m", "vmm.cli", "run", *args], capture_output=True,
                          text=True, timeout=timeout, **kw)

