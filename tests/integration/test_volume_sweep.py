"""A worker agent killed with volume overlays mounted leaves them behind; the next agent on
the same cache unmounts and removes them at start (``volumes.sweep_leftovers``), and an
agent still holding the cache's lock keeps its mounts."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from strato.worker import volumes


def _mounted(path: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(ln.split()[4] == str(path) for ln in f)


def _leftover_overlay(cache: Path, cid: str) -> Path:
    mine = volumes.container_dir(cache, cid)
    lower, upper, work, merged = (mine / n for n in ("lower", "0.upper", "0.work", "0"))
    for d in (lower, upper, work, merged):
        d.mkdir(parents=True)
    (lower / "f").write_text("x")
    done = subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o",
         f"lowerdir={lower},upperdir={upper},workdir={work}", str(merged)],
        capture_output=True, text=True,
    )  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"this kernel/user cannot mount overlayfs here: {done.stderr.strip()}")
    return merged


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting an overlay needs root")
def test_sweep_unmounts_and_removes_leftovers(tmp_path: Path) -> None:
    merged = _leftover_overlay(tmp_path, "ct-dead")
    assert _mounted(merged)
    assert volumes.sweep_leftovers(tmp_path) == 1
    assert not _mounted(merged), "the leftover overlay is still mounted after the sweep"
    assert list((tmp_path / "volumes" / "containers").iterdir()) == []
    assert volumes.sweep_leftovers(tmp_path) == 0  # nothing left: a second sweep is a no-op


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting an overlay needs root")
def test_agent_sweeps_only_with_the_cache_lock(tmp_path: Path) -> None:
    import fcntl

    from strato.worker.agent import WorkerAgent

    merged = _leftover_overlay(tmp_path / "worker", "ct-live")
    held = open(tmp_path / "worker" / "agent.lock", "a+b")  # another agent's lock
    fcntl.flock(held, fcntl.LOCK_EX)
    try:
        agent = WorkerAgent.__new__(WorkerAgent)
        agent.cache = tmp_path / "worker"
        agent._sweep_leftovers()
        assert _mounted(merged), "a mount of an agent still holding the lock was swept"
        agent._cache_lock.close()
    finally:
        held.close()
    agent._sweep_leftovers()  # the other agent is gone: its leftovers go
    try:
        assert not _mounted(merged)
    finally:
        agent._cache_lock.close()
        subprocess.run(["umount", "-l", str(merged)], capture_output=True)
