"""Which input a dead container's failure is charged to.

A fast function's container holds many inputs at once, and the outputs of those it has
finished may die with it: when it dies holding several, none is blamed; each runs again
alone, so that the input that kills its container is the one that fails."""

from __future__ import annotations

import asyncio
import pickle
import time

import msgspec
import pytest
from manager_helpers import RecordingContainer, attach, die, make_manager

from strato.protocol import messages as m
from strato.server.calls.manager import CallManager
from strato.server.store import Store


@pytest.fixture
def mgr(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'state.db'}")
    spec = m.FunctionSpec(name="f", module="mod", qualname="f")  # retries=0
    manager = make_manager(store, tmp_path / "blobs", spec)
    manager.function("fu-1").ewma_duration = 0.001  # fast: containers take many inputs
    yield manager
    store.close()


async def _start_call(mgr: CallManager, n: int) -> None:
    items = [m.InputItem(i, pickle.dumps(((i,), {}))) for i in range(n)]
    await mgr.create_call(m.CreateCall("fc-1", "fu-1", items))


def _attach(mgr: CallManager, cid: str) -> RecordingContainer:
    return attach(mgr, cid)


def _die(mgr: CallManager, c: RecordingContainer) -> None:
    """What the fleet does when a container's process dies."""
    die(mgr, c, 1, "ContainerDiedError: it died", known=False)


def _outputs(mgr: CallManager) -> dict[int, str]:
    return {r.idx: r.status for r in mgr.store.outputs_after("fc-1", 0, 100)}


def _ok(c: RecordingContainer, inp: m.TaskInput) -> m.TaskOutput:
    return m.TaskOutput(inp.input_id, inp.attempt, "success", pickle.dumps(0), duration=0.001)


def test_a_container_dying_with_many_inputs_blames_none_and_isolates_them(mgr):
    async def go() -> None:
        await _start_call(mgr, 4)
        a = _attach(mgr, "ct-a")
        assert len(a.inputs()) == 4  # a fast function's container takes them all
        _die(mgr, a)
        assert _outputs(mgr) == {}  # nobody failed
        b = _attach(mgr, "ct-b")
        c = _attach(mgr, "ct-c")
        # each runs alone: one per idle container, nothing more until it is done
        assert [len(b.inputs()), len(c.inputs())] == [1, 1]
        first = b.inputs()[0]
        mgr.on_outputs(b, [_ok(b, first)])
        assert len(b.inputs()) == 2  # b is free again: it gets the next one, alone
        assert len(b.inflight) == 1

    asyncio.run(go())


def test_the_input_that_kills_its_container_alone_fails(mgr):
    async def go() -> None:
        await _start_call(mgr, 3)
        a = _attach(mgr, "ct-a")
        _die(mgr, a)  # held 3: none blamed
        b = _attach(mgr, "ct-b")
        (culprit,) = b.inputs()
        _die(mgr, b)  # held 1: that one is blamed (retries=0: it fails)
        idx = {p.input_id: p.idx for p in mgr.live["fc-1"].values()}
        assert _outputs(mgr) == {0: "died"}
        assert culprit.input_id not in idx
        c = _attach(mgr, "ct-c")
        for _ in range(2):
            (inp,) = [i for i in c.inputs() if i.input_id in c.inflight]
            mgr.on_outputs(c, [_ok(c, inp)])
        assert _outputs(mgr) == {0: "died", 1: "success", 2: "success"}

    asyncio.run(go())


def test_a_timeout_blames_the_first_lease(mgr):
    async def go() -> None:
        mgr.function("fu-1").spec = msgspec.structs.replace(mgr.function("fu-1").spec, timeout=1.0)
        await _start_call(mgr, 3)
        a = _attach(mgr, "ct-a")
        assert len(a.inputs()) == 3
        mgr.check_timeouts(time.monotonic() + 5)
        assert _outputs(mgr) == {0: "timeout"}
        # the others go back as usual, not one by one
        assert all(not p.solo for p in mgr.live["fc-1"].values())

    asyncio.run(go())
