"""The call graph against a real store (SQLite and PostgreSQL): calls made from inside
containers record their parent input and caller app, cancelling a call (or stopping an
app) cancels the calls its inputs made, recursively, and a call's graph is read back with
Modal's statuses, bounded in depth and size."""

from __future__ import annotations

import asyncio
import pickle
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import msgspec
import pytest
from manager_helpers import RecordingContainer, attach, make_manager, registry

from strato import exceptions as exc
from strato.protocol import messages as m
from strato.sdk.call_graph import InputInfo, InputStatus, from_wire
from strato.server.api import routes_graph
from strato.server.api.router import Principal, Router
from strato.server.calls import graph
from strato.server.calls.manager import CallManager
from strato.server.store import CallRow, InputRow, Store
from strato.server.store.journal import Journal

SPEC = m.FunctionSpec(name="f", module="mod_f", qualname="f")
SPEC_G = m.FunctionSpec(name="g", module="mod_g", qualname="g")


@pytest.fixture
def db(db_url, tmp_path):
    """(url, journal path): SQLite's journal is the default one beside its file."""
    sqlite = db_url.startswith("sqlite")
    return db_url, tmp_path / ("state.db.intake" if sqlite else "pg.intake")


def _open(url: str, journal: Path) -> Store:
    return Store(url) if url.startswith("sqlite") else Store(url, journal=journal)


@pytest.fixture
def store(db):
    s = _open(*db)
    yield s
    s.close()


@pytest.fixture
def mgr(store, tmp_path):
    """A manager with ``fu-1`` (``f``, app ``ap-1``) and ``fu-2`` (``g``, app ``ap-2``)."""
    killed: list[str] = []
    manager = make_manager(store, tmp_path / "blobs", SPEC, killed)
    store.create_app(
        "ap-2", "other", "deployed", [("fu-2", "g", msgspec.msgpack.encode(SPEC_G))], None, False
    )
    manager.killed = killed  # type: ignore[attr-defined]
    return manager


def _args(x) -> bytes:
    return pickle.dumps(((x,), {}))


async def _call(
    mgr: CallManager,
    call_id: str,
    function_id: str,
    xs: list,
    parent: int | None = None,
    caller: str | None = None,
) -> None:
    req = m.CreateCall(call_id, function_id, [m.InputItem(i, _args(x)) for i, x in enumerate(xs)])
    await mgr.create_call(req, parent_input_id=parent, caller_app_id=caller)


def _container(mgr: CallManager, cid: str, function_id: str) -> RecordingContainer:
    c = RecordingContainer(cid, function_id)
    registry(mgr).add(c)
    mgr.on_ready(function_id)
    return c


def _out(inp: m.TaskInput, status: str = "success", value=None) -> m.TaskOutput:
    return m.TaskOutput(inp.input_id, inp.attempt, status, pickle.dumps(value), duration=0.1)


def _cancelled_ids(c: RecordingContainer) -> list[int]:
    return [i for msg in c.sent if isinstance(msg, m.CancelInputs) for i in msg.input_ids]


async def _statuses(mgr: CallManager, call_id: str) -> list[str]:
    out = await mgr.wait_outputs(call_id, 0, 0.0, 100)
    return [o.status for o in out.outputs]


# ---------------------------------------------------------------------- the store


def test_a_call_records_its_parent_input_and_caller_app(store):
    call = CallRow(
        "fc-2", "fu-2", "remote", None, 1, True, False, 1.0, time.time() + 600, 7, "ap-1"
    )
    assert store.accept_call(call, [InputRow(8, "fc-2", 0, b"a", None)]).wait()
    assert store.call_row("fc-2") == call
    plain = CallRow("fc-1", "fu-1", "remote", None, 0, True, False, 1.0, time.time() + 600)
    assert store.accept_call(plain, []).wait()
    got = store.call_row("fc-1")
    assert got is not None and (got.parent_input_id, got.caller_app_id) == (None, None)


