"""``--device MODULE:CLASS`` through the real ``vmm run`` command: a type
that names no usable model gives one line and status 2 before any guest
starts (a model that works, in both placements, is examples/counter_device)."""

from __future__ import annotations

import os

import pytest

from tests.vmm.conftest import needs_kvm, vmm_run

OWN = "tests.vmm.own_models"


@pytest.mark.parametrize("kind, words", [
    ("no_such_module_at_all:Dev", "cannot import no_such_module_at_all: ModuleNotFoundError"),
    (f"{OWN}:Missing", f"module {OWN} has no Missing"),
    (f"{OWN}:NotADevice", "is not a subclass of devices.base.Device"),
    (f"{OWN}:not_a_class", "is not a subclass of devices.base.Device"),
    (f"{OWN}:NoRead", "is abstract (no read)"),
    (f"{OWN}:Crashes", "rejects its parameters: ZeroDivisionError"),
    ("tests.testkinds:IrqEcho", "pio= is required"),
    ("echo:", "is not MODULE:CLASS"),
    ("explodes_at_import:Dev", "cannot import explodes_at_import: RuntimeError: boom at import"),
])
def test_unusable_model_class(kind, words, tmp_path, guest):
    # A module of the user's own, on PYTHONPATH, whose import raises.
    (tmp_path / "explodes_at_import.py").write_text('raise RuntimeError("boom at import")\n')
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    # The hello guest would end with status 0 if it ever ran.
    r = vmm_run("--guest", str(guest("hello")), "--device", kind, env=env)
    err = r.stderr
    assert r.returncode == 2, err
    assert err.count("\n") == 1 and err.startswith("vmm: ") and words in err, err


@needs_kvm
@pytest.mark.parametrize("placement", ["isolated", "inline"])
def test_a_kind_registered_by_an_installed_distribution(placement, tmp_path, guest):
    # A package of the user's own, installed (a .dist-info on the path) with
    # an entry point in splitvmm.devices: `--device own-echo` names its class,
    # in the VMM and in the device process (forked from the fork server).
    (tmp_path / "own_echo_mod.py").write_text(
        "from devices.echo import Echo\n\n\nclass OwnEcho(Echo):\n    kind = \"own-echo\"\n")
    info = tmp_path / "own_echo_dist-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: own-echo-dist\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[splitvmm.devices]\nown-echo = own_echo_mod:OwnEcho\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    r = vmm_run("--guest", str(guest("echo")), "--serial", "none",
                "--cmdline", "pio=0x1000 mmio=0xd0000000 free_pio=0x3000 free_mmio=0xd0100000",
                "--device", f"own-echo,id=mine,pio=0x1000,mmio=0xd0000000,process={placement}", env=env)
    assert r.returncode == 0, r.stderr          # every check of tests/guests/echo.c passed
    assert "mine: pid" in r.stderr and ("own process" in r.stderr) == (placement == "isolated"), r.stderr
