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

When the VM goes away -- Shutdown, the connection closed, the VMM killed
-- the session's model, mappings and descriptors are released and the
service listens again, so a restarted VMM finds it where it was.  While a
VM is served, another VMM that connects waits ``--busy-grace`` seconds (a
restarted VMM often connects just before the old connection's end is
seen) and is then refused ("busy").

With ``$NOTIFY_SOCKET`` (:mod:`devserver.notify`): READY=1 once listening,
STATUS= (listening / serving the VM of pid N, accesses served), WATCHDOG=1
from the accept loop, the handshake and the serving loop while they run
(so a hung model stops the pings and the manager restarts the service),
STOPPING=1 on SIGTERM or SIGINT.

Exit status: 0 stopped by SIGTERM/SIGINT; 1 no usable listening socket; 2
bad command line; 3 a model handler stuck after its VM went away (a
failure, so ``Restart=on-failure`` starts a fresh process).

Not yet (restart with state, issue 10 sections 2-3): every session builds a
fresh model.  A VMM that reconnects to a restarted service will hand it
the state segment it kept, and the session will restore from it instead;
the session's hooks into the runtime (:meth:`DeviceService.merge`, the
watchdog tick) are where that plugs in.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import select
import signal
import socket
import sys
import threading
from collections.abc import Sequence

from devserver import activation
from devserver.activation import ActivationError, Listener
from devices.kinds import ModelNotFound, kinds, resolve
from devserver.notify import Notifier, Watchdog, watchdog_interval
from devserver.runtime import DeviceServer, StartFailed, configure_logging, set_log_name
from ipc.protocol import FEATURES, PROTOCOL_VERSION, DeviceConfig, Error, Hello, Role
from ipc.transport import Channel, ChannelTimeout, peer_credentials

__all__ = ["ServiceSpec", "SpecError", "DeviceService", "parse_spec", "capabilities", "main"]

log = logging.getLogger("devserver")

