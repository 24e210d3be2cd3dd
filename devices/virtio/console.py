"""virtio-console (virtio 1.2 §5.3) with one port, no feature bits
(no VIRTIO_CONSOLE_F_SIZE, _MULTIPORT or _EMERG_WRITE).

``--device virtio-console[,socket=PATH]``.  Queue 0 is receiveq0 (bytes
to the guest), queue 1 transmitq0 (bytes from the guest).  The port is
connected to the console the host hands the device (``host.console()``:
the VMM's terminal or file, which ``vmm run`` gives a virtio-console
without ``socket=``, :mod:`vmm.console`), else, with ``socket=PATH``, to a
Unix stream socket the device listens on (one client at a time; a new
client replaces the old one), else to nothing (output is dropped, there is
no input).

Transmit: every device-readable byte of a chain is written to the output;
when the output cannot take it (a client that does not read), the rest is
dropped and counted (:attr:`VirtioConsole.dropped`), never waited for.
Receive: a reader thread takes input as it comes and fills the buffers the
driver made available on receiveq0; at most :data:`RX_PENDING` bytes wait
for buffers, and the input is not read further until they are taken
(back-pressure, nothing lost); input that arrived before the driver is
ready -- or across a device reset -- waits for it.  A restarted device
(snapshot and restore, devices.base) keeps that input; a socket client
connects again to the new process.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import threading

from devices.base import BadParameter, DeviceHost
from devices.faults.apply import fault_bytes
from devices.faults.table import POINTS
from devices.guestmem import GuestRam
from devices.hostres import LISTEN_UNIX, HostResource, listen_unix
from devices.snapshot import Fields
from devices.virtio.pci import VirtioPciDevice
from devices.virtio.virtqueue import Chain, Virtqueue

log = logging.getLogger(__name__)

VIRTIO_ID_CONSOLE = 3
QUEUE_SIZE = 64
RECEIVEQ = 0
TRANSMITQ = 1
RX_PENDING = 64 << 10
READ_CHUNK = 4096


class VirtioConsole(VirtioPciDevice):
    kind = "virtio-console"
    virtio_id = VIRTIO_ID_CONSOLE
    class_code = 0x078000           # simple communication controller, other (as QEMU)
    queue_sizes = (QUEUE_SIZE, QUEUE_SIZE)
    fault_points = {**VirtioPciDevice.fault_points, "console.tx": POINTS["console.tx"],
                    "console.rx": POINTS["console.rx"]}

    def __init__(self, host: DeviceHost, **params: str):
        self.socket_path = params.pop("socket", None)
        if self.socket_path is not None and not self.socket_path:
            raise BadParameter("virtio-console: socket= needs a path")
        super().__init__(host, **params)
        self._out = -1
        self._in = -1
        self._listener: socket.socket | None = None
        self._client: socket.socket | None = None
        self._pending = bytearray()
        self._reader: threading.Thread | None = None
        self._io_wake = -1
        #: Output bytes that could not be written.
        self.dropped = 0

    def start(self) -> None:
        console = self.host.console()
        if console is not None:
            self._out, self._in = console.output, console.input
        elif self.socket_path is not None:
            self._listen(self.socket_path)
        self._io_wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        super().start()
        self._reader = threading.Thread(target=self._read_loop, name=f"{self.kind}-input", daemon=True)
        self._reader.start()

    @classmethod
    def host_resources(cls, params: dict[str, str]) -> tuple[HostResource, ...]:
        return (HostResource(LISTEN_UNIX, params["socket"]),) if params.get("socket") else ()

    def _listen(self, path: str) -> None:
        try:
            s = listen_unix(path)
        except OSError as e:
            raise BadParameter(f"virtio-console: socket={path}: {e.strerror}") from None
        self._listener = s

    def stop(self) -> None:
        self._stopped.set()
        self._kick_reader()
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(5.0)
        super().stop()
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None
            if self._listener is not None:
                self._listener.close()
                self._listener = None
                try:
                    os.unlink(self.socket_path or "")
                except OSError:
                    pass
        if self._io_wake >= 0:
            os.close(self._io_wake)
            self._io_wake = -1

    def _kick_reader(self) -> None:
        if self._io_wake >= 0:
            os.eventfd_write(self._io_wake, 1)

    # -- snapshot: input the guest has not taken yet ------------------------

    def device_state(self) -> dict:
        return {"pending": bytes(self._pending), "dropped": self.dropped}

    def check_device_state(self, state: object, where: str) -> object:
        f = Fields(state, where, ("pending", "dropped"))
        return f.blob("pending", max_length=RX_PENDING + READ_CHUNK), f.integer("dropped")

    def load_device_state(self, checked: object) -> None:
        pending, self.dropped = checked  # type: ignore[misc]  # what check_device_state returned
        self._pending[:] = pending

    # -- transmit ----------------------------------------------------------

    def _output_fd(self) -> int:
        if self._client is not None:
            return self._client.fileno()
        return self._out

    def handle(self, queue: Virtqueue, chain: Chain, mem: GuestRam) -> int:
        if queue.index == RECEIVEQ:
            return self._receive(chain, mem)
        fd = self._output_fd()
        for buf in chain.readable:
            data = mem.read(buf.addr, buf.length)
            if "console.tx" in self.fault_engine.armed:
                data = fault_bytes(self.fault_engine, "console.tx", data)
            if fd < 0:
                self.dropped += len(data)
                continue
            sent = 0
            while sent < len(data):
                try:
                    if self._client is not None:
                        n = self._client.send(data[sent:], socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
                    else:
                        n = os.write(fd, data[sent:])
                except (BlockingIOError, OSError) as e:
                    if not isinstance(e, BlockingIOError):
                        log.info("%s: output: %s", self.kind, e)
                    break
                sent += n
            self.dropped += len(data) - sent
        return 0

    # -- receive -------------------------------------------------------------

    def wants_requests(self, queue: Virtqueue) -> bool:
        """receiveq0's buffers are taken only while input waits for them."""
        return queue.index != RECEIVEQ or bool(self._pending)

    def _receive(self, chain: Chain, mem: GuestRam) -> int:
        """Fill one receive buffer chain with pending input (lock held)."""
        written = 0
        for buf in chain.writable:
            n = min(buf.length, len(self._pending))
            if n == 0:
                break
            chunk = bytes(self._pending[:n])
            del self._pending[:n]
            if "console.rx" in self.fault_engine.armed:
                chunk = fault_bytes(self.fault_engine, "console.rx", chunk)
                self._pending[:0] = chunk[n:]      # a duplicated byte that did not fit waits
                chunk = chunk[:n]
                n = len(chunk)
            mem.write(buf.addr, chunk)
            written += n
        if written:
            self._kick_reader()                     # room again: read on
        return written

    def _read_loop(self) -> None:
        while not self._stopped.is_set():
            poller = select.poll()
            poller.register(self._io_wake, select.POLLIN)
            with self._lock:
                room = len(self._pending) < RX_PENDING
                client = self._client
            source = client.fileno() if client is not None else self._in
            if room and source >= 0:
                poller.register(source, select.POLLIN)
            if self._listener is not None:
                poller.register(self._listener.fileno(), select.POLLIN)
            try:
                events = poller.poll(1000)
            except (OSError, ValueError):
                continue
            for fd, _ev in events:
                if fd == self._io_wake:
                    try:
                        os.eventfd_read(fd)
                    except OSError:
                        pass
                elif self._listener is not None and fd == self._listener.fileno():
                    self._accept()
                elif fd == source:
                    self._read_input(source, client)

    def _accept(self) -> None:
        listener = self._listener
        if listener is None:
            return
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with self._lock:
            if self._client is not None:
                self._client.close()
            self._client = conn
        log.info("%s: client connected on %s", self.kind, self.socket_path)

    def _read_input(self, fd: int, client: socket.socket | None) -> None:
        try:
            data = os.read(fd, READ_CHUNK)
        except BlockingIOError:
            return
        except OSError as e:
            data = b""
            log.info("%s: input: %s", self.kind, e)
        with self._lock:
            if not data:            # end of input
                if client is not None and client is self._client:
                    client.close()
                    self._client = None
                elif client is None:
                    self._in = -1
                return
            self._pending += data
            self.process_queue(self.queues[RECEIVEQ])
