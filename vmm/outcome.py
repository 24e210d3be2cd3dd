"""How a run ends, and the exit status ``vmm run`` gives each ending.

Odd statuses belong to the guest: a write of ``v`` to the test-exit port
gives ``(v << 1) | 1``, as QEMU's ``isa-debug-exit,iobase=0xf4`` does, so
one guest binary gives the same status under both.  Every other ending has
an even status of its own:

======  =====================================================================
status  ending
======  =====================================================================
0       clean stop: the guest powered off (ACPI PM1a SLP_EN, port 0x604),
        KVM reported a shutdown system event, or (without an in-kernel
        LAPIC) vCPU 0 halted with interrupts off
odd     test exit, ``(v << 1) | 1`` (the OS keeps the low 8 bits)
2       bad arguments or bad input (command line, device spec, guest image)
4       the guest reset itself: triple fault (KVM_EXIT_SHUTDOWN), a reset
        or crash system event
6       KVM could not run the guest: emulation failure or another internal
        error, failed VM entry, an exit the VMM does not handle
8       timeout (``--timeout``)
10      the VMM itself failed (a bug, or KVM refused the set-up)
12      the user quit: from the console (Ctrl-A x, :mod:`vmm.console`) or
        with ``quit`` on the control socket (:mod:`vmm.qmp`)
130     interrupted (SIGINT, Ctrl-C); 143 for SIGTERM, 129 for SIGHUP
======  =====================================================================
"""

from __future__ import annotations

import enum
import signal

from devices.record import record


class Ending(enum.Enum):
    POWER_OFF = "power off"
    TEST_EXIT = "test exit"
    RESET = "guest reset"
    KVM_FAILURE = "KVM failure"
    TIMEOUT = "timeout"
    VMM_ERROR = "VMM error"
    INTERRUPTED = "interrupted"
    QUIT = "console quit"


STATUS_CLEAN = 0
STATUS_USAGE = 2
STATUS_RESET = 4
STATUS_KVM_FAILURE = 6
STATUS_TIMEOUT = 8
STATUS_VMM_ERROR = 10
STATUS_QUIT = 12

_STATUS = {
    Ending.POWER_OFF: STATUS_CLEAN,
    Ending.RESET: STATUS_RESET,
    Ending.KVM_FAILURE: STATUS_KVM_FAILURE,
    Ending.TIMEOUT: STATUS_TIMEOUT,
    Ending.VMM_ERROR: STATUS_VMM_ERROR,
    Ending.QUIT: STATUS_QUIT,
}


@record
class Outcome:
    """The ending of a run: what happened, on which vCPU, and why."""

    ending: Ending
    #: One line saying what happened.
    detail: str
    #: The test-exit value, or the signal number of an interruption.
    value: int = 0
    #: The vCPU that ended the run, if one did.
    vcpu: int | None = None
    #: A multi-line report (registers, bytes at rip) for KVM failures.
    report: str = ""

    @property
    def status(self) -> int:
        """The exit status of ``vmm run`` for this ending (0-255)."""
        if self.ending is Ending.TEST_EXIT:
            return ((self.value << 1) | 1) & 0xFF
        if self.ending is Ending.INTERRUPTED:
            return 128 + (self.value or signal.SIGINT)
        return _STATUS[self.ending]

    def __str__(self) -> str:
        where = f" on vCPU {self.vcpu}" if self.vcpu is not None else ""
        return f"{self.ending.value}{where}: {self.detail} (status {self.status})"
