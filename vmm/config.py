"""Device specs of the command line, and the table of device types.

``--device TYPE[,key=value...]``: ``TYPE`` names a model in
:data:`DEVICE_TYPES`; ``id=NAME`` (default ``TYPE`` plus a number) and
``process=isolated|inline`` (default ``isolated``) are understood for every
type, and so are ``sandbox=strict|auto|off`` (default ``strict``) and
``seccomp=kill|trap|log`` (default ``kill``), the sandbox of an isolated
device (:mod:`devserver.sandbox`); every other key goes to the model,
which validates it.
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
SANDBOX_MODES = ("strict", "auto", "off")
SECCOMP_MODES = ("kill", "trap", "log")
DEFAULT_PLACEMENT = "isolated"
_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class ConfigError(VmmError):
    """A bad command-line argument or device spec (exit status 2)."""


@dataclasses.dataclass(frozen=True)
class DeviceSpec:
    kind: str
    name: str
    placement: str
    params: tuple[tuple[str, str], ...]
    #: The sandbox of an isolated device (devserver.sandbox).
    sandbox: str = "strict"
    seccomp: str = "kill"

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
    placement = params.pop("process", DEFAULT_PLACEMENT)
    if placement not in PLACEMENTS:
        raise ConfigError(f"device spec {text!r}: process={placement!r} (expected isolated or inline)")
    sandbox = params.pop("sandbox", "strict")
    if sandbox not in SANDBOX_MODES:
        raise ConfigError(f"device spec {text!r}: sandbox={sandbox!r} (expected strict, auto or off)")
    seccomp = params.pop("seccomp", "kill")
    if seccomp not in SECCOMP_MODES:
        raise ConfigError(f"device spec {text!r}: seccomp={seccomp!r} (expected kill, trap or log)")
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
    try:
        DEVICE_TYPES[kind](_NullHost(), **params)
    except BadParameter as e:
        raise ConfigError(f"device {name}: {e}") from None
    taken.add(name)
    return DeviceSpec(kind, name, placement, tuple(params.items()), sandbox, seccomp)
