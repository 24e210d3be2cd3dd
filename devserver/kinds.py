"""Which device model class serves each ``--device TYPE``."""

from __future__ import annotations

from devices.base import Device
from devices.echo import Echo

#: ``kind`` -> model class.  One line per model.
KINDS: dict[str, type[Device]] = {
    Echo.kind: Echo,
}


def model_class(kind: str) -> type[Device]:
    """The model class of ``kind``; KeyError names the known kinds."""
    try:
        return KINDS[kind]
    except KeyError:
        raise KeyError(f"unknown device type {kind!r} (known: {', '.join(sorted(KINDS))})") from None
