"""The initramfs writer and the Debian package reader (vmm.image), read
back with the module's own parser and with libarchive's bsdtar."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from vmm import image
from vmm.image import S_IFCHR, S_IFDIR, S_IFLNK, S_IFREG, CpioEntry


@pytest.fixture(scope="session")
def bsdtar():
    path = shutil.which("bsdtar")
    if path is None:
        subprocess.run(["apt-get", "install", "-y", "-q", "libarchive-tools"], check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)
        path = shutil.which("bsdtar")
    assert path, "bsdtar (libarchive-tools) could not be installed"
    return path


ENTRIES = [
    CpioEntry("bin", S_IFDIR | 0o755),
    CpioEntry("bin/busybox", S_IFREG | 0o755, b"\x7fELF" + bytes(range(256)) * 3 + b"x"),
    CpioEntry("bin/sh", S_IFLNK | 0o777, b"busybox"),
    CpioEntry("dev", S_IFDIR | 0o755),
    CpioEntry("dev/console", S_IFCHR | 0o600, rdev=(5, 1)),
    CpioEntry("empty", S_IFREG | 0o644),
    CpioEntry("init", S_IFREG | 0o755, b"#!/bin/sh\necho hi\n"),
]


def test_newc_round_trip():
    data = image.write_newc(ENTRIES)
    assert data.startswith(b"070701") and len(data) % 4 == 0
    assert image.read_newc(data) == ENTRIES


def test_newc_header_fields():
    data = image.write_newc([CpioEntry("a", S_IFREG | 0o644, b"hello")])
    fields = [int(data[6 + 8 * i:14 + 8 * i], 16) for i in range(13)]
    assert fields[1] == S_IFREG | 0o644 and fields[6] == 5 and fields[11] == 2
    assert data[110:112] == b"a\0" and data[112:117] == b"hello"       # 110 + 2 = 112: aligned
    assert b"TRAILER!!!\0" in data


def test_newc_truncated():
    data = image.write_newc(ENTRIES)
    with pytest.raises(ValueError):
        image.read_newc(data[:200])


def test_bsdtar_reads_it(bsdtar, tmp_path):
    path = tmp_path / "initramfs.cpio"
    path.write_bytes(image.write_newc(ENTRIES))
    listing = subprocess.run([bsdtar, "-tvf", str(path)], capture_output=True, text=True, check=True).stdout
    assert "bin/sh -> busybox" in listing and "5,1" in listing
    out = tmp_path / "x"
    out.mkdir()
    subprocess.run([bsdtar, "-xf", str(path), "-C", str(out), "--exclude", "dev/console"], check=True)
    assert (out / "bin/busybox").read_bytes() == ENTRIES[1].data
    assert (out / "init").read_bytes() == ENTRIES[6].data and (out / "init").stat().st_mode & 0o111
    assert (out / "bin/sh").is_symlink()


def _ar(members: dict[str, bytes]) -> bytes:
    out = b"!<arch>\n"
    for name, data in members.items():
        head = f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{'100644':<8}{len(data):<10}`\n".encode()
        assert len(head) == 60
        out += head + data + (b"\n" if len(data) & 1 else b"")
    return out


def test_deb_members():
    deb = _ar({"debian-binary": b"2.0\n", "control.tar.xz": b"abc", "data.tar.xz": b"12345"})
    assert image.deb_members(deb) == {"debian-binary": b"2.0\n", "control.tar.xz": b"abc", "data.tar.xz": b"12345"}
    with pytest.raises(image.ImageError, match="not a .deb"):
        image.deb_members(b"PK\x03\x04")


def _ko(depends: str) -> bytes:
    return b"\x7fELF junk\0license=GPL\0depends=" + depends.encode() + b"\0name=x\0"


def test_modules_in_dependency_order():
    mods = {"virtio_ring": _ko(""), "virtio": _ko("virtio_ring"), "virtio_pci_modern_dev": _ko(""),
            "virtio_pci_legacy_dev": _ko(""), "virtio_blk": _ko("virtio,virtio_ring"),
            "virtio_pci": _ko("virtio_ring,virtio_pci_modern_dev,virtio_pci_legacy_dev,virtio")}
    order = image.select_modules(mods)
    assert set(order) == set(mods)
    for name, data in mods.items():
        for dep in image.module_depends(data):
            assert order.index(dep) < order.index(name)
    assert order[-1] == "virtio_blk"


def test_module_errors():
    with pytest.raises(image.ImageError, match="module virtio_blk is not in the kernel package"):
        image.select_modules({"virtio_pci": _ko("")})
    with pytest.raises(image.ImageError, match="cycle"):
        image.select_modules({"virtio_pci": _ko("virtio_blk"), "virtio_blk": _ko("virtio_pci")})


def test_initramfs_layout():
    data = image.build_initramfs(b"BUSYBOX", [("virtio", b"ko1"), ("virtio_blk", b"ko2")])
    entries = {e.name: e for e in image.read_newc(data)}
    init = entries["init"]
    assert init.mode == S_IFREG | 0o755 and init.data.startswith(b"#!/bin/sh\n")
    text = init.data.decode()
    assert image.BANNER in text and image.DONE in text and "for m in virtio virtio_blk" in text
    assert "mount -t proc" in text and "mount -t sysfs" in text and "poweroff -f" in text
    assert entries["bin/busybox"].data == b"BUSYBOX" and entries["lib/modules/virtio_blk.ko"].data == b"ko2"
    assert entries["dev/console"].rdev == (5, 1)
