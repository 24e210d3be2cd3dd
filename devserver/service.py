"""``devserver serve``: a device as a service that VMMs connect to.

    devserver serve KIND[,key=value...] [--listen PATH] [--handshake-timeout SECONDS]
                    [--busy-grace SECONDS] [--log-level LEVEL]
    devserver serve --print-capabilities

The service runs one device model (``KIND`` with its own parameters: image
path, read-only, serial id...) for one VM at a time.  Its listening socket
(``AF_UNIX SOCK_SEQPACKET``) is ``--listen PATH``, or the one systemd's
socket activation passed (:mod:`devserver.activation`).  A VMM attaches
with ``--device KIND,connect=PATH[,id=NAME][,slot=N]`` and runs the same
handshake as with a device it spawns (:mod:`devserver.runtime`): it sends
guest memory, the registry and slot segments, and the placement it decided
(PCI slot, BAR windows, id); the service adds its own parameters
(:meth:`DeviceService.merge`).  A kind that is not this service's, or a
parameter given on both sides, is refused: the VMM gets an Error naming
it, the service logs one line, and listens again.

Each VM session runs in a process of its own, forked from the listener:
the listener never starts a thread (it checks before every fork), so the
child can enter a user namespace, and the session applies the sandbox
exactly as a spawned device does (:mod:`devserver.sandbox`: strict by
default, ``--sandbox auto`` applies what the host or unit allows and
still loads seccomp, ``off`` for debugging; ``--seccomp kill|trap|log``).
The sandbox is the service's: the VMM's DeviceConfig cannot weaken it.
Forking keeps everything imported: a session starts in tens of
milliseconds, where a fresh ``python -m devserver --fd N`` takes about
200 ms.  The device that sends Ready is the session's process (pid 1 of
its pid namespace under the sandbox), so the pid the VMM takes from the
kernel (SO_PASSCRED) is the one to kill.

When the session's process exits -- Shutdown, the connection closed, the
VMM killed, a seccomp kill, the VMM cutting it off -- the listener reaps
it, logs how it ended, and listens again, so a restarted VMM finds it
where it was.  While a VM is served, another VMM that connects waits
``--busy-grace`` seconds (a restarted VMM often connects just before the
old connection's end is seen) and is then refused ("busy", told by a
short-lived forked process so the loop never waits on a client).

With ``$NOTIFY_SOCKET`` (:mod:`devserver.notify`): READY=1 once listening,
STATUS= (listening / serving the VM of pid N, accesses served),
STOPPING=1 on SIGTERM or SIGINT (the session gets SIGTERM, SIGKILL after
:data:`STOP_GRACE`).  WATCHDOG=1: between VMs from the listener's loop;
while a VM is served only as the session's own keep-alives arrive over a
pipe (sent from its handshake waits and serving loop, with the accesses
served), so a hung model stops the pings and the manager restarts the
service.

Exit status: 0 stopped by SIGTERM/SIGINT; 1 no usable listening socket; 2
bad command line.  A session's process exits as a device process does,
or with 3 when a model handler is stuck after its VM went away.

Restart with state (issue 10 sections 2-3): a VMM that reconnects after a
death hands the new session the state segment it kept (SetState), and the
session restores from it as a restarted spawned device does
(:mod:`devserver.persist`).  A session dies with its listener: the
listener is single-threaded, so the session's process (the sandbox's outer
reaper) keeps PR_SET_PDEATHSIG across the sandbox's uid switch, which
clears it (``parent_death``, :func:`devserver.sandbox.namespaces.fork_into_pid_namespace`);
a listener killed by its manager takes the device down at once, and the
VMM reconnects to the next one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import select
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Sequence

from devserver import activation
from devserver.activation import ActivationError, Listener
from devices.kinds import ModelNotFound, kinds, resolve
from devserver.notify import Notifier, Watchdog, watchdog_interval
from devserver.runtime import DeviceServer, StartFailed, configure_logging, set_log_name
from devserver.sandbox import (DEFAULT_MODE, DEFAULT_SECCOMP, MODES, SECCOMP_MODES, SandboxConfig,
                               _sys)
from ipc.protocol import FEATURES, PROTOCOL_VERSION, DeviceConfig, Error, Hello, Role
from ipc.transport import Channel, ChannelTimeout, peer_credentials

__all__ = ["ServiceSpec", "SpecError", "DeviceService", "parse_spec", "capabilities", "main"]

log = logging.getLogger("devserver")

EXIT_OK = 0
EXIT_NO_SOCKET = 1
EXIT_USAGE = 2
EXIT_STUCK = 3
#: A session's process that failed outside the runtime (a bug).
EXIT_CRASHED = 70
#: Keys that name a device to the VMM, never parameters of its model.
RESERVED_KEYS = frozenset({"id", "process", "connect"})
#: How long a VMM that connects while another is served waits for that
#: session to end before it is refused.
BUSY_GRACE = 2.0
#: How long a refused client has to say Hello (to be told why).
REFUSE_HELLO_TIMEOUT = 2.0
#: Longest sleep of the accept loop (it ticks the watchdog in between).
ACCEPT_SLICE = 1.0
#: How long a session's process has to end after SIGTERM when the
#: service stops, before it is killed.
STOP_GRACE = 5.0
#: How often a session reports its health without a watchdog (its served
#: count, for STATUS=).
HEALTH_PERIOD = 1.0
#: Blocked around a fork, so the child never runs the listener's handlers.
STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}
#: What ``--print-capabilities`` lists beyond the protocol's features.
SERVICE_FEATURES = ("listen", "socket-activation", "sd-notify", "watchdog", "one-vm-at-a-time",
                    "process-per-session", "sandbox")


class SpecError(ValueError):
    """A bad ``KIND[,key=value...]`` on the service's command line."""


