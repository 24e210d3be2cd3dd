"""The options of a device in another process, as one value.

:class:`RemoteOptions` replaces the keyword arguments that
``RemoteEndpoint.spawn`` used to take one by one: the machine keeps one
(``Machine.remote_options``, the tunables) and fills in what it hands each
device (guest memory, console, interrupt routing) with
:func:`dataclasses.replace`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from typing import TYPE_CHECKING

from devices.record import record
from vmm.remote.restart import RestartPolicy

if TYPE_CHECKING:       # (annotations only: a machine makes its options before any device process)
    from ipc.protocol import MemRegion, SetConsole
    from vmm.coalesce import CoalescedMmio
    from vmm.forkserver import ForkServer
    from vmm.irq import IrqRouter

__all__ = ["RemoteOptions", "DEVSERVER_COMMAND"]

#: How a device process is started; ``--fd N`` is appended.
DEVSERVER_COMMAND: tuple[str, ...] = (sys.executable, "-m", "devserver")


@record
class RemoteOptions:
    """How a device process is started, handshaken with and served.

    The fields marked *spawn* matter only when the VMM starts the process
    itself (``RemoteEndpoint.spawn``); a device reached over a connected
    socket (``RemoteEndpoint.attach``) ignores them.
    """

    #: Deadline of one access, in seconds.
    access_timeout: float = 1.0
    #: Deadline of the whole start (handshake up to Ready), in seconds.
    start_timeout: float = 10.0
    #: The device's longest poll after a request, in microseconds (0: it
    #: sleeps at once).
    poll_us: int = 200
    #: Let the device shorten or lengthen its poll window (see ipc.slots).
    adaptive: bool = True
    #: How long a vCPU spins on the answer before sleeping, in microseconds.
    spin_us: int = 100
    #: Let the device's serving thread move itself off the CPU of the vCPU
    #: it serves (see ipc.slots; off by default: measured bimodal on the
    #: nested development host).
    move: bool = False
    #: *spawn*: the device program (``--fd N`` is appended).
    command: Sequence[str] = DEVSERVER_COMMAND
    #: *spawn*: CPUs the device process may run on (None: any).
    cpus: AbstractSet[int] | None = None
    #: *spawn*: a descriptor the device process's stderr (its log) goes to,
    #: e.g. a file per device (None: the VMM's stderr, vmm.console.StderrRelay).
    stderr: int | None = None
    #: Guest RAM to share (None: the device gets no guest memory).
    memfd: int | None = None
    #: Where ``memfd`` sits in the guest (None: the whole fd at address 0).
    mem_regions: Sequence[MemRegion] | None = None
    #: The console fds to hand the device (the VMM keeps its own copies).
    console: SetConsole | None = None
    #: The VM's interrupt routing, from which the device may ask for
    #: irqfds and ioeventfds (None: it gets none, its requests are refused).
    irq_router: IrqRouter | None = None
    #: The device's sandbox (devserver.sandbox): strict, auto or off.
    sandbox: str = "strict"
    #: What its seccomp filter does with a call outside the allowlist.
    seccomp: str = "kill"
    #: The VM's coalesced-MMIO zones, of which the device may ask for some
    #: inside its own regions (None: it gets none, its requests are refused).
    coalesced: CoalescedMmio | None = None
    #: What happens when the device process ends (vmm.remote.restart).
    #: The library default is ``no``; a ``--device`` spec's default is
    #: ``on-failure`` (vmm.machine).
    restart: RestartPolicy = RestartPolicy(mode="no")
    #: Give the device a state segment (ipc.state): the device stores its
    #: snapshot there before each answer, a restarted process resumes
    #: from it.  Needed for a restart that keeps the device's state.
    state: bool = True
    #: *spawn*: keep a warm spare process for restarts (``--spare`` is
    #: added to ``command``; only with a restart policy and without a
    #: fork server, which forks a new process as fast as a spare takes
    #: over: restart pause ~31-49 ms either way, measured, README).
    spare: bool = True
    #: *spawn*: a fork server (vmm.forkserver) that forks the
    #: devserver processes (None: each is exec'd).
    forkserver: ForkServer | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.poll_us, int) or self.poll_us < 0:
            raise ValueError(f"poll_us must be an integer >= 0, not {self.poll_us!r}")
        object.__setattr__(self, "command", tuple(self.command))
        if self.cpus is not None:
            object.__setattr__(self, "cpus", frozenset(self.cpus))
        if self.mem_regions is not None:
            object.__setattr__(self, "mem_regions", tuple(self.mem_regions))
