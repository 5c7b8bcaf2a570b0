"""Dict keys and values (and Queue items) pickle with plain ``pickle`` when they are built
of atoms, tuples, lists and dicts: the same bytes as cloudpickle (a Dict key must pickle
the same whichever way it was made), anything else through cloudpickle."""

from __future__ import annotations

import pickle

import cloudpickle
import pytest

from strato.sdk.dict import KEY_PROTOCOL, _plain, dumps

PLAIN = [
    "k",
    1,
    -(2**70),
    1.5,
    b"x",
    None,
    True,
    ("a", ("b", 2)),
    {"user": 12345, "tags": ["a", "b", "c"], "score": 0.5},
    [1, "a", b"b", 2.5, {"x": None}],
    {1: "one", 2: [3]},
]


@pytest.mark.parametrize("value", PLAIN)
def test_plain_values_pickle_to_the_same_bytes_as_with_cloudpickle(value):
    assert _plain(value)
    for protocol in (KEY_PROTOCOL, None):
        assert dumps(value, "v", protocol) == cloudpickle.dumps(value, protocol=protocol)


class Local:
    def __init__(self) -> None:
        self.n = 3


def test_other_values_go_through_cloudpickle():
    for value in [Local(), {"a": Local()}, [1, [2, [3, [4, [5]]]]], list(range(65)), {1, 2}]:
        assert not _plain(value)
        assert dumps(value, "v") == cloudpickle.dumps(value)
    assert pickle.loads(dumps(lambda x: x + 1, "v"))(1) == 2