@dataclasses.dataclass(frozen=True)
class ServiceSpec:
    """The device this service runs: its kind and its own parameters."""

    kind: str
    params: dict[str, str]


def parse_spec(text: str) -> ServiceSpec:
    """``KIND[,key=value...]`` -> ServiceSpec; SpecError says what is wrong."""
    kind, _, rest = text.partition(",")
    kind = kind.strip()
    if not kind:
        raise SpecError(f"{text!r}: missing KIND")
    try:
        resolve(kind)
    except ModelNotFound as e:
        raise SpecError(str(e)) from None
    params: dict[str, str] = {}
    for item in rest.split(",") if rest else ():
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise SpecError(f"{text!r}: {item!r} is not key=value")
        if key in RESERVED_KEYS:
            raise SpecError(f"{text!r}: {key}= is given by the VMM (--device {kind},connect=PATH,{key}=...), "
                            "not on the service's command line")
        if key in params:
            raise SpecError(f"{text!r}: {key} given twice")
        params[key] = value.strip()
    return ServiceSpec(kind, params)


def capabilities() -> dict:
    """What ``--print-capabilities`` prints (cf. the vhost-user back-ends'
    option of the same name)."""
    return {
        "type": "splitvmm-device",
        "protocol": {"version": PROTOCOL_VERSION, "features": sorted(FEATURES)},
        "kinds": sorted(kinds()),
        "features": list(SERVICE_FEATURES),
        "socket": "AF_UNIX SOCK_SEQPACKET",
    }


def peer_pid(sock: socket.socket) -> int:
    """The pid of the VMM that connected (SO_PEERCRED; 0 if unknown)."""
    return peer_credentials(sock)[0]


