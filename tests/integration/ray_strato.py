"""strato on a real Ray cluster on this machine (Ray's own ``ray.cluster_utils.Cluster``):
the control plane started with ``--provider ray``, and everything torn down at the end (no
raylet, actor, agent or container left). Shared by the Ray provider's tests."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from conftest import INTEGRATION_DIR, ServerHandle, free_port, pid_alive, restore_env, wait_until

from strato.client import session


def _pids_mentioning(text: str) -> list[int]:
    """Processes whose command line or environment names ``text``."""
    needle = text.encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                seen = f.read()
            with open(f"/proc/{entry}/environ", "rb") as f:
                seen += f.read()
        except OSError:
            continue
        if needle in seen and pid_alive(int(entry)):
            found.append(int(entry))
    return found


def start_server(env: dict[str, str]) -> None:
    """The documented command: the control plane joins the Ray cluster at RAY_ADDRESS."""
    out = subprocess.run(
        [sys.executable, "-m", "strato.cli.main", "server", "start", "--provider", "ray"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr


@contextlib.contextmanager
def strato_on_ray(
    prefix: str, raylets: list[dict], extra_env: dict[str, str]
) -> Iterator[tuple[object, ServerHandle, list, Path, dict[str, str]]]:
    """A head of one CPU plus ``raylets`` (``Cluster.add_node`` arguments each), and a
    control plane on it with ``extra_env``: (cluster, handle, raylets, agents' home, env)."""
    import ray
    from ray.cluster_utils import Cluster

    keys = ("STRATO_HOME", "STRATO_SERVER_URL", "PYTHONPATH", "STRATO_RUNTIME", "RAY_ADDRESS")
    saved = {k: os.environ.get(k) for k in keys}
    work = Path(tempfile.mkdtemp(prefix=prefix))
    agents_home = work / "agents"
    # the raylets' workers (strato's actors, their agents, their containers) inherit this
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(INTEGRATION_DIR), *([saved["PYTHONPATH"]] if saved["PYTHONPATH"] else [])]
    )
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "include_dashboard": False},
    )
    added = [cluster.add_node(**args) for args in raylets]
    cluster.wait_for_nodes()
    home = work / "cp"
    port = free_port()
    handle = ServerHandle(home, f"http://127.0.0.1:{port}", port)
    env = dict(
        os.environ,
        STRATO_HOME=str(home),
        STRATO_SERVER_URL=handle.url,
        STRATO_RUNTIME=os.environ.get("STRATO_RUNTIME", "process"),
        STRATO_RAY_AGENT_HOME=str(agents_home),
        RAY_ADDRESS=cluster.address,
        **extra_env,
    )
    env.pop("STRATO_PROVIDER", None)
    try:
        start_server(env)
        handle.activate()
        ray.init(address=cluster.address, log_to_driver=False)  # the tests read Ray too
        yield cluster, handle, added, agents_home, env
    finally:
        with contextlib.suppress(Exception):
            ray.shutdown()
        session.reset()
        try:
            with contextlib.suppress(OSError, ValueError):
                os.kill(handle.pid, signal.SIGTERM)
                wait_until(lambda: not pid_alive(handle.pid), 60, "the control plane to stop")
            # the provider stopped every node's agent, which stopped its containers
            wait_until(lambda: not _pids_mentioning(str(agents_home)), 60, "agents to exit")
        finally:
            raylet_pids = [
                p.process.pid
                for node in cluster.list_all_nodes()
                for procs in node.all_processes.values()
                for p in procs
            ]
            cluster.shutdown()
            left = [p for p in raylet_pids if pid_alive(p)]
            strays = _pids_mentioning(str(agents_home))
            for pid in strays:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            if not os.environ.get("STRATO_TEST_KEEP_HOME"):
                shutil.rmtree(work, ignore_errors=True)
            restore_env(saved)
            session.reset()
        assert not left, f"Ray processes left behind: {left}"
        assert not strays, f"strato agents or containers left behind: {strays}"
