"""TEST-ONLY: a hostile device model that attacks its host on request, for
the sandbox's attack tests and figures (``python -m devserver.bench.sandbox``
and ``tests/devserver/test_sandbox*.py``).  Never a kind of a real VMM:
it exists only in a device process started as

    python -m devserver.sandbox.hostile KIND --fd N ...

which serves it under ``KIND`` (a built-in kind's name, to get that
kind's allowlist), and otherwise runs the ordinary device-process command
line (:mod:`devserver.cli`); or as a user's model, through the ordinary
device process: ``devserver.sandbox.hostile:Hostile`` (the common part
plus :attr:`Hostile.syscalls`).

Registers (4-byte accesses in a 16-port window at ``pio=``): a write of
an attack number (:data:`ATTACKS`) at offset 0 runs it; a read at offset
4 gives the outcome: 0 = it SUCCEEDED, else the errno it failed with.  An
attack the sandbox answers by killing the process has no outcome: the
access fails and the VMM names the system call.  Parameters: ``vmm_pid``,
``port`` (a TCP listener on 127.0.0.1), ``unix`` (a Unix socket of the
VMM), ``dir`` (a directory where ``create`` and ``mount`` would act).
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import resource
import socket
import sys

from devices.base import Device, DeviceHost, Space, Window, parse_int

_libc = ctypes.CDLL(None, use_errno=True)
SYS_ptrace, SYS_unshare, SYS_mount = 101, 272, 165
PTRACE_SEIZE, PTRACE_DETACH = 0x4206, 17
CLONE_NEWNET = 0x40000000


def _syscall(nr: int, *args: int | bytes | None) -> None:
    cargs = [ctypes.c_char_p(a) if isinstance(a, bytes) or a is None else ctypes.c_long(a) for a in args]
    if _libc.syscall(ctypes.c_long(nr), *cargs) < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


class Hostile(Device):
    kind = "hostile"
    #: As a user model: what it declares on top of the common allowlist.
    syscalls = ("getrandom",)

    @classmethod
    def windows(cls, params: dict[str, str]) -> list[Window]:
        """Its 16 ports (the VMM grants them at spawn, vmm.windows)."""
        return [Window(Space.PIO, parse_int(cls.kind, "pio", params.get("pio", "0x6000")), 16)]

    def __init__(self, host: DeviceHost, **params: str):
        self.pio = parse_int(self.kind, "pio", params.pop("pio", "0x6000"))
        self.vmm_pid = parse_int(self.kind, "vmm_pid", params.pop("vmm_pid", "1"))
        self.port = parse_int(self.kind, "port", params.pop("port", "9"))
        self.unix = params.pop("unix", "/nonexistent")
        self.dir = params.pop("dir", "/tmp")
        super().__init__(host, **params)
        self.outcome = 0xFFFF_FFFF

    def start(self) -> None:
        self.host.claim(Space.PIO, self.pio, 16)

    def read(self, space: Space, cookie: int, offset: int, size: int) -> int:
        return self.outcome if offset == 4 else 0

    def write(self, space: Space, cookie: int, offset: int, size: int, value: int) -> None:
        if offset != 0 or not 0 <= value < len(ATTACKS):
            return
        try:
            getattr(self, "attack_" + ATTACKS[value])()
        except OSError as e:
            self.outcome = e.errno or errno.EIO
        except ValueError:      # resource.setrlimit words EPERM so
            self.outcome = errno.EPERM
        else:
            self.outcome = 0

    # -- the attacks (each raises OSError when stopped by an error) ----------

    def attack_open_passwd(self) -> None:
        os.close(os.open("/etc/passwd", os.O_RDONLY))

    def attack_open_vmm_mem(self) -> None:
        os.close(os.open(f"/proc/{self.vmm_pid}/mem", os.O_RDONLY))

    def attack_list_root(self) -> None:
        os.listdir("/")

    def attack_create_file(self) -> None:
        os.close(os.open(os.path.join(self.dir, "created-by-device"), os.O_CREAT | os.O_WRONLY, 0o600))

    def attack_tcp_connect(self) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.settimeout(2.0)
            s.connect(("127.0.0.1", self.port))
        finally:
            s.close()

    def attack_unix_connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(self.unix)
        finally:
            s.close()

    def attack_execve(self) -> None:
        os.execv("/bin/true", ["true"])

    def attack_fork(self) -> None:
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)

    def attack_ptrace_vmm(self) -> None:
        _syscall(SYS_ptrace, PTRACE_SEIZE, self.vmm_pid, 0, 0)
        try:    # a seized tracee is not stopped, so this fails; our exit detaches it anyway
            _syscall(SYS_ptrace, PTRACE_DETACH, self.vmm_pid, 0, 0)
        except OSError:
            pass

    def attack_kill_vmm(self) -> None:
        os.kill(self.vmm_pid, 0)

    def attack_mmap_exec(self) -> None:
        mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_EXEC).close()

    def attack_unshare(self) -> None:
        # (a new user namespace is refused to any process with threads: EINVAL)
        _syscall(SYS_unshare, CLONE_NEWNET)

    def attack_mount(self) -> None:
        _syscall(SYS_mount, b"none", self.dir.encode(), b"tmpfs", 0, None)

    def attack_raise_rlimit(self) -> None:
        """Raise a hard limit (needs CAP_SYS_RESOURCE)."""
        soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
        if hard == resource.RLIM_INFINITY:
            resource.setrlimit(resource.RLIMIT_MEMLOCK, (soft, soft))
            hard = soft
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (soft, hard + 4096))

    def attack_vmm_environ(self) -> None:
        with open(f"/proc/{self.vmm_pid}/environ", "rb") as f:
            f.read()


#: Attack numbers (the value written at offset 0).
ATTACKS = tuple(name[len("attack_"):] for name in vars(Hostile) if name.startswith("attack_"))


def main() -> int:
    from devserver import runtime
    from devserver.cli import main as devserver_main

    served = sys.argv[1]
    real = runtime.resolve

    def resolve(kind: str) -> type[Device]:
        return Hostile if kind == served else real(kind)

    runtime.resolve = resolve   # this process serves Hostile under KIND (TEST-ONLY)
    return devserver_main(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
