"""Spawning and supervising a device process (a child of this VMM).

:meth:`DeviceProcess.start` runs the device program with one end of the
control socket pair as ``--fd N`` (nothing else of the VMM's: stdin and
stdout are /dev/null, stderr goes through :class:`vmm.console.StderrRelay`),
in its own session, optionally pinned to ``cpus``.  The process is watched
through a pidfd, so only this child can ever be signalled.  It is the
:class:`vmm.remote.peer.Peer` of the endpoint that talks to it.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import socket
from collections.abc import Mapping, Sequence, Set
from typing import TYPE_CHECKING

from devices import kinds
from vmm.console import StderrRelay
from vmm.endpoint import DeviceFailed
from vmm.remote.options import DEVSERVER_COMMAND

if TYPE_CHECKING:
    import subprocess

    from vmm.forkserver import ForkServer

__all__ = ["DeviceProcess", "child_env"]

log = logging.getLogger(__name__)


class DeviceProcess:
    """One device child: its Popen and pidfd."""

    def __init__(self, proc: subprocess.Popen, pidfd: int):
        self.pid = proc.pid
        self._proc = proc
        self._pidfd = pidfd

    @classmethod
    def start(cls, command: Sequence[str], channel: socket.socket, name: str,
              cpus: Set[int] | None = None, env: Mapping[str, str] | None = None,
              stderr: int | None = None, forkserver: ForkServer | None = None) -> DeviceProcess:
        """Start ``command --fd N`` with ``channel`` as descriptor N; the
        caller's copy of ``channel`` is closed on every path.  ``env``:
        the child's environment (None: the VMM's; :func:`child_env`);
        ``stderr``: where its log goes (None: the VMM's stderr);
        ``forkserver``: fork a ``devserver`` there instead of exec'ing it
        (:mod:`vmm.forkserver`; only for the devserver command: another
        program, or a server that is gone, is exec'd)."""
        proc = pidfd = None
        # No descriptor of the VMM's terminal reaches the device (vmm.console).
        relay = StderrRelay.for_child() if stderr is None else None
        if forkserver is not None and tuple(command[:len(DEVSERVER_COMMAND)]) == DEVSERVER_COMMAND:
            forked = _forked(forkserver, command, channel, name, cpus, env, stderr, relay)
            if forked is not None:
                return forked
        import subprocess       # only for an exec'd process: a forked one is the common case

        try:
            try:
                proc = subprocess.Popen([*command, "--fd", str(channel.fileno()), *_log_level_args(command)],
                                        pass_fds=[channel.fileno()], stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, start_new_session=True, env=env,
                                        stderr=relay.child_fd if relay is not None else stderr)
            finally:
                channel.close()      # the child has its copy
                if relay is not None and proc is not None:
                    relay.started(name)
                elif relay is not None:
                    relay.abandon()
            pidfd = os.pidfd_open(proc.pid)
            if cpus is not None:
                os.sched_setaffinity(proc.pid, cpus)
        except BaseException:
            if pidfd is not None:
                os.close(pidfd)
            if proc is not None:
                _kill_and_reap(proc)
            raise
        return cls(proc, pidfd)

    @property
    def exit_fd(self) -> int | None:
        """The pidfd (polls readable once the child has exited)."""
        return self._pidfd

    @property
    def returncode(self) -> int | None:
        """Its exit status once reaped (negative: the signal), else None."""
        return self._proc.returncode

    def kill(self) -> None:
        """SIGKILL through the pidfd."""
        try:
            signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
        except (OSError, ValueError):
            pass  # already gone, or pidfd closed

    def wait(self, timeout: float) -> bool:
        """Reap it if it exits within ``timeout`` seconds; True once reaped."""
        if self._proc.returncode is None and self._pidfd >= 0 and timeout > 0:
            # Popen.wait(timeout) polls with sleeps of up to 50 ms; the
            # pidfd says at once when the child has exited.
            poller = select.poll()
            poller.register(self._pidfd, select.POLLIN)
            if not poller.poll(max(0, int(timeout * 1000))):
                return False
            timeout = max(timeout, 1.0)     # it has exited: reaping it takes no time
        import subprocess

        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        return True

    def exit_text(self, wait: float) -> str:
        if not self.wait(wait):
            return "still running"
        rc = self.returncode
        assert rc is not None
        return f"killed by {signal.Signals(-rc).name}" if rc < 0 else f"exited with status {rc}"

    def close(self) -> None:
        """Close the pidfd (the child must be reaped already)."""
        if self._pidfd >= 0:
            try:
                os.close(self._pidfd)
            except OSError:
                pass
        self._pidfd = -1


def _forked(server: ForkServer, command: Sequence[str], channel: socket.socket, name: str,
            cpus: Set[int] | None, env: Mapping[str, str] | None, stderr: int | None,
            relay: StderrRelay | None) -> DeviceProcess | None:
    """``command`` forked by ``server`` (None: the server is gone; the
    caller execs instead).  Closes ``channel`` unless it returns None."""
    from vmm.forkserver import ForkServerError
    from vmm.remote.forked import ForkedProcess

    argv = [*command[len(DEVSERVER_COMMAND):], "--fd", str(channel.fileno()), *_log_level_args(command)]
    err = relay.child_fd if relay is not None else stderr if stderr is not None else 2
    try:
        # The environment as it is now, as an exec'd device would get it (the
        # server's is the VMM's of when it started).
        proc = ForkedProcess(server, *server.spawn(argv, channel.fileno(), err,
                                                   dict(os.environ) if env is None else env))
    except ForkServerError as e:
        log.warning("device %s: %s; starting it the slow way", name, e)
        return None
    except BaseException:
        channel.close()
        if relay is not None:
            relay.abandon()
        raise
    channel.close()
    if relay is not None:
        relay.started(name)
    if cpus is not None:
        try:
            os.sched_setaffinity(proc.pid, cpus)
        except BaseException:
            proc.kill()
            proc.wait(5.0)
            proc.close()
            raise
    return proc


def child_env(kind: str, name: str) -> dict[str, str] | None:
    """The device process's environment: the VMM's, plus, for a
    ``MODULE:CLASS`` model, the directory the VMM imported that module
    from in front of PYTHONPATH (importable here, importable there).
    None for a registered kind (the VMM's environment as it is).  Raises
    DeviceFailed for a type that names no model."""
    if not kinds.is_qualified(kind):
        return None
    try:
        root = kinds.import_root(kinds.resolve(kind))
    except kinds.ModelNotFound as e:
        raise DeviceFailed(f"device {name}: {e}") from None
    if root is None:
        return None
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": root if not path else f"{root}{os.pathsep}{path}"}


def _log_level_args(command: Sequence[str]) -> list[str]:
    """Give a devserver the VMM's logging level (quiet unless the VMM is
    verbose); other device programs get no extra arguments."""
    if tuple(command) != tuple(DEVSERVER_COMMAND):
        return []
    level = logging.getLogger().getEffectiveLevel()
    name = "DEBUG" if level <= logging.DEBUG else "INFO" if level <= logging.INFO else "WARNING"
    return ["--log-level", name]


def _kill_and_reap(proc: subprocess.Popen) -> None:
    import subprocess

    try:
        proc.kill()
    except OSError:
        pass
    try:
        proc.wait(5.0)
    except subprocess.TimeoutExpired:
        log.error("device process %d does not die", proc.pid)
