"""The start of a device's control connection, VMM side: Hello, the
configuration, Start, then Ready -- with one deadline for all of it.

Sans process: :func:`handshake` needs a connected :class:`Channel`, a way to
send on it and a way to say how the device ended; it does not care whether
the device is a child of this VMM or was reached over a listening socket.
Interrupt requests the model makes from its ``start()`` are answered
in the middle (``serve``).  Anything the device gets wrong raises
:class:`StartError` with the reason for the error line.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence

import posix_ipc

from devices.record import record
from ipc import Registry
from ipc.protocol import (IRQ_REQUESTS, ConnectionClosed, DeviceConfig, Error, Hello, MemRegion, Message,
                          Ready, RemoteProtocolError, SetConsole, SetMemTable, SetRegistry, SetSlots,
                          Start, Welcome)
from ipc.transport import Channel, ChannelTimeout

__all__ = ["Offer", "Agreement", "StartError", "handshake", "registry_fd"]


class StartError(Exception):
    """Why a device did not come up (becomes DeviceFailed)."""


@record
class Offer:
    """What the VMM hands the device during the handshake (the descriptors
    stay the caller's)."""

    config: DeviceConfig
    #: A read-write descriptor on the registry segment (:func:`registry_fd`).
    registry_fd: int
    slots: SetSlots
    #: Guest RAM (None: none).
    memfd: int | None = None
    mem_regions: Sequence[MemRegion] = ()
    console: SetConsole | None = None


@record
class Agreement:
    """What the device said about itself."""

    features: frozenset[str]
    #: The pid the device reported in Ready (as the VMM sees it).
    pid: int
    #: The sandbox layers that are on in the device (Ready.sandbox).
    sandbox: tuple[str, ...] = ()


def handshake(channel: Channel, send: Callable[[Message], None], offer: Offer, deadline: float,
              serve: Callable[[Message], None], exit_text: Callable[[float], str],
              on_welcome: Callable[[frozenset[str]], None] | None = None,
              extra: Callable[[frozenset[str]], Sequence[Message]] | None = None) -> Agreement:
    """Run the VMM side of the handshake up to Ready.

    ``send``: sends one message (under the caller's channel lock);
    ``serve``: answers one interrupt request; ``exit_text``: how the device
    ended, for the error when it hangs up; ``on_welcome``: told the agreed
    features as soon as they are known (before the model's requests are
    served); ``extra``: more configuration messages, given the agreed
    features (the state segment).  Raises :class:`StartError`."""

    def put(msg: Message) -> None:
        try:
            send(msg)
        except OSError as e:
            # A device that refuses (its Error) hangs up: the reason may be
            # waiting behind the broken pipe.
            refused = _pending_error(channel)
            if refused is not None:
                raise StartError(f"refused: {refused.message}") from None
            raise StartError(f"control socket: {e} ({exit_text(0.5)})") from None

    def get() -> Message:
        try:
            msg = channel.receive(max(0.0, deadline - time.monotonic()))
        except RemoteProtocolError as e:
            raise StartError(f"broke the control protocol: {e}") from None
        except ChannelTimeout:
            raise StartError("no answer before the start deadline") from None
        except OSError as e:
            raise StartError(f"control socket: {e}") from None
        if isinstance(msg, ConnectionClosed):
            raise StartError(f"closed its control socket ({exit_text(0.5)})")
        if isinstance(msg, Error):
            raise StartError(f"refused: {msg.message}")
        return msg

    put(Hello())
    welcome = get()
    assert isinstance(welcome, Welcome)  # the protocol table allows nothing else
    if on_welcome is not None:
        on_welcome(welcome.features)
    put(offer.config)
    put(SetRegistry(fd=offer.registry_fd))
    put(offer.slots)
    if offer.memfd is not None:
        if "mem-table" not in welcome.features:
            raise StartError("does not take guest memory (no mem-table feature)")
        put(SetMemTable(fd=offer.memfd, regions=tuple(offer.mem_regions)))
    if offer.console is not None:
        put(offer.console)
    for msg in extra(welcome.features) if extra is not None else ():
        put(msg)
    put(Start())
    ready = get()
    while isinstance(ready, IRQ_REQUESTS):      # the model's start() asks
        serve(ready)
        ready = get()
    assert isinstance(ready, Ready)
    return Agreement(features=welcome.features, pid=ready.pid, sandbox=ready.sandbox)


def _pending_error(channel: Channel) -> Error | None:
    """An Error already received on ``channel`` (unread), if any."""
    try:
        while True:
            msg = channel.receive(0)
            if isinstance(msg, Error):
                return msg
            if isinstance(msg, ConnectionClosed):
                return None
    except Exception:   # nothing (more) there, or garbage: no reason to report
        return None


def registry_fd(registry: Registry) -> int:
    """A new read-write descriptor on the registry's segment: a duplicate of
    a sealed registry's memfd, or the named segment opened again."""
    if registry.fd is not None:
        return os.dup(registry.fd)
    if registry.name is None:
        raise ValueError("the registry must be sealed (Registry.create_sealed) or named to be shared")
    shm = posix_ipc.SharedMemory(registry.name)
    return shm.fd
