"""The call manager's lease, retry, timeout and cancellation rules, against a real store
and a recording stand-in for a container's channel."""

from __future__ import annotations

import asyncio
import contextlib
import pickle
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from manager_helpers import RecordingContainer, attach, die, make_manager

from strato import exceptions as exc
from strato.protocol import messages as m
from strato.server.calls.manager import CallManager
from strato.server.containers import ContainerRegistry
from strato.server.store import Store
from strato.server.store.blobs import BlobStore
from strato.server.store.journal import Journal


@pytest.fixture
def env(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'state.db'}")
    killed: list[str] = []

    def make(retries: m.RetryPolicy = m.RetryPolicy(), timeout: float = 300.0):
        spec = m.FunctionSpec(
            name="f", module="mod", qualname="f", retries=retries, timeout=timeout
        )
        return make_manager(store, tmp_path / "blobs", spec, killed)

    yield make, store, killed
    store.close()


def _args(x) -> bytes:
    return pickle.dumps(((x,), {}))


async def _call(mgr: CallManager, call_id: str, xs: list) -> None:
    await mgr.create_call(
        m.CreateCall(call_id, "fu-1", [m.InputItem(i, _args(x)) for i, x in enumerate(xs)])
    )


def _attach(mgr: CallManager, cid: str = "ct-1") -> RecordingContainer:
    return attach(mgr, cid)


def _ok(inp: m.TaskInput, value) -> m.TaskOutput:
    return m.TaskOutput(inp.input_id, inp.attempt, "success", pickle.dumps(value), duration=0.1)


def test_inputs_are_stored_before_dispatch_and_outputs_recorded_once(env):
    make, store, _ = env

    async def go():
        mgr = make()
        await _call(mgr, "fc-1", [1, 2])
        assert len(store.pending_inputs()) == 2  # durable before any container exists
        c = _attach(mgr)
        first = c.inputs()[0]
        assert first.call_id == "fc-1"  # a container knows the call of its input
        mgr.on_outputs(c, [_ok(first, 10), _ok(first, 99)])  # a duplicate is ignored
        out = await mgr.wait_outputs("fc-1", 0, 0.0, 10)
        assert [(o.idx, pickle.loads(o.data)) for o in out.outputs] == [(0, 10)]

    asyncio.run(go())


def test_stale_lease_token_is_ignored(env):
    make, _, _ = env

    async def go():
        mgr = make()
        await _call(mgr, "fc-1", [1])
        c = _attach(mgr)
        inp = c.inputs()[0]
        stale = m.TaskOutput(inp.input_id, inp.attempt + 1000, "success", pickle.dumps(0))
        mgr.on_outputs(c, [stale])
        assert inp.input_id in c.inflight
        out = await mgr.wait_outputs("fc-1", 0, 0.0, 10)
        assert out.outputs == []

    asyncio.run(go())


def test_container_death_charges_only_the_running_input(env):
    make, store, _ = env

    async def go():
        mgr = make(retries=m.RetryPolicy(max_retries=0))
        mgr.function("fu-1").ewma_duration = 0.001  # fast: several inputs in flight at once
        await _call(mgr, "fc-1", [1, 2, 3])
        c = _attach(mgr)
        assert len(c.inflight) == 3
        die(mgr, c, 1, "ContainerDiedError: killed by signal SIGKILL", known=True)
        assert len(c.inputs()) == 3  # nothing re-sent to the dead container
        out = await mgr.wait_outputs("fc-1", 0, 0.0, 10)
        assert [(o.idx, o.status) for o in out.outputs] == [(0, "died")]
        assert "SIGKILL" in out.outputs[0].error
        c2 = _attach(mgr, "ct-2")  # the other two were re-queued, not failed
        assert sorted(i.input_id for i in c2.inputs()) == [2, 3]

    asyncio.run(go())


