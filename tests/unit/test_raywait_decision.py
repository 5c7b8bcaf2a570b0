"""The decision behind STRATO_RAY_AUTOSCALER_WAIT_S (providers/ray_wait.py): work that
fits no Ray node waits for Ray's autoscaler, until the wait ends or Ray's autoscaler
reports strato's request for it infeasible; work that fits a node never waits here (the
fleet waits for room)."""

from __future__ import annotations

from strato.protocol.gpu import parse_gpu
from strato.providers.ray import RayNodeShape
from strato.providers.ray_demand import Pending, demand_bundles, shape_of_request
from strato.providers.ray_wait import AutoscalerWait, fits, infeasible_in, what_fits
from strato.server.scheduler import ContainerRequest

CPU_NODE = RayNodeShape(
    "a" * 28, "10.0.0.1", cpu=2.0, memory_bytes=4 << 30, gpu_count=0, accelerator=None
)
GPU_NODE = RayNodeShape(
    "b" * 28, "10.0.0.2", cpu=8.0, memory_bytes=32 << 30, gpu_count=1, accelerator="H100"
)
H100 = shape_of_request(ContainerRequest(cpu=1.0, memory_mb=1024, gpu=parse_gpu("H100")))
SMALL = Pending(cpu=1.0, memory_mb=512)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_a_shape_fits_a_node_by_its_share_and_gpu_type():
    assert fits(SMALL, CPU_NODE)
    assert not fits(H100, CPU_NODE)
    assert fits(H100, GPU_NODE)
    assert not fits(Pending(cpu=4.0, memory_mb=512), CPU_NODE)
    assert not fits(Pending(cpu=1.0, memory_mb=8192), CPU_NODE)
    a100 = Pending(cpu=1.0, memory_mb=1024, gpu_count=1, gpu_type="A100")
    assert not fits(a100, GPU_NODE)
    assert what_fits(H100) == "GPU H100"
    assert what_fits(Pending(cpu=2.0, memory_mb=4096)) == "2 CPU and 4096 MiB for strato"


def test_off_by_default_and_work_that_fits_a_node_never_waits_here():
    assert not AutoscalerWait(0.0).waits(H100, [CPU_NODE])  # 0: fails at once, as before
    wait = AutoscalerWait(60.0)
    assert not wait.waits(SMALL, [CPU_NODE])  # a busy node fits it: the fleet waits for room
    assert wait.since == {}


def test_work_no_node_fits_waits_until_the_wait_ends_then_says_why():
    clock = Clock()
    wait = AutoscalerWait(60.0, clock=clock)
    assert wait.waits(H100, [CPU_NODE])
    assert wait.why_not(H100) is None
    assert "waiting up to 60s for Ray's autoscaler to add a node with GPU H100" in (
        wait.waiting_text("f", H100)
    )
    clock.t += 59.0
    assert wait.waits(H100, [CPU_NODE])
    assert "waiting up to 1s" in wait.waiting_text("f", H100)
    clock.t += 1.0
    assert not wait.waits(H100, [CPU_NODE])
    assert wait.why_not(H100) == (
        "Ray's autoscaler added no node with GPU H100 in 60s (STRATO_RAY_AUTOSCALER_WAIT_S)"
    )
    # a node that fits joined: no longer Ray's autoscaler's business
    assert not wait.waits(H100, [CPU_NODE, GPU_NODE])
    # once no work of it waits, the next wait starts afresh
    wait.keep([])
    assert wait.since == {} and wait.ended == set()
    assert wait.waits(H100, [CPU_NODE])


def test_infeasible_per_rays_autoscaler_ends_the_wait_of_that_shape_only():
    clock = Clock()
    wait = AutoscalerWait(600.0, share=0.5, clock=clock)
    big = Pending(cpu=4.0, memory_mb=512)
    assert wait.waits(H100, [CPU_NODE]) and wait.waits(big, [CPU_NODE])
    held = {"CPU": 4.0, "memory": float(8 << 30)}
    # Ray's autoscaler judged an earlier request holding only the held node and H100
    h100_bundle = demand_bundles([H100], [], 0.5)[0]
    assert h100_bundle["GPU"] == 2.0 and "accelerator_type:H100" in h100_bundle
    wait.saw_infeasible([held, h100_bundle])
    assert not wait.waits(H100, [CPU_NODE])
    assert wait.waits(big, [CPU_NODE])
    why = wait.why_not(H100)
    assert why is not None and why.startswith(
        "Ray's autoscaler reports strato's request for a node with GPU H100 infeasible"
    )
    assert wait.why_not(big) is None
    # a bundle that differs (another share, another accelerator) is not this shape
    wait.saw_infeasible([demand_bundles([big], [], 1.0)[0]])
    assert wait.waits(big, [CPU_NODE])
    wait.keep([big])  # the H100 work failed: its next wait starts afresh
    assert H100 not in wait.infeasible
    assert wait.waits(H100, [CPU_NODE])


def test_the_infeasible_requests_are_read_from_rays_cluster_status_reply():
    """What the GCS answers to GetClusterStatus (Ray's own message type) where the v2
    autoscaler found strato's request infeasible."""
    from ray.core.generated import autoscaler_pb2 as pb

    h100 = demand_bundles([H100], [], 0.5)[0]
    reply = pb.GetClusterStatusReply()
    constraint = reply.autoscaling_state.infeasible_cluster_resource_constraints.add()
    for bundle, count in (({"CPU": 4.0}, 1), (h100, 2)):
        req = constraint.resource_requests.add(count=count)
        req.request.resources_bundle.update(bundle)
    assert infeasible_in(reply.SerializeToString()) == [{"CPU": 4.0}, h100]
    assert infeasible_in(pb.GetClusterStatusReply().SerializeToString()) == []
    wait = AutoscalerWait(600.0, share=0.5)
    assert wait.waits(H100, [CPU_NODE])
    wait.saw_infeasible(infeasible_in(reply.SerializeToString()))
    assert not wait.waits(H100, [CPU_NODE])
