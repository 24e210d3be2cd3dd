"""``seccomp_probe.py KIND CASE``: load KIND's seccomp allowlist
(devserver.sandbox.policy) in this process, then make the one call CASE
names (tests/devserver/test_sandbox_policy.py).  Exit 0: the call ran;
3: it failed, its errno printed on stdout; death by SIGSYS: killed."""

import ctypes
import fcntl
import mmap
import os
import resource
import signal
import socket
import sys
import tempfile
import termios
import threading

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from devserver.sandbox import seccomp  # noqa: E402
from devserver.sandbox.policy import rules_for  # noqa: E402

libc = ctypes.CDLL(None, use_errno=True)
libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
libc.syscall.restype = ctypes.c_long
TIOCSTI = 0x5412
MADV_HUGEPAGE = 14
SYS_clone3 = 435


def check(rc: int) -> None:
    if rc < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def main() -> None:
    kind, case = sys.argv[1], sys.argv[2]
    page = mmap.mmap(-1, mmap.PAGESIZE)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(page))
    a, b = socket.socketpair()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(b"\0splitvmm-probe-%d" % os.getpid())
    listener.listen(1)
    listener.setblocking(False)
    image = tempfile.TemporaryFile()
    image.write(b"x" * 512)
    image.flush()
    fd = image.fileno()
    cases = {
        "mmap_rw": lambda: mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE),
        "mmap_exec": lambda: mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_EXEC),
        "mprotect_ro": lambda: check(libc.mprotect(addr, mmap.PAGESIZE, mmap.PROT_READ)),
        "mprotect_exec": lambda: check(libc.mprotect(addr, mmap.PAGESIZE, mmap.PROT_READ | mmap.PROT_EXEC)),
        "madvise_dontneed": lambda: page.madvise(mmap.MADV_DONTNEED),
        "madvise_hugepage": lambda: page.madvise(MADV_HUGEPAGE),
        "thread": lambda: _thread(),
        "fork": lambda: os.fork() == 0 and os._exit(0),
        "clone3": lambda: check(libc.syscall(SYS_clone3, None, 0)),
        "kill_self": lambda: os.kill(os.getpid(), 0),
        "kill_parent": lambda: os.kill(os.getppid(), 0),
        "tgkill_self": lambda: signal.pthread_kill(threading.get_ident(), 0),
        "fstat": lambda: os.fstat(fd),
        "stat_path": lambda: os.stat("/"),
        "getrlimit": lambda: resource.getrlimit(resource.RLIMIT_NOFILE),
        "setrlimit": lambda: resource.setrlimit(resource.RLIMIT_CORE, resource.getrlimit(resource.RLIMIT_CORE)),
        "ioctl_fionbio": lambda: a.setblocking(False),
        "ioctl_tcgets": lambda: fcntl.ioctl(a.fileno(), termios.TCGETS, bytes(64)),
        "ioctl_tiocsti": lambda: fcntl.ioctl(a.fileno(), TIOCSTI, b"x"),
        "open": lambda: os.open("/etc/hostname", os.O_RDONLY),
        "socket": lambda: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM),
        "sendmsg": lambda: a.sendmsg([b"x"]),
        "pread": lambda: os.pread(fd, 512, 0),
        "preadv": lambda: os.preadv(fd, [bytearray(512)], 0),
        "pwritev": lambda: os.pwritev(fd, [b"y" * 512], 0),
        "fdatasync": lambda: os.fdatasync(fd),
        "getrandom": lambda: os.getrandom(8),
        "accept": lambda: _accept(listener),
    }
    call = cases[case]
    seccomp.load(rules_for(kind, None, os.getpid()), "kill")
    try:
        call()
    except OSError as e:
        os.write(1, str(e.errno).encode())
        os._exit(3)
    os._exit(0)


def _thread() -> None:
    t = threading.Thread(target=lambda: None)
    t.start()
    t.join()


def _accept(listener) -> None:
    try:
        listener.accept()
    except BlockingIOError:
        pass        # the call ran: nobody is connecting


if __name__ == "__main__":
    main()
