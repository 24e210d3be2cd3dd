"""Devices in their own process (``process=isolated``), VMM side.

One module per job:

- :mod:`vmm.remote.options` -- :class:`RemoteOptions`, every option of a
  device process as one value;
- :mod:`vmm.remote.process` -- spawning and supervising a child device
  process (:class:`~vmm.remote.process.DeviceProcess`, a pidfd);
- :mod:`vmm.remote.peer` -- what the endpoint needs of whatever is at the
  far end of the channel (:class:`~vmm.remote.peer.Peer`), and
  :class:`~vmm.remote.peer.SocketPeer` for a device this VMM did not start;
- :mod:`vmm.remote.handshake` -- Hello to Ready on a connected channel;
- :mod:`vmm.remote.requests` -- the service of the device's control
  requests (interrupt pins, MSI routes, ioeventfds), one handler per type;
- :mod:`vmm.remote.endpoint` -- :class:`RemoteEndpoint`, the access proxy
  (the :class:`vmm.endpoint.Endpoint` the dispatcher calls), with
  :meth:`~RemoteEndpoint.spawn` (start a child) and
  :meth:`~RemoteEndpoint.attach` (take a connected socket);
- :mod:`vmm.remote.connect` -- ``--device KIND,connect=PATH``: reaching a
  device that runs as a service (``devserver serve``) and attaching to it.
"""

from typing import TYPE_CHECKING

from devices.lazy import lazy_exports

__all__ = ["RemoteEndpoint", "RemoteOptions", "DEVSERVER_COMMAND", "Peer", "SocketPeer"]

if TYPE_CHECKING:
    from vmm.remote.endpoint import RemoteEndpoint
    from vmm.remote.options import DEVSERVER_COMMAND, RemoteOptions
    from vmm.remote.peer import Peer, SocketPeer

# Imported from their modules when first asked for: a VMM with no device
# process (``vmm run --serial none``, inline devices) needs options and
# restart policies (vmm.config) but not the endpoint and the protocol
# stack behind it (~14 ms of start-up; issue 15).
_MODULE_OF = {"RemoteEndpoint": "endpoint", "RemoteOptions": "options", "DEVSERVER_COMMAND": "options",
              "Peer": "peer", "SocketPeer": "peer"}


__getattr__, __dir__ = lazy_exports(globals(), _MODULE_OF)