def test_the_journal_carries_the_parent_across_a_crash(db, tmp_path):
    url, journal = db
    crash = """
    import os, sys, threading, time
    from pathlib import Path
    from strato.server.store import CallRow, InputRow, Store
    url, journal = sys.argv[1], Path(sys.argv[2])
    store = Store(url) if url.startswith("sqlite") else Store(url, journal=journal)
    store._write("hold", lambda _c: threading.Event().wait())  # the database gets nothing
    call = CallRow("fc-2", "fu-2", "spawn", None, 1, True, False, 1.0, 4e9, 41, "ap-1")
    w = store.accept_call(call, [InputRow(42, "fc-2", 0, b"a", None)])
    assert not w.done()
    print("accepted", flush=True)
    os._exit(0)
    """
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(crash), url, str(journal)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.stdout.strip() == "accepted", out.stderr
    (entry,) = Journal.read(journal)  # the journal's record names the parent
    assert entry[2][0]["parent_input_id"] == 41 and entry[2][0]["caller_app_id"] == "ap-1"
    s = _open(url, journal)
    try:
        row = s.call_row("fc-2")
        assert row is not None and (row.parent_input_id, row.caller_app_id) == (41, "ap-1")
    finally:
        s.close()


def _tree(store: Store) -> None:
    """fc-1 (inputs 1, 2) -> fc-2 made by input 1 (inputs 3, 4) -> fc-3 made by input 4
    (input 5, cancelled already) -> fc-4 made by input 5 (input 6)."""
    now = time.time()

    def call(cid, fid, first, n, parent, cancelled=False):
        row = CallRow(cid, fid, "map", None, n, True, cancelled, now, now + 600, parent, None)
        ins = [InputRow(first + k, cid, k, b"x", None) for k in range(n)]
        assert store.accept_call(row, ins).wait()

    call("fc-1", "fu-1", 1, 2, None)
    call("fc-2", "fu-2", 3, 2, 1)
    call("fc-3", "fu-1", 5, 1, 4, cancelled=True)
    call("fc-4", "fu-2", 6, 1, 5)
    call("fc-9", "fu-2", 7, 1, None)  # not in the tree


def test_descendants_are_walked_through_cancelled_calls(store):
    store.create_app("ap-1", "a", "ephemeral", [("fu-1", "f", b"")], None, False)
    _tree(store)
    assert store.descendant_calls(["fc-1"], [], 100) == (["fc-2", "fc-4"], False)
    assert store.descendant_calls([], [4], 100) == (["fc-4"], False)  # fc-3 is cancelled
    assert store.descendant_calls([], [2], 100) == ([], False)
    assert store.descendant_calls(["fc-1"], [], 1) == (["fc-2"], True)  # stopped at the limit


def test_call_graph_rows_are_bounded_in_depth_and_size(store):
    store.create_app(
        "ap-1", "a", "ephemeral", [("fu-1", "f", msgspec.msgpack.encode(SPEC))], None, False
    )
    store.create_app(
        "ap-2", "b", "deployed", [("fu-2", "g", msgspec.msgpack.encode(SPEC_G))], None, False
    )
    _tree(store)
    rows = store.call_graph("fc-1", 10, 100)
    assert rows is not None and not rows.truncated
    assert [c.call_id for c in rows.calls] == ["fc-1", "fc-2", "fc-3", "fc-4"]
    assert [i.input_id for i in rows.inputs] == [1, 2, 3, 4, 5, 6]
    assert sorted(f.function_id for f in rows.functions) == ["fu-1", "fu-2"]
    shallow = store.call_graph("fc-1", 2, 100)
    assert shallow is not None and shallow.truncated
    assert [c.call_id for c in shallow.calls] == ["fc-1", "fc-2"]
    small = store.call_graph("fc-1", 10, 3)
    assert small is not None and small.truncated and len(small.inputs) == 3
    assert store.call_graph("fc-nope", 10, 100) is None
    assert store.call_owner("fc-2") is not None and store.call_owner("fc-2")[:2] == ("ap-2", None)
    assert store.call_owner("fc-nope") is None


# ---------------------------------------------------------------------- the call manager


