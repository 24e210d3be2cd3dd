"""A misbehaving device process for tests: ``fake_device.py MODE --fd N``.

Modes: ``junk-instead`` (bytes instead of a welcome), ``junk-after`` (a
correct handshake, then bytes that are not a frame), ``bad-msgpack``,
``unknown-type``, ``extra-fds`` (a ready message carrying descriptors),
``silent`` (never answers), ``error`` (refuses with an Error message),
``zone-thief`` (asks for coalesced-MMIO zones over addresses it does not
own, then says Ready only if every request was refused, else Error).
After misbehaving it waits for the VMM to hang up.
"""

import os
import socket
import struct
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from ipc.protocol import CoalescedMmioRequest, Error, IrqRefused, Ready, Role, Start, negotiate  # noqa: E402
from ipc.transport import Channel  # noqa: E402


#: zone-thief: (address, length) of the zones it asks for.
ZONE_THEFTS = ((0xD000_0000, 0x1000), (0xD000_0800, 0x10), (0xD0F0_0000, 0x1000))


def raw_frame(body: bytes) -> bytes:
    return struct.pack("<I", len(body)) + body


def main() -> None:
    mode, fd = sys.argv[1], int(sys.argv[sys.argv.index("--fd") + 1])
    sock = socket.socket(fileno=fd)
    chan = Channel(sock, Role.DEVICE)
    hello = chan.receive(10)
    if mode == "junk-instead":
        sock.send(b"\xff\xff\x00\x00this is not a frame")
    elif mode == "silent":
        pass
    elif mode == "error":
        chan.send(negotiate(hello))
        chan.send(Error("fake device refuses"))
    else:
        chan.send(negotiate(hello))
        while not isinstance(chan.receive(10), Start):
            pass
        for fd in chan.conn.take_unclaimed_fds():
            os.close(fd)
        if mode == "zone-thief":
            granted = []
            for seq, (address, length) in enumerate(ZONE_THEFTS, 1):
                chan.send(CoalescedMmioRequest(seq, address, length))
                answer = chan.receive(10)
                if not isinstance(answer, IrqRefused):
                    granted.append(f"{address:#x}: {answer}")
            if granted:
                chan.send(Error(f"granted: {granted}"))
        chan.send(Ready(os.getpid()))
        if mode == "junk-after":
            sock.send(b"\x05\x00\x00\x00junk!")
        elif mode == "bad-msgpack":
            sock.send(raw_frame(b"\xc1\xc1"))
        elif mode == "unknown-type":
            sock.send(raw_frame(b"\x81\xa4type\xa4nope"))
        elif mode == "extra-fds":
            r, w = os.pipe()
            socket.send_fds(sock, [raw_frame(b"\x82\xa4type\xa5error\xa7message\xa1x")], [r, w])
    # Stay until the VMM hangs up or kills us.
    try:
        sock.settimeout(30)
        while sock.recv(65536):
            pass
    except OSError:
        pass


if __name__ == "__main__":
    main()
