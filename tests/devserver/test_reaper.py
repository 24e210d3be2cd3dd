"""The sandbox's outer reaper (devserver.sandbox.namespaces.reap) leaves
with the parent it was started under, also when that parent died before
it looked: real processes, no namespaces needed."""

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
