"""The control socket: a Unix socket speaking QMP (:mod:`vmm.qmp.wire`),
served by one thread with a selector, so no client can hold up a vCPU or
another client.

* The socket is made with mode 0600 in a private directory beside the
  path and renamed into place, so it is never reachable by others; a
  stale socket (nobody accepting) is replaced, a live one is refused.
* At most ``max_clients`` sessions at once (16); one more is told so in
  one QMP error line and closed.
* Every socket is non-blocking.  Replies and events are queued per client;
  a client whose queue passes ``max_output`` bytes (it does not read) is
  dropped, and so is one that resets or vanishes -- mid-command too: its
  command still runs, its reply goes nowhere.
* Events come from any thread through :class:`~vmm.qmp.events.EventHub`;
  the listener only queues them and wakes the selector through a pipe.
* :meth:`close` sends what is queued (the ``SHUTDOWN`` event) for up to
  ``FLUSH_TIMEOUT`` seconds, then closes every client and unlinks the path.
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import selectors
import socket
import stat
import threading
import time
from typing import TYPE_CHECKING, Any, Callable

from vmm.endpoint import VmmError
from vmm.qmp.events import Event
from vmm.qmp.wire import GENERIC_ERROR, MAX_MESSAGE, QmpError, Session, encode

if TYPE_CHECKING:
    from vmm.machine import Machine

log = logging.getLogger(__name__)

MAX_CLIENTS = 16
#: Bytes of replies and events a client may leave unread before it is dropped.
MAX_OUTPUT = 4 << 20
FLUSH_TIMEOUT = 1.0
_RECV = 64 << 10
#: sun_path holds 108 bytes, the terminating NUL included (unix(7)).
_SUN_PATH_MAX = 107
#: The greeting's version: QEMU clients print version.qemu.major/minor/micro.
VERSION = {"qemu": {"major": 0, "minor": 1, "micro": 0}, "package": "splitvmm 0.1.0"}


class ApiError(VmmError):
    """The control socket cannot be made."""


class _Client:
    __slots__ = ("sock", "fd", "session", "out", "name")

    def __init__(self, sock: socket.socket, session: Session, name: str):
        self.sock = sock
        self.fd = sock.fileno()
        self.session = session
        self.out = bytearray()
        self.name = name


class QmpServer:
    """Serves ``path`` for ``machine`` until :meth:`close`."""

    def __init__(self, machine: Machine, path: str | os.PathLike, *, max_clients: int = MAX_CLIENTS,
                 max_output: int = MAX_OUTPUT, max_message: int = MAX_MESSAGE,
                 execute: Callable[[str, dict[str, Any]], Any] | None = None):
        from vmm.qmp.commands import execute as run_command

        self.machine = machine
        self.path = os.fspath(path)
        self.max_clients = max_clients
        self.max_output = max_output
        self.max_message = max_message
        self._execute = execute or (lambda name, args: run_command(machine, name, args))
        self._listener, self._inode = _listen(self.path)
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._wake_lock = threading.Lock()     # no write to the pipe once it is closed
        self._events: collections.deque[Event] = collections.deque()
        self._clients: dict[int, _Client] = {}
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ, None)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._stopping = False
        self._closed = False
        self._serial = 0
        #: Clients refused because ``max_clients`` were connected, dropped
        #: for not reading, and served in total (for tests and logs).
        self.refused = self.dropped = self.accepted = 0
        self._thread = threading.Thread(target=self._main, name="qmp", daemon=True)
        machine.events.subscribe(self._on_event)
        self._thread.start()

    # -- other threads ---------------------------------------------------

    def _on_event(self, event: Event) -> None:
        self._events.append(event)
        self._wake()

    def _wake(self) -> None:
        with self._wake_lock:
            if self._wake_w < 0:
                return
            try:
                os.write(self._wake_w, b"\0")
            except BlockingIOError:
                pass    # full: a wake-up is pending anyway

    @property
    def clients(self) -> int:
        return len(self._clients)

    def close(self) -> None:
        """Flush queued output (bounded), close every client, unlink the path."""
        if self._closed:
            return
        self._closed = True
        self.machine.events.unsubscribe(self._on_event)
        self._stopping = True
        self._wake()
        self._thread.join(FLUSH_TIMEOUT + 5.0)
        if self._thread.is_alive():
            log.error("control socket thread did not stop")
            return
        for client in list(self._clients.values()):
            self._drop(client, None)
        self._selector.close()
        self._listener.close()
        with self._wake_lock:
            os.close(self._wake_r)
            os.close(self._wake_w)
            self._wake_w = -1
        try:
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)
        except OSError:
            pass

    # -- the thread --------------------------------------------------------

    def _main(self) -> None:
        try:
            while not self._stopping:
                for key, mask in self._selector.select():
                    self._ready(key, mask)
                self._send_events()
            self._flush_all()
        except Exception:
            log.exception("control socket %s: server failed; it is closed, the VM goes on", self.path)

    def _ready(self, key: selectors.SelectorKey, mask: int) -> None:
        if key.fileobj is self._listener:
            self._accept()
        elif key.fileobj == self._wake_r:
            try:
                while os.read(self._wake_r, 4096):
                    pass
            except BlockingIOError:
                pass
        else:
            client = key.data
            if client.fd not in self._clients:
                return      # dropped earlier in this round
            if mask & selectors.EVENT_READ:
                self._read(client)
            if mask & selectors.EVENT_WRITE and client.fd in self._clients:
                self._write(client)

    def _accept(self) -> None:
        try:
            sock, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            log.warning("control socket %s: accept: %s", self.path, e)
            return
        sock.setblocking(False)
        if len(self._clients) >= self.max_clients:
            self.refused += 1
            try:
                sock.send(encode({"error": QmpError(
                    GENERIC_ERROR, f"too many clients ({self.max_clients}); try again later").as_json()}),
                    socket.MSG_NOSIGNAL)
            except OSError:
                pass
            sock.close()
            log.warning("control socket %s: refused a client: %d connected already", self.path,
                        self.max_clients)
            return
        self._serial += 1
        self.accepted += 1
        client = _Client(sock, Session(self._execute, VERSION, self.max_message), f"client {self._serial}")
        self._clients[client.fd] = client
        self._selector.register(sock, selectors.EVENT_READ, client)
        log.debug("control socket: %s connected", client.name)
        self._queue(client, client.session.greeting())

    def _read(self, client: _Client) -> None:
        try:
            data = client.sock.recv(_RECV)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._drop(client, f"receive failed: {e}")
            return
        if not data:
            self._drop(client, None)
            return
        reply = client.session.receive_data(data)
        if reply:
            self._queue(client, reply)
        if client.session.closing and client.fd in self._clients:
            # Framing lost: no more input; the error line goes out, then close.
            self._interest(client)

    def _queue(self, client: _Client, data: bytes) -> None:
        if client.fd not in self._clients:
            return
        client.out += data
        if len(client.out) > self.max_output:
            self.dropped += 1
            self._drop(client, f"more than {self.max_output} bytes of output left unread")
            return
        self._write(client)

    def _write(self, client: _Client) -> None:
        try:
            while client.out:
                n = client.sock.send(client.out, socket.MSG_NOSIGNAL)
                del client.out[:n]
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as e:
            self._drop(client, None if e.errno in (errno.EPIPE, errno.ECONNRESET) else f"send failed: {e}")
            return
        if not client.out and client.session.closing:
            self._drop(client, "closed after a framing error")
            return
        self._interest(client)

    def _interest(self, client: _Client) -> None:
        mask = 0 if client.session.closing else selectors.EVENT_READ
        if client.out:
            mask |= selectors.EVENT_WRITE
        if mask == 0:
            mask = selectors.EVENT_WRITE
        self._selector.modify(client.sock, mask, client)

    def _send_events(self) -> None:
        while self._events:
            event = self._events.popleft()
            for client in list(self._clients.values()):
                data = client.session.event(event)
                if data:
                    self._queue(client, data)

    def _drop(self, client: _Client, why: str | None) -> None:
        if self._clients.pop(client.fd, None) is None:
            return
        if why:
            log.warning("control socket: %s dropped: %s", client.name, why)
        try:
            self._selector.unregister(client.sock)
        except (KeyError, ValueError):
            pass
        client.sock.close()

    def _flush_all(self) -> None:
        """Closing: the last events, then what each client has queued."""
        self._selector.unregister(self._listener)
        self._selector.unregister(self._wake_r)
        self._send_events()
        deadline = time.monotonic() + FLUSH_TIMEOUT
        while any(c.out for c in self._clients.values()):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            for key, mask in self._selector.select(left):
                if key.data is not None and mask & selectors.EVENT_WRITE and key.data.fd in self._clients:
                    self._write(key.data)


def _listen(path: str) -> tuple[socket.socket, int]:
    """A listening socket at ``path``, mode 0600 from the start."""
    if len(os.fsencode(path)) > _SUN_PATH_MAX:
        raise ApiError(f"--api {path}: longer than the {_SUN_PATH_MAX} bytes a Unix socket address holds")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise ApiError(f"--api {path}: {e.strerror or e}") from None
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise ApiError(f"--api {path}: exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            pass        # stale: nobody accepts there; replaced below
        except OSError as e:
            raise ApiError(f"--api {path}: {e.strerror or e}") from None
        else:
            raise ApiError(f"--api {path}: another process is serving this socket")
        finally:
            probe.close()
    parent = os.path.dirname(os.path.abspath(path))
    try:
        private = _private_dir(parent)
    except OSError as e:
        raise ApiError(f"--api {path}: {e.strerror or e} ({parent})") from None
    tmp = os.path.join(private, "s")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    try:
        sock.bind(tmp)
        os.chmod(tmp, 0o600)
        sock.listen(64)
        os.rename(tmp, path)
        inode = os.stat(path).st_ino
    except OSError as e:
        sock.close()
        raise ApiError(f"--api {path}: {e.strerror or e}") from None
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        os.rmdir(private)
    return sock, inode


def _private_dir(parent: str) -> str:
    """A new directory ``parent/.vmm`` + 12 random hex digits that only we
    may enter (mode 0700), as ``tempfile.mkdtemp`` makes one: a random name, created
    exclusively, another name on a collision.  Not tempfile itself: it
    imports ``shutil`` and ``random``, and with them ``bz2`` and ``lzma``
    and their libraries (~0.5 MB of the VMM's memory, 2.4 ms; issue 15)."""
    for _ in range(100):
        path = os.path.join(parent, f".vmm{os.urandom(6).hex()}")
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            continue
        return path
    raise FileExistsError(errno.EEXIST, "no unused name for a private directory", parent)
