"""Scheduler placement: feasibility, ranking, GPU fallbacks, reservations, explanations."""

from __future__ import annotations

import pytest

from strato.exceptions import InvalidError
from strato.protocol.gpu import parse_gpu
from strato.server.scheduler import (
    ContainerRequest,
    NodeView,
    Placement,
    explain_unplaceable,
    place,
    release,
    reserve,
)


def node(
    node_id: str,
    *,
    price: float = 1.0,
    cpu: float = 8.0,
    memory_mb: int = 32768,
    gpus: dict[str, list[int]] | None = None,
    provider: str = "local",
    region: str | None = "us-east-1",
    **kwargs: object,
) -> NodeView:
    return NodeView(
        node_id=node_id,
        provider=provider,
        region=region,
        price_per_hour=price,
        cpu_total=cpu,
        memory_mb=memory_mb,
        gpus=gpus or {},
        **kwargs,  # type: ignore[arg-type]
    )


def request(
    cpu: float = 1.0, memory_mb: int = 1024, gpu: str | list[str] | None = None, **kwargs: object
) -> ContainerRequest:
    return ContainerRequest(cpu=cpu, memory_mb=memory_mb, gpu=parse_gpu(gpu), **kwargs)  # type: ignore[arg-type]


# --- feasibility -------------------------------------------------------------------------


def test_cpu_only_request_lands_on_a_node() -> None:
    assert place(request(), [node("n1")]) == Placement("n1", None, [])


def test_no_nodes_means_no_placement() -> None:
    assert place(request(), []) is None


def test_unhealthy_nodes_are_skipped() -> None:
    nodes = [node("sick", price=0.1, healthy=False), node("well", price=5.0)]
    assert place(request(), nodes) == Placement("well", None, [])
    assert place(request(), nodes[:1]) is None


def test_cpu_and_memory_must_be_free() -> None:
    nodes = [
        node("busy-cpu", price=0.1, cpu=4, cpu_reserved=3.5),
        node("busy-mem", price=0.2, memory_mb=4096, memory_reserved_mb=3500),
        node("roomy", price=0.9),
    ]
    assert place(request(cpu=1, memory_mb=1024), nodes).node_id == "roomy"


def test_exact_fit_is_feasible() -> None:
    nodes = [node("n1", cpu=2, memory_mb=2048, cpu_reserved=1.0, memory_reserved_mb=1024)]
    assert place(request(cpu=1.0, memory_mb=1024), nodes) == Placement("n1", None, [])
    assert place(request(cpu=1.01, memory_mb=1024), nodes) is None
    assert place(request(cpu=1.0, memory_mb=1025), nodes) is None


def test_fractional_cpu_reservations_do_not_lose_the_last_slot_to_rounding() -> None:
    n = node("n1", cpu=0.3, memory_mb=3000)
    req = request(cpu=0.1, memory_mb=1000)
    for _ in range(3):
        placement = place(req, [n])
        assert placement is not None
        reserve(n, req, placement)
    assert place(req, [n]) is None


@pytest.mark.parametrize(
    ("wanted", "expected"),
    [
        ("us-east-1", "use1"),
        ("US-EAST-1", "use1"),
        ("us-east", "use1"),
        ("eu", "euw"),
        (["ap-south-1", "eu-west"], "euw"),
    ],
)
def test_region_filter(wanted: str | list[str], expected: str) -> None:
    nodes = [
        node("use1", region="us-east-1", price=2.0),
        node("euw", region="eu-west-2", price=3.0),
        node("noregion", region=None, price=0.1),
    ]
    assert place(request(region=wanted), nodes).node_id == expected


def test_region_prefix_must_end_at_a_dash() -> None:
    # A bare string prefix is not enough: "us" must not match "usa-1", "us-east" not "us-east2".
    nodes = [node("usa", region="usa-1"), node("east2", region="us-east2")]
    assert place(request(region="us-east"), nodes) is None
    assert place(request(region="us"), nodes).node_id == "east2"
    assert place(request(region="us"), nodes[:1]) is None


def test_no_region_request_accepts_nodes_without_region() -> None:
    assert place(request(), [node("n", region=None)]).node_id == "n"


