"""Pieces of the VMM without KVM: sizes, device specs, ELF/PVH loading
errors, the page-table walk, outcomes, and dispatch failure semantics."""

from __future__ import annotations

import struct

import pytest

from devices.base import Space
from ipc import Bus
from tests.vmm.conftest import needs_kvm
from vmm import x86
from vmm.boot import BootError
from vmm.boot.elf import ElfFile
from vmm.config import ConfigError, parse_device_spec
from vmm.dispatch import Dispatcher
from vmm.endpoint import DeviceFailed
from vmm.local import LocalEndpoint
from vmm.memory import parse_size
from vmm.outcome import Ending, Outcome
from devices.echo import Echo


@pytest.mark.parametrize("text, size", [("256M", 256 << 20), ("1G", 1 << 30), ("4096", 4096),
                                        ("512MiB", 512 << 20), ("2k", 2048)])
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "M", "1.5G", "-1M", "12Q"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError):
        parse_size(text)


def test_device_spec_defaults_and_ids():
    taken: set[str] = set()
    a = parse_device_spec("echo,pio=0x1000", taken)
    b = parse_device_spec("echo,mmio=0xd0000000,process=inline", taken)
    assert (a.name, a.placement, a.param_dict()) == ("echo0", "isolated", {"pio": "0x1000"})
    assert (b.name, b.placement) == ("echo1", "inline")
    with pytest.raises(ConfigError):
        parse_device_spec("echo,pio=0x2000,id=echo0", taken)


def elf64(phdrs: list[tuple], notes: bytes = b"", entry: int = 0x100000) -> bytes:
    """A minimal ELF64 image: header, program headers, then payload."""
    ehdr_size, phdr_size = 64, 56
    payload_off = ehdr_size + phdr_size * len(phdrs)
    out = bytearray(b"\x7fELF\x02\x01\x01" + b"\0" * 9)
    out += struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, entry, ehdr_size, 0, 0, ehdr_size, phdr_size,
                       len(phdrs), 64, 0, 0)
    for ptype, off, paddr, filesz, memsz in phdrs:
        out += struct.pack("<IIQQQQQQ", ptype, 7, payload_off + off, paddr, paddr, filesz, memsz, 8)
    out += notes
    return bytes(out)


def pvh_note(entry: int) -> bytes:
    return struct.pack("<III", 4, 4, 18) + b"Xen\0" + struct.pack("<I", entry)


def test_elf_notes_and_segments():
    note = pvh_note(0x100000)
    img = elf64([(4, 0, 0, len(note), len(note)), (1, 0, 0x100000, len(note), 0x2000)], note)
    elf = ElfFile(img)
    assert [n.type for n in elf.notes()] == [18]
    assert elf.loads[0].memsz == 0x2000


@pytest.mark.parametrize("mutate, words", [
    (lambda b: b[:40], "truncated"),
    (lambda b: b[:4] + b"\x03" + b[5:], "class"),
    (lambda b: b[:5] + b"\x02" + b[6:], "little-endian"),
    (lambda b: b[:18] + b"\x28\x00" + b[20:], "not x86"),
])
def test_elf_rejects(mutate, words):
    note = pvh_note(0x100000)
    img = elf64([(4, 0, 0, len(note), len(note))], note)
    with pytest.raises(BootError, match=words):
        ElfFile(mutate(img))


def test_elf_segment_past_end_of_file():
    img = elf64([(1, 0, 0x100000, 0x10000, 0x10000)])
    with pytest.raises(BootError, match="past the end"):
        ElfFile(img)


@needs_kvm
@pytest.mark.parametrize("phdrs, entry, words", [
    ([(1, 0, 0x100000, 20, 0x1000)], 0x100000, "not a PVH image"),
    ([(4, 0, 0, 20, 20), (1, 0, 0x1000, 20, 0x1000)], 0x1000, "boot area"),
    ([(4, 0, 0, 20, 20), (1, 0, 0x100000, 20, 64 << 20)], 0x100000, "does not fit"),
    ([(4, 0, 0, 20, 20), (1, 0, 0x100000, 20, 0x1000)], 0x200000, "outside the loaded"),
])
def test_pvh_load_rejects(phdrs, entry, words):
    from vmm.boot import pvh
    from vmm.memory import GuestMemory

    mem = GuestMemory(16 << 20)
    try:
        with pytest.raises(BootError, match=words):
            pvh.load(mem, elf64(phdrs, pvh_note(entry)))
    finally:
        mem.close()


