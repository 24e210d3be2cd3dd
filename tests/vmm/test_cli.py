"""``vmm run`` argument errors: status 2 and one line on stderr."""

from __future__ import annotations

import pytest

from tests.vmm.conftest import needs_kvm, vmm_run
from vmm import cli


def one_line_status_2(capsys, argv: list[str]) -> str:
    status = cli.main(argv)
    err = capsys.readouterr().err
    assert status == 2, err
    assert err.count("\n") == 1 and err.startswith("vmm: "), err
    return err


@pytest.mark.parametrize("argv, words", [
    ([], "required"),
    (["run", "--cmdline", "x"], "need --guest"),
    (["fly", "--guest", "x"], "invalid choice"),
    (["run", "--guest", "g.elf", "--vcpus", "0"], "at least 1"),
    (["run", "--guest", "g.elf", "--vcpus", "two"], "not an integer"),
    (["run", "--guest", "g.elf", "--memory", "12Q"], "not a size"),
    (["run", "--guest", "g.elf", "--timeout", "-1"], "positive"),
    (["run", "--guest", "g.elf", "--bogus"], "unrecognized"),
    (["run", "--guest", "g.elf", "--device", "nosuch"], "unknown device type 'nosuch'"),
    (["run", "--guest", "g.elf", "--device", "echo"], "needs pio=PORT"),
    (["run", "--guest", "g.elf", "--device", "echo,pio=zz"], "not an integer"),
    (["run", "--guest", "g.elf", "--device", "echo,pio=0x1000,colour=red"], "unknown parameter"),
    (["run", "--guest", "g.elf", "--device", "echo,pio=0x1000,process=elsewhere"], "process="),
    (["run", "--guest", "g.elf", "--device", "echo,pio"], "not key=value"),
    (["run", "--guest", "g.elf", "--device", "echo,pio=1,pio=2"], "given twice"),
    (["run", "--guest", "g.elf", "--device", "echo,pio=0x1000,id=a", "--device", "echo,pio=0x2000,id=a"],
     "already used"),
    (["run", "--guest", "g.elf", "--device", "echo,pio=0x1000,id=no spaces"], "id="),
    (["run", "--guest", "g.elf", "--device", "echo,mmio=0xd0000800"], "not 4 KiB aligned"),
])
def test_bad_arguments(capsys, argv, words):
    assert words in one_line_status_2(capsys, argv)


@needs_kvm
def test_bad_guests(capsys, tmp_path):
    missing = tmp_path / "missing.elf"
    assert "No such file" in one_line_status_2(capsys, ["run", "--guest", str(missing)])
    text = tmp_path / "text.elf"
    text.write_text("hello")
    assert "not an ELF file" in one_line_status_2(capsys, ["run", "--guest", str(text)])
    truncated = tmp_path / "trunc.elf"
    truncated.write_bytes(b"\x7fELF\x02\x01\x01" + b"\0" * 20)
    assert "truncated" in one_line_status_2(capsys, ["run", "--guest", str(truncated)])
    # A real ELF executable without the PVH note.
    assert "not a PVH image" in one_line_status_2(capsys, ["run", "--guest", "/bin/true"])


@needs_kvm
def test_guest_too_big_for_memory(capsys, guest):
    err = one_line_status_2(capsys, ["run", "--guest", str(guest("hello")), "--memory", "1M"])
    assert "between 2 MiB" in err


@needs_kvm
def test_device_claiming_a_vmm_port(capsys, guest):
    err = one_line_status_2(capsys, ["run", "--guest", str(guest("hello")),
                                     "--device", "echo,pio=0xf0,process=inline"])
    assert "overlaps" in err


@needs_kvm
def test_cmdline_too_long(capsys, guest):
    err = one_line_status_2(capsys, ["run", "--guest", str(guest("hello")), "--cmdline", "x" * 5000])
    assert "command line" in err


@needs_kvm
def test_console_script_exit_status(guest):
    r = vmm_run("--guest", str(guest("hello")), "--cmdline", "code=0x10")
    assert r.returncode == 0x21, r.stderr
    r = vmm_run("--vcpus", "0", "--guest", str(guest("hello")))
    assert r.returncode == 2 and r.stderr.count("\n") == 1


#: What a run with no device process, no Linux, no plan and no --api has no
#: use for (each costs milliseconds of every start: issue 15).
NOT_FOR_A_BARE_RUN = ("vmm.remote.endpoint", "ipc.protocol", "ipc.transport", "msgpack", "devices.faults.plan",
                      "devices.faults.trace", "tomllib", "hashlib", "importlib.metadata", "vmm.boot.linux",
                      "vmm.qmp.server", "vmm.forkserver", "ctypes", "shutil", "tempfile", "subprocess", "pathlib",
                      "vmm.emulate", "vmm.qmp.wire", "json", "ast", "dis", "vmm.config", "devices.kinds",
                      "vmm.remote.options", "vmm.remote.restart")

#: ``vmm ARGV`` as the console script runs it (vmm.entry), then what it
#: imported of NOT_FOR_A_BARE_RUN, and whether ``inspect`` is still
#: vmm.deferred's stand-in.  No json here: a run must not need it.
_IMPORTS_OF_A_RUN = ("import sys\nimport vmm.entry\n"
                     "status = vmm.entry.main(sys.argv[1:])\n"
                     "deferred = type(sys.modules['inspect']).__name__ == 'Deferred'\n"
                     f"print(repr([status, [m for m in {NOT_FOR_A_BARE_RUN!r} if m in sys.modules], deferred]))\n")


def _imports_of_a_run(*argv: str) -> tuple[int, list[str], bool]:
    import ast
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", _IMPORTS_OF_A_RUN, *argv], capture_output=True, text=True,
                       timeout=60, stdin=subprocess.DEVNULL)
    assert r.stdout, r.stderr
    status, imported, deferred = ast.literal_eval(r.stdout.splitlines()[-1])
    return status, imported, deferred


@needs_kvm
def test_a_run_without_devices_imports_only_what_it_uses(guest, tmp_path):
    status, imported, deferred = _imports_of_a_run("run", "--guest", str(guest("hello")), "--serial", "none")
    assert status == 0x43 and imported == [], imported
    # every dataclass on the path has a docstring, so dataclasses never needed the real inspect
    assert deferred
    # The same modules are there once something uses them: a device in its own process.
    status, imported, deferred = _imports_of_a_run("run", "--guest", str(guest("hello")), "--serial", "none",
                                                   "--device", "echo,pio=0x1000", "--api", str(tmp_path / "api"))
    assert status == 0x43 and {"vmm.remote.endpoint", "ipc.protocol", "msgpack", "vmm.config",
                                "vmm.qmp.server"} <= set(imported), imported
    # ... but not OpenSSL (hashlib): the plan's digests take CPython's own SHA-256; nor tempfile (and
    # shutil, bz2, lzma) for the control socket's private directory
    assert not {"hashlib", "tempfile", "shutil"} & set(imported) and deferred, imported


def test_a_deferred_module_is_the_real_one_once_used():
    import subprocess
    import sys

    code = ("import sys\nfrom vmm.deferred import Deferred, defer_imports\ndefer_imports()\n"
            "import inspect\nassert isinstance(inspect, Deferred) and 'ast' not in sys.modules\n"
            "assert inspect.isclass(int) and inspect.signature(len).parameters\n"
            "import inspect as again\nassert not isinstance(again, Deferred) and again.isclass is inspect.isclass\n"
            "import dataclasses\n@dataclasses.dataclass\nclass P:\n    x: int\nassert P.__doc__ == 'P(x: int)'\n"
            "print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout == "ok\n", r.stderr
