"""Helpers of the snapshot tests: a host over a real registry whose regions
outlive the model (as the VMM keeps a restarting device's), recording
interrupts; the plain-data check; and hostile variants of a snapshot."""

from __future__ import annotations

import copy
from collections.abc import Iterator

import msgpack

from devices.base import ConsoleFds, Space
from devices.guestmem import GuestRam
from ipc import Registry
from vmm.local import LocalHost

PLAIN = (dict, list, str, int, bytes, bool, type(None), float)


class Vector:
    """An MSI vector that records its routes and triggers."""

    def __init__(self, log: list, n: int):
        self.log, self.n = log, n

    def program(self, address: int, data: int) -> None:
        self.log.append(("program", self.n, address, data))

    def unprogram(self) -> None:
        self.log.append(("unprogram", self.n))

    def trigger(self) -> None:
        self.log.append(("msi", self.n))


class Line:
    def __init__(self, log: list, gsi: int):
        self.log, self.gsi = log, gsi

    def trigger(self) -> None:
        self.log.append(("intx", self.gsi))


class KeptHost(LocalHost):
    """One device process's host: the registry (shared by every "process"
    of the device, like the VMM's) under ``owner``; interrupts go to
    :attr:`log`."""

    def __init__(self, registry: Registry, owner: int = 5, memory: GuestRam | None = None,
                 console: ConsoleFds | None = None):
        super().__init__(registry, owner, console=console, memory=memory)
        self.log: list = []

    def irq_line(self, gsi: int) -> Line:  # type: ignore[override]
        return Line(self.log, gsi)

    def msi_vector(self, index: int) -> Vector:  # type: ignore[override]
        return Vector(self.log, index)

    def process_id(self) -> int:
        return 4242

    def regions(self) -> set[tuple[Space, int, int, int]]:
        return {(Space(int(r.bus)), r.start, r.length, r.cookie) for r in self.registry.regions()
                if r.owner == self.owner and not r.removing}


def plain(value: object, where: str = "state") -> None:
    """Assert ``value`` is made of plain types only (devices.base)."""
    assert type(value) in PLAIN, f"{where}: {type(value).__name__}"
    if type(value) is dict:
        for k, v in value.items():
            assert type(k) is str, f"{where}: key {k!r}"
            plain(v, f"{where}.{k}")
    elif type(value) is list:
        for i, v in enumerate(value):
            plain(v, f"{where}[{i}]")


def wire(state: dict) -> dict:
    """The snapshot as it comes back from a segment (msgpack)."""
    out = msgpack.unpackb(msgpack.packb(state, use_bin_type=True), raw=False)
    assert out == state
    return out


def paths(value: object, path: tuple = ()) -> Iterator[tuple]:
    """Every key / index path inside ``value`` (dicts and lists)."""
    if type(value) is dict:
        for k, v in value.items():
            yield path + (k,)
            yield from paths(v, path + (k,))
    elif type(value) is list:
        for i, v in enumerate(value):
            yield path + (i,)
            yield from paths(v, path + (i,))


def _at(state: object, path: tuple) -> object:
    for p in path:
        state = state[p]  # type: ignore[index]
    return state


def hostile(state: dict) -> Iterator[tuple[str, dict]]:
    """Variants of ``state`` no model may accept: each key missing, an
    unknown key in each dict, each value of another type, negative, too
    large for 64 bits, or huge."""
    for path in paths(state):
        parent_path, key = path[:-1], path[-1]
        value = _at(state, path)
        parent = _at(state, parent_path)
        if type(parent) is dict:
            s = copy.deepcopy(state)
            del _at(s, parent_path)[key]  # type: ignore[attr-defined]
            yield f"{path} missing", s
        replacements: list[object] = [1.5, "x" * 8, {"a": 1}, [None] * 100_000, b"\0" * 2_000_000]
        if type(value) is int:
            replacements += [-1, 1 << 64, True]
        elif type(value) is bool:
            replacements += [int(value), None]
        elif value is None:
            replacements = [1.5, "x" * 8, [None] * 100_000, True, -1, 1 << 64]
        elif type(value) is str:
            replacements = [1.5, None, b"x", "x" * 100_000]
        for r in replacements:
            if type(r) is type(value) is str and len(r) < 100_000:   # a reason text may be any text
                continue
            s = copy.deepcopy(state)
            _at(s, parent_path)[key] = r  # type: ignore[index]
            yield f"{path} = {type(r).__name__} {str(r)[:20]}", s
    for path in [()] + [p for p in paths(state) if type(_at(state, p)) is dict]:
        s = copy.deepcopy(state)
        _at(s, path)["surplus"] = 0  # type: ignore[index]
        yield f"{path} + unknown key", s
    yield "not a dict", [state]  # type: ignore[misc]
