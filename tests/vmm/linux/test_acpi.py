"""The ACPI tables (vmm.boot.acpi, vmm.boot.aml): lengths, checksums,
contents, and Debian's iasl disassembling every one without error."""

from __future__ import annotations

import shutil
import struct
import subprocess

import pytest

from vmm import layout
from vmm.boot import BootError, acpi, aml
from vmm.memory import GuestMemory


@pytest.fixture(scope="session")
def iasl():
    """The iasl binary; installed from Debian's acpica-tools when missing
    (a fresh machine lacks it; the tests run as root)."""
    path = shutil.which("iasl")
    if path is None:
        subprocess.run(["apt-get", "install", "-y", "-q", "acpica-tools"], check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)
        path = shutil.which("iasl")
        if path is None:
            subprocess.run(["apt-get", "update", "-q"], check=False, stdout=subprocess.DEVNULL, timeout=600)
            subprocess.run(["apt-get", "install", "-y", "-q", "acpica-tools"], check=True,
                           stdout=subprocess.DEVNULL, timeout=600)
            path = shutil.which("iasl")
    assert path, "iasl (acpica-tools) could not be installed"
    return path


def tables(nvcpus=4):
    return acpi.build(nvcpus)[1]


@pytest.mark.parametrize("nvcpus", [1, 4, 254])
def test_lengths_and_checksums(nvcpus):
    for name, (addr, data) in tables(nvcpus).items():
        assert addr % 16 == 0 and layout.ACPI_START <= addr and addr + len(data) <= layout.ACPI_END
        if name == "RSDP":
            assert data[:8] == b"RSD PTR " and len(data) == 36
            assert sum(data[:20]) % 256 == 0 and sum(data) % 256 == 0
            assert struct.unpack_from("<I", data, 20)[0] == 36 and data[15] == 2
        elif name == "FACS":
            assert data[:4] == b"FACS" and len(data) == struct.unpack_from("<I", data, 4)[0] == 64
            assert addr % 64 == 0
        else:
            assert struct.unpack_from("<I", data, 4)[0] == len(data), name
            assert sum(data) % 256 == 0, name
    assert len(tables(nvcpus)["FACP"][1]) == 276


def test_pointers_link_the_tables():
    t = tables()
    xsdt_addr = struct.unpack_from("<Q", t["RSDP"][1], 24)[0]
    assert xsdt_addr == t["XSDT"][0]
    entries = struct.unpack_from("<2Q", t["XSDT"][1], 36)
    assert set(entries) == {t["FACP"][0], t["APIC"][0]}
    fadt = t["FACP"][1]
    assert struct.unpack_from("<Q", fadt, 140)[0] == t["DSDT"][0] == struct.unpack_from("<I", fadt, 40)[0]
    assert struct.unpack_from("<Q", fadt, 132)[0] == t["FACS"][0]
    assert struct.unpack_from("<I", fadt, 64)[0] == layout.POWER_OFF_PORT


def test_madt_has_a_local_apic_per_vcpu():
    data = tables(3)["APIC"][1]
    assert struct.unpack_from("<I", data, 36)[0] == layout.LAPIC_BASE
    pos, seen = 44, []
    while pos < len(data):
        kind, length = data[pos], data[pos + 1]
        seen.append((kind, bytes(data[pos:pos + length])))
        pos += length
    assert pos == len(data)
    lapics = [body for kind, body in seen if kind == 0]
    assert [(b[2], b[3], struct.unpack_from("<I", b, 4)[0]) for b in lapics] == [(0, 0, 1), (1, 1, 1), (2, 2, 1)]
    ioapic = [body for kind, body in seen if kind == 1]
    assert len(ioapic) == 1 and struct.unpack_from("<II", ioapic[0], 4) == (layout.IOAPIC_BASE, 0)
    overrides = [struct.unpack_from("<BBIH", body, 2) for kind, body in seen if kind == 2]
    assert (0, 0, 2, 0) in overrides and (0, 9, 9, 0xD) in overrides


def test_too_many_vcpus():
    with pytest.raises(BootError, match="255 vCPUs"):
        acpi.build(255)


def test_written_into_guest_memory():
    m = GuestMemory(16 * layout.MiB)
    try:
        rsdp = acpi.write(m, 2)
        assert rsdp == layout.ACPI_START and m.read(rsdp, 8) == b"RSD PTR "
    finally:
        m.close()


def test_pkg_length_encodings():
    assert aml.pkg_length(10) == bytes([11])
    assert aml.pkg_length(62) == bytes([63])
    assert aml.pkg_length(63) == bytes([0x40 | (65 & 0xF), 65 >> 4])
    assert aml.pkg_length(4000) == bytes([0x40 | (4002 & 0xF), 4002 >> 4])
    assert aml.pkg_length(5000) == bytes([0x80 | (5003 & 0xF), (5003 >> 4) & 0xFF, 5003 >> 12])


def test_eisa_id():
    assert aml.eisa_id("PNP0A03") == bytes([0x0C, 0x41, 0xD0, 0x0A, 0x03])


def _disassemble(iasl, tmp_path, name, data):
    path = tmp_path / f"{name}.dat"
    path.write_bytes(data)
    r = subprocess.run([iasl, "-d", str(path)], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "Error" not in out and "Invalid" not in out, out
    return (tmp_path / f"{name}.dsl").read_text()


@pytest.mark.parametrize("name", ["XSDT", "FACP", "FACS", "APIC", "DSDT"])
def test_iasl_disassembles(iasl, tmp_path, name):
    dsl = _disassemble(iasl, tmp_path, name, tables()[name][1])
    if name == "DSDT":
        for text in ("PNP0A03", "PNP0501", "0xE0000000", "0x03F8", "IRQNoFlags ()\n                    {4}",
                     "_PRT", "_S5"):
            assert text in dsl, text
        # The disassembly compiles back with no error.
        r = subprocess.run([iasl, "-p", str(tmp_path / "again"), str(tmp_path / "DSDT.dsl")],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "0 Errors" in r.stdout, r.stdout + r.stderr
    if name == "APIC":
        assert dsl.count("Processor Local APIC") >= 4


def test_rsdp_matches_iasl(iasl, tmp_path):
    """iasl cannot disassemble an RSDP from a file; its data-table compiler
    builds one from the same fields (checksums computed by iasl)."""
    addr, ours = tables()["RSDP"]
    xsdt = struct.unpack_from("<Q", ours, 24)[0]
    src = tmp_path / "rsdp.asl"
    src.write_text(
        '[0008] Signature : "RSD PTR "\n[0001] Checksum : 00\n[0006] Oem ID : "SPLITV"\n'
        "[0001] Revision : 02\n[0004] RSDT Address : 00000000\n[0004] Length : 00000024\n"
        f"[0008] XSDT Address : {xsdt:016X}\n[0001] Extended Checksum : 00\n[0003] Reserved : 000000\n")
    r = subprocess.run([iasl, str(src)], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "rsdp.aml").read_bytes() == ours
