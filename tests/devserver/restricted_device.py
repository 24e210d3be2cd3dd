"""``restricted_device.py --fd N ...``: the device-process command line
run under a seccomp filter that refuses new user namespaces (EPERM), as
systemd's ``RestrictNamespaces=`` does to a unit; everything else is
allowed.  For tests of ``sandbox=strict`` and ``auto``."""

import errno
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from devserver._sandbox_c import lib  # noqa: E402
from devserver.sandbox import _sys, seccomp  # noqa: E402
from devserver.sandbox.policy import MASKED_EQ, Arg, Rule  # noqa: E402

rules = (Rule("unshare", (Arg(0, MASKED_EQ, _sys.CLONE_NEWUSER, _sys.CLONE_NEWUSER),), errno=errno.EPERM),)


def main() -> None:
    seccomp.load_with_default(rules, lib.SCMP_ACT_ALLOW)
    os.execv(sys.executable, [sys.executable, "-m", "devserver", *sys.argv[1:]])


if __name__ == "__main__":
    main()