def test_provider_filter_is_modal_cloud() -> None:
    nodes = [node("cheap", provider="lambda", price=1.0), node("aws", provider="aws", price=3.0)]
    assert place(request(provider="aws"), nodes).node_id == "aws"
    assert place(request(provider="AWS"), nodes).node_id == "aws"
    assert place(request(provider="gcp"), nodes) is None


# --- ranking -----------------------------------------------------------------------------


def test_cheapest_node_wins() -> None:
    nodes = [node("a", price=3.0), node("b", price=1.0), node("c", price=2.0)]
    assert place(request(), nodes).node_id == "b"


def test_price_beats_fit() -> None:
    nodes = [
        node("tight-expensive", price=2.0, cpu=1, memory_mb=1024),
        node("loose-cheap", price=1.0, cpu=64, memory_mb=262144),
    ]
    assert place(request(cpu=1, memory_mb=1024), nodes).node_id == "loose-cheap"


def test_best_fit_among_equal_prices() -> None:
    nodes = [
        node("big", cpu=16, memory_mb=65536),
        node("tight", cpu=8, memory_mb=32768, cpu_reserved=6, memory_reserved_mb=28672),
        node("medium", cpu=8, memory_mb=32768, cpu_reserved=2),
    ]
    assert place(request(cpu=2, memory_mb=4096), nodes).node_id == "tight"


def test_best_fit_is_normalised_per_node() -> None:
    # Both leave 2 CPU / 2048 MiB free in absolute terms, but that is a smaller share of "big".
    nodes = [
        node("small", cpu=4, memory_mb=4096),
        node("big", cpu=16, memory_mb=16384, cpu_reserved=12, memory_reserved_mb=12288),
        node("big2", cpu=16, memory_mb=16384, cpu_reserved=10, memory_reserved_mb=12288),
    ]
    assert place(request(cpu=2, memory_mb=2048), nodes).node_id == "big"


def test_node_id_breaks_ties_deterministically() -> None:
    nodes = [node("n3"), node("n1"), node("n2")]
    assert place(request(), nodes).node_id == "n1"
    assert place(request(), list(reversed(nodes))).node_id == "n1"


# --- GPUs --------------------------------------------------------------------------------


def test_gpu_indices_lowest_first_skipping_used() -> None:
    n = node("g", gpus={"H100": [3, 0, 2, 1]}, gpus_in_use={0, 2})
    assert place(request(gpu="H100:2"), [n]) == Placement("g", "H100", [1, 3])


def test_gpu_type_must_match() -> None:
    nodes = [node("a100", gpus={"A100-80GB": [0, 1]}, price=0.5), node("h100", gpus={"H100": [0]})]
    assert place(request(gpu="H100"), nodes) == Placement("h100", "H100", [0])


def test_gpu_count_must_be_free() -> None:
    nodes = [node("g", gpus={"H100": [0, 1, 2, 3]}, gpus_in_use={1, 2})]
    assert place(request(gpu="H100:2"), nodes) == Placement("g", "H100", [0, 3])
    assert place(request(gpu="H100:3"), nodes) is None


def test_cpu_request_needs_no_gpu_and_takes_none() -> None:
    n = node("g", gpus={"H100": [0]})
    assert place(request(), [n]) == Placement("g", None, [])


def test_any_gpu_takes_whatever_is_free() -> None:
    nodes = [node("cpu-only", price=0.1), node("t4", gpus={"T4": [0]}, price=0.5)]
    assert place(request(gpu="any"), nodes) == Placement("t4", "T4", [0])


def test_any_gpu_on_a_mixed_node_prefers_the_smallest_pool_that_fits() -> None:
    n = node("mixed", gpus={"A10G": [0, 1, 2, 3], "L4": [4, 5]})
    assert place(request(gpu="any:2"), [n]) == Placement("mixed", "L4", [4, 5])
    assert place(request(gpu="any:3"), [n]) == Placement("mixed", "A10G", [0, 1, 2])


def test_fallbacks_are_tried_in_order_even_if_later_ones_are_cheaper() -> None:
    nodes = [
        node("a100", gpus={"A100-80GB": [0]}, price=1.0),
        node("h100", gpus={"H100": [0]}, price=9.0),
    ]
    assert place(request(gpu=["H100", "A100-80GB"]), nodes).node_id == "h100"
    assert place(request(gpu=["A100-80GB", "H100"]), nodes).node_id == "a100"


