"""Calling functions end to end: .remote, .local, .map, .starmap, .for_each, .spawn,
.remote_gen, .aio variants, async functions, kwargs, large payloads, shipped helpers."""

from __future__ import annotations

import asyncio
import hashlib
import os
import pickle

import cloudpickle
import pytest
from apps import basic

import strato
from strato import exceptions as exc
from strato.client import session
from strato.protocol import messages as m

pytestmark = pytest.mark.usefixtures("running_basic")
MIB = 1 << 20


@pytest.fixture(scope="module")
def running_basic(strato_server):
    strato_server.activate()
    with basic.app.run(quiet=True):
        yield basic.app


def test_remote_returns_the_result():
    assert basic.square.remote(7) == 49
    assert basic.square.remote(-3) == 9


def test_remote_runs_in_a_container():
    info = basic.where_am_i.remote()
    assert info["in_container"] == "1"
    assert info["container_id"].startswith("ct-")
    assert info["container_id"] != os.environ.get("STRATO_CONTAINER_ID")
    # the app module was shipped: the container imports a copy, not this checkout's file
    assert info["module_file"] != os.path.abspath(basic.__file__)
    assert info["module_file"].endswith(os.path.join("apps", "basic.py"))


def test_local_runs_here():
    assert basic.square.local(5) == 25
    assert basic.add.local(1, b=2, scale=3) == 9
    assert basic.where_am_i.local()["container_id"] == os.environ.get("STRATO_CONTAINER_ID")


def test_calling_the_function_directly_is_refused():
    with pytest.raises(exc.InvalidError, match=r"\.remote"):
        basic.square(3)


def test_kwargs_and_defaults():
    assert basic.add.remote(1) == 11
    assert basic.add.remote(1, 2) == 3
    assert basic.add.remote(1, b=5, scale=2) == 12
    assert basic.add.remote(a=4, scale=3) == 42


def test_map_keeps_order():
    xs = list(range(200))
    assert list(basic.square.map(xs)) == [x * x for x in xs]


def test_map_of_nothing():
    assert list(basic.square.map([])) == []


def test_map_zips_iterables():
    assert list(basic.add.map([1, 2, 3], [10, 20, 30])) == [11, 22, 33]


def test_map_unordered_returns_every_result():
    # later inputs finish first, so arrival order differs from input order
    delays = [0.6, 0.3, 0.0, 0.0]
    out = list(basic.slow_identity.map(range(4), delays, order_outputs=False))
    assert sorted(out) == [0, 1, 2, 3]


def test_map_raises_the_first_failure():
    with pytest.raises(ValueError, match="multiple of three: 0"):
        list(basic.maybe_fail.map(range(10)))


def test_map_return_exceptions():
    out = list(basic.maybe_fail.map(range(7), return_exceptions=True))
    assert [type(o) for o in out] == [ValueError, int, int, ValueError, int, int, ValueError]
    assert [o for o in out if isinstance(o, int)] == [1, 2, 4, 5]
    assert "multiple of three: 3" in str(out[3])


def test_map_unordered_return_exceptions():
    out = list(basic.maybe_fail.map(range(9), order_outputs=False, return_exceptions=True))
    assert len(out) == 9
    assert sorted(o for o in out if isinstance(o, int)) == [1, 2, 4, 5, 7, 8]
    assert sorted(str(o) for o in out if isinstance(o, ValueError)) == [
        f"multiple of three: {x}" for x in (0, 3, 6)
    ]


def test_map_of_a_generator_input():
    assert list(basic.square.map(x for x in range(5))) == [0, 1, 4, 9, 16]


def test_starmap():
    assert list(basic.add.starmap([(1, 2), (3, 4), (5,)])) == [3, 7, 15]


def test_for_each(tmp_path):
    path = tmp_path / "seen.txt"
    assert basic.record.for_each([str(path)] * 5, ["a", "b", "c", "d", "e"]) is None
    assert sorted(path.read_text().split()) == ["a", "b", "c", "d", "e"]


def test_for_each_ignore_exceptions():
    with pytest.raises(ValueError):
        basic.maybe_fail.for_each(range(4))
    assert basic.maybe_fail.for_each(range(4), ignore_exceptions=True) is None