class DeviceService:
    """The listener: one VM session after another, each in a process of its
    own (module docstring)."""

    def __init__(self, spec: ServiceSpec, listener: Listener, notifier: Notifier | None = None, *,
                 handshake_timeout: float = 10.0, busy_grace: float = BUSY_GRACE,
                 watchdog: float | None = None, sandbox_config: SandboxConfig | None = None):
        self.spec = spec
        self.listener = listener
        self.notifier = notifier if notifier is not None else Notifier(None)
        self.handshake_timeout = handshake_timeout
        self.busy_grace = busy_grace
        self.watchdog = Watchdog(self.notifier, watchdog, status=self.status_text)
        #: The sandbox of every session's device (the service's, not the VMM's).
        self.sandbox = sandbox_config if sandbox_config is not None else SandboxConfig()
        #: Sessions so far, and accesses served in the finished ones.
        self.sessions = 0
        self.served_before = 0
        #: The session being served (its process), if any.
        self.session: Session | None = None
        #: Connections waiting while a VM is served: (socket, accepted at).
        self._pending: list[tuple[socket.socket, float]] = []
        #: Short-lived processes telling a waiting VMM it is refused.
        self._refusers: set[int] = set()
        self._stop = False
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        listener.sock.setblocking(False)

    # -- what the manager sees --------------------------------------------

    @property
    def serving(self) -> bool:
        return self.session is not None

    @property
    def vm_pid(self) -> int:
        return self.session.vm_pid if self.session is not None else 0

    def session_served(self) -> int:
        """Accesses served to the VM being served (0 between VMs), as the
        session's last keep-alive reported."""
        return self.session.served if self.session is not None else 0

    def served(self) -> int:
        """Accesses served, in every session so far (this one included)."""
        return self.served_before + self.session_served()

    def status_text(self) -> str:
        if self.session is not None:
            return f"serving the VM of pid {self.session.vm_pid}; {self.session.served} access(es) served"
        return f"listening on {self.listener.where}; {self.sessions} VM(s) served, {self.served()} access(es)"

    # -- the loop ----------------------------------------------------------

    def run(self) -> int:
        """Serve VMs until :meth:`request_stop`; the exit status."""
        set_log_name(self.spec.kind)
        log.info("%s: listening on %s (sessions sandboxed: sandbox=%s seccomp=%s)", self.spec.kind,
                 self.listener.where, self.sandbox.mode, self.sandbox.seccomp)
        self.notifier.ready(self.status_text())
        try:
            while not self._stop:
                self._step()
        finally:
            self._stop_session()
            self.notifier.stopping(f"stopping; {self.sessions} VM(s) served")
            for conn, _ in self._pending:
                conn.close()
            self._pending.clear()
            self._reap_refusers(block=True)
            self.listener.close()
            os.close(self._wake_r)
            os.close(self._wake_w)
        log.info("stopped after %d VM session(s), %d access(es)", self.sessions, self.served_before)
        return EXIT_OK

    def request_stop(self) -> None:
        """End the service (from a signal handler: does not wait).  The
        session's process is asked to end too (SIGTERM: its VM's device
        shuts down cleanly)."""
        self._stop = True
        session = self.session
        if session is not None:
            session.signal(signal.SIGTERM)
        try:
            os.write(self._wake_w, b"!")
        except OSError:
            pass

    def _step(self) -> None:
        session = self.session
        now = time.monotonic()
        timeout = self.watchdog.wait_slice(ACCEPT_SLICE)
        if session is not None:
            for _, since in self._pending:
                timeout = min(timeout, max(0.0, since + self.busy_grace - now))
        watched = [self.listener.sock.fileno(), self._wake_r]
        if session is not None:
            watched.append(session.pidfd)
            if session.health >= 0:
                watched.append(session.health)
        try:
            ready = set(select.select(watched, [], [], timeout)[0])
        except InterruptedError:
            ready = set()
        if self._wake_r in ready:
            _drain_pipe(self._wake_r)
        pinged = False
        if session is not None and session.health in ready:
            pinged = session.read_health()
        if session is not None and session.pidfd in ready:
            self._session_ended(session)
            session = None
        if self.listener.sock.fileno() in ready:
            conn = _accept(self.listener.sock)
            if conn is not None:
                self._pending.append((conn, time.monotonic()))
        self._reap_refusers()
        if self._stop:
            return
        if session is None and self._pending:
            conn, _ = self._pending.pop(0)
            self._start_session(conn)
        elif session is not None:
            self._refuse_expired(session)
        # The keep-alive vouches for the loop that would hang: between VMs
        # this one, while a VM is served the session's serving loop, whose
        # own keep-alives (over the health pipe) are relayed as they come.
        if self.session is None or pinged:
            self.watchdog.tick()

    # -- a session's process --------------------------------------------------

    def _start_session(self, conn: socket.socket) -> None:
        vm_pid = peer_pid(conn)
        number = self.sessions + 1
        threads = _thread_count()
        if threads != 1:
            # A fork now would give the child locks held by threads it does
            # not have, and a user namespace would be refused to it.
            log.error("cannot serve the VMM of pid %d: the listener has %d threads (it must have one "
                      "to fork a session)", vm_pid, threads)
            self._refuse(conn, "internal error: the service cannot start a session")
            return
        health_r, health_w = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(health_w, False)
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                os.close(health_r)
                self._in_session_child(conn, health_w, vm_pid, blocked)     # never returns
            os.close(health_w)
            conn.close()
            try:
                pidfd = os.pidfd_open(pid)
            except OSError:     # cannot happen for our own unreaped child; keep the loop alive anyway
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                os.close(health_r)
                raise
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        self.sessions = number
        self.session = Session(number, pid, pidfd, health_r, vm_pid, started=time.monotonic())
        log.info("the VMM of pid %d connected (session %d), served by process %d", vm_pid, number, pid)
        self.notifier.status(self.status_text())

    def _in_session_child(self, conn: socket.socket, health_w: int, vm_pid: int, mask) -> None:
        """The session's process, forked from the single-threaded listener:
        serve this one VM (sandboxed like a spawned device), then exit."""
        rc = EXIT_CRASHED
        try:
            _sys.set_parent_death_signal(signal.SIGKILL)
            server: DeviceServer | None = None

            def stop(_signo: int, _frame: object) -> None:
                if server is not None:
                    server.request_stop()

            signal.signal(signal.SIGTERM, stop)
            signal.signal(signal.SIGINT, signal.SIG_IGN)    # a Ctrl-C is the listener's
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            for other, _ in self._pending:
                other.close()
            self.listener.sock.close()
            self.notifier.close()       # NotifyAccess=main: the manager hears the listener only
            os.close(self._wake_r)
            os.close(self._wake_w)
            period = self.watchdog.interval / 2 if self.watchdog.interval else HEALTH_PERIOD
            beat = _Heartbeat(health_w, period)
            server = DeviceServer(Channel(conn, Role.DEVICE), self.handshake_timeout, check_parent=True,
                                  config_filter=self.merge, tick=lambda: beat.tick(server),
                                  wait_slice=min(period, 1.0), stuck_status=EXIT_STUCK,
                                  keep_fds={health_w}, parent_death=True)
            if os.getppid() == 1 or self._stop:     # the listener died or stops before we could see it
                server.request_stop()
            rc = server.run()
            beat.send(server.served)
        except BaseException:
            log.exception("session with the VMM of pid %d failed", vm_pid)
        finally:
            try:
                logging.shutdown()
                sys.stderr.flush()
            finally:
                os._exit(rc)

    def _session_ended(self, session: Session) -> None:
        _, status = os.waitpid(session.pid, 0)
        session.close()
        self.session = None
        self.served_before += session.served
        how = _how(status)
        if os.WIFSIGNALED(status) or os.waitstatus_to_exitcode(status) not in (0, 1, 2):
            log.warning("session %d with the VMM of pid %d (process %d) %s; listening again",
                        session.number, session.vm_pid, session.pid, how)
        else:
            log.info("session %d with the VMM of pid %d %s; listening again", session.number,
                     session.vm_pid, how)
        set_log_name(self.spec.kind)
        self.notifier.status(self.status_text())

    def _stop_session(self) -> None:
        """On the way out: SIGTERM to the session, SIGKILL after STOP_GRACE."""
        session = self.session
        if session is None:
            return
        session.signal(signal.SIGTERM)
        if not _wait_fd(session.pidfd, STOP_GRACE):
            log.warning("session %d did not end within %g s of SIGTERM; killing it", session.number, STOP_GRACE)
            session.signal(signal.SIGKILL)
        self._session_ended(session)

    # -- VMMs that come while one is served ------------------------------------

    def _refuse_expired(self, session: Session) -> None:
        now = time.monotonic()
        keep = []
        for conn, since in self._pending:
            if now - since < self.busy_grace:
                keep.append((conn, since))
            else:
                self._refuse(conn, "busy: this service serves one VM at a time and serves the VMM of "
                                   f"pid {session.vm_pid}")
        self._pending = keep

    def _refuse(self, conn: socket.socket, why: str) -> None:
        """Tell the VMM why (after its Hello, which may be slow to come) in
        a short-lived process, so the loop never waits on a client."""
        if _thread_count() != 1:
            conn.close()
            return
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            rc = 0
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                _refuse(conn, why)
            except BaseException:
                rc = 1
            finally:
                os._exit(rc)
        conn.close()
        self._refusers.add(pid)

    def _reap_refusers(self, block: bool = False) -> None:
        for pid in list(self._refusers):
            done, _ = os.waitpid(pid, 0 if block else os.WNOHANG)
            if done:
                self._refusers.discard(pid)

    def merge(self, cfg: DeviceConfig) -> DeviceConfig:
        """The VMM's DeviceConfig with this service's parameters added;
        StartFailed when the kind differs or a key is on both sides.  The
        sandbox is the service's (``--sandbox``, ``--seccomp``): the VMM
        cannot weaken it."""
        if _target(cfg.kind) != _target(self.spec.kind):
            raise StartFailed(f"kind mismatch: this service runs {self.spec.kind}, the VMM asked for {cfg.kind}")
        both = sorted(set(cfg.params) & set(self.spec.params))
        if both:
            keys = ", ".join(f"{k}=" for k in both)
            raise StartFailed(f"{keys} given both by the VMM and on the service's command line "
                              "(give each parameter on one side)")
        return dataclasses.replace(cfg, kind=self.spec.kind, params={**self.spec.params, **cfg.params},
                                   sandbox=self.sandbox.mode, seccomp=self.sandbox.seccomp)


