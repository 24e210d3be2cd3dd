"""The control socket: QMP's wire protocol (:mod:`vmm.qmp.wire`), the
command table (:mod:`vmm.qmp.commands`), events (:mod:`vmm.qmp.events`),
the server thread (:mod:`vmm.qmp.server`) and ``vmm ctl``
(:mod:`vmm.qmp.ctl`).  QEMU's own client (``qemu.qmp``) and ``qmp-shell``
work with it unchanged."""

from vmm.qmp.wire import QmpError

__all__ = ["QmpError"]
