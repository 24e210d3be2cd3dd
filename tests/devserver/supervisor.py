"""TEST-ONLY: what a socket unit with ``Restart=on-failure`` (and optionally
``WatchdogSec=``) does, without systemd (never started on the development
machines).

    python supervisor.py --listen PATH [--restart on-failure|always|no]
                         [--watchdog-sec S --notify PATH] -- COMMAND...

Binds ``PATH`` (``AF_UNIX SOCK_SEQPACKET``, as ``ListenSequentialPacket=``)
and keeps it for its whole life, like the socket unit.  Starts ``COMMAND``
with the socket as descriptor 3 and ``LISTEN_FDS=1``, ``LISTEN_PID`` (the
child's own pid: set between fork and exec), ``LISTEN_FDNAMES=control``;
when the child dies it starts it again, per ``--restart`` with systemd's
meaning (``on-failure``: a non-zero status or a signal other than the clean
SIGHUP/SIGINT/SIGTERM/SIGPIPE).  Connections that arrive while no child
runs wait in the socket's backlog, as they do behind a socket unit.

With ``--watchdog-sec``, it also plays the manager's notification socket
(bound at ``--notify PATH``, passed as ``NOTIFY_SOCKET`` with
``WATCHDOG_USEC`` and ``WATCHDOG_PID``): each datagram is echoed as an
event, and a child that sends no ``WATCHDOG=1`` for ``S`` seconds is
killed with SIGABRT (systemd's ``WatchdogSignal=`` default) -- a failure,
so it is restarted.

Each event is one line on stdout, flushed: ``started PID``, ``notify PID
KEY=VALUE;KEY=VALUE``, ``watchdog PID`` (timed out), ``exited PID status
N`` or ``exited PID signal NAME``, ``stopped``.  SIGTERM stops the child
(SIGTERM, then SIGKILL after 5 s) and the supervisor.
"""

from __future__ import annotations

import argparse
import os
import resource
import select
import signal
import socket
import sys
import time

CLEAN_SIGNALS = {signal.SIGHUP, signal.SIGINT, signal.SIGTERM, signal.SIGPIPE}
stopping = False


def say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def start(sock: socket.socket, command: list[str], extra_env: dict[str, str], watchdog: bool) -> int:
    pid = os.fork()
    if pid == 0:                    # the child: nothing but set-up, then exec
        try:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))    # a watchdog SIGABRT leaves no core file
            if sock.fileno() == 3:
                os.set_inheritable(3, True)     # dup2(3, 3) would leave close-on-exec set
            else:
                os.dup2(sock.fileno(), 3, inheritable=True)
            me = str(os.getpid())
            env = dict(os.environ, LISTEN_FDS="1", LISTEN_PID=me, LISTEN_FDNAMES="control", **extra_env)
            if watchdog:
                env["WATCHDOG_PID"] = me
            os.execvpe(command[0], command, env)
        finally:
            os._exit(127)
    say(f"started {pid}")
    return pid


def restart_wanted(policy: str, status: int) -> bool:
    if policy == "always":
        return True
    if policy == "no":
        return False
    if os.WIFSIGNALED(status):
        return os.WTERMSIG(status) not in CLEAN_SIGNALS
    return os.WEXITSTATUS(status) != 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--listen", required=True)
    ap.add_argument("--restart", default="on-failure", choices=["on-failure", "always", "no"])
    ap.add_argument("--watchdog-sec", type=float, default=0.0)
    ap.add_argument("--notify", help="where to bind the notification socket (with --watchdog-sec)")
    ap.add_argument("command", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.bind(args.listen)
    os.chmod(args.listen, 0o600)
    sock.listen(8)
    notify = None
    extra_env: dict[str, str] = {}
    if args.watchdog_sec > 0:
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(args.notify)
        extra_env = {"NOTIFY_SOCKET": args.notify, "WATCHDOG_USEC": str(int(args.watchdog_sec * 1e6))}
    child = 0

    def on_term(signo, frame):
        global stopping
        stopping = True
        if child:
            try:
                os.kill(child, signal.SIGTERM)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, on_term)
    while not stopping:
        child = start(sock, command, extra_env, notify is not None)
        pidfd = os.pidfd_open(child)
        kill_at = None
        watchdog_at = time.monotonic() + args.watchdog_sec if notify is not None else None
        watched = [pidfd] + ([notify] if notify is not None else [])
        while True:
            ready = select.select(watched, [], [], 0.1)[0]
            if pidfd in ready:
                break
            if notify is not None and notify in ready:
                data = notify.recv(4096).decode(errors="replace")
                fields = [line for line in data.split("\n") if line]
                say(f"notify {child} " + ";".join(fields))
                if "WATCHDOG=1" in fields:
                    watchdog_at = time.monotonic() + args.watchdog_sec
            now = time.monotonic()
            if watchdog_at is not None and now > watchdog_at:
                say(f"watchdog {child}")
                os.kill(child, signal.SIGABRT)
                watchdog_at = None
            if stopping and kill_at is None:
                kill_at = now + 5
            if kill_at is not None and now > kill_at:
                os.kill(child, signal.SIGKILL)
        os.close(pidfd)
        _, status = os.waitpid(child, 0)
        if os.WIFSIGNALED(status):
            say(f"exited {child} signal {signal.Signals(os.WTERMSIG(status)).name}")
        else:
            say(f"exited {child} status {os.WEXITSTATUS(status)}")
        child = 0
        if not restart_wanted(args.restart, status):
            break
    sock.close()
    os.unlink(args.listen)
    if notify is not None:
        notify.close()
        os.unlink(args.notify)
    say("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
