"""The sandbox's outer reaper (devserver.sandbox.namespaces.reap, which
execs devserver/_reaper) leaves with the parent it was started under,
also when that parent died before it looked, and leaves the way its pid 1
says the device left: real processes, no namespaces needed."""

from __future__ import annotations

import os
import select
import signal
import time

from devserver.sandbox import _sys, namespaces


def test_a_reaper_whose_parent_is_gone_already_kills_pid_1_and_leaves():
    # A service's listener killed while its session was still applying the
    # sandbox: by the time the reaper reaches reap(), its parent is another
    # process.  Given the parent it started under, it must not wait for a
    # parent it has already lost (the device would serve on, unstoppable).
    t0 = time.monotonic()
    reaper = os.fork()
    if reaper == 0:
        try:
            inner = os.fork()
            if inner == 0:                 # pid 1's stand-in: would wait forever
                _sys.set_parent_death_signal(signal.SIGKILL)    # (not past this test, whatever happens)
                while True:
                    signal.pause()
            namespaces.reap(inner, os.pidfd_open(inner), -1, parent=os.getppid() + 1_000_000)
        finally:
            os._exit(99)
    pidfd = os.pidfd_open(reaper)
    try:
        assert select.select([pidfd], [], [], 10)[0], "the reaper is still waiting"
    finally:
        os.close(pidfd)
    _, status = os.waitpid(reaper, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert time.monotonic() - t0 < 5


def test_a_reaper_mirrors_its_pid_1_while_the_parent_stays():
    reaper = os.fork()
    if reaper == 0:
        try:
            inner = os.fork()
            if inner == 0:
                os._exit(7)
            namespaces.reap(inner, os.pidfd_open(inner), -1, parent=os.getppid())
        finally:
            os._exit(99)
    _, status = os.waitpid(reaper, 0)
    assert os.waitstatus_to_exitcode(status) == 7


def _reaper_status(inner_body) -> int:
    """Fork a reaper whose pid 1 stand-in runs ``inner_body(w)`` (``w``: the
    write end of the status pipe); the reaper's wait status."""
    r, w = os.pipe()
    reaper = os.fork()
    if reaper == 0:
        try:
            inner = os.fork()
            if inner == 0:
                try:
                    os.close(r)
                    inner_body(w)
                finally:
                    os._exit(1)
            os.close(w)
            namespaces.reap(inner, os.pidfd_open(inner), r, parent=os.getppid())
        finally:
            os._exit(99)
    os.close(r)
    os.close(w)
    _, status = os.waitpid(reaper, 0)
    return status


def _die_of(signo: int) -> None:
    # The disposition is this process's, inherited through the forks: a
    # test before this one may have handled the signal (a Machine handles
    # SIGUSR1, its vCPU kick, for the rest of the process), and pid 1's
    # stand-in would then live on and exit 1.
    signal.signal(signo, signal.SIG_DFL)
    os.kill(os.getpid(), signo)


def test_a_reaper_dies_of_the_signal_its_pid_1_died_of():
    status = _reaper_status(lambda w: _die_of(signal.SIGUSR1))
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGUSR1


def test_a_reaper_leaves_as_the_status_pid_1_passed_on():
    # pid 1 passes the device's wait status (killed by seccomp: SIGSYS) and
    # exits 1 itself: the reaper must die of SIGSYS, as the device did.
    import struct

    def inner(w):
        os.write(w, struct.pack("<i", signal.SIGSYS))
        os._exit(1)
    status = _reaper_status(inner)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSYS
    # ... and with an exit code passed, that code
    status = _reaper_status(lambda w: (os.write(w, struct.pack("<i", 3 << 8)), os._exit(1)))
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 3


def test_reapers_pass_sigterm_on_to_the_device():
    # A service's session: SIGTERM to the process the listener started goes
    # to pid 1, from there to the device, whose exit both reapers mirror.
    # SIGTERM stays blocked in the reapers from before their forks until
    # the program handles it (as fork_into_pid_namespace does).
    ready_r, ready_w = os.pipe()
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM])
    try:
        outer = os.fork()
        if outer == 0:
            try:
                r, w = os.pipe()
                inner = os.fork()
                if inner == 0:
                    os.close(r)
                    device = os.fork()
                    if device == 0:
                        signal.signal(signal.SIGTERM, lambda _s, _f: os._exit(6))
                        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGTERM])
                        os.write(ready_w, b"x")
                        while True:
                            signal.pause()
                    namespaces.reap_inside(device, w, forward=True)
                os.close(w)
                namespaces.reap(inner, os.pidfd_open(inner), r, parent=os.getppid(), forward=True)
            finally:
                os._exit(99)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGTERM])
    assert select.select([ready_r], [], [], 10)[0], "the device never got ready"
    os.kill(outer, signal.SIGTERM)
    pidfd = os.pidfd_open(outer)
    try:
        assert select.select([pidfd], [], [], 10)[0], "the reaper is still waiting"
    finally:
        os.close(pidfd)
    _, status = os.waitpid(outer, 0)
    os.close(ready_r)
    os.close(ready_w)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 6, status