def test_spawn_and_get():
    call = basic.square.spawn(12)
    assert isinstance(call, strato.FunctionCall)
    assert call.object_id.startswith("fc-")
    assert call.get(timeout=60) == 144
    assert call.get(timeout=5) == 144  # the output stays fetchable
    assert strato.FunctionCall.from_id(call.object_id).get(timeout=5) == 144


def test_get_times_out_while_running():
    call = basic.sleep_then.spawn(3.0, "late")
    with pytest.raises(exc.TimeoutError, match="no result after 0.2s"):
        call.get(timeout=0.2)
    assert call.get(timeout=60) == "late"


def test_from_id_of_an_unknown_call():
    with pytest.raises(exc.NotFoundError):
        strato.FunctionCall.from_id("fc-" + "0" * 32).get(timeout=1)


def test_gather():
    calls = [basic.square.spawn(i) for i in range(5)]
    assert strato.FunctionCall.gather(*calls) == [0, 1, 4, 9, 16]


def test_remote_gen_yields_in_order():
    assert list(basic.count_up.remote_gen(5)) == [0, 10, 20, 30, 40]
    assert list(basic.count_up.remote_gen(0)) == []


def test_remote_on_a_generator_is_refused():
    with pytest.raises(exc.InvalidError, match="remote_gen"):
        basic.count_up.remote(3)


def test_remote_gen_raises_after_its_items():
    got = []
    with pytest.raises(RuntimeError, match="stopped after 3 items"):
        for item in basic.fail_midway.remote_gen(3):
            got.append(item)
    assert got == [0, 1, 2]


def test_async_function():
    assert basic.async_double.remote(21) == 42
    assert list(basic.async_double.map([1, 2, 3])) == [2, 4, 6]


def test_async_generator():
    assert list(basic.async_count.remote_gen(4)) == [0, -1, -2, -3]


def test_aio_variants():
    async def main():
        results = {}
        results["remote"] = await basic.square.remote.aio(9)
        results["map"] = [r async for r in basic.square.map.aio(range(6))]
        results["starmap"] = [r async for r in basic.add.starmap.aio([(1, 1), (2, 2)])]
        results["gen"] = [r async for r in basic.count_up.remote_gen.aio(3)]
        call = await basic.square.spawn.aio(4)
        results["spawn"] = await call.get.aio(timeout=60)
        results["async_fn"] = await basic.async_double.remote.aio(5)
        # several calls in flight at once on one event loop
        results["gathered"] = await asyncio.gather(*(basic.square.remote.aio(i) for i in range(4)))
        return results

    results = asyncio.run(asyncio.wait_for(main(), 120))
    assert results == {
        "remote": 81,
        "map": [0, 1, 4, 9, 16, 25],
        "starmap": [2, 4],
        "gen": [0, 10, 20],
        "spawn": 16,
        "async_fn": 10,
        "gathered": [0, 1, 4, 9],
    }


def test_large_argument_goes_through_the_blob_store(server):
    data = os.urandom(3 * MIB)
    assert basic.nbytes.remote(data) == len(data)
    # the pickled arguments are stored as a content-addressed blob
    key = hashlib.sha256(cloudpickle.dumps(((data,), {}))).hexdigest()
    assert (server.home / "blobs" / key[:2] / key).stat().st_size > MIB


def test_large_result_goes_through_the_blob_store():
    n = 2 * MIB + 123
    expected = bytes(range(256)) * (n // 256) + bytes(n % 256)
    assert basic.make_bytes.remote(n) == expected
    call = basic.make_bytes.spawn(n)
    assert call.get(timeout=60) == expected
    raw = session.api().call(
        "GET", f"/calls/{call.object_id}/outputs", None, m.Outputs, params={"timeout": 5}
    )
    (item,) = raw.outputs
    assert item.status == "success"
    assert item.data is None and item.blob is not None
    assert pickle.loads(session.api().get_blob(item.blob)) == expected


def test_large_payloads_in_a_map():
    sizes = [MIB + 1, 10, 2 * MIB]
    assert list(basic.nbytes.map([b"x" * n for n in sizes])) == sizes


def test_local_helper_package_is_shipped():
    text = basic.helper_shout.remote("hello")
    assert text.startswith("HELLO! (from ")
    shipped_dir = text[len("HELLO! (from ") : -1]
    # imported from the shipped copy in the container, not from this checkout
    assert shipped_dir.endswith("stratotest_helpers")
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "stratotest_helpers")
    assert os.path.realpath(shipped_dir) != os.path.realpath(here)
