"""The pure parts of vmm.minikernel: the config check, the build
dependency check and the source unpacking (from a .deb made here)."""

from __future__ import annotations

import io
import tarfile

import pytest

from vmm import minikernel
from vmm.image import ImageError


def test_parse_config_reads_values_and_not_set_lines():
    text = 'CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C="x y"\n# a comment\nCONFIG_D=8\n'
    assert minikernel.parse_config(text) == {"CONFIG_A": "y", "CONFIG_B": "n", "CONFIG_C": '"x y"', "CONFIG_D": "8"}


def test_mismatches_name_what_kconfig_dropped():
    fragment = "CONFIG_A=y\nCONFIG_B=n\nCONFIG_C=y\nCONFIG_D=n\n"
    config = "CONFIG_A=y\n# CONFIG_B is not set\n# CONFIG_C is not set\n"
    # C was dropped (a dependency off); D is absent, which is n, as asked.
    assert minikernel.config_mismatches(fragment, config) == ["CONFIG_C=y (got n)"]


def test_fragment_asks_for_what_the_machine_needs():
    frag = minikernel.parse_config(minikernel.FRAGMENT)
    for opt in ("CONFIG_PVH", "CONFIG_ACPI", "CONFIG_SERIAL_8250_CONSOLE", "CONFIG_VIRTIO_PCI", "CONFIG_VIRTIO_BLK",
                "CONFIG_HW_RANDOM_VIRTIO", "CONFIG_VIRTIO_CONSOLE", "CONFIG_BLK_DEV_INITRD", "CONFIG_DEVTMPFS"):
        assert frag[opt] == "y", opt
    assert frag["CONFIG_MODULES"] == "n" and frag["CONFIG_CRYPTO_BLAKE2S_X86"] == "n"


def test_missing_build_deps_maps_tools_and_headers_to_packages():
    present = {"gcc", "make", "perl", "xz"}
    missing = minikernel.missing_build_deps(which=lambda t: "/usr/bin/" + t if t in present else None,
                                            exists=lambda p: p == "/usr/include/openssl/ssl.h")
    assert missing == ["flex", "bison", "bc", "libelf-dev"]
    assert minikernel.missing_build_deps(which=lambda t: "/x", exists=lambda p: True) == []


def _tar(files: dict[str, bytes], mode: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _deb(data_tar: bytes) -> bytes:
    out = b"!<arch>\n"
    for name, body in (("debian-binary", b"2.0\n"), ("data.tar.xz", data_tar)):
        head = f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(body):<10}`\n".encode()
        assert len(head) == 60
        out += head + body + (b"\n" if len(body) & 1 else b"")
    return out


def test_unpack_source_strips_the_top_folder_and_refuses_escapes(tmp_path):
    inner = _tar({"linux-source-9.9/Makefile": b"VERSION = 9\n", "linux-source-9.9/kernel/a.c": b"int a;\n",
                  "linux-source-9.9/../../escape": b"no"}, "w:xz")
    deb = tmp_path / "linux-source-9.9_9.9-1_all.deb"
    deb.write_bytes(_deb(_tar({"./usr/src/linux-source-9.9.tar.xz": inner}, "w:xz")))
    dest = tmp_path / "cache" / "src"
    dest.parent.mkdir()
    minikernel.unpack_source(deb, dest)
    assert (dest / "Makefile").read_bytes() == b"VERSION = 9\n"
    assert (dest / "kernel/a.c").exists()
    assert not (tmp_path / "escape").exists() and not (tmp_path / "cache" / "escape").exists()


def test_unpack_source_without_the_tarball_is_one_error(tmp_path):
    deb = tmp_path / "x.deb"
    deb.write_bytes(_deb(_tar({"./usr/share/doc/x": b""}, "w:xz")))
    with pytest.raises(ImageError, match="no usr/src/linux-source"):
        minikernel.unpack_source(deb, tmp_path / "src")


def test_patches_apply_once_after_their_anchor(tmp_path):
    fault = tmp_path / "arch/x86/mm/fault.c"
    fault.parent.mkdir(parents=True)
    original = ("#include <asm/irq_stack.h>\n\nvoid f(void)\n{\n"
                "\tif (kvm_handle_async_pf(regs, (u32)address))\n\t\treturn;\n\n\tirqentry_enter();\n}\n")
    fault.write_text(original)
    minikernel.apply_patches(tmp_path)
    once = fault.read_text()
    assert minikernel.PVM_SYSCALL_MARK in once and "do_syscall_64(regs" in once and "#include <asm/syscall.h>" in once
    assert once.index("kvm_handle_async_pf") < once.index("do_syscall_64") < once.index("irqentry_enter")
    minikernel.apply_patches(tmp_path)
    assert fault.read_text() == once


def test_a_patch_without_its_anchor_is_one_error(tmp_path):
    fault = tmp_path / "arch/x86/mm/fault.c"
    fault.parent.mkdir(parents=True)
    fault.write_text("int nothing_here;\n")
    with pytest.raises(ImageError, match="anchor"):
        minikernel.apply_patches(tmp_path)
