"""``--device MODULE:CLASS`` through the real ``vmm run`` command: a type
that names no usable model gives one line and status 2 before any guest
starts (a model that works, in both placements, is examples/counter_device)."""

from __future__ import annotations

import os

import pytest

from tests.vmm.conftest import vmm_run

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
