"""The ``devserver`` command: run one device process.

    devserver --fd N [--log-level LEVEL] [--handshake-timeout SECONDS] [--spare [--preload KIND]]
    devserver serve KIND[,key=value...] [--listen PATH] ...   (devserver.service)

``N`` is an inherited, connected ``AF_UNIX SOCK_SEQPACKET`` socket to the
VMM (the VMM passes it when it spawns the process).  Everything else (the
device type, its parameters, the registry, the slots, guest memory)
arrives over that socket.  ``devserver serve`` instead runs the device as
a service that listens for VMMs (``--listen PATH`` or systemd socket
activation) and takes its own parameters from its command line.
``--spare``: a warm spare the VMM starts ahead of a restart (issue 10 §3):
the process imports everything (and with ``--preload KIND`` that kind's
model), then waits for the VMM's Hello with no deadline, exiting when the
VMM goes away.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from devserver.runtime import EXIT_PROTOCOL, DeviceServer, configure_logging
from ipc.protocol import Role
from ipc.transport import Channel

log = logging.getLogger("devserver")


def main(argv: list[str] | None = None) -> int:
    args_in = sys.argv[1:] if argv is None else argv
    if args_in[:1] == ["serve"]:
        from devserver.service import main as serve_main
        return serve_main(args_in[1:])
    return run(parser().parse_args(args_in))


def parser() -> argparse.ArgumentParser:
    """The command line of one device process (not ``serve``)."""
    ap = argparse.ArgumentParser(prog="devserver", description="Run one splitvmm device process.")
    ap.add_argument("--fd", type=int, required=True, metavar="N",
                    help="inherited control socket (AF_UNIX SOCK_SEQPACKET) connected to the VMM")
    ap.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    ap.add_argument("--handshake-timeout", type=float, default=10.0, metavar="SECONDS")
    ap.add_argument("--spare", action="store_true",
                    help="a warm spare: wait for the VMM's hello without a deadline")
    ap.add_argument("--preload", metavar="KIND", help="with --spare: import this kind's model ahead")
    return ap


#: The defaults of :func:`parser`'s options (test_forkserver checks they agree).
_DEFAULTS = {"log_level": "INFO", "handshake_timeout": 10.0, "spare": False, "preload": None}
_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def parse_plain(argv: list[str]) -> argparse.Namespace | None:
    """The command line the VMM gives a device (``--fd N``, ``--log-level
    L``, ``--handshake-timeout S``, ``--spare``, ``--preload KIND``, each
    at most once, in any order) parsed as :func:`parser` would, without
    argparse; None for anything else (argparse then parses it and says
    what is wrong).  The fork server parses each request's command line
    before it forks: argparse's code and objects are ~0.5 MB of pages the
    server writes anew for every request, and each copy stays with the
    device forked before (issue 15 section 2)."""
    out: dict[str, object] = dict(_DEFAULTS)
    seen: set[str] = set()
    i, n = 0, len(argv)
    while i < n:
        opt = argv[i]
        if opt in seen:
            return None
        seen.add(opt)
        if opt == "--spare":
            out["spare"] = True
            i += 1
            continue
        if i + 1 >= n:
            return None
        value = argv[i + 1]
        if opt == "--fd" and value.isascii() and value.isdigit():
            out["fd"] = int(value)
        elif opt == "--log-level" and value in _LEVELS:
            out["log_level"] = value
        elif opt == "--handshake-timeout":
            try:
                out["handshake_timeout"] = float(value)
            except ValueError:
                return None
        elif opt == "--preload" and value and not value.startswith("-"):
            out["preload"] = value
        else:
            return None
        i += 2
    if "fd" not in out:
        return None
    return argparse.Namespace(**out)


def run(args: argparse.Namespace) -> int:
    """The device process, its command line parsed (:func:`parser`; the
    fork server parses it before it forks: devserver.forkserver)."""
    configure_logging(getattr(logging, args.log_level))
    # The VMM decides when a device stops (Shutdown, or its socket going
    # away): a Ctrl-C on the terminal is for the VMM, not for us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        channel = Channel.from_fd(args.fd, Role.DEVICE)
    except (OSError, ValueError) as e:
        log.error("--fd %d: %s", args.fd, e)
        return EXIT_PROTOCOL
    if args.preload:
        from devices.kinds import ModelNotFound, resolve
        try:
            resolve(args.preload)
        except ModelNotFound as e:
            log.warning("--preload %s: %s", args.preload, e)
    return DeviceServer(channel, handshake_timeout=args.handshake_timeout, spare=args.spare).run()


if __name__ == "__main__":
    sys.exit(main())
