"""The device process's store before each answer (devserver.persist.StateKeeper)
for a model that packs its own snapshot: the serving loop's fast path
(StateKeeper.fast, as devserver.runtime runs it) and keeper.answered store
the same thing, and a packed store that fails falls back or fails the access
as the dict store does."""

from __future__ import annotations

import pytest

from devices.base import NoSnapshot, Space
from devices.echo import Echo
from devserver.host import RemoteHost
from devserver.persist import StateKeeper
from ipc import Registry
from ipc.state import AccessRecord, StateSegment

PORT = 0x1000
SCRATCH = 0x10


@pytest.fixture
def kept():
    registry = Registry.create_sealed()
    segment = StateSegment.create(capacity=4096)
    model = Echo(RemoteHost(registry, 3), pio=hex(PORT))
    keeper = StateKeeper(segment)
    keeper.bring_up(model)
    yield keeper, model, segment
    model.stop()
    segment.close()
    registry.close()


def serve_store(keeper: StateKeeper, model, aseq: int, value: int) -> None:
    """What DeviceServer._serve does before an answer."""
    fast = keeper.fast
    if fast is not None and model is fast[0] and aseq:
        try:
            if fast[2](fast[1](), aseq, value):
                keeper.stores += 1
        except Exception as e:
            keeper.fast_failed(model, aseq, value, e)
    else:
        keeper.answered(model, aseq, value)


@pytest.mark.parametrize("path", ["serve_loop", "answered"])
def test_packed_store_before_each_answer(kept, path):
    keeper, model, segment = kept
    assert keeper.fast is not None and keeper.fast[0] is model
    store = serve_store if path == "serve_loop" else StateKeeper.answered
    before = keeper.stores
    for aseq in range(1, 4):
        value = model.read(Space.PIO, 0, SCRATCH, 4)
        store(keeper, model, aseq, value)
        snap = segment.read()
        assert snap is not None and snap.state == model.snapshot()
        assert snap.access == AccessRecord(aseq, value, 0)
    assert keeper.stores == before + 3
    store(keeper, model, 9, 0)              # nothing changed: nothing stored, the record stays
    assert keeper.stores == before + 3 and segment.read().access == AccessRecord(3, value, 0)


def test_a_model_without_a_packed_snapshot_after_all_is_stored_as_a_dict(kept):
    keeper, model, segment = kept

    def no_packed() -> bytes:
        raise NoSnapshot("not today")

    keeper.fast = (model, no_packed, keeper.fast[2])
    model.read(Space.PIO, 0, SCRATCH, 4)
    serve_store(keeper, model, 5, 7)
    assert keeper.fast is None                          # from now on the dict store
    snap = segment.read()
    assert snap.state == model.snapshot() and snap.access == AccessRecord(5, 7, 0)


def test_a_packed_snapshot_too_large_fails_the_access(kept):
    keeper, model, segment = kept
    number = segment.read().number
    keeper.fast = (model, lambda: bytes(8192), keeper.fast[2])
    with pytest.raises(RuntimeError, match="cannot store the snapshot"):
        serve_store(keeper, model, 5, 7)
    assert segment.read().number == number              # nothing written
