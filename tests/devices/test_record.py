"""devices.record: a @record class behaves as dataclass(frozen=True) does."""

from __future__ import annotations

import copy
import dataclasses
import pickle
from typing import ClassVar

import pytest

from devices.record import record


@record
class Rec:
    """A record."""

    KIND: ClassVar[str] = "rec"
    a: int
    b: str = "x"
    c: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "b", self.b.upper())


@dataclasses.dataclass(frozen=True)
class Dat:
    """The same as a dataclass."""

    KIND: ClassVar[str] = "rec"
    a: int
    b: str = "x"
    c: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "b", self.b.upper())


@pytest.mark.parametrize("args, kw", [((1,), {}), ((1, "y"), {}), ((), {"a": 2, "c": {1: 2}}), ((3, "z", {}), {})])
def test_built_compared_and_shown_as_a_frozen_dataclass(args, kw):
    r, d = Rec(*args, **kw), Dat(*args, **kw)
    assert repr(r) == repr(d).replace("Dat(", "Rec(")
    assert dataclasses.astuple(r) == dataclasses.astuple(d) and dataclasses.asdict(r) == dataclasses.asdict(d)
    assert r == Rec(*args, **kw) and not r != Rec(*args, **kw) and r != d
    assert [f.name for f in dataclasses.fields(r)] == [f.name for f in dataclasses.fields(d)] == ["a", "b", "c"]
    assert dataclasses.is_dataclass(r) and Rec.__match_args__ == Dat.__match_args__
    assert dataclasses.replace(r, a=9) == Rec(9, r.b, r.c) and dataclasses.replace(r, a=9).b == r.b.upper()
    assert pickle.loads(pickle.dumps(r)) == r and copy.deepcopy(r) == r and copy.copy(r) == r
    assert Rec(1).c is not Rec(1).c      # a factory's value per instance


def test_hash_and_frozen():
    assert hash(Rec(1, c=None)) == hash(Rec(1, c=None)) == hash((1, "X", None)) == hash(Dat(1, c=None))
    with pytest.raises(TypeError):
        hash(Rec(1))         # a dict field: unhashable, as a dataclass's
    r = Rec(1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.a = 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        del r.a
    assert r.a == 1 and Rec.KIND == "rec"


@pytest.mark.parametrize("make, words", [
    (lambda: Rec(), "missing required argument: 'a'"),                  # type: ignore[call-arg]
    (lambda: Rec(1, "y", {}, 4), "takes 4 positional arguments but 5"),  # type: ignore[call-arg]
    (lambda: Rec(1, a=1), "multiple values for argument 'a'"),           # type: ignore[misc]
    (lambda: Rec(1, z=1), "unexpected keyword argument 'z'"),            # type: ignore[call-arg]
])
def test_bad_arguments_are_type_errors(make, words):
    with pytest.raises(TypeError, match=words):
        make()


def test_what_a_record_does_not_take():
    with pytest.raises(TypeError, match="writes __repr__ itself"):
        @record
        class OwnRepr:
            """Writes its own repr."""

            a: int

            def __repr__(self) -> str:
                return "mine"
    with pytest.raises(TypeError, match="take only a default"):
        @record
        class Hidden:
            """A field left out of the repr."""

            a: int = dataclasses.field(default=0, repr=False)
    with pytest.raises(TypeError, match="no InitVar"):
        @record
        class WithInitVar:
            """An InitVar."""

            a: dataclasses.InitVar[int]
