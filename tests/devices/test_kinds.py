"""devices.kinds: the one table of ``--device`` kinds (entry points of
``splitvmm.devices``) and ``MODULE:CLASS`` models."""

from __future__ import annotations

import importlib
import pathlib
import sys

import pytest

from devices import kinds
from devices.base import Device
from devices.echo import Echo

BUILT_IN = {"echo", "pci-echo", "serial", "virtio-rng", "virtio-blk", "virtio-console"}


def test_the_built_in_kinds_are_entry_points_named_after_their_class():
    table = kinds.kinds()
    assert BUILT_IN <= set(table), table
    for name in BUILT_IN:
        cls = kinds.resolve(name)
        assert issubclass(cls, Device) and cls.kind == name
        assert table[name] == f"{cls.__module__}:{cls.__qualname__}"


def test_module_class_names_the_same_class_as_the_kind():
    assert kinds.resolve("devices.echo:Echo") is Echo is kinds.resolve("echo")
    assert kinds.is_qualified("devices.echo:Echo") and not kinds.is_qualified("echo")


@pytest.mark.parametrize("kind, words", [
    ("nosuch", "unknown device type 'nosuch'"),
    ("no.such.module:X", "cannot import no.such.module: ModuleNotFoundError"),
    ("devices.echo:Nope", "has no Nope"),
    ("devices.echo:ECHO_PID", "is not a subclass of devices.base.Device"),
    ("devices.base:Device", "is abstract"),
    ("devices.echo:", "is not MODULE:CLASS"),
    ("a b:C", "is not MODULE:CLASS"),
])
def test_what_is_not_a_model(kind, words):
    with pytest.raises(kinds.ModelNotFound, match=words):
        kinds.resolve(kind)


def test_import_root_is_the_path_entry_of_the_module(tmp_path, monkeypatch):
    pkg = tmp_path / "own_pkg" / "sub"
    pkg.mkdir(parents=True)
    (tmp_path / "own_pkg" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("from devices.echo import Echo\n\n\nclass Mine(Echo):\n    pass\n")
    (pkg / "leaf.py").write_text("from devices.echo import Echo\n\n\nclass Leaf(Echo):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert kinds.import_root(kinds.resolve("own_pkg.sub:Mine")) == str(tmp_path.resolve())
        assert kinds.import_root(kinds.resolve("own_pkg.sub.leaf:Leaf")) == str(tmp_path.resolve())
    finally:
        for name in [m for m in sys.modules if m.startswith("own_pkg")]:
            del sys.modules[name]
        importlib.invalidate_caches()
    repo = pathlib.Path(__file__).resolve().parents[2]
    assert kinds.import_root(Echo) == str(repo)