def test_cancelling_a_call_cancels_the_calls_its_inputs_made_recursively(mgr, store):
    async def go():
        await _call(mgr, "fc-1", "fu-1", [1])
        c1 = attach(mgr, "ct-1")
        (root,) = c1.inputs()
        await _call(mgr, "fc-2", "fu-2", [2], parent=root.input_id, caller="ap-1")
        c2 = _container(mgr, "ct-2", "fu-2")
        (child,) = c2.inputs()
        # the child makes a grandchild (fu-1: its one container is busy, so it waits in
        # the queue), then returns
        await _call(mgr, "fc-3", "fu-1", [3], parent=child.input_id, caller="ap-2")
        mgr.on_outputs(c2, [_out(child, value=20)])
        # ... and a second child of the root, running
        await _call(mgr, "fc-4", "fu-2", [4], parent=root.input_id, caller="ap-1")
        (second,) = [i for i in c2.inputs() if i.call_id == "fc-4"]  # c2 runs it
        await _call(mgr, "fc-9", "fu-2", [9])  # made by no input: not part of the tree
        n = await mgr.cancel_call("fc-1", terminate_containers=False)
        assert n == 3  # fc-2 (ended, but it made fc-3), fc-3, fc-4
        assert await _statuses(mgr, "fc-1") == ["cancelled"]
        assert await _statuses(mgr, "fc-2") == ["success"]  # it had ended already
        assert await _statuses(mgr, "fc-3") == ["cancelled"]
        assert await _statuses(mgr, "fc-4") == ["cancelled"]
        assert second.input_id in _cancelled_ids(c2)
        assert root.input_id in _cancelled_ids(c1)
        for cid in ("fc-1", "fc-2", "fc-3", "fc-4"):
            row = await store.aread(store.call_row, cid)
            assert row is not None and row.cancelled, cid
        row9 = await store.aread(store.call_row, "fc-9")
        assert row9 is not None and not row9.cancelled
        assert mgr.ledger.live.get("fc-9")  # still waiting to run
        assert mgr.killed == []  # type: ignore[attr-defined]
        with pytest.raises(exc.InvalidError):  # a cancelled child takes no more inputs
            mgr.add_inputs("fc-3", m.AddInputs([m.InputItem(1, _args(1))]))

    asyncio.run(go())


def test_cancelling_with_terminate_containers_kills_the_childrens_containers(mgr):
    async def go():
        await _call(mgr, "fc-1", "fu-1", [1])
        c1 = attach(mgr, "ct-1")
        (root,) = c1.inputs()
        await _call(mgr, "fc-2", "fu-2", [2], parent=root.input_id, caller="ap-1")
        c2 = _container(mgr, "ct-2", "fu-2")
        assert c2.inputs()
        await mgr.cancel_call("fc-1", terminate_containers=True)
        assert sorted(mgr.killed) == ["ct-1", "ct-2"]  # type: ignore[attr-defined]
        assert await _statuses(mgr, "fc-2") == ["cancelled"]

    asyncio.run(go())


def test_stopping_an_app_cancels_the_calls_its_inputs_made_in_other_apps(mgr):
    async def go():
        await _call(mgr, "fc-1", "fu-1", [1])
        c1 = attach(mgr, "ct-1")
        (root,) = c1.inputs()
        await _call(mgr, "fc-2", "fu-2", [2], parent=root.input_id, caller="ap-1")
        await _call(mgr, "fc-9", "fu-2", [9])
        mgr.stop_app("ap-1")
        await mgr.tree.settled()
        assert await _statuses(mgr, "fc-2") == ["cancelled"]
        assert "fc-9" in mgr.ledger.live

    asyncio.run(go())


def test_withdrawn_inputs_cancel_the_calls_they_made(mgr):
    # inputs of a call the database did not take as new are withdrawn: what they made
    # while they ran is cancelled
    async def go():
        await _call(mgr, "fc-1", "fu-1", [1])
        c1 = attach(mgr, "ct-1")
        (root,) = c1.inputs()
        await _call(mgr, "fc-2", "fu-2", [2], parent=root.input_id, caller="ap-1")
        mgr.failures.withdraw(list(mgr.ledger.live["fc-1"].values()))
        await mgr.tree.settled()
        assert await _statuses(mgr, "fc-2") == ["cancelled"]
        assert root.input_id in _cancelled_ids(c1)

    asyncio.run(go())