def test_failures_are_retried_with_backoff_then_fail(env):
    make, store, _ = env

    async def go():
        policy = m.RetryPolicy(
            max_retries=2, backoff_coefficient=2.0, initial_delay=0.05, max_delay=1.0
        )
        assert policy.delay(1) == pytest.approx(0.05)
        assert policy.delay(2) == pytest.approx(0.1)
        mgr = make(retries=policy)
        await _call(mgr, "fc-1", [1])
        c = _attach(mgr)
        attempts = 0
        for _ in range(3):
            inp = c.inputs()[-1]
            attempts += 1
            mgr.on_outputs(
                c,
                [
                    m.TaskOutput(
                        inp.input_id, inp.attempt, "failure", None, "ValueError: nope", "tb"
                    )
                ],
            )
            await asyncio.sleep(0.25)
        assert len(c.inputs()) == 3  # first try + 2 retries, no more
        out = await mgr.wait_outputs("fc-1", 0, 0.0, 10)
        assert [(o.status, o.error) for o in out.outputs] == [("failure", "ValueError: nope")]
        assert store.pending_inputs() == []

    asyncio.run(go())


def test_timeout_kills_the_container_and_fails_the_input(env):
    make, _, killed = env

    async def go():
        mgr = make(timeout=1.0)
        await _call(mgr, "fc-1", [1])
        _attach(mgr)
        mgr.check_timeouts(time.monotonic() + 0.5)
        assert killed == []
        mgr.check_timeouts(time.monotonic() + 2.0)
        assert killed == ["ct-1"]
        out = await mgr.wait_outputs("fc-1", 0, 0.0, 10)
        assert out.outputs[0].status == "timeout"

    asyncio.run(go())


def test_cancel_ends_queued_and_running_inputs(env):
    make, _, _ = env

    async def go():
        mgr = make()
        await _call(mgr, "fc-1", [1, 2])
        c = _attach(mgr)  # one input running, one queued (slow function: one at a time)
        mgr.cancel_call("fc-1", terminate_containers=False)
        assert any(isinstance(msg, m.CancelInputs) for msg in c.sent)
        out = await mgr.wait_outputs("fc-1", 0, 0.0, 10)
        assert sorted(o.status for o in out.outputs) == ["cancelled", "cancelled"]
        assert not mgr.function("fu-1").queue

    asyncio.run(go())


def test_retried_create_call_adds_nothing_twice(env):
    make, store, _ = env

    async def go():
        mgr = make()
        await _call(mgr, "fc-1", [1, 2])
        await _call(mgr, "fc-1", [1, 2])  # the client retried after a lost answer
        assert len(store.pending_inputs()) == 2
        assert len(mgr.function("fu-1").queue) == 2

    asyncio.run(go())


def test_recover_requeues_inputs_without_outputs(env, tmp_path):
    make, store, _ = env

    async def go():
        mgr = make()
        await _call(mgr, "fc-1", [1, 2, 3])
        c = _attach(mgr)
        mgr.on_outputs(c, [_ok(c.inputs()[0], 1)])
        fresh = CallManager(
            store,
            BlobStore(tmp_path / "blobs"),
            containers=ContainerRegistry(),
            blob_threshold=1 << 20,
            max_payload=8 << 20,
            retention_s=3600,
            kill_container=lambda *a: None,
            wake_scaler=lambda: None,
        )
        assert fresh.recover() == 2
        assert [p.idx for p in fresh.function("fu-1").queue] == [1, 2]
        out = await fresh.wait_outputs("fc-1", 0, 0.0, 10)  # earlier outputs still readable
        assert [o.idx for o in out.outputs] == [0]

    asyncio.run(go())


def test_a_call_retried_after_a_restart_runs_nothing_twice(env, tmp_path):
    """A request for a call this process did not create queues its inputs, which run
    while the database writes the call; if the database had that call already (a client
    that retried across a restart), what the request queued is withdrawn and only what
    the call lacks is added: nothing."""
    make, store, _ = env

    async def go():
        mgr = make()
        await _call(mgr, "fc-1", [1, 2])
        fresh = CallManager(
            store,
            BlobStore(tmp_path / "blobs"),
            containers=ContainerRegistry(),
            blob_threshold=1 << 20,
            max_payload=8 << 20,
            retention_s=3600,
            kill_container=lambda *a: None,
            wake_scaler=lambda: None,
        )
        c = attach(fresh, "ct-9")
        await _call(fresh, "fc-1", [1, 2])  # the retry, before recovery found the call
        await fresh.intake.settled()  # the database said the call existed
        (ran,) = c.inputs()  # it ran at once (a slow function: one at a time), then
        cancelled = [i for msg in c.sent if isinstance(msg, m.CancelInputs) for i in msg.input_ids]
        assert cancelled == [ran.input_id] and not c.inflight  # was withdrawn
        assert "fc-1" not in fresh.live and not fresh.function("fu-1").queue
        assert sorted(p.idx for p in store.pending_inputs()) == [0, 1]  # the call's own

    asyncio.run(go())


