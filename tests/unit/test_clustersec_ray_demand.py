"""What the ``ray`` provider asks Ray's autoscaler for (``demand_bundles``)."""

from __future__ import annotations

from strato.providers.ray_demand import MAX_DEMAND_BUNDLES, MIB, Pending, demand_bundles

NODE = {"CPU": 4.0, "memory": 8.0 * (1 << 30), "GPU": 0.0, "object_store_memory": 1e9}


def test_nothing_is_asked_while_no_work_waits():
    assert demand_bundles([], [NODE], 0.5) == []
    assert demand_bundles([Pending(1.0, 512, count=0)], [NODE], 0.5) == []


def test_waiting_containers_are_asked_for_beside_the_nodes_strato_holds():
    out = demand_bundles([Pending(1.0, 512, count=2)], [NODE, NODE], 0.5)
    held = {"CPU": 4.0, "memory": 8.0 * (1 << 30)}  # totals: Ray packs against them
    container = {"CPU": 2.0, "memory": float(1024 * MIB)}  # over the share of a new node
    assert out == [held, held, container, container]


def test_gpus_their_type_and_the_required_resource_are_in_each_bundle():
    out = demand_bundles(
        [Pending(0.5, 100, gpu_count=1, gpu_type="H100", count=1)], [], 0.5, required="strato"
    )
    assert out == [
        {
            "CPU": 1.0,
            "memory": float(200 * MIB),
            "GPU": 2.0,  # strato takes the share of a node's GPUs, rounded down
            "accelerator_type:H100": 0.001,
            "strato": 0.001,
        }
    ]
    assert demand_bundles([Pending(1.0, 64, gpu_count=1, count=1)], [], 1.0) == [
        {"CPU": 1.0, "memory": float(64 * MIB), "GPU": 1.0}
    ]


def test_a_huge_backlog_asks_for_a_bounded_number_of_containers():
    out = demand_bundles([Pending(0.25, 64, count=10**6), Pending(1.0, 64, count=5)], [NODE], 1.0)
    assert len(out) == 1 + MAX_DEMAND_BUNDLES
