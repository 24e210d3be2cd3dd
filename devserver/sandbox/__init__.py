"""The sandbox of a device process: layers applied after the process has
received its descriptors and before the model is built, in this order
(one module each):

1. :mod:`.preload` -- import now what is needed later;
2. :mod:`.userns` -- a user namespace whose root is a host uid of the
   device's own;
3. :mod:`.namespaces` -- mount, pid, net, ipc, uts, cgroup namespaces and
   an empty read-only root (the process forks twice here: pid 1 of the new
   pid namespace is a reaper that forks the device at its own thread-id
   range; the parent, outside, reaps pid 1);
4. :mod:`.fds` -- descriptors not kept closed, rlimits, not dumpable;
5. :mod:`.caps` -- no capabilities, ``no_new_privs``;
6. :mod:`.landlock` -- no filesystem access, no TCP;
7. :mod:`.seccomp` -- the allowlist of the kind (:mod:`.policy`), last.

``sandbox=strict`` (the default of isolated devices) refuses to start when
a layer cannot be applied (:class:`SandboxError`, one line naming the layer
and the reason); ``auto`` applies what the host allows (without a user
namespace: a plain switch to the dedicated uid) and reports the layers it
applied; ``off`` applies none (debugging).  :func:`apply` returns the
layers that are on; the device reports them to the VMM in Ready.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import time

from devices.base import Device

log = logging.getLogger(__name__)

MODES = ("strict", "auto", "off")
DEFAULT_MODE = "strict"
SECCOMP_MODES = ("kill", "trap", "log")
DEFAULT_SECCOMP = "kill"
#: For measurements only (the attack x layer figures): a comma-separated
#: subset of LAYERS; the others are skipped, whatever the mode.
ONLY_ENV = "SPLITVMM_SANDBOX_LAYERS"
#: Every layer, in the order applied (the names :func:`apply` reports).
LAYERS = ("preload", "userns", "namespaces", "fds", "caps", "landlock", "seccomp")


def tid_base(owner: int) -> int:
    """Where thread ids start in the pid namespace of device ``owner``: its
    main thread's id (:func:`.namespaces.tid_base`)."""
    return namespaces.tid_base(owner)


class SandboxError(Exception):
    """A layer could not be applied under ``sandbox=strict``."""

    def __init__(self, layer: str, reason: str):
        super().__init__(f"sandbox layer {layer} cannot be applied: {reason}")
        self.layer = layer
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class SandboxConfig:
    mode: str = DEFAULT_MODE
    seccomp: str = DEFAULT_SECCOMP

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"sandbox={self.mode!r} (expected strict, auto or off)")
        if self.seccomp not in SECCOMP_MODES:
            raise ValueError(f"seccomp={self.seccomp!r} (expected kill, trap or log)")


@dataclasses.dataclass
class Applied:
    """What :func:`apply` did."""

    #: The layers that are on, in order (``seccomp`` as ``seccomp=MODE``;
    #: ``uid`` instead of ``userns`` for the fallback).
    layers: list[str] = dataclasses.field(default_factory=list)
    #: This process runs in a pid namespace of its own, the child of its
    #: pid 1 (a reaper, itself the child of the process the VMM started).
    pid_namespace: bool = False
    #: This process's pid as the host (the VMM) sees it.
    host_pid: int = dataclasses.field(default_factory=os.getpid)
    #: Host uid of the device (0: unchanged).
    uid: int = 0
    #: Seconds the layers took.
    seconds: float = 0.0
    #: Allowlist rules loaded.
    rules: int = 0
    #: Seconds each layer took (the device logs them at debug level).
    layer_seconds: dict[str, float] = dataclasses.field(default_factory=dict)


