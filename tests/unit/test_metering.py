"""Metering arithmetic: a container's lifetime clipped to the window, times what it
reserved; cost from its node's price and its dominant share of the node."""

from __future__ import annotations

import pytest

from strato.server.metering import UsageRecord, account, dominant_share
from strato.server.scheduler import NodeView


def rec(
    cid,
    app="ap-1",
    fn="f",
    provider="aws",
    gpu=None,
    n=0,
    cpu=1.0,
    mem=1024,
    price=0.0,
    share=1.0,
    start=0.0,
    end=None,
):
    return UsageRecord(
        cid, app, "fu-" + fn, fn, provider, gpu, n, cpu, mem, price, share, start, end
    )


def test_one_container_whole_window():
    r = account(
        [rec("a", gpu="H100", n=2, cpu=4, mem=2048, price=7.2, start=100, end=400)],
        "app",
        0.0,
        1000.0,
    )
    t = r.total
    assert (t.containers, t.seconds) == (1, 300.0)
    assert t.cpu_s == 1200.0 and t.memory_gib_s == 600.0 and t.gpu_s == 600.0
    assert t.cost == pytest.approx(7.2 * 300 / 3600)


def test_clipped_to_the_window_and_running_ones_count_to_now():
    rows = [rec("a", start=0, end=100), rec("b", start=50, end=None)]
    r = account(rows, "app", 60.0, 160.0)
    # a: 60..100 = 40 s; b: 60..160 = 100 s
    assert r.total.seconds == pytest.approx(140.0)


def test_grouping_and_totals_agree():
    rows = [
        rec("a", app="x", provider="aws", gpu="V100", n=1, price=3.0, start=0, end=3600),
        rec(
            "b",
            app="x",
            provider="lambda",
            gpu="H100",
            n=1,
            price=2.0,
            share=0.5,
            start=0,
            end=1800,
        ),
        rec("c", app="y", provider="local", start=0, end=60),
    ]
    for by in ("app", "function", "provider", "gpu"):
        r = account(rows, by, 0.0, 10_000.0)
        assert sum(g.seconds for g in r.rows) == pytest.approx(r.total.seconds)
        assert sum(g.cost for g in r.rows) == pytest.approx(r.total.cost)
    r = account(rows, "provider", 0.0, 10_000.0)
    costs = {g.key: g.cost for g in r.rows}
    assert costs == pytest.approx({"aws": 3.0, "lambda": 0.5, "local": 0.0})
    gpu = {g.key: g.gpu_s for g in account(rows, "gpu", 0.0, 10_000.0).rows}
    assert gpu == {"V100": 3600.0, "H100": 1800.0, "none": 0.0}


def test_dominant_share():
    node = NodeView("n", "aws", "us-east-1", 8.0, 16.0, 65536, {"H100": [0, 1, 2, 3]})
    assert dominant_share(1.0, 1024, 1, node) == 0.25  # a quarter of the GPUs
    assert dominant_share(8.0, 1024, 1, node) == 0.5  # half the CPUs
    assert dominant_share(32.0, 1024, 0, node) == 1.0  # never more than the node
    cpu_node = NodeView("c", "local", None, 0.0, 4.0, 4096, {})
    assert dominant_share(1.0, 2048, 0, cpu_node) == 0.5


# --------------------------------------------------------------------------- durable rows


@pytest.fixture
def store(db_url):
    from strato.server.store import Store

    s = Store(db_url)
    yield s
    s.close()


def _container(cid: str, gpus: list[int]):
    from strato.protocol.gpu import GpuRequest
    from strato.server.containers import Container
    from strato.server.scheduler import ContainerRequest, Placement

    req = ContainerRequest(2.0, 4096, [GpuRequest("H100", len(gpus))] if gpus else [])
    return Container(cid, "fu-1", "ap-1", "node-1", req, Placement("node-1", "H100", gpus))


def test_rows_are_durable_and_closed_after_a_crash(store):
    from strato.server.metering import Meter

    node = NodeView("node-1", "lambda", "us-west-1", 4.0, 8.0, 65536, {"H100": [0, 1]})
    meter = Meter(store)
    meter.started(_container("ct-a", [0]), node, "train")
    meter.started(_container("ct-b", [1]), node, "train")
    meter.ended("ct-a")
    store.flush()
    [a] = [r for r in meter.records(0.0) if r.container_id == "ct-a"]
    assert a.ended_at is not None and a.share == 0.5 and a.node_price_per_hour == 4.0
    assert a.gpu_type == "H100" and a.gpu_count == 1 and a.provider == "lambda"
    # a crash: ct-b never ended; the next run closes it at its last seen_at
    assert Meter(store).recover() == 1
    rows = {r.container_id: r for r in meter.records(0.0)}
    assert rows["ct-b"].ended_at is not None
    report = meter.report("function", 0.0)
    assert report.total.containers == 2 and report.rows[0].key == "ap-1/train"
