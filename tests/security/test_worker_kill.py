"""Supervision: the worker agent SIGKILLed in the middle of a 20,000-input ``.map``.

The local provider restarts the agent (with backoff); the control plane marks the node
lost when the agent's channel drops, counts its containers dead and puts the inputs they
held back in the queue (no failed attempt: the node failed, not the input); the new agent
registers as the same node and the map finishes with every output exactly once. While no
node can run the function, the app's log says why and for how long."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest
from conftest import dedicated_server, pid_alive, processes_of, stored_map_call, wait_until

from strato.client import session
from strato.exceptions import ContainerDiedError
from strato.protocol import messages as m

sys.path.insert(0, str(Path(__file__).resolve().parent))
import supervision_apps as apps  # noqa: E402

pytestmark = pytest.mark.slow  # about 25 s: a control plane of its own, agents restarted

N = 20_000
BACKOFF = (0.2, 1.6)  # first restart delay, cap (seconds)


@pytest.fixture(scope="module")
def server():
    env = {
        "STRATO_RUNTIME": "process",
        "STRATO_WORKER_RESTART_BACKOFF": f"{BACKOFF[0]},{BACKOFF[1]}",
        "STRATO_WORKER_RESTART_RESET_S": "600",
        # containers started as plain processes, not forked from a zygote (a forked one
        # dies with the agent by itself): the provider must kill what the agent left
        "STRATO_ZYGOTE": "0",
        # heartbeats every 0.5 s; 4 s without one and the node is lost
        "STRATO_WORKER_HEARTBEAT_S": "0.5",
        "STRATO_WORKER_HEARTBEAT_TIMEOUT": "4",
    }
    with dedicated_server(env) as handle:
        yield handle


def worker_pid(home: Path) -> int | None:
    found = [pid for pid, cmd in processes_of(home) if "-m strato.worker" in cmd]
    assert len(found) <= 1, f"more than one worker agent for one home: {found}"
    return found[0] if found else None


def container_pids(home: Path, function_id: str | None = None) -> list[int]:
    """Container processes of this home (of one function: its STRATO_FUNCTION_ID)."""
    pids = [pid for pid, cmd in processes_of(home) if "strato.container" in cmd]
    if function_id is None:
        return pids
    needle = f"STRATO_FUNCTION_ID={function_id}".encode()
    mine = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    mine.append(pid)
        except OSError:
            pass
    return mine


def container_cgroups(pid: int) -> list[Path]:
    """The cgroup folders of a container process (named by its container id)."""
    with open(f"/proc/{pid}/environ", "rb") as f:
        env = dict(e.split(b"=", 1) for e in f.read().split(b"\0") if b"=" in e)
    cid = env[b"STRATO_CONTAINER_ID"].decode()
    found = []
    with open(f"/proc/{pid}/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            if not path.endswith("/" + cid):
                continue
            for name in controllers.split(",") if controllers else ["unified"]:
                for root in (Path("/sys/fs/cgroup") / name, Path("/sys/fs/cgroup")):
                    if (root / path.lstrip("/")).is_dir():
                        found.append(root / path.lstrip("/"))
                        break
    return found


def restarts(home: Path) -> list[dict]:
    path = home / "logs" / "worker-restarts.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def node_states() -> list[str]:
    return [n.state for n in session.api().call("GET", "/nodes", None, m.NodeList).nodes]


def kill_worker(home: Path) -> int:
    """SIGKILL the current worker agent; returns its pid once it is gone."""
    pid = wait_until(lambda: worker_pid(home), 30, "a worker agent process")
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not pid_alive(pid), 30, f"worker agent {pid} to die")
    return pid


def wait_for_new_worker(home: Path, old: int) -> int:
    pid = wait_until(
        lambda: (p := worker_pid(home)) and p != old and p,
        60,
        "the provider to start a new worker agent (it restarts a dead one)",
    )
    wait_until(lambda: node_states() == ["ready"], 60, "the new agent to register as the same node")
    return pid


def app_logs(app_id: str) -> list[m.LogLine]:
    lines: list[m.LogLine] = []
    after = 0
    while True:
        batch = session.api().call(
            "GET", f"/apps/{app_id}/logs", None, m.LogBatch, params={"after": after, "timeout": 0}
        )
        if not batch.lines:
            return lines
        lines += batch.lines
        after = batch.cursor


def test_map_survives_a_sigkilled_worker_agent(server):
    home = server.home
    with apps.app.run(quiet=True):
        assert apps.double.remote(21) == 42  # the function's containers exist
        results: list[int] = []
        victims: list[int] = []
        killed = None
        for value in apps.double.map(range(N)):
            results.append(value)
            if len(results) == N // 4:
                victims = container_pids(home)
                killed = kill_worker(home)
        assert killed is not None
        assert victims, "the map's containers were running when the agent was killed"
        # every output exactly once, with its value, in input order
        assert len(results) == N
        assert results == [2 * x for x in range(N)]
        stored = stored_map_call(home, apps.double.object_id, N)
        assert stored["done"] == stored["successes"] == N
        assert sorted(stored["indices"]) == list(range(N)), "an input's output is repeated"
        # the node failed, not the inputs: none counted a failed attempt
        assert stored["attempts"] == 0
        # the dead agent's containers (plain processes under the process runtime) do not
        # linger: the provider killed them before starting the new agent
        for pid in victims:
            wait_until(lambda pid=pid: not pid_alive(pid), 30, f"old container {pid} to die")
        new = worker_pid(home)
        assert new is not None and new != killed
        assert node_states() == ["ready"]
        recorded = restarts(home)
        assert [r["died_pid"] for r in recorded] == [killed]
        assert recorded[0]["signal"] == signal.SIGKILL and recorded[0]["new_pid"] == new
        # the app's user was told what happened and why the function waited
        texts = [line.text for line in app_logs(apps.app.app_id) if line.stream == "system"]
        assert any("lost its worker agent" in t and "back to the queue" in t for t in texts), texts[
            -20:
        ]
        # inputs were queued while no agent was connected (its restart takes at least the
        # 0.2 s backoff plus the agent's start-up), so the scaling loop said why it waited
        waits = [t for t in texts if "waits for a worker agent: no node can run it now" in t]
        assert waits and all("lost its worker agent" in t for t in waits), texts[-20:]


def test_worker_comes_back_after_sigkill(server, tmp_path):
    """The agent is restarted and registers as the same node; a container of the dead
    agent that is busy in a long input (under the process runtime it would outlive the
    agent) is killed, not left to finish and report later; the input runs again."""
    home = server.home
    before = len(restarts(home))
    with apps.app.run(quiet=True):
        marker = tmp_path / "running"
        call = apps.slow.spawn(3600.0, str(marker))
        wait_until(marker.exists, 60, "the slow input to run")
        busy = container_pids(home, apps.slow.object_id)
        assert len(busy) == 1
        groups = container_cgroups(busy[0])
        old = kill_worker(home)
        new = wait_for_new_worker(home, old)
        for pid in busy:  # it sleeps an hour: dead now means killed
            wait_until(lambda pid=pid: not pid_alive(pid), 30, f"old container {pid} to die")
        recorded = restarts(home)
        assert len(recorded) == before + 1, "one more restart recorded"
        last = recorded[-1]
        assert last["died_pid"] == old and last["new_pid"] == new
        assert last["signal"] == signal.SIGKILL
        assert last["total"] == before + 1
        # its container (a plain process, busy in the input) was killed by the provider
        assert last["orphans_killed"] >= 1
        # the input went back to the queue (no attempt counted) and runs on the new agent
        again = wait_until(
            lambda: [p for p in container_pids(home, apps.slow.object_id) if p not in busy],
            60,
            "a new container for the re-queued input",
        )
        assert again
        assert apps.double.remote(5) == 10  # the node places containers again
        # the new agent removed the cgroup of the dead agent's container (the control
        # plane named it in its welcome); empty where the runtime had no cgroups here
        for group in groups:
            wait_until(lambda g=group: not g.exists(), 30, f"stale cgroup {group} removed")
        call.cancel(terminate_containers=True)


def test_repeated_kills_back_off(server):
    """Killed again and again (each time soon after it started), the agent is restarted
    after planned delays that double up to the cap; checked on the recorded plans, not on
    the clock."""
    home = server.home
    before = len(restarts(home))
    for _ in range(5):
        old = kill_worker(home)
        wait_for_new_worker(home, old)
    recorded = restarts(home)[before:]
    assert len(recorded) == 5
    attempts = [r["attempt"] for r in recorded]
    delays = [r["delay_s"] for r in recorded]
    # no reset in between (each agent lived far less than the 600 s reset window)
    assert attempts == list(range(attempts[0], attempts[0] + 5)), attempts
    first, cap = BACKOFF
    assert delays == [min(first * 2 ** (a - 1), cap) for a in attempts], delays
    assert delays[-1] == cap and delays == sorted(delays), delays
    assert len({r["died_pid"] for r in recorded}) == 5


def test_hung_worker_agent_is_lost_until_it_answers_again(server, tmp_path):
    """An agent that stops answering (SIGSTOP: its channel stays open) is counted lost
    once its heartbeats stop, and the input its container held goes back to the queue;
    when the agent runs again it re-registers as the same node and kills that container
    (the control plane counts it dead), and the input runs in a new one."""
    home = server.home
    pid = wait_until(lambda: worker_pid(home), 30, "a worker agent process")
    before = len(restarts(home))
    with apps.app.run(quiet=True):
        marker = tmp_path / "running"
        call = apps.slow.spawn(3600.0, str(marker))
        wait_until(marker.exists, 60, "the slow input to run")
        busy = container_pids(home, apps.slow.object_id)
        assert len(busy) == 1
        os.kill(pid, signal.SIGSTOP)
        try:
            wait_until(
                lambda: node_states() == ["lost"],
                60,
                "the node to be lost (its agent has sent no heartbeat for 4 s)",
            )
        finally:
            os.kill(pid, signal.SIGCONT)
        wait_until(lambda: node_states() == ["ready"], 60, "the agent to register again")
        assert worker_pid(home) == pid  # the same agent, not a restarted one
        assert len(restarts(home)) == before
        for old in busy:  # it sleeps an hour: dead now means killed
            wait_until(lambda old=old: not pid_alive(old), 30, f"stale container {old} to die")
        wait_until(
            lambda: [p for p in container_pids(home, apps.slow.object_id) if p not in busy],
            60,
            "a new container for the re-queued input",
        )
        assert apps.double.remote(7) == 14
        call.cancel(terminate_containers=True)


def test_an_input_that_kills_its_worker_agent_fails_after_three_losses(server):
    """Inputs lost with their node go back to the queue without penalty, but one that
    was lost with it three times counts a failed attempt (no retries here: it fails),
    so an input that kills its agent does not loop for ever."""
    home = server.home
    before = len(restarts(home))
    with apps.app.run(quiet=True):
        with pytest.raises(ContainerDiedError, match="lost its node's worker agent"):
            apps.kill_my_worker.remote(1)
        # (a restart is recorded once the new agent is started, after its backoff)
        wait_until(lambda: len(restarts(home)) - before >= 3, 60, "the third restart")
        wait_until(lambda: node_states() == ["ready"], 60, "the agent to be back")
        assert len(restarts(home)) - before == 3, "it killed its agent three times, no more"
        assert apps.double.remote(8) == 16


def test_backoff_doubles_to_its_cap_and_resets_after_a_long_uptime():
    from strato.providers.local import Backoff

    b = Backoff(0.5, 4.0, reset_after=60.0)
    assert [b.next_delay(1.0) for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert b.next_delay(60.0) == 0.5  # it had stayed up a while: start again
    assert b.next_delay(59.0) == 1.0
