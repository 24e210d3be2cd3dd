"""Device specs of the command line.

``--device TYPE[,key=value...]``: ``TYPE`` names a model, a registered
kind or ``MODULE:CLASS`` (:mod:`devices.kinds`, the one table); ``id=NAME``
(default ``TYPE`` plus a number) and ``process=isolated|inline`` (default
``isolated``) are understood for every type, and so are
``sandbox=strict|auto|off`` (default ``strict``) and
``seccomp=kill|trap|log`` (default ``kill``), the sandbox of a device in
its own process (:mod:`devserver.sandbox`); for ``process=isolated`` also
the restart policy (``restart=no|on-failure|always``, default
``on-failure``; ``restart_delay``, ``restart_timeout``, ``restart_burst``,
``restart_interval``: :mod:`vmm.remote.restart`) and ``state=on|off`` (the
state segment a restart resumes from; default on); every other key goes to the
model, which validates it: the model is built once on a host that refuses
everything, before the guest starts.  ``connect=PATH`` attaches to a device
that runs as a service listening on ``PATH`` (``devserver serve``): the
service holds the model's own parameters and validates the whole set; the
VMM adds placement (and the sandbox it asks the service's device for).
"""

from __future__ import annotations

import dataclasses
import re

from devices import kinds
from devices.base import Device, DeviceError, DeviceHost, NotOffered, Space
from vmm.endpoint import ConfigError
from vmm.remote.restart import POLICY_KEYS, RestartPolicy, parse_policy

PLACEMENTS = ("isolated", "inline")
SANDBOX_MODES = ("strict", "auto", "off")
SECCOMP_MODES = ("kill", "trap", "log")
DEFAULT_PLACEMENT = "isolated"
#: The placement of a ``connect=PATH`` device: its own process, not ours.
SERVICE_PLACEMENT = "service"
_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


@dataclasses.dataclass(frozen=True)
class DeviceSpec:
    """One ``--device`` spec, parsed: the kind, its id, where it runs and its parameters."""

    kind: str
    name: str
    placement: str
    params: tuple[tuple[str, str], ...]
    #: The socket of the device service to attach to (placement "service").
    connect: str | None = None
    #: The sandbox of a device in its own process (devserver.sandbox).
    sandbox: str = "strict"
    seccomp: str = "kill"
    #: What happens when its process ends (isolated devices only).
    restart: RestartPolicy = RestartPolicy()
    #: Whether it gets a state segment (isolated devices only).
    state: bool = True

    @property
    def model_class(self) -> type[Device]:
        """The model class (raises devices.kinds.ModelNotFound)."""
        return kinds.resolve(self.kind)

    def param_dict(self) -> dict[str, str]:
        return dict(self.params)


class _NullHost(DeviceHost):
    """A DeviceHost that refuses everything: models are built on it only to
    validate their parameters (constructors must not touch the host)."""

    def claim(self, space: Space, start: int, length: int, cookie: int = 0, *,
              coalesce: bool = False) -> None:
        raise NotOffered("a parameter-validation host has no regions")

    def release(self, space: Space, start: int) -> None:
        raise NotOffered("a parameter-validation host has no regions")

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
    from ipc.protocol import MAX_KIND      # here: a run without --device needs no protocol

    if len(kind) > MAX_KIND:
        raise ConfigError(f"device spec {text[:80]!r}...: TYPE is longer than {MAX_KIND} characters")
    try:
        model_class = kinds.resolve(kind)
    except kinds.ModelNotFound as e:
        raise ConfigError(f"--device {kind}: {e}") from None
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
    if connect is not None and ("sandbox" in params or "seccomp" in params):
        raise ConfigError(f"device spec {text!r}: sandbox= and seccomp= of a connect= device are the service's "
                          "(devserver serve --sandbox MODE --seccomp MODE)")
    if placement == "inline" and ("sandbox" in params or "seccomp" in params):
        raise ConfigError(f"device spec {text!r}: sandbox= and seccomp= are for process=isolated "
                          "(an inline model runs in the VMM)")
    sandbox = params.pop("sandbox", "strict")
    if sandbox not in SANDBOX_MODES:
        raise ConfigError(f"device spec {text!r}: sandbox={sandbox!r} (expected strict, auto or off)")
    seccomp = params.pop("seccomp", "kill")
    if seccomp not in SECCOMP_MODES:
        raise ConfigError(f"device spec {text!r}: seccomp={seccomp!r} (expected kill, trap or log)")
    policy_items = {k: params.pop(k) for k in (*POLICY_KEYS, "state") if k in params}
    state = policy_items.pop("state", "on")
    if state not in ("on", "off"):
        raise ConfigError(f"device spec {text!r}: state={state!r} (expected on or off)")
    if state == "off" and placement == "inline":
        policy_items["state"] = state
    if policy_items and placement == "inline":
        raise ConfigError(f"device spec {text!r}: {', '.join(policy_items)} apply only to process=isolated "
                          "(an inline device lives and dies with the VMM)")
    try:
        policy = parse_policy(policy_items)
    except ValueError as e:
        raise ConfigError(f"device spec {text!r}: {e}") from None
    name = params.pop("id", None)
    if name is None:
        n = 0
        base = _default_name(kind, model_class)
        while f"{base}{n}" in taken:
            n += 1
        name = f"{base}{n}"
    elif not _ID.match(name):
        raise ConfigError(f"device spec {text!r}: id={name!r} (letters, digits, '_', '.', '-'; at most 64)")
    if name in taken:
        raise ConfigError(f"device spec {text!r}: id {name!r} is already used")
    if connect is None:     # a service validates the parameters it completes
        try:
            model_class(_NullHost(), **params)
        except DeviceError as e:
            raise ConfigError(f"device {name}: {e}") from None
        except Exception as e:      # a model of the user's may fail in any way
            raise ConfigError(f"device {name}: {kind} rejects its parameters: {type(e).__name__}: {e}") from None
    taken.add(name)
    return DeviceSpec(kind, name, placement, tuple(params.items()), connect, sandbox=sandbox, seccomp=seccomp,
                      restart=policy, state=state == "on")


def _default_name(kind: str, model_class: type[Device]) -> str:
    """The stem of a default ``id=``: the kind, or for ``MODULE:CLASS`` the
    class's own ``kind`` (else its name), cut to fit an id."""
    if not kinds.is_qualified(kind):
        return kind
    stem = re.sub(r"[^A-Za-z0-9_.-]", "-", model_class.kind or model_class.__name__.lower())
    return stem[:60] or "device"