def test_an_acknowledged_call_is_in_the_journal_before_the_database(env, tmp_path):
    """The answer waits for the journal, not for the database: with the database held,
    the call is acknowledged, journaled and not yet committed; then committed."""
    make, store, _ = env

    async def go():
        mgr = make()
        mgr.function("fu-1")  # loaded from the store on first use
        release = threading.Event()
        store._write("hold", lambda _c: release.wait(30))  # the database gets nothing
        try:
            await asyncio.wait_for(_call(mgr, "fc-1", [1]), 10)
            entries = Journal.read(tmp_path / "state.db.intake")
            assert [(kind, payload[0]["call_id"]) for _, kind, payload in entries] == [
                ("create_call", "fc-1")
            ]
            assert _committed(tmp_path) == []
        finally:
            release.set()
        await mgr.intake.settled()
        assert _committed(tmp_path) == [(0, "pending")]

    asyncio.run(go())


def _committed(tmp_path) -> list:
    """Inputs of fc-1, read beside the store (not through its queue): committed ones."""
    with contextlib.closing(sqlite3.connect(tmp_path / "state.db")) as db:
        return db.execute("select idx, status from inputs where call_id = 'fc-1'").fetchall()


def test_outputs_are_journaled_then_served_from_memory(env, tmp_path):
    """A long-poll of a call created here is answered from memory, without waiting for
    the database, and only with outputs the journal has (durable)."""
    make, store, _ = env

    async def go():
        mgr = make()
        await _call(mgr, "fc-1", [1])
        c = _attach(mgr)
        await mgr.intake.settled()
        release = threading.Event()
        store._write("hold", lambda _c: release.wait(30))  # the database gets nothing
        try:
            mgr.on_outputs(c, [_ok(c.inputs()[0], 10)])
            out = await asyncio.wait_for(mgr.wait_outputs("fc-1", 0, 5.0, 10), 10)
            assert [pickle.loads(o.data) for o in out.outputs] == [10]
            journaled = [
                row["b_seq"]
                for _, kind, payload in Journal.read(tmp_path / "state.db.intake")
                if kind == "outputs"
                for row in payload[0]
            ]
            assert journaled == [out.outputs[0].seq]
            assert _committed(tmp_path) == [(0, "pending")]  # not in the database yet
        finally:
            release.set()
        await store.aflush()
        assert _committed(tmp_path) == [(0, "done")]

    asyncio.run(go())


def test_the_output_buffer_is_bounded_in_bytes_and_the_store_answers_beyond_it(env):
    make, _, _ = env

    async def go():
        mgr = make()
        mgr.outputs.buffer_bytes = 4096
        c = _attach(mgr)
        await _call(mgr, "fc-1", [1])
        mgr.on_outputs(c, [_ok(c.inputs()[-1], b"a" * 3000)])
        assert "fc-1" in mgr.outputs._buffers
        await _call(mgr, "fc-2", [2])
        mgr.on_outputs(c, [_ok(c.inputs()[-1], b"b" * 3000)])
        # the oldest call's outputs made room: its long-polls read the store
        assert "fc-1" not in mgr.outputs._buffers and "fc-2" in mgr.outputs._buffers
        assert 3000 < mgr.outputs._buffered <= 4096
        one = await mgr.wait_outputs("fc-1", 0, 0.0, 10)
        assert [pickle.loads(o.data) for o in one.outputs] == [b"a" * 3000]
        two = await mgr.wait_outputs("fc-2", 0, 0.0, 10)
        assert [pickle.loads(o.data) for o in two.outputs] == [b"b" * 3000]
        # what a client has seen is dropped; the complete call's buffer goes
        done = await mgr.wait_outputs("fc-2", two.last_seq, 0.0, 10)
        assert done.done and done.outputs == []
        assert mgr.outputs._buffered == 0 and not mgr.outputs._buffers

    asyncio.run(go())


