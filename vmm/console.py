"""The VMM's console: where the bytes of the devices on the VMM's line go
and come from (``vmm run --serial stdio|file:PATH|none``).

The VMM owns the terminal; a device on the console -- COM1, and every
virtio-console without a ``socket=`` -- in its own process by default, and
untrusted, gets two descriptors and nothing else of it
(:class:`ipc.protocol.SetConsole`): an output (a duplicate of the VMM's
stdout, or the file) and an input (a pipe of its own that this module
feeds).  Like QEMU's multiplexed ``-chardev stdio,mux=on``, every device's
output goes to the one line, and the input goes to one device at a time:
the first attached (COM1) at the start, the next one after ``Ctrl-A c``
(the VMM says on stderr which one has it).

``stdio`` (the default): output to stdout.  When stdin is a terminal (and
the VMM is in its foreground process group) it is put in raw mode for the
run -- every key, Ctrl-C included, goes to the guest, as in QEMU's
``-serial stdio``; output processing (OPOST) is left as it was -- and the
escape key Ctrl-A is interpreted: ``Ctrl-A x`` quits (exit status 12,
:mod:`vmm.outcome`), ``Ctrl-A c`` switches the input to the next device,
``Ctrl-A Ctrl-A`` sends one Ctrl-A, ``Ctrl-A h`` prints the keys; any
other key after Ctrl-A is dropped with it.  The terminal's attributes are
restored on every way out (:meth:`Console.close` runs in ``vmm run``'s
``finally``, after a normal end, a guest crash, a signal or an exception;
an ``atexit`` hook backs it up).  When stdin is not a terminal (a pipe or
a file) its bytes go to the first device as they are, with no escape key,
until its end.

``file:PATH``: output to PATH (created or truncated), no input.
``capture`` (the Python API's, :class:`vmm.machine.Machine`): output into
a pipe that a thread reads into memory (:attr:`Console.data`,
:meth:`Console.expect`), input from :meth:`Console.send`.
``none``: no console, and no serial device unless ``--device serial`` asks
for one (whose output is then dropped, as a virtio-console's without
``socket=``).
"""

from __future__ import annotations

import atexit
import codecs
import dataclasses
import logging
import os
import re
import select
import termios
import threading
import time
from collections.abc import Callable

from devices.base import ConsoleFds
from devices.record import record
from vmm.endpoint import VmmError

log = logging.getLogger(__name__)

#: The escape key (Ctrl-A, as in QEMU) and what may follow it.
ESCAPE = 0x01
QUIT_KEY = ord("x")
HELP_KEY = ord("h")
SWITCH_KEY = ord("c")
HELP_TEXT = ("\r\nC-a h    print this help\r\nC-a x    quit the VMM (exit status 12)\r\n"
             "C-a c    send the input to the next device on the console\r\n"
             "C-a C-a  send C-a to the guest\r\n")


class ConsoleError(VmmError):
    """The console cannot be set up (e.g. the output file cannot be opened)."""


class ExpectTimeout(ConsoleError):
    """:meth:`Console.expect` did not see its pattern in time (or the run
    ended without it); the message quotes the end of the output."""


@record
class SerialMode:
    """A parsed ``--serial`` value."""

    kind: str            # "stdio", "file", "capture" or "none"
    path: str = ""

    def __str__(self) -> str:
        return f"file:{self.path}" if self.kind == "file" else self.kind


def parse_serial(text: str, capture: bool = False) -> SerialMode:
    """``stdio``, ``none`` or ``file:PATH`` (and ``capture`` if asked:
    the Python API's); ValueError names what is wrong."""
    if text in ("stdio", "none") or (capture and text == "capture"):
        return SerialMode(text)
    if text.startswith("file:"):
        path = text[len("file:"):]
        if not path:
            raise ValueError("file: needs a path (file:PATH)")
        return SerialMode("file", path)
    raise ValueError(f"{text!r} (expected stdio, none{', capture' if capture else ''} or file:PATH)")


def _raw_keep_output(attrs: list) -> list:
    """cfmakeraw(3) on the input and line flags, output flags kept (QEMU's
    stdio character device does the same)."""
    iflag, oflag, cflag, lflag, ispeed, ospeed, cc = attrs
    iflag &= ~(termios.IGNBRK | termios.BRKINT | termios.PARMRK | termios.ISTRIP | termios.INLCR
               | termios.IGNCR | termios.ICRNL | termios.IXON)
    lflag &= ~(termios.ECHO | termios.ECHONL | termios.ICANON | termios.ISIG | termios.IEXTEN)
    cflag = (cflag & ~(termios.CSIZE | termios.PARENB)) | termios.CS8
    cc = list(cc)
    cc[termios.VMIN] = 1
    cc[termios.VTIME] = 0
    return [iflag, oflag, cflag, lflag, ispeed, ospeed, cc]


