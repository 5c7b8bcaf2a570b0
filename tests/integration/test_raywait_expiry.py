"""STRATO_RAY_AUTOSCALER_WAIT_S on a real Ray cluster (a head of Ray's own
``ray.cluster_utils.Cluster``; no Ray autoscaler runs here, so no node comes): a GPU
function on a CPU-only cluster waits for Ray's autoscaler (the app's logs say so, its
bundle is asked of Ray's autoscaler in the GCS), then fails with a ResourceUnavailableError
that says the wait ended. Everything is torn down at the end."""

from __future__ import annotations

import pytest
from conftest import wait_until
from ray_strato import strato_on_ray
from test_ray_provider import _app_logs, ray_ready_nodes, requested_from_ray_autoscaler

from strato.exceptions import ResourceUnavailableError

pytestmark = pytest.mark.slow
ray = pytest.importorskip("ray")

SHARE = 0.5
WAIT_S = 8


@pytest.fixture(scope="module")
def short_wait():
    env = {"STRATO_RAY_SHARE": str(SHARE), "STRATO_RAY_AUTOSCALER_WAIT_S": str(WAIT_S)}
    with strato_on_ray("strato-raywait-", [], env) as (_, handle, *_rest):
        yield handle


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