def apply(config: SandboxConfig, kind: str, model_class: type[Device] | None,
          keep: set[int], report_sock: int = -1, tid_base: int = 0, *,
          parent_death: bool = False) -> Applied:
    """Apply the layers (module docstring); ``keep``: the descriptors the
    runtime holds; ``report_sock``: the control socket, where a seccomp
    death is reported; ``tid_base``: where thread ids start in the
    device's pid namespace (the VMM tells registry-lock holders of
    different devices apart by them); ``parent_death``: the parent is
    single-threaded and the process is to die with it (a service's
    session: :func:`.namespaces.fork_into_pid_namespace`).  Must be called
    while the process has one thread."""
    out = Applied()
    if config.mode == "off":
        return out
    # Before any layer: the uid switch clears PR_SET_PDEATHSIG, and the
    # outer reaper must know which parent to outlive no longer.
    parent = os.getppid()
    t0 = time.monotonic()
    strict = config.mode == "strict"
    only = os.environ.get(ONLY_ENV)
    chosen = set(only.split(",")) if only else None
    # Before the uid switch, while this process surely reaches it: the
    # reapers' program (the namespaces layer execs it).
    program: int | OSError = -1
    if chosen is None or "namespaces" in chosen:
        try:
            program = namespaces.open_program()
        except OSError as e:
            program = e

    def layer(name: str, fn, *args):
        if chosen is not None and name.split("=")[0] not in chosen:
            return None
        t = time.monotonic()
        try:
            result = fn(*args)
        except (OSError, ValueError) as e:
            if strict:
                raise SandboxError(name, str(e)) from None
            log.warning("sandbox=auto: layer %s is off: %s", name, e)
            return None
        out.layers.append(name)
        out.layer_seconds[name] = time.monotonic() - t
        return True if result is None else result

    extra = kind_rules(kind, model_class)     # imports the kind's policy module while it can
    layer("preload", preload.apply)
    was_root = os.geteuid() == 0
    uid = layer("userns", userns.apply)
    if uid is not None:
        out.uid = uid
    keep = set(keep) | {2} | fds.mapping_fds()
    ns = layer("namespaces", _namespaces, out, tid_base, parent, parent_death, program)
    layer("fds", fds.apply, keep)
    if uid is None and was_root and ns:
        out.uid = layer("uid", userns.switch_uid) or 0
    layer("caps", caps.apply)
    layer("landlock", landlock.apply)
    rules = common.rules(os.getpid()) + extra
    n = layer(f"seccomp={config.seccomp}", seccomp.load, rules, config.seccomp, report_sock)
    out.rules = n or 0
    out.seconds = time.monotonic() - t0
    return out


def _namespaces(out: Applied, tid_base: int, parent: int, parent_death: bool, program: int | OSError) -> None:
    if isinstance(program, OSError):
        raise OSError(f"the reaper program {namespaces.PROGRAM}: {program.strerror} "
                      "(pip install builds it: make install)")
    forward = callable(signal.getsignal(signal.SIGTERM))   # a service's session passes SIGTERM on

    # What each reaper does before it execs the reaper program (which then
    # loads its own seccomp list).  Neither applies Landlock: on ABI >= 6
    # it scopes signals to the process's own domain, which the process it
    # must kill or pass a SIGTERM to (forked before, or with a domain made
    # after) is not in (pidfd_send_signal, kill: EPERM).
    def lock_down(keep: set[int]) -> None:
        fds.apply(keep)
        try:
            caps.apply()
        except OSError:
            pass    # best effort: the program drops them again (capset), no_new_privs is set before the exec

    try:
        namespaces.unshare()
        out.host_pid = namespaces.fork_into_pid_namespace(lock_down, tid_base, program=program, parent=parent,
                                                          parent_death=parent_death, forward=forward)
    finally:
        os.close(program)       # the device's (the reapers have exec'd)
    out.pid_namespace = True
    namespaces.empty_root()


from devserver.sandbox import caps, fds, landlock, namespaces, preload, seccomp, userns  # noqa: E402
from devserver.sandbox.policy import common, kind_rules  # noqa: E402
