"""The seccomp allowlists: :mod:`.common` for every device process, plus
one small module per kind that needs more (``SYSCALLS``), plus what a
user's model class declares in its ``syscalls`` attribute.

A rule is a system call name, optionally with argument conditions
(:class:`Arg`; all must hold), and an action: allowed, or answered with an
errno (:class:`Rule`).  A call that no rule allows gets the filter's
default action (``seccomp=kill|trap|log``)."""

from __future__ import annotations

import dataclasses
import errno
import importlib

from devices.base import Device

#: Comparison operators (libseccomp's SCMP_CMP_*).
NE, LT, LE, EQ, GE, GT, MASKED_EQ = "ne", "lt", "le", "eq", "ge", "gt", "masked_eq"


@dataclasses.dataclass(frozen=True)
class Arg:
    """Argument ``index`` compared with ``op``: ``arg op value``, or for
    MASKED_EQ ``arg & value == match``."""

    index: int
    op: str
    value: int
    match: int = 0


@dataclasses.dataclass(frozen=True)
class Rule:
    name: str
    args: tuple[Arg, ...] = ()
    #: None: allow; an errno: answer it instead of running the call.
    errno: int | None = None
    #: Kill the process instead (the sentinel of devserver.sandbox.seccomp).
    kill: bool = False

    def __str__(self) -> str:
        cond = " && ".join(f"arg{a.index} {a.op} {a.value:#x}" + (f" == {a.match:#x}" if a.op == MASKED_EQ else "")
                           for a in self.args)
        act = "allow" if self.errno is None else f"errno {errno.errorcode.get(self.errno, self.errno)}"
        return f"{self.name}{' if ' + cond if cond else ''}: {act}"


#: kind -> module of policy/ with its extra SYSCALLS.
KIND_MODULES = {
    "virtio-blk": "blk",
    "virtio-rng": "rng",
    "virtio-console": "console",
}
#: The same for the built-in classes named ``MODULE:CLASS``.
CLASS_MODULES = {
    "devices.virtio.blk:VirtioBlk": "blk",
    "devices.virtio.rng:VirtioRng": "rng",
    "devices.virtio.console:VirtioConsole": "console",
}
#: Built-in kinds (and their classes) that need nothing beyond the common part.
PLAIN_KINDS = {"echo", "pci-echo", "serial"}
_PLAIN_CLASSES = {"devices.echo:Echo", "devices.pci_echo:PciEcho", "devices.serial:Serial"}


def kind_rules(kind: str, cls: type[Device] | None) -> tuple[Rule, ...]:
    """The rules one kind adds to the common part: its policy module's
    (found by the kind's name, or by the class for a built-in model named
    ``MODULE:CLASS``), or for any other model the names its class
    declares in ``syscalls``."""
    qualified = f"{cls.__module__}:{cls.__qualname__}" if cls is not None else ""
    module = KIND_MODULES.get(kind) or CLASS_MODULES.get(qualified)
    names: tuple[str | Rule, ...] = ()
    if kind in PLAIN_KINDS or qualified in _PLAIN_CLASSES:
        pass
    elif module is not None:
        names = importlib.import_module(f"{__name__}.{module}").SYSCALLS
    elif cls is not None:
        declared = cls.syscalls
        if isinstance(declared, str) or not all(isinstance(n, str) for n in declared):
            raise TypeError(f"{cls.__name__}.syscalls must be a tuple of system call names")
        names = tuple(declared)
    return tuple(n if isinstance(n, Rule) else Rule(n) for n in names)


def rules_for(kind: str, cls: type[Device] | None, own_pid: int) -> tuple[Rule, ...]:
    from devserver.sandbox.policy import common

    return common.rules(own_pid) + kind_rules(kind, cls)
