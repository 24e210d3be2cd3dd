"""The device process's store before each answer (devserver.persist.StateKeeper.answered,
which the serving loop calls) for a model that packs its own snapshot
(StateKeeper.fast): what it stores, and a packed store that fails falls back
or fails the access as the dict store does."""

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


def test_packed_store_before_each_answer(kept):
    keeper, model, segment = kept
    assert keeper.fast is not None and keeper.fast[0] is model
    before = keeper.stores
    for aseq in range(1, 4):
        value = model.read(Space.PIO, 0, SCRATCH, 4)
        keeper.answered(model, aseq, value)
        snap = segment.read()
        assert snap is not None and snap.state == model.snapshot()
        assert snap.access == AccessRecord(aseq, value, 0)
    assert keeper.stores == before + 3
    keeper.answered(model, 9, 0)            # nothing changed: nothing stored, the record stays
    assert keeper.stores == before + 3 and segment.read().access == AccessRecord(3, value, 0)


def test_a_model_without_a_packed_snapshot_after_all_is_stored_as_a_dict(kept):
    keeper, model, segment = kept

    def no_packed() -> bytes:
        raise NoSnapshot("not today")

    keeper.fast = (model, no_packed, keeper.fast[2])
    model.read(Space.PIO, 0, SCRATCH, 4)
    keeper.answered(model, 5, 7)
    assert keeper.fast is None                          # from now on the dict store
    snap = segment.read()
    assert snap.state == model.snapshot() and snap.access == AccessRecord(5, 7, 0)


def test_a_packed_snapshot_too_large_fails_the_access(kept):
    keeper, model, segment = kept
    number = segment.read().number
    keeper.fast = (model, lambda: bytes(8192), keeper.fast[2])
    with pytest.raises(RuntimeError, match="cannot store the snapshot"):
        keeper.answered(model, 5, 7)
    assert segment.read().number == number              # nothing written
