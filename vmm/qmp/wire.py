"""QMP's wire protocol without I/O: a JSON stream framer and one client's
session (greeting, capabilities negotiation, requests, replies, events).

What goes over the socket is QEMU's (docs/interop/qmp-spec.rst):

* the server speaks first, ``{"QMP": {"version": {...}, "capabilities": []}}``;
* the session starts in capabilities-negotiation mode, where the only
  command is ``qmp_capabilities``; anything else is answered with a
  ``CommandNotFound`` error, and so is a second ``qmp_capabilities`` once
  in command mode (QEMU's texts, so clients that look at them still match);
* a request is a JSON object ``{"execute": NAME, "arguments": {...}, "id":
  ANY}``; the reply is ``{"return": VALUE}`` or ``{"error": {"class":
  CLASS, "desc": TEXT}}``, with the request's ``id`` echoed whenever the
  request was an object that had one;
* events, ``{"event": NAME, "data": {...}, "timestamp": {"seconds": S,
  "microseconds": US}}``, go only to sessions in command mode.

Requests are not line-based: QEMU's own client (``qemu.qmp``) sends a JSON
text with no newline after it, so :class:`JsonFramer` finds where each
top-level value ends by counting brackets outside strings, as QEMU's
json-streamer does.  Output is one JSON text per line ending in CR LF, as
QEMU's monitor writes it.  A text over ``max_message`` bytes or nested
deeper than ``max_nesting`` cannot be resynchronised from: the session
answers with an error and asks to be closed (:attr:`Session.closing`).
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any, Callable

from vmm.qmp.events import Event

log = logging.getLogger(__name__)

#: The largest JSON text a client may send (bytes).
MAX_MESSAGE = 1 << 20
#: The deepest nesting of objects and arrays in one request.
MAX_NESTING = 64

GENERIC_ERROR = "GenericError"
COMMAND_NOT_FOUND = "CommandNotFound"
DEVICE_NOT_FOUND = "DeviceNotFound"

_NOT_SPACE = re.compile(rb"[^ \t\r\n]")
_IN_STRING = re.compile(rb'["\\]')
_STRUCTURE = re.compile(rb'[\[\]{}"]')
_TOKEN_END = re.compile(rb'[ \t\r\n\[\]{}"]')


class QmpError(Exception):
    """A QMP error reply: ``class`` (QEMU's ErrorClass name) and ``desc``."""

    def __init__(self, error_class: str, desc: str):
        super().__init__(f"{error_class}: {desc}")
        self.error_class = error_class
        self.desc = desc

    def as_json(self) -> dict[str, str]:
        return {"class": self.error_class, "desc": self.desc}


class FramingError(Exception):
    """The byte stream cannot be split into JSON texts any more."""


class JsonFramer:
    """Splits a byte stream into top-level JSON texts (bytes, not parsed).

    Objects and arrays end at their matching bracket (strings and their
    escapes are skipped); a top-level string at its closing quote; any
    other top-level token (a number, ``true``, garbage) at the next
    whitespace or bracket.  Brackets are ASCII, so UTF-8 needs no care.
    """

    def __init__(self, max_message: int = MAX_MESSAGE, max_nesting: int = MAX_NESTING):
        self.max_message = max_message
        self.max_nesting = max_nesting
        self._buf = bytearray()
        self._start = 0          # start of the text being scanned (in _buf)
        self._pos = 0            # next byte to look at
        self._depth = 0
        self._in_string = False
        self._in_token = False   # a top-level token other than an object, array or string
        #: Why the stream cannot be framed any more (None while it can).
        self.error: FramingError | None = None

    def feed(self, data: bytes) -> list[bytes]:
        """Add ``data``; returns the texts it completed.  An oversized or
        too deeply nested text sets :attr:`error` (a :class:`FramingError`);
        from then on nothing more is taken."""
        out: list[bytes] = []
        if self.error is None:
            try:
                self._scan(data, out)
            except FramingError as e:
                self.error = e
                self._buf.clear()
        return out

    def _scan(self, data: bytes, out: list[bytes]) -> None:
        buf = self._buf
        buf += data
        pos, n = self._pos, len(buf)
        while pos < n:
            if self._in_string:
                m = _IN_STRING.search(buf, pos)
                if m is None:
                    pos = n
                    break
                j = m.start()
                if buf[j] == 0x5C:            # backslash: skip the escaped byte
                    if j + 1 >= n:
                        pos = j
                        break
                    pos = j + 2
                    continue
                self._in_string = False
                pos = j + 1
                if self._depth == 0:
                    out.append(self._take(pos))
                continue
            if self._in_token:
                m = _TOKEN_END.search(buf, pos)
                if m is None:
                    pos = n
                    break
                pos = m.start()
                self._in_token = False
                out.append(self._take(pos))
                continue
            if self._depth == 0:
                m = _NOT_SPACE.search(buf, pos)
                if m is None:                 # only whitespace: drop it
                    pos = self._start = n
                    break
                pos = self._start = m.start()
                c = buf[pos]
                pos += 1
                if c in b"{[":
                    self._depth = 1
                elif c == 0x22:
                    self._in_string = True
                elif c in b"}]":
                    out.append(self._take(pos))   # a stray bracket: a parse error for the caller
                else:
                    self._in_token = True
                continue
            m = _STRUCTURE.search(buf, pos)
            if m is None:
                pos = n
                break
            c = buf[m.start()]
            pos = m.start() + 1
            if c == 0x22:
                self._in_string = True
            elif c in b"{[":
                self._depth += 1
                if self._depth > self.max_nesting:
                    raise FramingError(f"JSON nesting deeper than {self.max_nesting}")
            else:
                self._depth -= 1
                if self._depth == 0:
                    out.append(self._take(pos))
        self._pos = pos
        if pos - self._start > self.max_message:
            raise FramingError(f"request longer than {self.max_message} bytes")
        if self._start:
            del buf[:self._start]
            self._pos -= self._start
            self._start = 0

    def _take(self, end: int) -> bytes:
        text = bytes(self._buf[self._start:end])
        self._start = end
        if len(text) > self.max_message:
            raise FramingError(f"request longer than {self.max_message} bytes")
        return text

    @property
    def pending(self) -> int:
        """Bytes of an incomplete text held."""
        return len(self._buf) - self._start


def encode(message: dict[str, Any]) -> bytes:
    """One JSON text as QEMU's monitor writes it: a line ending in CR LF."""
    return json.dumps(message).encode() + b"\r\n"


def _reject_constant(name: str) -> Any:
    raise ValueError(f"invalid literal {name!r}")


#: Runs one command: (name, arguments) -> the ``return`` value; raises QmpError.
Execute = Callable[[str, dict[str, Any]], Any]


class Session:
    """One client's protocol state.  Feed it bytes, send what it returns."""

    #: The only capability QEMU offers is "oob"; this server offers none.
    CAPABILITIES: tuple[str, ...] = ()

    def __init__(self, execute: Execute, version: dict[str, Any], max_message: int = MAX_MESSAGE):
        self._execute = execute
        self._version = version
        self._framer = JsonFramer(max_message)
        #: True once ``qmp_capabilities`` succeeded (command mode).
        self.negotiated = False
        #: True after a framing error: send what is queued, then close.
        self.closing = False

    def greeting(self) -> bytes:
        return encode({"QMP": {"version": self._version, "capabilities": list(self.CAPABILITIES)}})

    def receive_data(self, data: bytes) -> bytes:
        """Take bytes from the client; returns the replies to send."""
        if self.closing:
            return b""
        out = [encode(self.handle(text)) for text in self._framer.feed(data)]
        error = self._framer.error
        if error is not None:
            self.closing = True
            out.append(encode({"error": QmpError(GENERIC_ERROR, f"{error}; closing the connection").as_json()}))
        return b"".join(out)

    def event(self, event: Event) -> bytes:
        """The bytes of an event for this client (none before negotiation)."""
        return encode(event.as_json()) if self.negotiated else b""

    def handle(self, text: bytes) -> dict[str, Any]:
        """The reply to one complete JSON text."""
        try:
            request = json.loads(text, parse_constant=_reject_constant)
        except (ValueError, UnicodeDecodeError) as e:
            return {"error": QmpError(GENERIC_ERROR, f"JSON parse error, {e}").as_json()}
        if not isinstance(request, dict):
            return {"error": QmpError(GENERIC_ERROR, "QMP input must be a JSON object").as_json()}
        reply: dict[str, Any]
        try:
            reply = {"return": self._dispatch(request)}
        except QmpError as e:
            reply = {"error": e.as_json()}
        if "id" in request:
            reply["id"] = request["id"]
        return reply

    def _dispatch(self, request: dict[str, Any]) -> Any:
        for key, value in request.items():
            if key in ("execute", "exec-oob"):
                if not isinstance(value, str):
                    raise QmpError(GENERIC_ERROR, f"QMP input member '{key}' must be a string")
            elif key == "arguments":
                if not isinstance(value, dict):
                    raise QmpError(GENERIC_ERROR, "QMP input member 'arguments' must be an object")
            elif key not in ("id", "control"):
                raise QmpError(GENERIC_ERROR, f"QMP input member '{key}' is unexpected")
        if "exec-oob" in request:
            raise QmpError(GENERIC_ERROR, "QMP input member 'exec-oob' is unexpected "
                                          "(out-of-band execution was not negotiated)")
        if "execute" not in request:
            raise QmpError(GENERIC_ERROR, "QMP input lacks member 'execute'")
        name = request["execute"]
        arguments = request.get("arguments", {})
        if name == "qmp_capabilities":
            return self._capabilities(arguments)
        if not self.negotiated:
            raise QmpError(COMMAND_NOT_FOUND, "Expecting capabilities negotiation with 'qmp_capabilities'")
        try:
            result = self._execute(name, arguments)
            json.dumps(result)        # what cannot be sent is an error here, not a broken reply
        except QmpError:
            raise
        except Exception as e:
            log.exception("QMP command %s failed", name)
            raise QmpError(GENERIC_ERROR, f"{name}: {type(e).__name__}: {e}") from None
        return result

    def _capabilities(self, arguments: dict[str, Any]) -> dict[str, Any]:
        if self.negotiated:
            raise QmpError(COMMAND_NOT_FOUND, "Capabilities negotiation is already complete, command ignored")
        for key in arguments:
            if key != "enable":
                raise QmpError(GENERIC_ERROR, f"Parameter '{key}' is unexpected")
        enable = arguments.get("enable", [])
        if not isinstance(enable, list) or not all(isinstance(c, str) for c in enable):
            raise QmpError(GENERIC_ERROR, "Invalid parameter type for 'enable', expected: array of strings")
        for capability in enable:
            if capability not in self.CAPABILITIES:
                raise QmpError(GENERIC_ERROR, f"Capability '{capability}' not available")
        self.negotiated = True
        return {}