@needs_kvm
def test_pvh_start_info_and_memmap():
    from vmm import layout
    from vmm.boot import pvh
    from vmm.memory import GuestMemory

    note = pvh_note(0x100000)
    mem = GuestMemory(16 << 20)
    try:
        boot = pvh.load(mem, elf64([(4, 0, 0, 20, 20), (1, 0, 0x100000, 20, 0x1000)], note), "console=x")
        assert boot.entry == 0x100000 and boot.start_info == layout.PVH_START_INFO
        magic, version, _, _, _, cmdline, _, memmap, n, _ = pvh.START_INFO.unpack(
            mem.read(boot.start_info, pvh.START_INFO.size))
        assert (magic, version) == (0x336EC578, 1)
        assert mem.read(cmdline, 10) == b"console=x\0"
        entries = [pvh.MEMMAP_ENTRY.unpack(mem.read(memmap + 24 * i, 24)) for i in range(n)]
        assert entries[-1][:3] == (0x100000, (16 << 20) - 0x100000, 1)
    finally:
        mem.close()


def test_translate_walks_4_level_tables():
    pages: dict[int, int] = {}
    pml4, pdpt, pd, pt = 0x1000, 0x2000, 0x3000, 0x4000
    pages[pml4] = pdpt | 7
    pages[pdpt + 8 * 1] = pd | 7                         # 1 GiB .. 2 GiB
    pages[pd + 8 * 2] = 0x0060_0000 | 0x87               # 2 MiB page
    pages[pd + 8 * 3] = pt | 7
    pages[pt + 8 * 5] = 0x0000_9000 | 7                  # 4 KiB page

    def read(a):
        return pages.get(a, 0)

    args = (x86.CR0_PG | x86.CR0_PE, pml4, x86.CR4_PAE, x86.EFER_LME | x86.EFER_LMA)
    assert x86.translate(read, *args, (1 << 30) + (2 << 21) + 0x1234) == 0x60_1234
    assert x86.translate(read, *args, (1 << 30) + (3 << 21) + (5 << 12) + 0x56) == 0x9056
    with pytest.raises(x86.TranslationError):
        x86.translate(read, *args, 5 << 30)
    assert x86.translate(read, x86.CR0_PE, 0, 0, 0, 0x1234_5678) == 0x1234_5678


def test_outcome_statuses():
    assert Outcome(Ending.TEST_EXIT, "", value=0x21).status == 0x43
    assert Outcome(Ending.POWER_OFF, "").status == 0
    assert {Outcome(e, "").status for e in (Ending.RESET, Ending.KVM_FAILURE, Ending.TIMEOUT,
                                             Ending.VMM_ERROR)} == {4, 6, 8, 10}
    assert Outcome(Ending.INTERRUPTED, "", value=15).status == 143


class Broken:
    owner = 7
    name = "broken"

    def access(self, *args):
        raise DeviceFailed("gone")

    def close(self):
        pass


def test_dispatch_unclaimed_and_failed_devices(registry):
    echo = LocalEndpoint.create(Echo, {"pio": "0x1000"}, 5, "e", registry)
    broken = Broken()
    registry.register(Bus.MMIO, 0xD000_0000, 0x1000, broken.owner)
    registry.register(Bus.MMIO, 0xD000_2000, 0x1000, broken.owner)
    failed = []
    d = Dispatcher(registry, {5: echo, 7: broken}, on_failure=lambda ep, e: failed.append(ep.name))
    assert d.access(0, Bus.PIO, 0x3000, 4, False, 0) == 0xFFFF_FFFF
    assert d.access(0, Bus.MMIO, 0xE000_0000, 8, False, 0) == (1 << 64) - 1
    assert d.access(0, Bus.PIO, 0x1000, 2, True, 0xBEEF) == 0
    assert d.access(0, Bus.PIO, 0x1000, 2, False, 0) == 0xBEEF
    # A failed device: all ones, its regions reaped, the others untouched.
    assert d.access(0, Bus.MMIO, 0xD000_0010, 4, False, 0) == 0xFFFF_FFFF
    assert failed == ["broken"] and 7 in d.failed
    assert [r.owner for r in registry.regions()] == [5]
    assert d.access(1, Bus.MMIO, 0xD000_2000, 1, False, 0) == 0xFF
    assert d.access(0, Bus.PIO, 0x1000, 2, False, 0) == 0xBEEF
    assert registry.check() == []
    echo.close()
    assert registry.regions() == []


def test_a_model_that_raises_is_a_failed_device(registry):
    ep = LocalEndpoint.create(Echo, {"pio": "0x1000"}, 5, "e", registry)
    ep.model.read = None   # calling it raises TypeError
    ep._read = ep.model.read
    d = Dispatcher(registry, {5: ep})
    assert d.access(0, Bus.PIO, 0x1000, 1, False, 0) == 0xFF
    assert 5 in d.failed and registry.regions() == []


def test_spaces_match_buses():
    assert [int(s) for s in Space] == [int(b) for b in Bus]