def test_a_cancel_walk_without_children_reads_the_store_off_the_loop(mgr, store, monkeypatch):
    async def go():
        await _call(mgr, "fc-1", "fu-1", [1])
        reads: list[str] = []
        real = store._read

        def spy(run):  # a read on the event loop's thread would block it
            reads.append("read")
            return real(run)

        monkeypatch.setattr(store, "_read", spy)
        walk = mgr.cancel_call("fc-1", False)
        on_loop = list(reads)
        assert await walk == 0
        assert on_loop == []  # the call was known in memory; the walk ran on the writer

    asyncio.run(go())


def test_cancelling_an_unknown_call_is_not_found(mgr):
    async def go():
        with pytest.raises(exc.NotFoundError):
            mgr.cancel_call("fc-nope", False)

    asyncio.run(go())


def test_call_owner_is_answered_from_memory_and_else_from_the_store(mgr, store, monkeypatch):
    async def go():
        await _call(mgr, "fc-1", "fu-1", [1])
        await _call(mgr, "fc-2", "fu-2", [2], parent=1, caller="ap-1")
        real = store.aread

        async def no_reads(*a, **kw):
            raise AssertionError("read the store")

        monkeypatch.setattr(store, "aread", no_reads)
        assert await mgr.call_owner("fc-1") == ("ap-1", None)
        assert await mgr.call_owner("fc-2") == ("ap-2", "ap-1")
        monkeypatch.setattr(store, "aread", real)
        mgr.tree.owners.drop("fc-2")  # as for a call another process made
        assert await mgr.call_owner("fc-2") == ("ap-2", "ap-1")
        assert await mgr.call_owner("fc-nope") is None

    asyncio.run(go())


def test_a_retried_nested_call_keeps_its_parent(mgr, store):
    async def go():
        await _call(mgr, "fc-2", "fu-2", [1, 2], parent=5, caller="ap-1")
        await _call(mgr, "fc-2", "fu-2", [1, 2], parent=5, caller="ap-1")  # a retry
        await mgr.intake.settled()
        row = await store.aread(store.call_row, "fc-2")
        assert row is not None and (row.n_inputs, row.parent_input_id) == (2, 5)

    asyncio.run(go())


def test_the_graph_shows_each_inputs_children_with_modal_statuses(mgr):
    async def go():
        await _call(mgr, "fc-1", "fu-1", [1, 2])
        c1 = attach(mgr, "ct-1")  # runs one input of fc-1 at a time
        (root,) = c1.inputs()
        await _call(mgr, "fc-2", "fu-2", [10, 11], parent=root.input_id, caller="ap-1")
        c2 = _container(mgr, "ct-2", "fu-2")
        first = c2.inputs()[0]
        mgr.on_outputs(c2, [_out(first, value=1)])
        second = c2.inputs()[1]
        mgr.on_outputs(c2, [_out(second, "failure", ValueError("no"))])
        registry(mgr).remove(c2)  # fu-2 has no container now: its inputs wait
        await _call(mgr, "fc-3", "fu-2", [12], parent=root.input_id, caller="ap-1")
        mgr.fail_queued("fu-2", "no node can run it", count_attempt=False)
        await _call(mgr, "fc-4", "fu-2", [13], parent=root.input_id, caller="ap-1")
        mgr.fail_queued("fu-2", "its @enter raised", count_attempt=False, init_failure=True)
        await _call(mgr, "fc-5", "fu-2", [14], parent=first.input_id, caller="ap-2")
        await mgr.cancel_call("fc-5", False)

        g = await mgr.call_graph("fc-1")
        assert not g.truncated
        infos = from_wire(g)
        assert [(i.function_call_id, i.status, i.task_id) for i in infos] == [
            ("fc-1", InputStatus.PENDING, "ct-1"),  # running
            ("fc-1", InputStatus.PENDING, ""),  # waiting
        ]
        top = infos[0]
        assert (top.function_name, top.module_name, top.input_id) == (
            "f",
            "mod_f",
            str(root.input_id),
        )
        assert [
            (c.function_call_id, c.status, c.task_id, c.function_name, c.module_name)
            for c in top.children
        ] == [
            ("fc-2", InputStatus.SUCCESS, "ct-2", "g", "mod_g"),
            ("fc-2", InputStatus.FAILURE, "ct-2", "g", "mod_g"),
            ("fc-3", InputStatus.FAILURE, "", "g", "mod_g"),
            ("fc-4", InputStatus.INIT_FAILURE, "", "g", "mod_g"),
        ]
        grand = top.children[0].children
        assert [(c.function_call_id, c.status) for c in grand] == [("fc-5", InputStatus.TERMINATED)]
        assert infos[1].children == [] and grand[0].children == []
        assert all(isinstance(i, InputInfo) for i in infos)
        with pytest.raises(exc.NotFoundError):
            await mgr.call_graph("fc-nope")

    asyncio.run(go())


