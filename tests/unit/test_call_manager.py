"""The call manager's lease, retry, timeout and cancellation rules, against a real store
and a recording stand-in for a container's channel."""

from __future__ import annotations

import asyncio
import contextlib
import pickle
import sqlite3
import time

import pytest
from manager_helpers import RecordingContainer, attach, die, make_manager

from strato.protocol import messages as m
from strato.server.calls.manager import CallManager
from strato.server.containers import ContainerRegistry
from strato.server.store import Store
from strato.server.store.blobs import BlobStore


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
        (ran,) = c.inputs()  # it ran at once (a slow function: one at a time), then
        cancelled = [i for msg in c.sent if isinstance(msg, m.CancelInputs) for i in msg.input_ids]
        assert cancelled == [ran.input_id] and not c.inflight  # was withdrawn
        assert "fc-1" not in fresh.live and not fresh.function("fu-1").queue
        assert sorted(p.idx for p in store.pending_inputs()) == [0, 1]  # the call's own

    asyncio.run(go())


def test_an_acknowledged_call_is_in_the_database(env, tmp_path):
    make, _, _ = env

    async def go():
        mgr = make()
        await _call(mgr, "fc-1", [1])
        # read beside the store (not through its queue): committed, not only queued
        with contextlib.closing(sqlite3.connect(tmp_path / "state.db")) as db:
            rows = db.execute("select idx, status from inputs where call_id = 'fc-1'").fetchall()
        assert rows == [(0, "pending")]

    asyncio.run(go())
