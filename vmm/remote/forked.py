"""A device process forked by the fork server (:mod:`vmm.forkserver`),
supervised like an exec'd one (:class:`vmm.remote.process.DeviceProcess`):
a pidfd to watch and signal it through (the device is the server's child,
not the VMM's, and a pidfd works on any process); its exit status comes
from the server, its parent, which reaps it."""

from __future__ import annotations

import os
import select
import signal
import time

from vmm.forkserver import ForkServer
from vmm.remote.process import DeviceProcess

__all__ = ["ForkedProcess"]


class ForkedProcess(DeviceProcess):
    """One device process of the fork server."""

    def __init__(self, server: ForkServer, pid: int, pidfd: int):  # not super(): that takes a Popen
        self.pid = pid
        self._pidfd = pidfd
        self._server = server
        self._returncode: int | None = None

    @property
    def returncode(self) -> int | None:
        return self._returncode

    def wait(self, timeout: float) -> bool:
        """True once it has exited (within ``timeout`` seconds) and the
        server has said how."""
        if self._returncode is not None:
            return True
        deadline = time.monotonic() + timeout
        if self._pidfd >= 0:
            poller = select.poll()
            poller.register(self._pidfd, select.POLLIN)
            if not poller.poll(max(0, int(timeout * 1000))):
                return False
        # It has exited; its parent (the server) reaps it and says how.
        status = self._server.status(self.pid, max(0.0, deadline - time.monotonic()) + 1.0)
        if status is None:
            if self._server.alive:
                return False
            self._returncode = -signal.SIGKILL      # unknown: the server died with the status
            return True
        self._returncode = os.waitstatus_to_exitcode(status)
        return True