@dataclasses.dataclass
class Session:
    """The process serving one VM, as the listener sees it."""

    number: int
    pid: int
    #: pidfd of the process (readable once it has exited).
    pidfd: int
    #: Read end of its health pipe (-1 once it closed).
    health: int
    #: The VMM that connected (SO_PEERCRED; 0: unknown).
    vm_pid: int
    started: float
    #: Accesses served, as its last keep-alive said.
    served: int = 0
    #: Keep-alives received.
    beats: int = 0

    def read_health(self) -> bool:
        """Take the keep-alives that arrived; True if there was one."""
        try:
            data = os.read(self.health, 4096)
        except BlockingIOError:
            return False
        except OSError:
            data = b""
        if not data:
            os.close(self.health)
            self.health = -1
            return False
        whole = len(data) - len(data) % _BEAT.size
        if whole:
            (served,) = _BEAT.unpack_from(data, whole - _BEAT.size)
            self.served = max(self.served, served)
            self.beats += whole // _BEAT.size
        return bool(whole)

    def signal(self, signo: int) -> None:
        try:
            signal.pidfd_send_signal(self.pidfd, signo)
        except OSError:
            pass    # exited already

    def close(self) -> None:
        if self.health >= 0:
            os.close(self.health)
            self.health = -1
        os.close(self.pidfd)


