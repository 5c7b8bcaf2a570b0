"""The store on SQLite and on PostgreSQL (the local server): same code, same behaviour."""

from __future__ import annotations

import time

import pytest

from strato.server.store import Store
from strato.server.store.migrations import LATEST, current_version


@pytest.fixture
def store(db_url):
    s = Store(db_url)
    yield s
    s.close()


def _call(store: Store, call_id: str, n: int, first_id: int, expires_at: float | None = None):
    store.create_call(
        {
            "call_id": call_id,
            "function_id": "fu-1",
            "kind": "map",
            "method": None,
            "n_inputs": n,
            "closed": True,
            "cancelled": False,
            "created_at": time.time(),
            "expires_at": expires_at or time.time() + 3600,
        },
        [
            {
                "input_id": first_id + i,
                "call_id": call_id,
                "idx": i,
                "args": b"a%d" % i,
                "args_blob": None,
                "status": "pending",
                "attempts": 0,
            }
            for i in range(n)
        ],
    )


def _finish(input_id: int, seq: int, value: bytes) -> dict:
    return {
        "b_id": input_id,
        "b_status": "success",
        "b_output": value,
        "b_blob": None,
        "b_error": None,
        "b_tb": None,
        "b_seq": seq,
        "b_at": time.time(),
    }


def test_schema_is_migrated_to_latest(store):
    assert current_version(store.conn) == LATEST


def test_inputs_are_pending_until_finished_once(store):
    store.create_app("ap-1", "demo", "ephemeral", [("fu-1", "f", b"spec")], None, False)
    _call(store, "fc-1", 3, 1)
    assert [r.idx for r in store.pending_inputs()] == [0, 1, 2]
    store.finish_inputs([_finish(2, 10, b"two")])
    store.finish_inputs([_finish(2, 11, b"again")])  # a second output is ignored
    outs = store.outputs_after("fc-1", 0, 100)
    assert [(o.idx, o.data, o.seq) for o in outs] == [(1, b"two", 10)]
    assert [r.idx for r in store.pending_inputs()] == [0, 2]
    assert store.count_done("fc-1") == 1
    assert store.max_ids()[:2] == (3, 10)


def test_outputs_are_read_by_sequence(store):
    store.create_app("ap-1", "demo", "ephemeral", [("fu-1", "f", b"spec")], None, False)
    _call(store, "fc-1", 4, 1)
    store.finish_inputs([_finish(4, 1, b"d"), _finish(1, 2, b"a")])
    store.finish_inputs([_finish(3, 3, b"c")])
    assert [o.idx for o in store.outputs_after("fc-1", 0, 2)] == [3, 0]
    assert [o.idx for o in store.outputs_after("fc-1", 2, 100)] == [2]
    assert store.existing_idx("fc-1", 1, 10) == {1, 2, 3}


def test_deploy_replaces_the_app_of_the_same_name(store):
    store.create_app("ap-1", "svc", "deployed", [("fu-1", "f", b"s1")], None, True)
    stopped = store.create_app("ap-2", "svc", "deployed", [("fu-2", "f", b"s2")], None, True)
    assert stopped == ["ap-1"]
    assert store.find_app("svc")["app_id"] == "ap-2"
    assert store.function("fu-1")["app_state"] == "stopped"


def test_expired_calls_are_deleted(store):
    store.create_app("ap-1", "demo", "ephemeral", [("fu-1", "f", b"spec")], None, False)
    _call(store, "fc-old", 2, 1, expires_at=time.time() - 1)
    _call(store, "fc-new", 2, 3)
    assert store.expire(time.time()) == 1
    assert store.call("fc-old") is None
    assert store.call("fc-new") is not None
    assert [r.call_id for r in store.pending_inputs()] == ["fc-new", "fc-new"]


def test_logs_are_kept_per_app_in_order(store):
    store.add_logs(
        [
            {
                "seq": i,
                "app_id": "ap-1" if i % 2 else "ap-2",
                "ts": time.time(),
                "container_id": "ct-1",
                "stream": "stdout",
                "text": f"line {i}",
            }
            for i in range(1, 7)
        ]
    )
    assert [r["text"] for r in store.logs_after("ap-1", 1)] == ["line 3", "line 5"]


