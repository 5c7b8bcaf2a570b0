"""STRATO_RAY_AUTOSCALER_WAIT_S on a real Ray cluster (a head of Ray's own
``ray.cluster_utils.Cluster``; no Ray autoscaler runs here, so no node comes): a GPU
function on a CPU-only cluster waits for Ray's autoscaler (the app's logs say so, its
bundle is asked of Ray's autoscaler in the GCS), then fails with a ResourceUnavailableError
that says the wait ended. Everything is torn down at the end."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
from pathlib import Path

import pytest
from conftest import INTEGRATION_DIR, ServerHandle, free_port, pid_alive, restore_env, wait_until
from test_ray_provider import (
    _app_logs,
    _pids_mentioning,
    ray_ready_nodes,
    requested_from_ray_autoscaler,
    start_server,
)

from strato.client import session
from strato.exceptions import ResourceUnavailableError

pytestmark = pytest.mark.slow
ray = pytest.importorskip("ray")

SHARE = 0.5
WAIT_S = 8


@pytest.fixture(scope="module")
def short_wait():
    from ray.cluster_utils import Cluster

    keys = ("STRATO_HOME", "STRATO_SERVER_URL", "PYTHONPATH", "STRATO_RUNTIME", "RAY_ADDRESS")
    saved = {k: os.environ.get(k) for k in keys}
    work = Path(tempfile.mkdtemp(prefix="strato-raywait-"))
    agents_home = work / "agents"
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(INTEGRATION_DIR), *([saved["PYTHONPATH"]] if saved["PYTHONPATH"] else [])]
    )
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False}
    )
    cluster.wait_for_nodes()
    port = free_port()
    handle = ServerHandle(work / "cp", f"http://127.0.0.1:{port}", port)
    env = dict(
        os.environ,
        STRATO_HOME=str(handle.home),
        STRATO_SERVER_URL=handle.url,
        STRATO_RUNTIME=os.environ.get("STRATO_RUNTIME", "process"),
        STRATO_RAY_SHARE=str(SHARE),
        STRATO_RAY_AGENT_HOME=str(agents_home),
        STRATO_RAY_AUTOSCALER_WAIT_S=str(WAIT_S),
        RAY_ADDRESS=cluster.address,
    )
    env.pop("STRATO_PROVIDER", None)
    try:
        start_server(env)
        handle.activate()
        ray.init(address=cluster.address, log_to_driver=False)  # this test reads Ray too
        yield handle
    finally:
        with contextlib.suppress(Exception):
            ray.shutdown()
        session.reset()
        try:
            with contextlib.suppress(OSError, ValueError):
                os.kill(handle.pid, signal.SIGTERM)
                wait_until(lambda: not pid_alive(handle.pid), 60, "the control plane to stop")
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
            shutil.rmtree(work, ignore_errors=True)
            restore_env(saved)
            session.reset()
        assert not left, f"Ray processes left behind: {left}"
        assert not strays, f"strato agents or containers left behind: {strays}"


def test_raywait_a_gpu_function_waits_for_rays_autoscaler_then_fails_clearly(short_wait):
    from apps import raywait_gpu as gpu

    wait_until(lambda: len(ray_ready_nodes()) == 1, 90, "the Ray head's agent")
    bundle = {"CPU": 0.25 / SHARE, "memory": float(100 * (1 << 20) / SHARE), "GPU": 2.0}
    bundle["accelerator_type:H100"] = 0.001
    with gpu.app.run(quiet=True) as app:
        call = gpu.on_gpu.spawn()
        wait_until(
            lambda: any(
                "waiting up to " in line.text  # (the seconds left when it was said)
                and "s for Ray's autoscaler to add a node with GPU H100" in line.text
                for line in _app_logs(app.app_id)
            ),
            30,
            "the app's logs to say the function waits for Ray's autoscaler",
        )
        wait_until(
            lambda: any(
                b.keys() == bundle.keys()
                and all(b[k] == pytest.approx(v) for k, v in bundle.items())
                for b in requested_from_ray_autoscaler()
            ),
            30,
            f"Ray's autoscaler to be asked for {bundle}",
        )
        with pytest.raises(ResourceUnavailableError) as e:
            call.get(timeout=60)  # no Ray autoscaler runs here: no node can come
        assert f"Ray's autoscaler added no node with GPU H100 in {WAIT_S}s" in str(e.value)
        assert "STRATO_RAY_AUTOSCALER_WAIT_S" in str(e.value)
    wait_until(lambda: requested_from_ray_autoscaler() == [], 30, "the request to be cleared")
