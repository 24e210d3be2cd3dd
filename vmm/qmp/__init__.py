"""The control socket: QMP's wire protocol (:mod:`vmm.qmp.wire`), the
command table (:mod:`vmm.qmp.commands`), events (:mod:`vmm.qmp.events`),
the server thread (:mod:`vmm.qmp.server`) and ``vmm ctl``
(:mod:`vmm.qmp.ctl`).  QEMU's own client (``qemu.qmp``) and ``qmp-shell``
work with it unchanged."""

from devices.lazy import lazy_exports

TYPE_CHECKING = False       # mypy takes it as typing's; no runtime typing here
if TYPE_CHECKING:
    from vmm.qmp.wire import QmpError

__all__ = ["QmpError"]


# ``QmpError`` from the wire module when first asked for: every machine
# imports vmm.qmp.events, and a run without --api has no use for the wire
# protocol (and its json; start-up, issue 15).
__getattr__, __dir__ = lazy_exports(globals(), {"QmpError": "wire"})
