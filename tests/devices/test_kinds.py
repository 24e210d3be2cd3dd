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


def _dist(root: pathlib.Path, name: str, text: str) -> None:
    info = root / f"{name}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name.partition('-')[0]}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(text)


def _metadata_entry_points(group: str) -> list[tuple[str, str]]:
    from importlib import metadata

    return [(ep.name, ep.value) for ep in metadata.entry_points(group=group)]


@pytest.fixture
def fresh_kinds():
    kinds.kinds.cache_clear()
    yield
    kinds.kinds.cache_clear()
    importlib.invalidate_caches()


def test_a_distributions_kinds_are_read_as_importlib_metadata_reads_them(tmp_path, monkeypatch, fresh_kinds):
    first, second = tmp_path / "a", tmp_path / "b"
    _dist(first, "own_devs-1.0", "[console_scripts]\nx = y:z\n\n[splitvmm.devices]\n# a comment\n"
                                 "own-echo = devices.echo:Echo\n  spaced   =  devices.serial:Serial  \n")
    # The same distribution again, later on the path (Own.Devs normalises to own_devs): not read.
    _dist(second, "Own.Devs-2.0", "[splitvmm.devices]\nshadowed = devices.echo:Echo\n")
    _dist(second, "other-3.0", "[splitvmm.devices]\nother = devices.serial:Serial\n")
    monkeypatch.syspath_prepend(str(second))
    monkeypatch.syspath_prepend(str(first))
    for group in (kinds.ENTRY_POINT_GROUP, "console_scripts", "pytest11"):
        assert kinds._scan_entry_points(group) == _metadata_entry_points(group), group
    table = kinds.kinds()
    assert table["own-echo"] == "devices.echo:Echo" and table["spaced"] == "devices.serial:Serial"
    assert "other" in table and "shadowed" not in table and BUILT_IN <= set(table)
    assert kinds.resolve("own-echo") is Echo


def test_where_the_scan_cannot_answer_importlib_metadata_does(tmp_path, monkeypatch, fresh_kinds):
    import zipfile

    archive = tmp_path / "zipped.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("zipped-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: zipped\nVersion: 1.0\n")
        z.writestr("zipped-1.0.dist-info/entry_points.txt", "[splitvmm.devices]\nzipped = devices.echo:Echo\n")
    monkeypatch.syspath_prepend(str(archive))
    assert kinds._scan_entry_points(kinds.ENTRY_POINT_GROUP) is None
    assert kinds.kinds()["zipped"] == "devices.echo:Echo"
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(archive)])
    _dist(tmp_path / "odd", "odd-1.0", "[splitvmm.devices]\nno equals sign here\n")
    monkeypatch.syspath_prepend(str(tmp_path / "odd"))
    assert kinds._scan_entry_points(kinds.ENTRY_POINT_GROUP) is None
    kinds.kinds.cache_clear()
    with pytest.raises((TypeError, ValueError)):     # what importlib.metadata makes of that line
        kinds.kinds()
