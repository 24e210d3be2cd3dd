"""The ``vmm`` command's entry point: start the fork server, then import the VMM.

``vmm run`` with device processes needs the fork server
(:mod:`devserver.forkserver`) to have imported the device runtime before
the first device can start.  Started here, before ``vmm.cli`` and the
~100 ms of imports behind it, the two import side by side on two CPUs
instead of one after the other.  Whether the run will have a device
process is guessed from the raw command line (a wrong guess costs an idle
server, closed at the end, or a server started later by :mod:`vmm.cli`);
anything else goes straight to :func:`vmm.cli.main`.  Then the standard
library's ``inspect`` is deferred (:mod:`vmm.deferred`) and the VMM imported.

:func:`command` (the console script) leaves with ``os._exit`` once
everything is closed and flushed: tearing down the interpreter's ~600
modules would add ~17 ms of CPU to every run and changes nothing.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False       # mypy takes it as typing's; typing itself is imported after the server starts
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import NoReturn


def wants_forkserver(argv: Sequence[str]) -> bool:
    """Whether ``vmm ARGV`` is a run that is likely to start a device
    process: ``run`` without ``--help``, unless the only device, COM1,
    is off (``--serial none`` with ``--guest`` or ``--kernel`` and no
    ``--device``)."""
    words = [a for a in argv if a not in ("-v", "-vv", "--verbose")]
    if not words or words[0] != "run" or "-h" in words or "--help" in words:
        return False
    own_guest = any(w.split("=")[0] in ("--guest", "--kernel") for w in words)
    has_device = any(w.split("=")[0] == "--device" for w in words)
    serial_off = "--serial=none" in words or any(
        a == "--serial" and b == "none" for a, b in zip(words, words[1:], strict=False))
    return not (own_guest and serial_off and not has_device)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    spawned = None
    if wants_forkserver(args):
        from vmm.forkserver import spawn_server
        try:
            spawned = spawn_server()
        except OSError:
            spawned = None       # vmm.cli starts one itself, or says why it cannot
    from vmm.deferred import defer_imports, import_uncollected
    defer_imports()     # before vmm.cli: dataclasses would import inspect
    cli = import_uncollected("vmm.cli")
    server = None
    if spawned is not None:
        from vmm.forkserver import ForkServer
        try:
            server = ForkServer.adopt(*spawned)
        except OSError:
            server = None
    return cli.main(args, forkserver=server)


def command() -> NoReturn:
    """The ``vmm`` console script."""
    code = main()
    try:
        import logging
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


if __name__ == "__main__":
    command()
