"""Device specs of the command line, and the table of device types.

``--device TYPE[,key=value...]``: ``TYPE`` names a model in
:data:`DEVICE_TYPES`; ``id=NAME`` (default ``TYPE`` plus a number) and
``process=isolated|inline`` (default ``isolated``) are understood for every
type, every other key goes to the model, which validates it.
``connect=PATH`` attaches to a device that runs as a service listening on
``PATH`` (``devserver serve``): the service holds the model's own
parameters and validates the whole set; the VMM adds placement.
"""

from __future__ import annotations

import dataclasses
import re

from devices.base import BadParameter, Device
from devices.echo import Echo
from devices.pci_echo import PciEcho
from devices.serial import Serial
from devices.virtio.blk import VirtioBlk
from devices.virtio.console import VirtioConsole
from devices.virtio.rng import VirtioRng
from vmm.endpoint import VmmError

#: kind -> model class.  A model is placement-agnostic: the same class
#: runs inline (vmm.local) or in a device process (devserver).
DEVICE_TYPES: dict[str, type[Device]] = {
    Echo.kind: Echo,
    PciEcho.kind: PciEcho,
    Serial.kind: Serial,
    VirtioRng.kind: VirtioRng,
    VirtioBlk.kind: VirtioBlk,
    VirtioConsole.kind: VirtioConsole,
}

PLACEMENTS = ("isolated", "inline")
DEFAULT_PLACEMENT = "isolated"
#: The placement of a ``connect=PATH`` device: its own process, not ours.
SERVICE_PLACEMENT = "service"
_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class ConfigError(VmmError):
    """A bad command-line argument or device spec (exit status 2)."""


@dataclasses.dataclass(frozen=True)
class DeviceSpec:
    kind: str
    name: str
    placement: str
    params: tuple[tuple[str, str], ...]
    #: The socket of the device service to attach to (placement "service").
    connect: str | None = None

    @property
    def model_class(self) -> type[Device]:
        return DEVICE_TYPES[self.kind]

    def param_dict(self) -> dict[str, str]:
        return dict(self.params)


class _NullHost:
    """A DeviceHost that refuses everything: models are built on it only to
    validate their parameters (constructors must not touch the host)."""

    def claim(self, space, start, length, cookie=0):
        raise RuntimeError("validation host")

    def release(self, space, start):
        raise RuntimeError("validation host")

    def process_id(self) -> int:
        return 0


def parse_device_spec(text: str, taken: set[str] | None = None) -> DeviceSpec:
    """Parse and validate one ``--device`` argument.

    ``taken`` holds the ids already in use (updated with this one)."""
    taken = taken if taken is not None else set()
    kind, _, rest = text.partition(",")
    kind = kind.strip()
    if not kind:
        raise ConfigError(f"device spec {text!r}: missing TYPE")
    if kind not in DEVICE_TYPES:
        raise ConfigError(f"device spec {text!r}: unknown type {kind!r} (known: {', '.join(sorted(DEVICE_TYPES))})")
    params: dict[str, str] = {}
    if rest:
        for item in rest.split(","):
            key, eq, value = item.partition("=")
            key = key.strip()
            if not eq or not key:
                raise ConfigError(f"device spec {text!r}: {item!r} is not key=value")
            if key in params:
                raise ConfigError(f"device spec {text!r}: {key} given twice")
            params[key] = value.strip()
    connect = params.pop("connect", None)
    if connect is not None and "process" in params:
        raise ConfigError(f"device spec {text!r}: connect= and process= exclude each other "
                          "(a connected device runs in its service's process)")
    if connect is not None and not connect:
        raise ConfigError(f"device spec {text!r}: connect= needs the PATH of the service's socket")
    placement = params.pop("process", DEFAULT_PLACEMENT)
    if connect is not None:
        placement = SERVICE_PLACEMENT
    elif placement not in PLACEMENTS:
        raise ConfigError(f"device spec {text!r}: process={placement!r} (expected isolated or inline)")
    name = params.pop("id", None)
    if name is None:
        n = 0
        while f"{kind}{n}" in taken:
            n += 1
        name = f"{kind}{n}"
    elif not _ID.match(name):
        raise ConfigError(f"device spec {text!r}: id={name!r} (letters, digits, '_', '.', '-'; at most 64)")
    if name in taken:
        raise ConfigError(f"device spec {text!r}: id {name!r} is already used")
    if connect is None:     # a service validates the parameters it completes
        try:
            DEVICE_TYPES[kind](_NullHost(), **params)
        except BadParameter as e:
            raise ConfigError(f"device {name}: {e}") from None
    taken.add(name)
    return DeviceSpec(kind, name, placement, tuple(params.items()), connect)
