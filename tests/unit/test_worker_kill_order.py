"""A kill the worker agent cannot carry out still ends the container's record: the
control plane waits for an exit report before it frees the container's reservation, so a
kill of a container still being prepared (its image or code on the way), or of one this
agent never started, must be answered with one."""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace

from strato.protocol import messages as m
from strato.worker.agent import WorkerAgent


def _agent(tmp_path, monkeypatch) -> WorkerAgent:
    monkeypatch.setenv("STRATO_RUNTIME", "process")
    return WorkerAgent("unused-channel", "token", tmp_path)


def _exits(agent: WorkerAgent) -> list[m.ContainerExited]:
    return [x for x in agent._outbox if isinstance(x, m.ContainerExited)]


def test_a_kill_of_a_container_never_started_here_is_answered(tmp_path, monkeypatch):
    agent = _agent(tmp_path, monkeypatch)
    agent._kill("ct-000000000001", 0.0)
    [exited] = _exits(agent)
    assert exited.container_id == "ct-000000000001"
    assert exited.description == "not running on its node"
    assert "ct-000000000001" not in agent.killed


def test_a_kill_while_the_container_is_prepared_is_answered_and_nothing_starts(
    tmp_path, monkeypatch
):
    agent = _agent(tmp_path, monkeypatch)
    preparing, release = threading.Event(), threading.Event()

    def slow_prepare(msg, runtime):  # the image build or code download of a real start
        preparing.set()
        assert release.wait(10)
        return None  # a launch a killed start must never use

    monkeypatch.setattr(agent, "_prepare", slow_prepare)
    cid = "ct-000000000002"
    start = SimpleNamespace(container_id=cid, spec=SimpleNamespace(runtime=None), runtime=None)

    async def scenario() -> None:
        task = asyncio.create_task(agent._start(start))  # type: ignore[arg-type]
        assert await asyncio.to_thread(preparing.wait, 10)
        agent._kill(cid, 0.0)
        assert _exits(agent) == []  # _start answers, once it is back
        release.set()
        await asyncio.wait_for(task, 10)

    asyncio.run(scenario())
    [exited] = _exits(agent)
    assert exited.container_id == cid and exited.description == "killed before it started"
    assert not any(isinstance(x, m.ContainerStarted) for x in agent._outbox)
    assert cid not in agent.starting and cid not in agent.killed
