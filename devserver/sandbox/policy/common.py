"""The allowlist every device process gets: the interpreter and the IPC
core (futexes, polling, eventfds, reads and writes, messages on its
sockets, memory without PROT_EXEC, threads, clocks, signals to itself,
exit).  ``open``/``openat`` and ``socket`` answer EACCES (a lazy import or
a model that tries gets a clean error); everything else not listed gets
the default action."""

from __future__ import annotations

import errno
import mmap
import termios

from devserver.sandbox import _sys
from devserver.sandbox.policy import EQ, MASKED_EQ, Arg, Rule

MADV_DONTNEED = 4
MADV_FREE = 8
AT_EMPTY_PATH = 0x1000
PROT_EXEC = mmap.PROT_EXEC

_PLAIN = (
    # reads and writes on descriptors it holds
    "read", "write", "readv", "writev", "close", "lseek", "dup", "dup3", "fcntl",
    # messages on its sockets (control socket: sendmsg/recvmsg with SCM_RIGHTS;
    # sock.recv is recvfrom, sock.send sendto; interpreter exit calls getsockname)
    "recvmsg", "sendmsg", "recvfrom", "sendto", "getsockname", "shutdown",
    # waiting: futexes (locks, the registry, slots), poll/epoll/select
    "futex", "poll", "ppoll", "epoll_create1", "epoll_ctl", "epoll_wait", "epoll_pwait",
    "select", "pselect6", "eventfd2", "pipe2",
    # memory (mmap/mprotect below, without PROT_EXEC)
    "munmap", "mremap", "brk",
    # threads (clone below, only CLONE_THREAD)
    "set_robust_list", "get_robust_list", "rseq", "set_tid_address", "sched_yield",
    "sched_getaffinity", "sched_setaffinity", "membarrier",
    # identity, clocks and sleeping
    "getpid", "gettid", "getppid", "getuid", "geteuid", "getgid", "getegid",
    "clock_gettime", "clock_getres", "clock_nanosleep", "nanosleep", "gettimeofday",
    # signals (kill/tgkill below, to itself only)
    "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "sigaltstack", "restart_syscall",
    "exit", "exit_group",
)


def rules(own_pid: int) -> tuple[Rule, ...]:
    """The common part, for a process whose pid (as it sees it) is ``own_pid``."""
    no_exec = Arg(2, MASKED_EQ, PROT_EXEC, 0)
    return tuple(Rule(n) for n in _PLAIN) + (
        Rule("mmap", (no_exec,)),
        Rule("mprotect", (no_exec,)),
        Rule("madvise", (Arg(2, EQ, MADV_DONTNEED),)),
        Rule("madvise", (Arg(2, EQ, MADV_FREE),)),
        Rule("clone", (Arg(0, MASKED_EQ, _sys.CLONE_THREAD, _sys.CLONE_THREAD),)),
        Rule("clone3", errno=errno.ENOSYS),     # glibc falls back to clone
        Rule("kill", (Arg(0, EQ, own_pid),)),
        Rule("tgkill", (Arg(0, EQ, own_pid),)),
        Rule("tkill", (Arg(0, EQ, own_pid),)),
        # fstat is newfstatat(fd, "", buf, AT_EMPTY_PATH) in glibc
        Rule("newfstatat", (Arg(3, MASKED_EQ, AT_EMPTY_PATH, AT_EMPTY_PATH),)),
        Rule("fstat"),
        # reading a limit (new_limit NULL), never raising one
        Rule("prlimit64", (Arg(2, EQ, 0),)),
        Rule("getrlimit"),
        # setblocking is ioctl(FIONBIO); isatty asks TCGETS (answered: not a terminal)
        Rule("ioctl", (Arg(1, EQ, termios.FIONBIO),)),
        Rule("ioctl", (Arg(1, EQ, termios.FIOCLEX),)),
        Rule("ioctl", (Arg(1, EQ, termios.TCGETS),), errno=errno.ENOTTY),
        Rule("open", errno=errno.EACCES),
        Rule("openat", errno=errno.EACCES),
        Rule("socket", errno=errno.EACCES),
    )

