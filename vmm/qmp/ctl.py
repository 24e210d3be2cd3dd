"""``vmm ctl PATH COMMAND [key=value...]``: one command on a VM's control
socket, the answer printed as JSON (``--table``: aligned tables for
people).

Arguments are typed from the command table (:mod:`vmm.qmp.commands`):
``integer`` takes decimal or 0x-hex, ``boolean`` on/off, true/false,
yes/no, 1/0, ``number`` a float; an argument the table does not know is
sent as a string (the VM answers for it).  Exit status: 0 the command
succeeded, 1 the VM answered with a QMP error (printed on stderr as
``CLASS: desc``), 2 bad arguments, 3 no VM at PATH (no socket, nobody
serving it, or the connection broke).
"""

from __future__ import annotations

import json
import socket
from typing import Any, Sequence

from vmm.qmp.commands import COMMANDS, Table

STATUS_OK = 0
STATUS_QMP_ERROR = 1
STATUS_USAGE = 2
STATUS_NO_VM = 3

_TRUE = {"on", "true", "yes", "1"}
_FALSE = {"off", "false", "no", "0"}


class CtlError(Exception):
    """A failure of ``vmm ctl`` itself, with the exit status it gives."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


class QmpErrorReply(Exception):
    def __init__(self, error: dict[str, Any]):
        super().__init__(f"{error.get('class')}: {error.get('desc')}")
        self.error = error


def parse_arguments(command: str, pairs: Sequence[str]) -> dict[str, Any]:
    """``key=value`` words -> the command's arguments (typed by the table)."""
    known = {a.name: a for a in COMMANDS[command].args} if command in COMMANDS else {}
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise CtlError(f"argument {pair!r}: expected key=value", STATUS_USAGE)
        arg = known.get(key)
        kind = arg.type if arg is not None else "string"
        free = command in COMMANDS and COMMANDS[command].free
        try:
            if free:        # fault-arm: JSON values (3, 0.5, [0, 7]), else the text
                try:
                    value: Any = json.loads(text)
                except ValueError:
                    value = text
            elif kind == "integer":
                value = int(text, 0)
            elif kind == "number":
                value = float(text)
            elif kind == "boolean":
                if text.lower() not in _TRUE | _FALSE:
                    raise ValueError
                value = text.lower() in _TRUE
            else:
                value = text
        except ValueError:
            raise CtlError(f"argument {key}={text!r}: not a valid {kind}", STATUS_USAGE) from None
        out[key] = value
    return out


class Connection:
    """A blocking QMP client, just enough for one command (the socket
    sends one JSON text per line)."""

    def __init__(self, path: str, timeout: float):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except FileNotFoundError:
            self.sock.close()
            raise CtlError(f"no control socket at {path} (is the VM running with --api {path}?)",
                           STATUS_NO_VM) from None
        except ConnectionRefusedError:
            self.sock.close()
            raise CtlError(f"nobody serves {path} (the VM has ended?)", STATUS_NO_VM) from None
        except OSError as e:
            self.sock.close()
            raise CtlError(f"{path}: {e.strerror or e}", STATUS_NO_VM) from None
        self._file = self.sock.makefile("rb")
        self._next_id = 0

    def close(self) -> None:
        self._file.close()
        self.sock.close()

    def receive(self) -> dict[str, Any]:
        try:
            line = self._file.readline()
        except OSError as e:
            raise CtlError(f"{self.path}: {e}", STATUS_NO_VM) from None
        if not line:
            raise CtlError(f"{self.path}: the VM closed the connection", STATUS_NO_VM)
        try:
            message = json.loads(line)
        except ValueError:
            raise CtlError(f"{self.path}: not QMP: {line[:80]!r}", STATUS_NO_VM) from None
        if not isinstance(message, dict):
            raise CtlError(f"{self.path}: not QMP: {line[:80]!r}", STATUS_NO_VM)
        return message

    def handshake(self) -> dict[str, Any]:
        greeting = self.receive()
        if "QMP" not in greeting:
            error = greeting.get("error")
            if isinstance(error, dict):
                raise CtlError(f"{self.path}: {error.get('desc')}", STATUS_NO_VM)
            raise CtlError(f"{self.path}: no QMP greeting", STATUS_NO_VM)
        self.execute("qmp_capabilities")
        return greeting

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """Send one command; its ``return`` value (events are skipped).
        Raises :class:`QmpErrorReply`."""
        self._next_id += 1
        ident = f"ctl-{self._next_id}"
        request: dict[str, Any] = {"execute": command, "id": ident}
        if arguments:
            request["arguments"] = arguments
        try:
            self.sock.sendall(json.dumps(request).encode() + b"\n")
        except OSError as e:
            raise CtlError(f"{self.path}: {e}", STATUS_NO_VM) from None
        while True:
            reply = self.receive()
            if "event" in reply or reply.get("id") != ident:
                continue
            if "error" in reply:
                raise QmpErrorReply(reply["error"])
            return reply.get("return")


def format_tables(tables: list[Table]) -> str:
    """Aligned columns, one blank line between tables."""
    blocks = []
    for headers, rows in tables:
        cells = [[str(h) for h in headers]] + [["-" if c is None else str(c) for c in row] for row in rows]
        widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def ctl(path: str, command: str, pairs: Sequence[str], table: bool = False, timeout: float = 10.0
        ) -> tuple[int, str, str]:
    """Run one command; (exit status, stdout text, stderr text)."""
    try:
        arguments = parse_arguments(command, pairs)
        conn = Connection(path, timeout)
        try:
            conn.handshake()
            result = conn.execute(command, arguments)
        finally:
            conn.close()
    except CtlError as e:
        return e.status, "", f"vmm ctl: {e}"
    except QmpErrorReply as e:
        return STATUS_QMP_ERROR, "", f"vmm ctl: {e}"
    except TimeoutError:
        return STATUS_NO_VM, "", f"vmm ctl: {path}: no answer within {timeout:g} s"
    spec = COMMANDS.get(command)
    if table and spec is not None and spec.table is not None:
        try:
            return STATUS_OK, format_tables(spec.table(result)), ""
        except (KeyError, TypeError, ValueError):
            pass    # another VM's reply shape: print it as JSON
    return STATUS_OK, json.dumps(result, indent=2), ""
