"""strato.Dict end to end, with the real control plane: Modal's methods and their
``.aio`` twins, any picklable key and value, large values through the blob store, paged
iteration, ephemeral Dicts, and bad input refused with a clear error and no change."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time

import pytest
from conftest import dedicated_server, wait_until

import strato
from strato import exceptions as exc
from strato.client import session
from strato.protocol import messages as m


def _name(request) -> str:
    return "t-" + request.node.name.replace("[", "-").replace("]", "")[:50]


@pytest.fixture
def d(server, request):
    name = _name(request)
    yield strato.Dict.from_name(name, create_if_missing=True)
    try:
        strato.Dict.delete(name)
    except exc.NotFoundError:
        pass


def test_mapping_methods(d):
    d["a"] = 1
    d[("tuple", 2)] = {"nested": [1, 2]}
    assert d["a"] == 1 and d[("tuple", 2)] == {"nested": [1, 2]}
    assert d.get("missing") is None and d.get("missing", 7) == 7
    with pytest.raises(KeyError):
        d["missing"]
    assert "a" in d and "missing" not in d and d.contains("a")
    assert d.put("a", 2, skip_if_exists=True) is False and d["a"] == 1
    assert d.put("b", 3, skip_if_exists=True) is True
    d.update({"c": 4}, e=5)
    assert d.len() == 5
    assert d.pop("c") == 4 and d.pop("c", None) is None
    with pytest.raises(KeyError):
        d.pop("c")
    del d["e"]
    assert sorted(map(repr, d.keys())) == sorted(map(repr, ["a", ("tuple", 2), "b"]))
    assert dict(d.items())["b"] == 3 and sorted(v for v in d.values() if isinstance(v, int)) == [
        1,
        3,
    ]
    d.clear()
    assert d.len() == 0 and list(d.keys()) == []


def test_iteration_pages_through_many_entries(d):
    d.update({i: str(i) for i in range(2600)})
    assert list(d.keys()) == list(range(2600))  # insertion order, across three pages
    assert sum(1 for _ in d.items()) == 2600


def test_large_values_go_through_the_blob_store(d):
    big = b"\x01" * (3 << 20)  # over the 1 MiB blob threshold
    d["big"] = big
    assert d["big"] == big
    assert list(d.values()) == [big]
    ref = session.api().call(
        "POST", f"/dicts/{d.object_id}/get", m.DictKey(d._key("big")), m.DictValue
    )
    assert ref.value is None and ref.blob  # the row holds the blob's key, not the bytes


def test_from_name_shares_one_dict_and_delete_removes_it(server, request):
    name = _name(request)
    a = strato.Dict.from_name(name, create_if_missing=True)
    a["k"] = "v"
    assert strato.Dict.from_name(name)["k"] == "v"
    assert strato.Dict.lookup(name).object_id == a.object_id
    from strato.dict import Dict  # Modal's module path

    assert Dict is strato.Dict
    Dict.delete(name)
    with pytest.raises(exc.NotFoundError, match="create_if_missing=True"):
        strato.Dict.from_name(name).get("k")


def test_ephemeral_dict_is_deleted_at_exit(server):
    with strato.Dict.ephemeral({"seed": 1}) as d:
        assert d["seed"] == 1 and d.name is None
        d["x"] = 2
        object_id = d.object_id
        session.api().call("POST", f"/dicts/{object_id}/heartbeat")  # what keeps it
    with pytest.raises(exc.NotFoundError):
        d.get("x")
    names = session.api().call("GET", "/dicts", None, m.StateList).objects
    assert object_id not in [o.object_id for o in names]


def test_aio_twins(d):
    async def body():
        await d.put.aio("k", [1, 2])
        assert await d.get.aio("k") == [1, 2]
        assert await d.contains.aio("k") and await d.len.aio() == 1
        await d.update.aio(j=3)
        assert sorted([k async for k in d.keys.aio()]) == ["j", "k"]
        assert await d.pop.aio("j") == 3
        await d.clear.aio()
        assert await d.len.aio() == 0
        async with strato.Dict.ephemeral() as e:
            await e.put.aio(1, 1)
            assert await e.get.aio(1) == 1
        await strato.Dict.delete.aio(d.name)

    asyncio.run(body())


def test_bad_input_is_refused_and_changes_nothing(d, server):
    d["a"] = 1
    with pytest.raises(exc.SerializationError, match="cannot be pickled"):
        d["lock"] = threading.Lock()
    with pytest.raises(exc.SerializationError):
        d.update({"ok": 1, "bad": threading.Lock()})
    with pytest.raises(exc.SerializationError, match="Dict key"):
        d.put(threading.Lock(), 1)
    with pytest.raises(exc.RequestSizeError, match="keys"):
        d["k" * 70_000] = 1
    assert d.len() == 1
    for bad in ("", "has space", "slash/name", "x" * 65, "ünïcode"):
        with pytest.raises(exc.InvalidError, match="invalid Dict name"):
            strato.Dict.from_name(bad)
    with pytest.raises(exc.InvalidError, match="invalid Dict name"):  # checked by the server
        session.api().call("POST", "/dicts/lookup", m.StateLookup("a b", True), m.StateRef)
    with pytest.raises(exc.NotFoundError, match="no Dict named"):
        strato.Dict.from_name("never-made").len()
    with pytest.raises(exc.NotFoundError):
        strato.Dict.delete("never-made")


def test_cli(d):
    from click.testing import CliRunner

    from strato.cli.main import main as cli

    d.update({"a": 1, "b": [2]})
    run = CliRunner().invoke
    out = run(cli, ["dict", "list"])
    assert out.exit_code == 0 and d.name in out.output
    assert run(cli, ["dict", "get", d.name, "b"]).output.strip() == "[2]"
    assert "no key 'zz'" in run(cli, ["dict", "get", d.name, "zz"]).output
    assert run(cli, ["dict", "items", d.name]).output.splitlines() == ["'a': 1", "'b': [2]"]
    assert run(cli, ["dict", "clear", d.name, "--yes"]).exit_code == 0 and d.len() == 0
    assert "invalid Dict name" in run(cli, ["dict", "delete", "bad name", "--yes"]).output
    assert run(cli, ["dict", "delete", d.name, "--yes"]).exit_code == 0
    with pytest.raises(exc.NotFoundError):
        d.len()


@pytest.mark.slow
def test_entries_expire_after_the_ttl_without_access():
    # STRATO_DICT_TTL=2: the behaviour under test is time itself
    with dedicated_server({"STRATO_DICT_TTL": "2"}) as srv:
        d = strato.Dict.from_name("ttl", create_if_missing=True)
        d.update(old=1, kept=2)
        deadline = time.monotonic() + 1.9
        while time.monotonic() < deadline:  # reading "kept" keeps it
            assert d["kept"] == 2
            time.sleep(0.1)
        time.sleep(0.5)
        assert "old" not in d and d["kept"] == 2 and d.len() == 1

        def rows() -> int:
            with sqlite3.connect(srv.home / "state.db") as db:
                return db.execute("SELECT count(*) FROM dict_entries").fetchone()[0]

        wait_until(lambda: rows() == 0, 30, "the expiry loop to delete the entries")
        assert d.len() == 0


def test_update_sends_large_batches_in_several_requests(d):
    values = {i: bytes([i]) * 900_000 for i in range(12)}  # each under the blob threshold
    d.update(values)
    assert d.len() == 12 and d[11] == values[11]
    assert sum(len(v) for v in d.values()) == 12 * 900_000  # pages of at most 8 MiB
