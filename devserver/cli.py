"""The ``devserver`` command: run one device process.

    devserver --fd N [--log-level LEVEL] [--handshake-timeout SECONDS]
    devserver serve KIND[,key=value...] [--listen PATH] ...   (devserver.service)

``N`` is an inherited, connected ``AF_UNIX SOCK_SEQPACKET`` socket to the
VMM (the VMM passes it when it spawns the process).  Everything else (the
device type, its parameters, the registry, the slots, guest memory)
arrives over that socket.  ``devserver serve`` instead runs the device as
a service that listens for VMMs (``--listen PATH`` or systemd socket
activation) and takes its own parameters from its command line.
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
    ap = argparse.ArgumentParser(prog="devserver", description="Run one splitvmm device process.")
    ap.add_argument("--fd", type=int, required=True, metavar="N",
                    help="inherited control socket (AF_UNIX SOCK_SEQPACKET) connected to the VMM")
    ap.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    ap.add_argument("--handshake-timeout", type=float, default=10.0, metavar="SECONDS")
    args = ap.parse_args(args_in)
    configure_logging(getattr(logging, args.log_level))
    # The VMM decides when a device stops (Shutdown, or its socket going
    # away): a Ctrl-C on the terminal is for the VMM, not for us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        channel = Channel.from_fd(args.fd, Role.DEVICE)
    except (OSError, ValueError) as e:
        log.error("--fd %d: %s", args.fd, e)
        return EXIT_PROTOCOL
    return DeviceServer(channel, handshake_timeout=args.handshake_timeout).run()


if __name__ == "__main__":
    sys.exit(main())