def test_fallback_used_when_first_choice_is_busy() -> None:
    nodes = [
        node("h100", gpus={"H100": [0]}, gpus_in_use={0}),
        node("a100", gpus={"A100-80GB": [0, 1]}),
    ]
    assert place(request(gpu=["H100", "A100-80GB:2"]), nodes) == Placement(
        "a100", "A100-80GB", [0, 1]
    )


def test_fallback_used_when_first_choice_node_lacks_cpu() -> None:
    nodes = [
        node("h100", gpus={"H100": [0]}, cpu=4, cpu_reserved=4),
        node("a100", gpus={"A100-80GB": [0]}),
    ]
    assert place(request(gpu=["H100", "A100-80GB"]), nodes).node_id == "a100"


def test_gpu_fallback_respects_region() -> None:
    nodes = [
        node("h100-eu", gpus={"H100": [0]}, region="eu-west-1"),
        node("a100-us", gpus={"A100-40GB": [0]}, region="us-east-1"),
    ]
    assert place(request(gpu=["H100", "A100"], region="us"), nodes).node_id == "a100-us"


def test_a_gpu_is_never_given_twice() -> None:
    n = node("g", cpu=64, memory_mb=1 << 20, gpus={"H100": [0, 1, 2]})
    req = request(gpu="H100")
    given: list[int] = []
    while (placement := place(req, [n])) is not None:
        reserve(n, req, placement)
        given += placement.gpu_indices
    assert given == [0, 1, 2]
    assert n.gpus_in_use == {0, 1, 2}


# --- reserve / release -------------------------------------------------------------------


def test_reserve_and_release_round_trip() -> None:
    n = node("g", cpu=8, memory_mb=8192, gpus={"A10G": [0, 1]})
    req = request(cpu=2.5, memory_mb=3000, gpu="A10G")
    placement = place(req, [n])
    reserve(n, req, placement)
    assert (n.cpu_reserved, n.memory_reserved_mb, n.gpus_in_use) == (2.5, 3000, {0})
    release(n, req, placement)
    assert (n.cpu_reserved, n.memory_reserved_mb, n.gpus_in_use) == (0.0, 0, set())


def test_release_frees_only_its_own_gpus() -> None:
    n = node("g", gpus={"H100": [0, 1]})
    req = request(gpu="H100")
    first = place(req, [n])
    reserve(n, req, first)
    second = place(req, [n])
    reserve(n, req, second)
    release(n, req, first)
    assert n.gpus_in_use == {1}
    assert place(req, [n]) == Placement("g", "H100", [0])


def test_release_never_goes_negative() -> None:
    n = node("n")
    req = request(cpu=0.1, memory_mb=100)
    placement = Placement("n", None, [])
    for _ in range(3):
        reserve(n, req, placement)
    for _ in range(4):
        release(n, req, placement)
    assert n.cpu_reserved == 0.0
    assert n.memory_reserved_mb == 0


def test_reserve_refuses_a_gpu_in_use() -> None:
    n = node("g", gpus={"H100": [0, 1]}, gpus_in_use={1})
    with pytest.raises(InvalidError, match="already assigned"):
        reserve(n, request(gpu="H100"), Placement("g", "H100", [1]))
    assert n.cpu_reserved == 0.0 and n.gpus_in_use == {1}


def test_reserve_refuses_a_gpu_the_node_lacks() -> None:
    n = node("g", gpus={"H100": [0]})
    with pytest.raises(InvalidError, match="does not exist"):
        reserve(n, request(gpu="H100"), Placement("g", "H100", [5]))
    with pytest.raises(InvalidError, match="does not exist"):
        reserve(n, request(gpu="A100"), Placement("g", "A100-40GB", [0]))


def test_reserve_refuses_another_nodes_placement() -> None:
    with pytest.raises(InvalidError, match="other"):
        reserve(node("mine"), request(), Placement("other", None, []))
    with pytest.raises(InvalidError, match="other"):
        release(node("mine"), request(), Placement("other", None, []))


