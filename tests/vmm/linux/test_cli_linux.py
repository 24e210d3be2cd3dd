"""``vmm run --kernel``'s errors: one line on stderr, status 2."""

from __future__ import annotations

import pytest

from tests.vmm.conftest import needs_kvm, vmm_run
from tests.vmm.linux import images


def one_line_status_2(r, pattern: str) -> None:
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and pattern in lines[0], r.stderr


@needs_kvm
@pytest.mark.parametrize("data, pattern", [
    (b"hello" * 200, "neither a bzImage (no 'HdrS' at 0x202) nor an ELF vmlinux"),
    (images.bzimage(version=0x0206), "boot protocol 2.06 is too old"),
    (images.bzimage(xloadflags=0), "not a 64-bit kernel"),
])
def test_bad_kernels(tmp_path, data, pattern):
    kernel = tmp_path / "k"
    kernel.write_bytes(data)
    one_line_status_2(vmm_run("--kernel", str(kernel), "--serial", "none"), pattern)


@needs_kvm
def test_command_line_too_long(tmp_path):
    kernel = tmp_path / "k"
    kernel.write_bytes(images.bzimage(cmdline_size=16))
    one_line_status_2(vmm_run("--kernel", str(kernel), "--kernel-boot", "bzimage", "--append", "x" * 17,
                              "--serial", "none"), "this kernel takes at most 16 (cmdline_size)")


@needs_kvm
def test_initrd_does_not_fit(tmp_path):
    kernel, initrd = tmp_path / "k", tmp_path / "i"
    kernel.write_bytes(images.bzimage())
    initrd.write_bytes(bytes(40 << 20))
    one_line_status_2(vmm_run("--kernel", str(kernel), "--initrd", str(initrd), "--memory", "32M",
                              "--kernel-boot", "bzimage", "--serial", "none"), "initrd: ")


@pytest.mark.parametrize("args, pattern", [
    (["--initrd", "x"], "--initrd and --append need --kernel"),
    (["--append", "quiet"], "--initrd and --append need --kernel"),
    (["--kernel", "k", "--guest", "g"], "--kernel and --guest exclude each other"),
    (["--kernel", "k", "--cmdline", "x"], "--cmdline is for --guest"),
    (["--cpuid-hide", "cx16,nonsense"], "unknown CPUID feature 'nonsense'"),
    (["--kernel-boot", "floppy"], "invalid choice: 'floppy'"),
])
def test_argument_errors(args, pattern):
    one_line_status_2(vmm_run(*args), pattern)