def _write_only(fd: int) -> int:
    """A descriptor for writing to ``fd``: a duplicate, or, when ``fd`` is a
    terminal (usually open for reading too), the terminal opened again
    write-only, so that the device it is handed to cannot read the keys
    typed into it (nor make it its controlling terminal)."""
    if os.isatty(fd):
        return os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_NOCTTY | os.O_CLOEXEC)
    return os.dup(fd)


@dataclasses.dataclass
class _Frontend:
    """A device on the console: the pipe its input comes through."""

    name: str
    input: int           # the read end, handed to the device
    feed: int            # the write end, -1 once closed


class Console:
    """The console of one run: the output, one input pipe per device on it
    and the thread that feeds the one that has the input.  :meth:`open`,
    :meth:`attach` for each device, :meth:`start` just before the guest
    runs, then :meth:`close` (always)."""

    def __init__(self, mode: SerialMode, stdin: int = 0, stdout: int = 1):
        self.mode = mode
        self._stdin = stdin
        self._stdout = stdout
        self.output = -1         # what the devices write to
        self._frontends: list[_Frontend] = []
        self._focus = 0          # index of the device that gets the input
        self._wake_r = self._wake_w = -1
        self._saved_attrs: list | None = None
        self._thread: threading.Thread | None = None
        self._on_quit: Callable[[], None] | None = None
        self._capture: _Capture | None = None
        self._closed = False

    @classmethod
    def open(cls, mode: SerialMode, stdin: int = 0, stdout: int = 1) -> Console:
        """Open the output (raises ConsoleError)."""
        self = cls(mode, stdin, stdout)
        if mode.kind == "capture":
            r, self.output = os.pipe2(os.O_CLOEXEC)
            self._capture = _Capture(r)
        elif mode.kind == "file":
            try:
                self.output = os.open(mode.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            except OSError as e:
                raise ConsoleError(f"--serial {mode}: {e.strerror}") from None
        else:
            try:
                self.output = _write_only(stdout)
            except OSError as e:
                raise ConsoleError(f"--serial stdio: stdout: {e.strerror} (try --serial none)") from None
        return self

    def attach(self, name: str, first: bool = False) -> ConsoleFds:
        """Put device ``name`` on the console: the descriptors it uses (the
        VMM keeps them).  The first device attached has the input first,
        unless a later one is attached ``first`` (COM1 is)."""
        if self._thread is not None or self._closed:
            raise VmmError("console: devices are attached before it starts")
        r, w = os.pipe2(os.O_CLOEXEC)
        if self.mode.kind == "file":
            os.close(w)          # no input: the device sees its end at once
            w = -1
        frontend = _Frontend(name, r, w)
        if first:
            self._frontends.insert(0, frontend)
        else:
            self._frontends.append(frontend)
        return ConsoleFds(self.output, r)

    @property
    def names(self) -> list[str]:
        """The devices on the console, in the order of ``Ctrl-A c``."""
        return [f.name for f in self._frontends]

    @property
    def focus(self) -> str | None:
        """The device that gets the input now."""
        return self._frontends[self._focus].name if self._frontends else None

    @property
    def raw(self) -> bool:
        """Whether the terminal is in raw mode now."""
        return self._saved_attrs is not None

    def start(self, on_quit: Callable[[], None]) -> None:
        """Begin forwarding input (raw mode if stdin is a terminal; with
        ``capture`` the input comes from :meth:`send`)."""
        if self._capture is not None or not any(f.feed >= 0 for f in self._frontends):
            return
        self._on_quit = on_quit
        tty = self._is_foreground_tty()
        if not tty and os.isatty(self._stdin):
            log.info("console: not in the terminal's foreground; no input")
            self._close_feeds()
            return
        if tty:
            self._saved_attrs = termios.tcgetattr(self._stdin)
            atexit.register(self._restore)
            termios.tcsetattr(self._stdin, termios.TCSADRAIN, _raw_keep_output(self._saved_attrs))
            for f in self._frontends:
                os.set_blocking(f.feed, False)
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._thread = threading.Thread(target=self._forward, args=(tty,), name="console-input", daemon=True)
        self._thread.start()

    def _is_foreground_tty(self) -> bool:
        try:
            return os.isatty(self._stdin) and os.tcgetpgrp(self._stdin) == os.getpgrp()
        except OSError:
            return False

    def _forward(self, tty: bool) -> None:
        """The input thread: stdin → (escape filter) → the pipe of the
        device that has the input."""
        poller = select.poll()
        poller.register(self._stdin, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        escaped = False
        while True:
            try:
                events = dict(poller.poll())
            except OSError as e:
                log.debug("console: poll: %s", e)
                break
            if self._wake_r in events:
                return
            try:
                data = os.read(self._stdin, 4096)
            except BlockingIOError:
                continue
            except OSError as e:
                log.info("console: reading stdin: %s", e)
                break
            if not data:
                break
            if tty:
                out = bytearray()
                for b in data:
                    if escaped:
                        escaped = False
                        if b == ESCAPE:
                            out.append(ESCAPE)
                        elif b == QUIT_KEY:
                            self._send(bytes(out), tty)
                            self._quit()
                            return
                        elif b == SWITCH_KEY:
                            self._send(bytes(out), tty)
                            out.clear()
                            self._switch()
                        elif b == HELP_KEY:
                            os.write(2, HELP_TEXT.encode())
                    elif b == ESCAPE:
                        escaped = True
                    else:
                        out.append(b)
                data = bytes(out)
            if not self._send(data, tty):
                break
        # End of input: the devices see the end of their pipes.
        self._close_feeds()

    def _switch(self) -> None:
        """``Ctrl-A c``: the input goes to the next device."""
        self._focus = (self._focus + 1) % len(self._frontends)
        os.write(2, f"\r\n[vmm: console input to {self.focus}]\r\n".encode())

    def _send(self, data: bytes, tty: bool) -> bool:
        """Write to the pipe of the device that has the input; False once
        no device takes input any more.  Typed input that finds the pipe
        full is dropped (like characters typed faster than the guest
        reads); piped input waits.  A device that is gone loses its input
        (the others keep theirs)."""
        target = self._frontends[self._focus]
        while data and target.feed >= 0:
            try:
                n = os.write(target.feed, data)
            except BlockingIOError:
                log.debug("console: %s does not read its input; %d byte(s) dropped", target.name, len(data))
                break
            except OSError:
                self._close_feed(target)
                break
            data = data[n:]
        return any(f.feed >= 0 for f in self._frontends)

    def _quit(self) -> None:
        log.info("console: quit (Ctrl-A x)")
        if self._on_quit is not None:
            self._on_quit()

    @staticmethod
    def _close_feed(f: _Frontend) -> None:
        feed, f.feed = f.feed, -1
        if feed >= 0:
            try:
                os.close(feed)
            except OSError:
                pass

    def _close_feeds(self) -> None:
        for f in self._frontends:
            self._close_feed(f)

    def _restore(self) -> None:
        attrs, self._saved_attrs = self._saved_attrs, None
        if attrs is not None:
            try:
                termios.tcsetattr(self._stdin, termios.TCSADRAIN, attrs)
            except (OSError, termios.error) as e:
                log.warning("cannot restore the terminal: %s", e)

    def restore_terminal(self) -> None:
        """Put the terminal back as it was (idempotent; first thing on the
        way out)."""
        self._restore()

    # -- capture (the Python API) -------------------------------------------

    def _captured(self) -> _Capture:
        if self._capture is None:
            raise ConsoleError(f"the console is {self.mode}, not captured (serial=\"capture\")")
        return self._capture

    @property
    def data(self) -> bytes:
        """Every byte the devices on the console wrote so far (capture)."""
        return self._captured().data()

    @property
    def text(self) -> str:
        """:attr:`data` as text (UTF-8, undecodable bytes replaced)."""
        return self._captured().text()

    def expect(self, pattern: str | re.Pattern[str], timeout: float = 30.0) -> re.Match[str]:
        """Wait until ``pattern`` (a regular expression) matches the output
        after the previous match; returns the match.  Raises
        :class:`ExpectTimeout` after ``timeout`` seconds, or as soon as the
        run has ended and its output is read without a match."""
        return self._captured().expect(pattern, timeout)

    def send(self, data: bytes | str) -> None:
        """Type ``data`` into the device that has the input (capture)."""
        self._captured()
        if isinstance(data, str):
            data = data.encode()
        target = self._frontends[self._focus] if self._frontends else None
        if target is None or target.feed < 0:
            raise ConsoleError("no device on the console takes input")
        while data:
            data = data[os.write(target.feed, data):]

    def run_ended(self) -> None:
        """The run is over: :meth:`expect` stops waiting once the output
        is read (called by the machine)."""
        if self._capture is not None:
            self._capture.end()

    def close(self) -> None:
        """Restore the terminal, stop the input thread, close every
        descriptor (idempotent)."""
        self._restore()
        if self._closed:
            return
        self._closed = True
        if self._capture is not None:
            os.close(self.output)       # the devices are gone: the reader sees the end
            self.output = -1
            self._capture.close()
        if self._thread is not None:
            try:
                os.write(self._wake_w, b"x")
            except OSError:
                pass
            self._thread.join(1.0)
            if self._thread.is_alive():     # blocked writing piped input
                log.debug("console: input thread still busy; left behind")
                return
        for fd in (self.output, self._wake_r, self._wake_w, *(f.input for f in self._frontends)):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._close_feeds()
        self.output = self._wake_r = self._wake_w = -1


class _Capture:
    """The reader of a captured console: a thread that moves the pipe's
    bytes into memory and wakes whoever waits in :meth:`expect`."""

    #: How much of the output an ExpectTimeout quotes.
    QUOTE = 2000

    def __init__(self, fd: int):
        self._fd = fd
        self._buf = bytearray()
        self._text: list[str] = []
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._cursor = 0              # where the next expect starts (text index)
        self._cond = threading.Condition()
        self._ended = False
        self._eof = False
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._read, name="console-capture", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while True:
            events = dict(poller.poll())
            with self._cond:
                if self._fd in events:
                    data = os.read(self._fd, 65536)
                    if data:
                        self._buf += data
                        self._text.append(self._decoder.decode(data))
                    else:
                        self._eof = True
                    self._cond.notify_all()
                    if data:
                        continue
                if self._wake_r in events or self._eof:
                    self._eof = True
                    self._cond.notify_all()
                    return

    def _drained(self) -> bool:
        """No byte left in the pipe (called with the lock held: the reader
        reads under it, so a byte is in the pipe or in the buffer)."""
        return self._eof or not select.select([self._fd], [], [], 0)[0]

    def data(self) -> bytes:
        with self._cond:
            return bytes(self._buf)

    def text(self) -> str:
        with self._cond:
            joined = "".join(self._text)
            self._text = [joined]
            return joined

    def expect(self, pattern: str | re.Pattern[str], timeout: float) -> re.Match[str]:
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                text = "".join(self._text)
                self._text = [text]
                m = regex.search(text, self._cursor)
                if m is not None:
                    self._cursor = m.end()
                    return m
                left = deadline - time.monotonic()
                finished = (self._ended and self._drained()) or self._eof
                if left <= 0 or finished:
                    why = "the run ended" if finished else f"{timeout:g} s passed"
                    tail = text[-self.QUOTE:]
                    raise ExpectTimeout(f"console: no match for {regex.pattern!r}; {why}; output "
                                        f"({len(text)} characters, last {len(tail)}):\n{tail}")
                self._cond.wait(left)

    def end(self) -> None:
        with self._cond:
            self._ended = True
            self._cond.notify_all()

    def close(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass
        self._thread.join(5.0)
        if self._thread.is_alive():
            log.debug("console: capture thread still busy; left behind")
            return
        with self._cond:
            self._eof = True
        for fd in (self._fd, self._wake_r, self._wake_w):
            os.close(fd)


class StderrRelay:
    """A device process's stderr while the VMM's stderr is a terminal.

    A device process never gets a descriptor of the terminal (it could read
    the keys the VMM filters, or change the terminal's modes): its stdin
    and stdout are /dev/null, it runs in a session of its own (no
    controlling terminal to open as /dev/tty), and when the VMM's stderr
    is a terminal its log lines come through a pipe that a thread here
    copies to that terminal.  When stderr is not a terminal (a pipe, a
    file) the device shares it as before.
    """

    def __init__(self) -> None:
        self._r, self.child_fd = os.pipe2(os.O_CLOEXEC)

    @classmethod
    def for_child(cls, stderr: int = 2) -> StderrRelay | None:
        return cls() if os.isatty(stderr) else None

    def started(self, name: str) -> None:
        """The child has its copy: close ours and start copying."""
        os.close(self.child_fd)
        threading.Thread(target=self._copy, name=f"stderr-{name}", daemon=True).start()

    def abandon(self) -> None:
        """The child did not start: close both ends."""
        for fd in (self._r, self.child_fd):
            try:
                os.close(fd)
            except OSError:
                pass

    def _copy(self) -> None:
        try:
            while data := os.read(self._r, 4096):
                os.write(2, data)
        except OSError as e:
            log.debug("device stderr relay: %s", e)
        finally:
            os.close(self._r)
