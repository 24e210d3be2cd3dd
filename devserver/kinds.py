"""Which device model class serves each ``--device TYPE``."""

from __future__ import annotations

import os

from devices.base import Device
from devices.echo import Echo
from devices.pci_echo import PciEcho
from devices.serial import Serial
from devices.virtio.blk import VirtioBlk
from devices.virtio.console import VirtioConsole
from devices.virtio.rng import VirtioRng

#: ``kind`` -> model class.  One line per model.
KINDS: dict[str, type[Device]] = {
    Echo.kind: Echo,
    PciEcho.kind: PciEcho,
    Serial.kind: Serial,
    VirtioRng.kind: VirtioRng,
    VirtioBlk.kind: VirtioBlk,
    VirtioConsole.kind: VirtioConsole,
}

#: With ``SPLITVMM_TEST_KINDS=1`` in its environment a device process also
#: serves the TEST-ONLY misbehaving kinds of :mod:`devserver.testkinds`.
TEST_KINDS_ENV = "SPLITVMM_TEST_KINDS"

if os.environ.get(TEST_KINDS_ENV) == "1":
    from devserver.testkinds import TEST_KINDS

    KINDS.update(TEST_KINDS)


def model_class(kind: str) -> type[Device]:
    """The model class of ``kind``; KeyError names the known kinds."""
    try:
        return KINDS[kind]
    except KeyError:
        raise KeyError(f"unknown device type {kind!r} (known: {', '.join(sorted(KINDS))})") from None