class _Heartbeat:
    """The session process's side of the health pipe: the accesses served,
    at most every ``period`` seconds, from the loops that would hang."""

    def __init__(self, fd: int, period: float):
        self.fd = fd
        self.period = period
        self._due = 0.0

    def tick(self, server: DeviceServer | None) -> None:
        now = time.monotonic()
        if now < self._due:
            return
        self._due = now + self.period
        served = 0
        slots = server.slots if server is not None else None
        if slots is not None:
            try:
                served = slots.device_stats().served
            except Exception:
                served = 0
        self.send(served)

    def send(self, served: int) -> None:
        try:
            os.write(self.fd, _BEAT.pack(served))
        except OSError:
            pass    # the listener is gone or not reading: its own problem


_BEAT = struct.Struct("=Q")


def _thread_count() -> int:
    """Threads of this process (Python's and any other)."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return threading.active_count()


def _drain_pipe(fd: int) -> None:
    try:
        while os.read(fd, 512):
            pass
    except BlockingIOError:
        pass


def _wait_fd(fd: int, timeout: float) -> bool:
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    except InterruptedError:
        return _wait_fd(fd, timeout / 2) if timeout > 0.01 else False


def _how(status: int) -> str:
    """How a session's process ended, for the log."""
    if os.WIFSIGNALED(status):
        signo = os.WTERMSIG(status)
        name = signal.Signals(signo).name
        return "was killed by seccomp (SIGSYS)" if signo == signal.SIGSYS else f"was killed by {name}"
    code = os.waitstatus_to_exitcode(status)
    return {0: "ended", 1: "refused", 2: "broke off", EXIT_STUCK: "ended with a handler stuck"}.get(
        code, f"ended with status {code}")


def _target(kind: str) -> str:
    """``module:Class`` of a registered kind, else the text itself: a kind
    and its ``MODULE:CLASS`` name the same model.  Nothing is imported, so
    a VMM cannot make the service load a module of its choosing."""
    return kinds().get(kind, kind)