def test_the_graph_says_when_it_was_cut(mgr, monkeypatch):
    monkeypatch.setattr(graph, "MAX_GRAPH_DEPTH", 2)

    async def go():
        await _call(mgr, "fc-1", "fu-1", [1])
        await _call(mgr, "fc-2", "fu-2", [2], parent=1, caller="ap-1")
        await _call(mgr, "fc-3", "fu-2", [3], parent=2, caller="ap-2")
        g = await mgr.call_graph("fc-1")
        assert g.truncated
        assert [c.function_call_id for c in g.inputs[0].children] == ["fc-2"]
        assert g.inputs[0].children[0].children == []
        monkeypatch.setattr(graph, "MAX_GRAPH_INPUTS", 1)
        monkeypatch.setattr(graph, "MAX_GRAPH_DEPTH", 10)
        g = await mgr.call_graph("fc-1")
        assert g.truncated and g.inputs[0].children == []

    asyncio.run(go())


# ---------------------------------------------------------------------- the route


class _Cp:
    def __init__(self, calls: CallManager) -> None:
        self.calls = calls
        self.workspaces = SimpleNamespace(app_ws={})  # every app in the default workspace


def test_a_container_sees_the_graphs_of_its_own_apps_calls_only(mgr):
    async def go():
        api = Router("t", "0", "token", 1 << 20)
        routes_graph.register(api, _Cp(mgr))  # type: ignore[arg-type]
        await _call(mgr, "fc-1", "fu-1", [1])
        await _call(mgr, "fc-2", "fu-2", [2], parent=1, caller="ap-1")
        await _call(mgr, "fc-3", "fu-2", [3])

        async def get(app_id: str, call_id: str):
            who = Principal("ct-x", app_id, "fu-x", None)
            return await api.dispatch_for(who, "GET", f"/calls/{call_id}/graph", {}, b"")

        for app_id, call_id, status in [
            ("ap-1", "fc-1", 200),  # its function's call
            ("ap-1", "fc-2", 200),  # a call it made
            ("ap-2", "fc-2", 200),  # a call of its function
            ("ap-1", "fc-3", 404),  # another app's call it did not make
            ("ap-3", "fc-1", 404),
            ("ap-1", "fc-nope", 404),
        ]:
            r = await get(app_id, call_id)
            assert r.status == status, (app_id, call_id, r.body)
        r = await get("ap-1", "fc-1")
        g = msgspec.msgpack.decode(r.body, type=m.CallGraph)
        assert [c.function_call_id for c in g.inputs[0].children] == ["fc-2"]

    asyncio.run(go())


def test_recent_keeps_the_newest_entries():
    from strato.server.calls.state import Recent

    r: Recent[int, str] = Recent(10)
    for i in range(100):
        r.put(i, str(i))
    assert all(r.get(i) == str(i) for i in range(95, 100))  # at least the newest half
    assert r.get(0) is None and 0 not in r
    assert sum(1 for i in range(100) if i in r) <= 10
    r.put(99, "again")
    assert r.pop(99) == "again" and r.get(99) is None
