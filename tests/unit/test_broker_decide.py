"""The broker's pure decisions over synthetic offers: cost model, feasibility, fallbacks,
packing, failover blocks, limits."""

from __future__ import annotations

import pytest

from strato.protocol.gpu import GpuRequest
from strato.providers.base import Offer
from strato.providers.traces import PreemptionModel, Trace
from strato.server.broker.decide import Demand, OfferIndex, block_key, choose
from strato.server.scheduler import ContainerRequest


def offer(provider, gpu, n, price, spot=None, region="us-east-1", cpu=8, mem=64, itype=None):
    return Offer(provider, itype or f"{gpu}x{n}", gpu, n, cpu, mem, price, spot, region)


def req(gpu=None, count=1, cpu=1.0, mem=1024, region=None, cloud=None, fallbacks=None):
    gpus = fallbacks or ([GpuRequest(gpu, count)] if gpu else [])
    return ContainerRequest(cpu, mem, gpus, region, cloud)


OFFERS = [
    offer("aws", "H100", 1, 4.0, spot=1.0),
    offer("lambda", "H100", 1, 2.5, region="us-west-1"),
    offer("runpod", "H100", 8, 16.0, region="CA"),  # 2.0 per GPU, packed
    offer("gcp", "L4", 1, 0.7, spot=0.2, region="europe-west4"),
    offer("aws", "L4", 1, 0.8, region="us-east-1"),
    offer("aws", None, 0, 0.1, cpu=2, mem=8),
]


def one(decision):
    [c] = decision.choices
    return c


def test_cheapest_expected_cost_counts_spot_preemptions():
    idx = OfferIndex(OFFERS, None)  # no preemptions: aws spot at 1.0 wins
    assert one(choose([Demand("f", req("H100"), 1)], idx)).option.spot
    # 10 preemptions an hour, each losing 0.25 h: spot costs 1.0 * 3.5 > lambda's 2.5
    trace = Trace("aws", "H100", "us-east-1a", 360, (1, 0) * 5)  # 5 drops in 0.5 h held
    many = PreemptionModel([trace], default=10.0)
    c = one(choose([Demand("f", req("H100"), 1)], OfferIndex(OFFERS, many)))
    assert (c.option.offer.provider, c.option.spot) == ("lambda", False)


def test_nonpreemptible_buys_on_demand_only():
    idx = OfferIndex(OFFERS, None)
    c = one(choose([Demand("f", req("H100"), 1, nonpreemptible=True)], idx))
    assert not c.option.spot and c.option.offer.provider == "lambda"


def test_packing_several_containers_on_one_node_where_cheaper():
    idx = OfferIndex([o for o in OFFERS if o.provider != "aws"], None)
    d = choose([Demand("f", req("H100"), 8)], idx)
    assert [(c.option.offer.provider, c.containers) for c in d.choices] == [("runpod", 8)]
    # one container: the 1-GPU node is cheaper than a whole 8-GPU one
    assert one(choose([Demand("f", req("H100"), 1)], idx)).option.offer.provider == "lambda"


def test_packing_respects_cpu_and_memory():
    idx = OfferIndex([offer("runpod", "H100", 8, 16.0, cpu=8, mem=64)], None)
    d = choose([Demand("f", req("H100", cpu=4, mem=1024), 8)], idx)
    assert [c.containers for c in d.choices] == [2, 2, 2, 2]  # 8 CPUs hold two


def test_region_and_cloud():
    idx = OfferIndex(OFFERS, None)
    assert (
        one(choose([Demand("f", req("H100", region="us-west"), 1)], idx)).option.offer.provider
        == "lambda"
    )
    c = one(choose([Demand("f", req("L4", cloud="aws"), 1)], idx))
    assert c.option.offer.provider == "aws"
    d = choose([Demand("f", req("L4", region="asia"), 1)], idx)
    assert d.infeasible["f"] and not d.choices


def test_gpu_fallbacks_in_order():
    idx = OfferIndex(OFFERS, None)
    fb = [GpuRequest("B200", 1), GpuRequest("H100", 1), GpuRequest("L4", 1)]
    # no B200 anywhere: H100 (the second), though L4 is cheaper
    assert one(choose([Demand("f", req(fallbacks=fb), 1)], idx)).option.offer.gpu == "H100"


def test_cpu_only_work_buys_cpu_offers():
    c = one(choose([Demand("f", req(cpu=1), 1)], OfferIndex(OFFERS, None)))
    assert c.option.offer.gpu is None


def test_a_blocked_place_is_skipped_and_the_next_chosen():
    idx = OfferIndex(OFFERS, None)
    first = one(choose([Demand("f", req("H100"), 1)], idx)).option
    blocked = {block_key(first.offer)}
    nxt = one(choose([Demand("f", req("H100"), 1)], idx, blocked=blocked)).option
    assert block_key(nxt.offer) != block_key(first.offer)
    everything = {block_key(o) for o in OFFERS}
    d = choose([Demand("f", req("H100"), 1)], idx, blocked=everything)
    assert "failed recently" in d.waits["f"]


def test_max_nodes_and_budget():
    idx = OfferIndex(OFFERS, None)
    d = choose([Demand("f", req("L4"), 3)], idx, nodes_left=2)
    assert len(d.choices) == 2 and "max_nodes" in d.waits["f"]
    d = choose([Demand("f", req("H100"), 1)], idx, budget_left=0.5)
    assert not d.choices and "budget" in d.waits["f"]
    d = choose([Demand("f", req("L4"), 3)], idx, budget_left=0.5)  # 0.2 spot each: two fit
    assert len(d.choices) == 2 and "budget" in d.waits["f"]


def test_providers_filter():
    idx = OfferIndex(OFFERS, None)
    c = one(choose([Demand("f", req("H100"), 1)], idx, providers={"lambda"}))
    assert c.option.offer.provider == "lambda"


@pytest.mark.parametrize("n", [1, 2, 9, 17])
def test_every_container_is_placed_once(n):
    idx = OfferIndex(OFFERS, None)
    d = choose([Demand("f", req("H100"), n)], idx)
    assert sum(c.containers for c in d.choices) == n


def test_cheaper_option_moves_a_node_bought_dear_only_past_the_margin():
    from strato.server.broker.decide import cheaper_option

    idx = OfferIndex(OFFERS, None)
    held = next(op for op in idx.buckets["H100"] if op.offer.provider == "aws" and not op.spot)
    d = Demand("f", req("H100"), 1)
    # aws on demand at 4.0 while aws spot sells at 1.0: moved there
    better = cheaper_option(held, d, idx, margin=0.02)
    assert better is not None and (better.offer.provider, better.spot) == ("aws", True)
    # while aws H100 is out of capacity, lambda at 2.5 is the best: 4.0 is still dearer
    blocked = {block_key(held.offer)}
    assert cheaper_option(held, d, idx, margin=0.02, blocked=blocked).offer.provider == "lambda"
    # a node within the margin of the best stays
    lam = next(op for op in idx.buckets["H100"] if op.offer.provider == "lambda")
    assert cheaper_option(lam, d, idx, margin=0.02, blocked=blocked) is None
    assert cheaper_option(lam, d, idx, margin=2.0) is None  # 2.5 vs 1.0: within 200%
    # 8 containers on runpod's 8-GPU node (2.0 each) vs aws spot at 1.0 each
    runpod = next(op for op in idx.buckets["H100"] if op.offer.provider == "runpod")
    assert cheaper_option(runpod, Demand("f", req("H100"), 8), idx, margin=0.5) is not None
    assert cheaper_option(runpod, Demand("f", req("H100"), 8), idx, margin=1.5) is None