# --- explain_unplaceable -----------------------------------------------------------------


def test_explain_no_nodes() -> None:
    assert explain_unplaceable(request(), []) == "no nodes are registered"


def test_explain_all_unhealthy() -> None:
    text = explain_unplaceable(request(), [node("a", healthy=False), node("b", healthy=False)])
    assert text == "no healthy node (2 nodes unhealthy)"


def test_explain_region() -> None:
    text = explain_unplaceable(request(region="ap"), [node("n1", region="eu-west-1")])
    assert text == "no healthy node in region ap (nodes are in: eu-west-1 on n1)"


def test_explain_provider() -> None:
    text = explain_unplaceable(request(provider="gcp"), [node("n1", provider="aws")])
    assert text == "no healthy node from provider gcp (nodes are from: aws on n1)"


def test_explain_missing_gpu_type() -> None:
    nodes = [node("node-1", gpus={"A100-80GB": [0, 1]})]
    assert (
        explain_unplaceable(request(gpu="H100"), nodes)
        == "H100: no node has GPU H100 (nodes offer: A100-80GB x2 on node-1)"
    )


def test_explain_no_gpus_anywhere() -> None:
    text = explain_unplaceable(request(gpu="any"), [node("n1")])
    assert text == "any: no node has any GPU (nodes offer: no GPUs)"


def test_explain_too_few_gpus_on_any_node() -> None:
    nodes = [node("n1", gpus={"H100": [0, 1]})]
    text = explain_unplaceable(request(gpu="H100:4"), nodes)
    assert text == "H100:4: no node has 4 x GPU H100 (largest: H100 x2 on n1)"


def test_explain_gpus_busy() -> None:
    nodes = [node("n1", gpus={"H100": [0, 1]}, gpus_in_use={0})]
    text = explain_unplaceable(request(gpu="H100:2"), nodes)
    assert text == "H100:2: not enough GPU H100 free for 2 (n1 1 of 2 free)"


def test_explain_cpu_and_memory() -> None:
    nodes = [
        node("small", cpu=2, memory_mb=4096),
        node("smaller", cpu=4, memory_mb=4096, cpu_reserved=3),
    ]
    assert (
        explain_unplaceable(request(cpu=4, memory_mb=8192), nodes)
        == "needs 4.0 CPU and 8192 MiB; the largest free node has 2.0 CPU and 4096 MiB"
    )


def test_explain_cpu_only_counts_nodes_with_the_gpu() -> None:
    nodes = [
        node("cpu-box", cpu=64, memory_mb=262144),
        node("gpu-box", cpu=4, memory_mb=8192, cpu_reserved=3, gpus={"T4": [0]}),
    ]
    text = explain_unplaceable(request(cpu=2, memory_mb=1024, gpu="T4"), nodes)
    assert text == "T4: needs 2.0 CPU and 1024 MiB; the largest free node has 1.0 CPU and 8192 MiB"


def test_explain_lists_each_fallback() -> None:
    nodes = [node("n1", gpus={"T4": [0]})]
    text = explain_unplaceable(request(gpu=["H100", "A100-80GB:2"]), nodes)
    assert text == (
        "no GPU fallback fits: H100: no node has GPU H100 (nodes offer: T4 x1 on n1); "
        "A100-80GB:2: no node has GPU A100-80GB (nodes offer: T4 x1 on n1)"
    )


def test_explain_truncates_long_listings() -> None:
    nodes = [node(f"n{i}", gpus={"T4": [0]}) for i in range(8)]
    text = explain_unplaceable(request(gpu="H100"), nodes)
    assert text.endswith("T4 x1 on n4 and 3 more)")


def test_explain_a_placeable_request_says_where_it_fits() -> None:
    assert explain_unplaceable(request(), [node("n1")]) == "it fits on node n1"


def test_explain_agrees_with_place_on_unplaceable_requests() -> None:
    cases = [
        (request(gpu="H100"), [node("n", gpus={"T4": [0]})]),
        (request(cpu=100), [node("n")]),
        (request(region="eu"), [node("n")]),
    ]
    for req, nodes in cases:
        assert place(req, nodes) is None
        assert "fits" not in explain_unplaceable(req, nodes)
