"""The VMM's console: where the serial device's bytes go and come from
(``vmm run --serial stdio|file:PATH|none``).

The VMM owns the terminal; the serial device -- in its own process by
default, and untrusted -- gets two descriptors and nothing else of it
(:class:`ipc.protocol.SetConsole`): an output (a duplicate of the VMM's
stdout, or the file) and an input (a pipe this module feeds).

``stdio`` (the default): output to stdout.  When stdin is a terminal (and
the VMM is in its foreground process group) it is put in raw mode for the
run -- every key, Ctrl-C included, goes to the guest, as in QEMU's
``-serial stdio``; output processing (OPOST) is left as it was -- and the
escape key Ctrl-A is interpreted: ``Ctrl-A x`` quits (exit status 12,
:mod:`vmm.outcome`), ``Ctrl-A Ctrl-A`` sends one Ctrl-A, ``Ctrl-A h``
prints the keys; any other key after Ctrl-A is dropped with it.  The
terminal's attributes are restored on every way out (:meth:`Console.close`
runs in ``vmm run``'s ``finally``, after a normal end, a guest crash, a
signal or an exception; an ``atexit`` hook backs it up).  When stdin is
not a terminal (a pipe or a file) its bytes go to the guest as they are,
with no escape key, until its end.

``file:PATH``: output to PATH (created or truncated), no input.
``none``: no console, and no serial device unless ``--device serial`` asks
for one (whose output is then dropped).
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import os
import select
import termios
import threading
from collections.abc import Callable

from devices.base import ConsoleFds
from vmm.endpoint import VmmError

log = logging.getLogger(__name__)

#: The escape key (Ctrl-A, as in QEMU) and what may follow it.
ESCAPE = 0x01
QUIT_KEY = ord("x")
HELP_KEY = ord("h")
HELP_TEXT = ("\r\nC-a h    print this help\r\nC-a x    quit the VMM (exit status 12)\r\n"
             "C-a C-a  send C-a to the guest\r\n")


class ConsoleError(VmmError):
    """The console cannot be set up (e.g. the output file cannot be opened)."""


@dataclasses.dataclass(frozen=True)
class SerialMode:
    """A parsed ``--serial`` value."""

    kind: str            # "stdio", "file" or "none"
    path: str = ""

    def __str__(self) -> str:
        return f"file:{self.path}" if self.kind == "file" else self.kind


def parse_serial(text: str) -> SerialMode:
    """``stdio``, ``none`` or ``file:PATH``; ValueError names what is wrong."""
    if text in ("stdio", "none"):
        return SerialMode(text)
    if text.startswith("file:"):
        path = text[len("file:"):]
        if not path:
            raise ValueError("file: needs a path (file:PATH)")
        return SerialMode("file", path)
    raise ValueError(f"{text!r} (expected stdio, none or file:PATH)")


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


class Console:
    """The console of one run: descriptors for the serial device and the
    thread that feeds its input.  :meth:`open`, then :meth:`start` just
    before the guest runs, then :meth:`close` (always)."""

    def __init__(self, mode: SerialMode, stdin: int = 0, stdout: int = 1):
        self.mode = mode
        self._stdin = stdin
        self._stdout = stdout
        self.output = -1         # what the device writes to
        self.input = -1          # what the device reads from (read end)
        self._feed = -1          # the write end of the input pipe
        self._wake_r = self._wake_w = -1
        self._saved_attrs: list | None = None
        self._thread: threading.Thread | None = None
        self._on_quit: Callable[[], None] | None = None
        self._closed = False

    @classmethod
    def open(cls, mode: SerialMode, stdin: int = 0, stdout: int = 1) -> Console:
        """Open the output and the input pipe (raises ConsoleError)."""
        self = cls(mode, stdin, stdout)
        try:
            if mode.kind == "file":
                try:
                    self.output = os.open(mode.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
                except OSError as e:
                    raise ConsoleError(f"--serial {mode}: {e.strerror}") from None
            else:
                try:
                    self.output = _write_only(stdout)
                except OSError as e:
                    raise ConsoleError(f"--serial stdio: stdout: {e.strerror} (try --serial none)") from None
            self.input, self._feed = os.pipe2(os.O_CLOEXEC)
            if mode.kind == "file":
                os.close(self._feed)     # no input: the device sees its end at once
                self._feed = -1
        except BaseException:
            self.close()
            raise
        return self

    def fds(self) -> ConsoleFds:
        """The descriptors the serial device uses (the VMM keeps them)."""
        return ConsoleFds(self.output, self.input)

    @property
    def raw(self) -> bool:
        """Whether the terminal is in raw mode now."""
        return self._saved_attrs is not None

    def start(self, on_quit: Callable[[], None]) -> None:
        """Begin forwarding input (raw mode if stdin is a terminal)."""
        if self._feed < 0:
            return
        self._on_quit = on_quit
        tty = self._is_foreground_tty()
        if not tty and os.isatty(self._stdin):
            log.info("console: not in the terminal's foreground; no input")
            self._close_feed()
            return
        if tty:
            self._saved_attrs = termios.tcgetattr(self._stdin)
            atexit.register(self._restore)
            termios.tcsetattr(self._stdin, termios.TCSADRAIN, _raw_keep_output(self._saved_attrs))
            os.set_blocking(self._feed, False)
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._thread = threading.Thread(target=self._forward, args=(tty,), name="console-input", daemon=True)
        self._thread.start()

    def _is_foreground_tty(self) -> bool:
        try:
            return os.isatty(self._stdin) and os.tcgetpgrp(self._stdin) == os.getpgrp()
        except OSError:
            return False

    def _forward(self, tty: bool) -> None:
        """The input thread: stdin → (escape filter) → the device's pipe."""
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
                        elif b == HELP_KEY:
                            os.write(2, HELP_TEXT.encode())
                    elif b == ESCAPE:
                        escaped = True
                    else:
                        out.append(b)
                data = bytes(out)
            if not self._send(data, tty):
                break
        # End of input: the device sees the end of its pipe.
        self._close_feed()

    def _send(self, data: bytes, tty: bool) -> bool:
        """Write to the device's pipe; False once it is gone.  Typed input
        that finds the pipe full is dropped (like characters typed faster
        than the guest reads); piped input waits."""
        while data:
            try:
                n = os.write(self._feed, data)
            except BlockingIOError:
                log.debug("console: the guest does not read its input; %d byte(s) dropped", len(data))
                return True
            except OSError:
                return False
            data = data[n:]
        return True

    def _quit(self) -> None:
        log.info("console: quit (Ctrl-A x)")
        if self._on_quit is not None:
            self._on_quit()

    def _close_feed(self) -> None:
        feed, self._feed = self._feed, -1
        if feed >= 0:
            try:
                os.close(feed)
            except OSError:
                pass

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

    def close(self) -> None:
        """Restore the terminal, stop the input thread, close every
        descriptor (idempotent)."""
        self._restore()
        if self._closed:
            return
        self._closed = True
        if self._thread is not None:
            try:
                os.write(self._wake_w, b"x")
            except OSError:
                pass
            self._thread.join(1.0)
            if self._thread.is_alive():     # blocked writing piped input
                log.debug("console: input thread still busy; left behind")
                return
        for fd in (self.output, self.input, self._wake_r, self._wake_w):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._close_feed()
        self.output = self.input = self._wake_r = self._wake_w = -1


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