def test_typed_rows_round_trip(store):
    from strato.server.store import CallRow, FinalRow, FunctionRow, GenItemRow, InputRow

    store.create_app("ap-1", "demo", "ephemeral", [("fu-1", "f", b"spec")], None, False)
    assert store.function_row("fu-1") == FunctionRow("fu-1", "ap-1", "f", b"spec", "ephemeral")
    assert store.function_row("fu-none") is None
    call = CallRow("fc-1", "fu-1", "map", None, 2, False, False, 1.0, time.time() + 60)
    inputs = [InputRow(1, "fc-1", 0, b"a", None), InputRow(2, "fc-1", 1, None, "b" * 64)]
    assert store.create_call_rows(call, inputs) is True
    assert store.create_call_rows(call, []) is False  # a retried request
    store.add_input_rows("fc-1", [InputRow(3, "fc-1", 2, b"c", None)], True, 3)
    assert store.call_row("fc-1") == CallRow(
        "fc-1", "fu-1", "map", None, 3, True, False, 1.0, call.expires_at
    )
    assert store.call_row("fc-none") is None
    assert [(p.input_id, p.args, p.args_blob) for p in store.pending_inputs()] == [
        (1, b"a", None),
        (2, None, "b" * 64),
        (3, b"c", None),
    ]
    store.finish_input_rows([FinalRow(2, "failure", None, None, "ValueError", "tb", 5, 2.0)])
    store.add_gen_item_rows([GenItemRow(4, "fc-1", 0, 0, b"g0", None)])
    outs = store.outputs_after("fc-1", 0, 10)
    assert [(o.idx, o.status, o.data, o.error, o.seq, o.gen_index) for o in outs] == [
        (0, "success", b"g0", None, 4, 0),
        (1, "failure", None, "ValueError", 5, None),
    ]


def test_error_type_is_kept_beside_the_error(store):
    from strato.server.store import FinalRow

    store.create_app("ap-1", "demo", "ephemeral", [("fu-1", "f", b"spec")], None, False)
    _call(store, "fc-1", 3, 1)
    store.finish_inputs([dict(_finish(1, 1, b""), b_error_type="ValueError", b_error="bad")])
    store.finish_inputs([_finish(2, 2, b"ok")])  # rows without the key still work
    store.finish_input_rows([FinalRow(3, "failure", None, None, "m", "tb", 3, 1.0, "KeyError")])
    outs = store.outputs_after("fc-1", 0, 10)
    assert [(o.idx, o.error, o.error_type) for o in outs] == [
        (0, "bad", "ValueError"),
        (1, None, None),
        (2, "m", "KeyError"),
    ]


def test_a_version_1_database_gains_error_type(store):
    from sqlalchemy import inspect, text

    url = store.url
    with store.conn.begin():
        store.conn.execute(text("ALTER TABLE inputs DROP COLUMN error_type"))
        store.conn.execute(text("UPDATE schema_version SET version = 1"))
    store.close()
    again = Store(url)
    try:
        with again.conn.begin():
            cols = {c["name"] for c in inspect(again.conn).get_columns("inputs")}
            assert current_version(again.conn) == LATEST == 7
        assert "error_type" in cols
    finally:
        again.close()
    # the fixture closes ``store`` again: closing twice is harmless


def test_a_version_3_database_gains_call_parents_and_state_tables(store):
    from sqlalchemy import inspect, text

    url = store.url
    with store.conn.begin():
        store.conn.execute(text("DROP INDEX ix_calls_parent_input_id"))
        store.conn.execute(text("ALTER TABLE calls DROP COLUMN parent_input_id"))
        store.conn.execute(text("ALTER TABLE calls DROP COLUMN caller_app_id"))
        store.conn.execute(text("UPDATE schema_version SET version = 3"))
    store.close()
    again = Store(url)
    try:
        with again.conn.begin():
            cols = {c["name"] for c in inspect(again.conn).get_columns("calls")}
            assert current_version(again.conn) == LATEST
        assert {"parent_input_id", "caller_app_id"} <= cols
    finally:
        again.close()
