"""Choosing the loader (vmm.boot.linux), the payload decompressors
(vmm.boot.payload) and the PVH initrd module."""

from __future__ import annotations

import pytest

from tests.vmm.linux import images
from vmm import layout
from vmm.boot import BootError, linux, payload, pvh
from vmm.memory import GuestMemory

VMLINUX = images.pvh_elf(entry=0x100_0000, code=b"\xf4" * 64)


@pytest.fixture
def memory():
    m = GuestMemory(64 * layout.MiB)
    yield m
    m.close()


@pytest.mark.parametrize("pack, kind", [(images.lz4_legacy, "lz4"), (images.gzip_payload, "gzip"),
                                        (images.xz_payload, "xz")])
def test_payload_formats(pack, kind):
    data = bytes(range(256)) * 4000 + VMLINUX
    packed = pack(data)
    assert payload.compression(packed) == kind
    assert payload.decompress(packed) == data


def test_lz4_several_blocks():
    data = bytes(i * 7 % 251 for i in range(300_000))
    assert payload.decompress(images.lz4_legacy(data, block=65536)) == data


def test_payload_size_mismatch():
    packed = bytearray(images.lz4_legacy(b"a" * 1000))
    packed[-4:] = (999).to_bytes(4, "little")
    with pytest.raises(BootError, match="decompressed to 1000 bytes, its trailer says 999"):
        payload.decompress(bytes(packed))


def test_truncated_lz4_block():
    packed = images.lz4_legacy(b"abc" * 10000)
    with pytest.raises(BootError, match="LZ4 block"):
        payload.decompress(packed[:20] + packed[-4:])


@pytest.mark.parametrize("magic, kind", [(b"\x28\xb5\x2f\xfd", "zstd"), (b"BZh9", "bzip2"), (b"\x89LZO", "lzo")])
def test_unsupported_compressors_are_named(magic, kind):
    with pytest.raises(BootError, match=f"{kind}-compressed; the host decompresses only gzip, xz and lz4"):
        payload.decompress(magic + bytes(100))


def _write(tmp_path, name, data):
    p = tmp_path / name
    p.write_bytes(data)
    return p


def test_elf_vmlinux_with_initrd_module(tmp_path, memory):
    kernel = _write(tmp_path, "vmlinux", VMLINUX)
    initrd = _write(tmp_path, "initrd", b"cpio!" * 1000)
    loaded = linux.load(memory, kernel, initrd, "console=ttyS0", rsdp=0xE0000)
    assert loaded.method == "pvh" and "ELF vmlinux" in loaded.description
    info = pvh.START_INFO.unpack(memory.read(layout.PVH_START_INFO, pvh.START_INFO.size))
    magic, _version, _flags, nr_modules, modlist, cmdline, rsdp, _mm, _n, _r = info
    assert magic == pvh.HVM_START_MAGIC and nr_modules == 1 and modlist == layout.PVH_MODLIST
    assert rsdp == 0xE0000
    assert memory.read(cmdline, 14) == b"console=ttyS0\0"
    addr, size, mod_cmdline, _ = pvh.MODLIST_ENTRY.unpack(memory.read(modlist, pvh.MODLIST_ENTRY.size))
    assert (addr, size) == loaded.initrd and size == 5000 and mod_cmdline == 0
    assert addr % layout.PAGE_SIZE == 0 and addr >= 0x100_2000
    assert memory.read(addr, size) == b"cpio!" * 1000


def test_elf_without_initrd_has_no_modules(tmp_path, memory):
    linux.load(memory, _write(tmp_path, "vmlinux", VMLINUX))
    info = pvh.START_INFO.unpack(memory.read(layout.PVH_START_INFO, pvh.START_INFO.size))
    assert info[3] == 0 and info[4] == 0


def test_pvh_initrd_too_big(tmp_path, memory):
    with pytest.raises(BootError, match="initrd.*do not fit"):
        linux.load(memory, _write(tmp_path, "vmlinux", VMLINUX), _write(tmp_path, "big", bytes(64 << 20)))


def test_bzimage_through_pvh(tmp_path, memory):
    kernel = _write(tmp_path, "bzImage", images.bzimage(payload=images.lz4_legacy(VMLINUX)))
    loaded = linux.load(memory, kernel, boot="pvh")
    assert loaded.method == "pvh" and "lz4 payload decompressed on the host" in loaded.description
    assert memory.read(0x100_0000, 64) == b"\xf4" * 64


def test_bzimage_through_the_boot_protocol(tmp_path, memory):
    kernel = _write(tmp_path, "bzImage", images.bzimage(payload=images.lz4_legacy(VMLINUX)))
    loaded = linux.load(memory, kernel, boot="bzimage")
    assert loaded.method == "bzimage" and "boot protocol 2.15" in loaded.description


@pytest.mark.parametrize("pvm, method", [(True, "pvh"), (False, "bzimage")])
def test_auto_follows_the_host(tmp_path, memory, monkeypatch, pvm, method):
    monkeypatch.setattr(linux, "host_is_pvm", lambda: pvm)
    kernel = _write(tmp_path, "bzImage", images.bzimage(payload=images.gzip_payload(VMLINUX)))
    assert linux.load(memory, kernel).method == method


def test_auto_falls_back_when_the_payload_has_no_pvh_note(tmp_path, memory, monkeypatch):
    monkeypatch.setattr(linux, "host_is_pvm", lambda: True)
    kernel = _write(tmp_path, "bzImage", images.bzimage(payload=images.gzip_payload(b"not an elf" * 10)))
    assert linux.load(memory, kernel).method == "bzimage"


def test_pvh_asked_but_payload_has_no_note(tmp_path, memory):
    kernel = _write(tmp_path, "bzImage", images.bzimage(payload=images.gzip_payload(b"not an elf" * 10)))
    with pytest.raises(BootError, match="not an ELF file"):
        linux.load(memory, kernel, boot="pvh")


def test_elf_is_not_a_bzimage(tmp_path, memory):
    with pytest.raises(BootError, match="not a bzImage"):
        linux.load(memory, _write(tmp_path, "vmlinux", VMLINUX), boot="bzimage")


def test_missing_files(tmp_path, memory):
    with pytest.raises(BootError, match="kernel .*nope: No such file"):
        linux.load(memory, tmp_path / "nope")
    with pytest.raises(BootError, match="initrd .*nope: No such file"):
        linux.load(memory, _write(tmp_path, "vmlinux", VMLINUX), tmp_path / "nope")
