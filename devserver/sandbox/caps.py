"""Layer 5: every capability dropped (bounding set, then ambient, then
effective, permitted and inheritable), and ``no_new_privs``."""

from __future__ import annotations

from devserver.sandbox import _sys


def drop_bounding() -> None:
    for cap in range(_sys.CAP_LAST_CAP + 1):
        _sys.drop_bounding(cap)


def apply() -> None:
    drop_bounding()
    _sys.clear_ambient()
    _sys.capset_zero()
    _sys.set_no_new_privs()