CRASH_AFTER_OUTPUT = """
import asyncio, os, pickle, sys, threading
sys.path.insert(0, sys.argv[2])
from manager_helpers import attach, make_manager
from strato import exceptions as exc
from strato.protocol import messages as m
from strato.server.store import Store

async def go():
    store = Store(f"sqlite:///{sys.argv[1]}/state.db")
    spec = m.FunctionSpec(name="f", module="mod", qualname="f")
    mgr = make_manager(store, __import__("pathlib").Path(sys.argv[1]) / "blobs", spec)
    mgr.function("fu-1").ewma_duration = 0.001  # both inputs in flight at once
    args = [m.InputItem(i, pickle.dumps(((i,), {}))) for i in range(2)]
    await mgr.create_call(m.CreateCall("fc-1", "fu-1", args))
    c = attach(mgr)
    first = c.inputs()[0]
    store._write("hold", lambda _c: threading.Event().wait())  # the database gets nothing
    out = m.TaskOutput(first.input_id, first.attempt, "success", pickle.dumps(10), duration=0.1)
    mgr.on_outputs(c, [out])
    seen = await mgr.wait_outputs("fc-1", 0, 5.0, 10)  # a client saw it
    print(seen.outputs[0].seq, flush=True)
    os._exit(0)  # a crash: nothing is flushed or closed

asyncio.run(go())
"""


def test_after_a_crash_an_output_a_client_saw_is_in_and_its_input_does_not_rerun(tmp_path):
    """The restarted store writes the journaled output before recovery reads what is
    pending: only the other input runs again, and the client reads the same output under
    the same sequence number."""
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            textwrap.dedent(CRASH_AFTER_OUTPUT),
            str(tmp_path),
            str(Path(__file__).parent),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and proc.stdout.strip(), proc.stderr
    seen_seq = int(proc.stdout.strip())
    store = Store(f"sqlite:///{tmp_path / 'state.db'}")

    async def go():
        fresh = CallManager(
            store,
            BlobStore(tmp_path / "blobs"),
            containers=ContainerRegistry(),
            blob_threshold=1 << 20,
            max_payload=8 << 20,
            retention_s=3600,
            kill_container=lambda *a: None,
            wake_scaler=lambda: None,
        )
        assert fresh.recover() == 1
        assert [p.idx for p in fresh.function("fu-1").queue] == [1]
        out = await fresh.wait_outputs("fc-1", 0, 0.0, 10)
        assert [(o.idx, o.seq, pickle.loads(o.data or b"")) for o in out.outputs] == [
            (0, seen_seq, 10)
        ]

    try:
        asyncio.run(go())
    finally:
        store.close()


def test_arguments_over_the_blob_threshold_are_stored_as_a_blob(env, tmp_path):
    make, store, _ = env

    async def go():
        mgr = make()
        big = _args(b"x" * (2 << 20))  # over the manager's 1 MiB threshold
        await mgr.create_call(m.CreateCall("fc-1", "fu-1", [m.InputItem(0, big)]))
        await mgr.intake.settled()
        (row,) = store.pending_inputs()
        assert row.args is None and row.args_blob is not None
        assert BlobStore(tmp_path / "blobs").get(row.args_blob) == big

    asyncio.run(go())


def test_inputs_added_to_a_call_of_this_process_read_nothing_from_the_store(env, tmp_path):
    """With the database held, a call created here takes more inputs (a retried batch
    adds nothing twice) without a read, which would wait for the database; a cancelled
    call refuses them. Once the database has caught up it holds what was acknowledged."""
    make, store, _ = env

    async def go():
        mgr = make()
        mgr.function("fu-1")  # loaded from the store on first use
        release = threading.Event()
        # the database gets nothing meanwhile: a read would raise StoreTimeout (30 s)
        store._write("hold", lambda _c: release.wait(120))
        try:
            await _call(mgr, "fc-1", [1])
            more = m.AddInputs([m.InputItem(1, _args(2)), m.InputItem(2, _args(3))])
            mgr.add_inputs("fc-1", more)
            mgr.add_inputs("fc-1", m.AddInputs([m.InputItem(2, _args(3))], closed=True))
            assert len(mgr.function("fu-1").queue) == 3
        finally:
            release.set()
        await store.aflush()
        call = store.call_row("fc-1")
        assert call is not None and (call.n_inputs, call.closed) == (3, True)
        assert sorted(p.idx for p in store.pending_inputs()) == [0, 1, 2]
        mgr.cancel_call("fc-1", terminate_containers=False)
        with pytest.raises(exc.InvalidError, match="cancelled"):
            mgr.add_inputs("fc-1", m.AddInputs([m.InputItem(3, _args(4))]))

    asyncio.run(go())