def _accept(sock: socket.socket) -> socket.socket | None:
    try:
        conn, _ = sock.accept()
    except (BlockingIOError, InterruptedError, ConnectionAbortedError):
        return None
    conn.setblocking(True)
    return conn


def _refuse(conn: socket.socket, why: str) -> None:
    """Tell a client why it is not served (after its Hello), and hang up."""
    pid = peer_pid(conn)
    channel = Channel(conn, Role.DEVICE)
    try:
        hello = channel.receive(REFUSE_HELLO_TIMEOUT)
        if isinstance(hello, Hello):
            channel.send(Error(why[:1000]))
            log.warning("refused the VMM of pid %d: %s", pid, why)
        else:
            log.warning("pid %d connected and left without a hello", pid)
    except ChannelTimeout:
        log.warning("pid %d connected and sent no hello within %g s", pid, REFUSE_HELLO_TIMEOUT)
    except Exception as e:
        log.warning("pid %d connected while busy and broke the protocol: %s", pid, e)
    finally:
        channel.close()


# ---- the command line ------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="devserver serve",
                                 description="Run one splitvmm device as a service that VMMs connect to "
                                             "(--device KIND,connect=PATH).")
    ap.add_argument("spec", nargs="?", metavar="KIND[,key=value...]",
                    help="the device and its own parameters (image path, read-only, serial id...)")
    ap.add_argument("--listen", metavar="PATH",
                    help="listen on this Unix socket (default: the socket systemd's activation passes)")
    ap.add_argument("--print-capabilities", action="store_true",
                    help="print kinds, protocol version and features as JSON, and exit")
    ap.add_argument("--handshake-timeout", type=float, default=10.0, metavar="SECONDS")
    ap.add_argument("--busy-grace", type=float, default=BUSY_GRACE, metavar="SECONDS",
                    help="how long a second VMM waits for the current one to leave before it is "
                         f"refused (default {BUSY_GRACE:g})")
    ap.add_argument("--sandbox", default=DEFAULT_MODE, choices=MODES,
                    help="the sandbox of each session's device process (default %(default)s; auto: what "
                         "this host or unit allows, seccomp included)")
    ap.add_argument("--seccomp", default=DEFAULT_SECCOMP, choices=SECCOMP_MODES,
                    help="what the seccomp layer does with a call outside the allowlist (default %(default)s)")
    ap.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.print_capabilities:
        json.dump(capabilities(), sys.stdout, indent=2)
        sys.stdout.write("\n")
        return EXIT_OK
    configure_logging(getattr(logging, args.log_level))
    if args.spec is None:
        log.error("serve: give KIND[,key=value...] (or --print-capabilities)")
        return EXIT_USAGE
    try:
        spec = parse_spec(args.spec)
    except SpecError as e:
        log.error("serve: %s", e)
        return EXIT_USAGE
    set_log_name(spec.kind)
    # Both are for this process only (WATCHDOG_PID, LISTEN_PID).  The
    # passed descriptors are taken before anything here opens one, so no
    # socket of ours can land on fd 3 when the manager passed none.
    interval = watchdog_interval()
    try:
        listener = activation.from_environ()
        if listener is not None and args.listen:
            listener.close()
            raise ActivationError("both --listen and a socket from socket activation: give one")
        if listener is None:
            if not args.listen:
                raise ActivationError("no listening socket: give --listen PATH, or run under socket "
                                      "activation (LISTEN_FDS)")
            listener = activation.bind(args.listen)
    except ActivationError as e:
        log.error("serve: %s", e)
        notifier = Notifier.from_environ()
        notifier.notify(STATUS=f"failed: {e}", ERRNO=22)
        return EXIT_NO_SOCKET
    notifier = Notifier.from_environ()
    service = DeviceService(spec, listener, notifier, handshake_timeout=args.handshake_timeout,
                            busy_grace=args.busy_grace, watchdog=interval,
                            sandbox_config=SandboxConfig(args.sandbox, args.seccomp))

    def stop(signo: int, _frame: object) -> None:
        log.info("%s: stopping", signal.Signals(signo).name)
        notifier.stopping()
        service.request_stop()

    for signo in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signo, stop)
    rc = service.run()
    # Stopped already: a second SIGTERM must not kill the interpreter on its
    # way out (its finalisation puts Python's handlers back to the default).
    for signo in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signo, signal.SIG_IGN)
    return rc
