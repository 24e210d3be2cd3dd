"""The VMM process: owns the VM (KVM fds, vCPU threads, guest RAM) and
dispatches every port-I/O and MMIO exit through the shared registry to the
endpoint that owns the address.  Nothing outside this package touches KVM.
"""

from __future__ import annotations

TYPE_CHECKING = False       # no runtime typing: `vmm` starts its fork server before importing it (vmm.entry)
if TYPE_CHECKING:
    from typing import Any

__all__ = ["Machine", "Outcome", "Ending"]


def __getattr__(name: str) -> Any:
    """``vmm.Machine`` (the Python API, README "Python API"), ``vmm.Outcome``
    and ``vmm.Ending``, imported when first asked for."""
    if name == "Machine":
        from vmm.machine import Machine
        return Machine
    if name in ("Outcome", "Ending"):
        from vmm import outcome
        return getattr(outcome, name)
    raise AttributeError(f"module 'vmm' has no attribute {name!r}")