EXIT_OK = 0
EXIT_NO_SOCKET = 1
EXIT_USAGE = 2
EXIT_STUCK = 3
#: Keys that name a device to the VMM, never parameters of its model.
RESERVED_KEYS = frozenset({"id", "process", "connect"})
#: How long a VMM that connects while another is served waits for that
#: session to end before it is refused.
BUSY_GRACE = 2.0
#: How long a refused client has to say Hello (to be told why).
REFUSE_HELLO_TIMEOUT = 2.0
#: Longest sleep of the accept loop (it ticks the watchdog in between).
ACCEPT_SLICE = 1.0
#: What ``--print-capabilities`` lists beyond the protocol's features.
SERVICE_FEATURES = ("listen", "socket-activation", "sd-notify", "watchdog", "one-vm-at-a-time")


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
    """The accept loop: one VM session after another (module docstring)."""

    def __init__(self, spec: ServiceSpec, listener: Listener, notifier: Notifier | None = None, *,
                 handshake_timeout: float = 10.0, busy_grace: float = BUSY_GRACE,
                 watchdog: float | None = None):
        self.spec = spec
        self.listener = listener
        self.notifier = notifier if notifier is not None else Notifier(None)
        self.handshake_timeout = handshake_timeout
        self.busy_grace = busy_grace
        self.watchdog = Watchdog(self.notifier, watchdog, status=self.status_text)
        #: Sessions so far, and accesses served in the finished ones.
        self.sessions = 0
        self.served_before = 0
        #: Whether a VM is served, the pid of its VMM (0: unknown) and its session.
        self.serving = False
        self.vm_pid = 0
        self._server: DeviceServer | None = None
        self._stop = threading.Event()
        self._pending: list[socket.socket] = []
        listener.sock.setblocking(False)

    # -- what the manager sees --------------------------------------------

    def session_served(self) -> int:
        """Accesses served to the VM being served (0 between VMs)."""
        server = self._server
        if server is None or server.slots is None:
            return 0
        try:
            return server.slots.device_stats().served
        except Exception:  # closed under us: counted at teardown
            return 0

    def served(self) -> int:
        """Accesses served, in every session so far (this one included)."""
        return self.served_before + self.session_served()

    def status_text(self) -> str:
        if self.serving:
            return f"serving the VM of pid {self.vm_pid}; {self.session_served()} access(es) served"
        return f"listening on {self.listener.where}; {self.sessions} VM(s) served, {self.served()} access(es)"

    # -- the loop ----------------------------------------------------------

    def run(self) -> int:
        """Serve VMs until :meth:`request_stop`; the exit status."""
        set_log_name(self.spec.kind)
        log.info("%s: listening on %s", self.spec.kind, self.listener.where)
        self.notifier.ready(self.status_text())
        try:
            while not self._stop.is_set():
                conn = self._next_connection()
                if conn is not None:
                    self._session(conn)
        finally:
            self.notifier.stopping(f"stopping; {self.sessions} VM(s) served")
            for conn in self._pending:
                conn.close()
            self.listener.close()
        log.info("stopped after %d VM session(s), %d access(es)", self.sessions, self.served_before)
        return EXIT_OK

    def request_stop(self) -> None:
        """End the service (from a signal handler: does not wait)."""
        self._stop.set()
        server = self._server
        if server is not None:
            server.request_stop()

    def _next_connection(self) -> socket.socket | None:
        if self._pending:
            return self._pending.pop(0)
        self.watchdog.tick()
        try:
            ready = select.select([self.listener.sock], [], [], self.watchdog.wait_slice(ACCEPT_SLICE))[0]
        except InterruptedError:
            return None
        if not ready:
            return None
        return _accept(self.listener.sock)

    def _session(self, conn: socket.socket) -> None:
        pid = peer_pid(conn)
        self.sessions += 1
        self.serving, self.vm_pid = True, pid
        log.info("the VMM of pid %d connected (session %d)", pid, self.sessions)
        server = DeviceServer(Channel(conn, Role.DEVICE), self.handshake_timeout, check_parent=False,
                              config_filter=self.merge, tick=self.watchdog.tick,
                              wait_slice=self.watchdog.wait_slice(1.0), stuck_status=EXIT_STUCK)
        self._server = server
        if self._stop.is_set():     # a stop that came in between
            server.request_stop()
        self.notifier.status(self.status_text())
        ended = threading.Event()
        refuser = threading.Thread(target=self._refuse_while_busy, args=(ended, pid),
                                   name="devserver-busy", daemon=True)
        refuser.start()
        try:
            rc = server.run()
        finally:
            ended.set()
            self._server = None
            self.served_before += server.served
            self.serving, self.vm_pid = False, 0
            refuser.join()
            set_log_name(self.spec.kind)
        how = {0: "ended", 1: "refused", 2: "broke off"}.get(rc, f"status {rc}")
        log.info("session %d with the VMM of pid %d %s; listening again", self.sessions, pid, how)
        self.notifier.status(self.status_text())

    def merge(self, cfg: DeviceConfig) -> DeviceConfig:
        """The VMM's DeviceConfig with this service's parameters added;
        StartFailed when the kind differs or a key is on both sides."""
        if _target(cfg.kind) != _target(self.spec.kind):
            raise StartFailed(f"kind mismatch: this service runs {self.spec.kind}, the VMM asked for {cfg.kind}")
        both = sorted(set(cfg.params) & set(self.spec.params))
        if both:
            keys = ", ".join(f"{k}=" for k in both)
            raise StartFailed(f"{keys} given both by the VMM and on the service's command line "
                              "(give each parameter on one side)")
        # Sessions run in this long-lived, threaded process, which must
        # listen again afterwards: devserver.sandbox (a user namespace needs
        # a single thread, and its layers are for good) cannot be applied
        # here; the service's confinement is its unit's.  Ready reports no
        # layers, which the VMM shows.  (A process per session would lift this.)
        return dataclasses.replace(cfg, kind=self.spec.kind, params={**self.spec.params, **cfg.params},
                                   sandbox="off")

    # -- a second VMM while one is served -----------------------------------

    def _refuse_while_busy(self, ended: threading.Event, serving: int) -> None:
        sock = self.listener.sock
        while not ended.is_set():
            try:
                ready = select.select([sock], [], [], 0.2)[0]
            except (OSError, ValueError):
                return
            if not ready:
                continue
            conn = _accept(sock)
            if conn is None:
                continue
            if ended.wait(self.busy_grace):
                self._pending.append(conn)      # served next, by the accept loop
                return
            _refuse(conn, f"busy: this service serves one VM at a time and serves the VMM of pid {serving}")


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
                            busy_grace=args.busy_grace, watchdog=interval)

    def stop(signo: int, _frame: object) -> None:
        log.info("%s: stopping", signal.Signals(signo).name)
        notifier.stopping()
        service.request_stop()

    for signo in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signo, stop)
    return service.run()
