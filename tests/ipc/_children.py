"""Forked child processes for the registry's multi-process tests.

``spawn(fn, *args)`` forks; the child runs ``fn(*args)``, sends its return
value (JSON) back through a pipe and leaves with ``os._exit`` (0 when
``fn`` returned, 1 when it raised: the traceback goes to stderr, which
pytest captures).  The child never returns into pytest.  A child may call
:func:`child_ready` once to tell the parent it has reached its main loop.

Every wait is bounded: :meth:`Child.wait` kills the child and raises when
its deadline passes, and :meth:`Child.kill` is safe to call on a child that
has already gone (tests call it in ``finally``).
"""

from __future__ import annotations

import errno
import json
import os
import select
import signal
import sys
import time
import traceback

_ready_fd: int | None = None


def child_ready() -> None:
    """In a child: tell the parent the child's main loop has started."""
    global _ready_fd
    if _ready_fd is not None:
        os.write(_ready_fd, b"R")
        os.close(_ready_fd)
        _ready_fd = None


class Child:
    def __init__(self, pid: int, result_fd: int, ready_fd: int):
        self.pid = pid
        self._result_fd = result_fd
        self._ready_fd = ready_fd
        self._data = bytearray()
        self.status: int | None = None  # raw wait status once reaped
        self._stopped = False

    # -- state -----------------------------------------------------------

    def _drain(self) -> None:
        if self._result_fd < 0:
            return
        while True:
            r, _, _ = select.select([self._result_fd], [], [], 0)
            if not r:
                return
            chunk = os.read(self._result_fd, 65536)
            if not chunk:
                os.close(self._result_fd)
                self._result_fd = -1
                return
            self._data += chunk

    def poll(self) -> int | None:
        """Reap the child if it has exited; its raw status, or None."""
        self._drain()
        if self.status is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid == self.pid:
                self.status = status
        return self.status

    @property
    def alive(self) -> bool:
        return self.poll() is None

    @property
    def signaled(self) -> int | None:
        """The signal that ended the child, or None."""
        if self.status is not None and os.WIFSIGNALED(self.status):
            return os.WTERMSIG(self.status)
        return None

    @property
    def exitcode(self) -> int | None:
        if self.status is not None and os.WIFEXITED(self.status):
            return os.WEXITSTATUS(self.status)
        return None

    def describe(self) -> str:
        if self.status is None:
            return f"child {self.pid} still running"
        if self.signaled is not None:
            return f"child {self.pid} killed by {signal.Signals(self.signaled).name}"
        return f"child {self.pid} exited with {self.exitcode}"

    # -- waiting ---------------------------------------------------------

    def wait_ready(self, timeout: float) -> None:
        """Wait until the child called child_ready() (or raise)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self.kill()
                raise TimeoutError(f"child {self.pid} not ready within {timeout} s")
            r, _, _ = select.select([self._ready_fd], [], [], min(left, 0.05))
            if r:
                if os.read(self._ready_fd, 1) == b"R":
                    return
                self.poll()
                raise AssertionError(f"{self.describe()} before it was ready")

    def wait(self, timeout: float) -> int:
        """Wait for the child to end; kill it and raise after ``timeout``."""
        deadline = time.monotonic() + timeout
        delay = 0.0005
        while self.poll() is None:
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(f"child {self.pid} did not finish within {timeout} s")
            time.sleep(delay)
            delay = min(delay * 2, 0.02)
        self._finish()
        return self.status

    def wait_stopped(self, timeout: float) -> bool:
        """Wait until the child is stopped by a signal (SIGSTOP)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.status is not None:
                return False
            pid, status = os.waitpid(self.pid, os.WNOHANG | os.WUNTRACED)
            if pid == self.pid:
                if os.WIFSTOPPED(status):
                    self._stopped = True
                    return True
                self.status = status
                return False
            time.sleep(0.0005)
        return False

    def result(self):
        """What the child's function returned (after wait)."""
        self._finish()
        if not self._data:
            return None
        return json.loads(self._data.decode())

    def _finish(self) -> None:
        # The child has exited: whatever it wrote is in the pipe, up to EOF.
        while self._result_fd >= 0:
            chunk = os.read(self._result_fd, 65536)
            if not chunk:
                os.close(self._result_fd)
                self._result_fd = -1
            else:
                self._data += chunk
        if self._ready_fd >= 0:
            os.close(self._ready_fd)
            self._ready_fd = -1

    def kill(self) -> None:
        """SIGKILL the child (if it is still there) and reap it."""
        if self.status is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                _, self.status = os.waitpid(self.pid, 0)
            except ChildProcessError:
                self.status = 0
        self._finish()


def spawn(fn, *args) -> Child:
    """Fork; the child runs fn(*args) and exits.  See the module doc."""
    global _ready_fd
    rr, rw = os.pipe()
    yr, yw = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            os.close(rr)
            os.close(yr)
            _ready_fd = yw
            result = fn(*args)
            data = json.dumps(result).encode()
            while data:
                try:
                    n = os.write(rw, data)
                except OSError as e:
                    if e.errno == errno.EINTR:
                        continue
                    raise
                data = data[n:]
            code = 0
        except BaseException:
            traceback.print_exc()
            sys.stderr.flush()
        finally:
            os._exit(code)
    os.close(rw)
    os.close(yw)
    return Child(pid, rr, yr)


def kill_all(children) -> None:
    for c in children:
        if c is not None:
            c.kill()
