"""The broker end to end: simulated providers start real worker agents (on this machine)
declaring their offers' GPUs, and functions that no local node can run are placed there.

One control plane for the module; each test writes the providers file (read again when
it changes) with its own providers, limits and faults. Needs the offers catalog
(``../shared/data/gpu-offers/offers.csv``, or ``STRATO_SIM_OFFERS``): skipped only where
it is absent.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from apps import broker_gpu as bg
from conftest import dedicated_server, live_containers, wait_until

from strato.client import session
from strato.protocol import messages as m
from strato.providers.catalog import offers_path

CATALOG = offers_path()
pytestmark = [
    pytest.mark.skipif(
        not CATALOG.is_file(), reason=f"the offers catalog {CATALOG} is absent (STRATO_SIM_OFFERS)"
    ),
    pytest.mark.slow,
]


def write(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    # a new mtime even within the file system's timestamp granularity
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))


def status() -> m.BrokerStatus:
    return session.api().call("GET", "/broker", None, m.BrokerStatus)


def held() -> list[m.InstanceInfo]:
    return [i for i in status().instances if i.state in ("provisioning", "running")]


def quiet(timeout: float = 60.0) -> None:
    """Wait until the broker holds nothing (its nodes idle past the keep-alive)."""
    wait_until(lambda: not held(), timeout, "the broker's nodes given back")


BASE = """
[broker]
max_nodes = {max_nodes}
budget_per_hour = {budget}
keep_alive_s = 1
cooldown_s = 600
[sim]
provisioning_delay_s = {delay}
"""


def config(providers: str, faults: str = "", max_nodes=4, budget=200.0, delay=0.3) -> str:
    return BASE.format(max_nodes=max_nodes, budget=budget, delay=delay) + providers + faults


@pytest.fixture(scope="module")
def broker_app(strato_server, tmp_path_factory):
    cfg = tmp_path_factory.mktemp("broker") / "providers.toml"
    write(cfg, config(""))
    env = {
        "STRATO_PROVIDERS_CONFIG": str(cfg),
        "STRATO_SIM_OFFERS": str(CATALOG),
        "STRATO_NODE_GPUS": "",  # the local node has no GPUs
    }
    with dedicated_server(env):
        with bg.app.run(quiet=True):
            yield cfg
    strato_server.activate()


def test_a_gpu_function_runs_on_a_bought_node(broker_app):
    write(broker_app, config("[providers.lambda]\n[providers.runpod]\n"))
    out = bg.on_h100.remote()
    assert out["devices"] == "0"
    [inst] = [i for i in status().instances if i.for_function and i.gpu == "H100"][:1]
    assert inst.provider in ("lambda", "runpod")
    nodes = session.api().call("GET", "/nodes", None, m.NodeList).nodes
    node = next(n for n in nodes if n.info.name == inst.node_name)
    assert node.info.gpus == {"H100": list(range(inst.gpu_count))}
    assert node.info.price_per_hour == pytest.approx(inst.price_per_hour, rel=1e-4)
    quiet()


def logs() -> list[str]:
    batch = session.api().call(
        "GET", f"/apps/{bg.app.app_id}/logs", None, m.LogBatch, params={"after": 0, "timeout": 0}
    )
    return [line.text for line in batch.lines]


def first_choice(providers: list[str], fn, blocked=frozenset()):
    """The option the broker picks first for ``fn`` (its pure decision code)."""
    from strato.protocol.gpu import parse_gpu
    from strato.providers.catalog import load_offers
    from strato.providers.traces import PreemptionModel, load_traces
    from strato.server.broker.decide import Demand, OfferIndex, choose
    from strato.server.scheduler import ContainerRequest

    spec = fn._spec if hasattr(fn, "_spec") else None
    index = OfferIndex(
        [o for o in load_offers(CATALOG) if o.provider in providers],
        PreemptionModel(load_traces()),
    )
    res = spec.resources
    req = ContainerRequest(res.cpu, res.memory_mb, parse_gpu(res.gpu), spec.region, spec.cloud)
    d = choose([Demand("f", req, 1, spec.nonpreemptible)], index, blocked=set(blocked))
    return d.choices[0].option


def test_out_of_capacity_fails_over_to_the_next_offer(broker_app):
    quiet()
    providers = ["lambda", "runpod", "nebius"]
    first = first_choice(providers, bg.on_h100)
    o = first.offer
    fault = (
        f'[[sim.faults]]\nkind = "out_of_capacity"\nprovider = "{o.provider}"\n'
        f'region = "{o.region}"\ngpu = "H100"\n'
    )
    write(broker_app, config("".join(f"[providers.{p}]\n" for p in providers), fault))
    before = status().failovers
    assert bg.on_h100.remote()["devices"] == "0"
    st = status()
    assert st.failovers == before + 1
    failed = [i for i in st.instances if i.state == "failed"]
    assert failed and failed[0].offer_id == o.offer_id and "out of capacity" in failed[0].reason
    ran = [i for i in st.instances if i.gpu == "H100" and i.state != "failed"][0]
    assert (ran.provider, ran.offer_id) != (o.provider, o.offer_id)
    assert any(b.startswith(f"{o.provider}/{o.region}/H100") for b in st.blocked)
    assert any("failed" in t and "trying the next offer" in t for t in logs())
    quiet()


def test_a_provisioning_error_fails_over_and_nonpreemptible_buys_on_demand(broker_app):
    providers = ["lambda", "runpod", "nebius", "shadeform"]
    first = first_choice(providers, bg.on_a100_on_demand)
    assert not first.spot
    o = first.offer
    fault = f'[[sim.faults]]\nkind = "error"\nprovider = "{o.provider}"\ngpu = "A100-80GB"\n'
    write(broker_app, config("".join(f"[providers.{p}]\n" for p in providers), fault))
    assert bg.on_a100_on_demand.remote()["devices"] == "0"
    st = status()
    bought = [i for i in st.instances if i.gpu == "A100-80GB"]
    assert any(i.state == "failed" and "provisioning error" in i.reason for i in bought)
    assert all(not i.spot for i in bought)
    assert any(i.state != "failed" and i.provider != o.provider for i in bought)
    quiet()


def test_slow_provisioning_is_waited_for(broker_app):
    # timing: the fault adds 3 s; the check 1 s in only needs the instance not yet running
    fault = '[[sim.faults]]\nkind = "slow"\ndelay_s = 3\ngpu = "H100"\n'
    write(broker_app, config("[providers.lambda]\n", fault))
    call = bg.on_h100.spawn()
    wait_until(lambda: [i for i in held() if i.state == "provisioning"], 30, "provisioning")
    time.sleep(1.0)
    assert [i for i in held() if i.state == "provisioning"]
    assert call.get(timeout=60)["devices"] == "0"
    assert any("provisioning lambda/" in t for t in logs())
    quiet()


def test_a_preempted_spot_node_gives_its_input_back(broker_app, tmp_path):
    first = first_choice(["aws"], bg.on_aws_v100)
    assert first.spot  # a V100 on AWS spot is far cheaper, preemptions counted in
    marker = str(tmp_path / "marker")
    fault = f'[[sim.faults]]\nkind = "preempt"\nprovider = "aws"\nwhen_file = "{marker}.cue"\n'
    write(broker_app, config("[providers.aws]\n", fault + "times = 1\n"))
    before = status().preemptions
    out = bg.on_aws_v100.remote(marker, 120.0)
    assert out["first"] is False  # the first run was on the preempted node; not run twice
    st = status()
    assert st.preemptions == before + 1
    assert any(i.state == "preempted" for i in st.instances)
    assert any("preempted" in t for t in logs())
    quiet()


def test_nonpreemptible_work_never_lands_on_a_spot_node(broker_app, tmp_path):
    write(broker_app, config("[providers.aws]\n").replace("keep_alive_s = 1", "keep_alive_s = 60"))
    assert bg.on_aws_v100.remote(str(tmp_path / "m"), 0.0)["devices"] == "0"
    spot = [i for i in held() if i.gpu == "V100" and i.spot]
    assert spot  # still held (keep-alive), its GPU free once the container scaled down
    wait_until(lambda: not live_containers(bg.app.app_id), 30, "the spot container gone")
    bg.on_aws_v100_on_demand.remote()
    mine = [i for i in status().instances if i.for_function and i.gpu == "V100" and not i.spot]
    assert mine and all(i.state in ("provisioning", "running") for i in mine)
    listing = session.api().call(
        "GET", "/containers", None, m.ContainerList, params={"app": bg.app.app_id}
    )
    ran = {c.node_id for c in listing.containers if c.function_name == "on_aws_v100_on_demand"}
    assert ran and ran <= {i.node_id for i in mine}  # never on the spot node
    write(broker_app, config("[providers.aws]\n"))
    quiet()


def test_preemptions_never_count_as_the_inputs_failure(broker_app, tmp_path):
    # an input lost with 3 nodes counts a failed attempt (an input that kills its agent
    # must not loop forever), but not when the provider took the nodes back
    runs = str(tmp_path / "runs")
    fault = f'[[sim.faults]]\nkind = "preempt"\nprovider = "aws"\nwhen_file = "{runs}.cue"\n'
    write(broker_app, config("[providers.aws]\n", fault + "times = 3\n"))
    before = status().preemptions
    assert bg.preempted_often.remote(runs, 4) == 4
    assert status().preemptions == before + 3
    quiet()


def test_preemptions_replayed_from_a_trace(broker_app, tmp_path):
    # us-west-2b of AWS3 is available 90% of the time; 2 samples (10 trace minutes) a second
    fault = (
        '[[sim.faults]]\nkind = "preempt"\nprovider = "aws"\n'
        'trace = "AWS3/us-west-2b_v100_1.json"\ntrace_speed = 600\n'
    )
    write(broker_app, config("[providers.aws]\n", fault))
    before = status().preemptions
    out = bg.on_aws_v100.remote(str(tmp_path / "marker"), 300.0)
    assert out["first"] is False
    assert status().preemptions > before
    write(broker_app, config("[providers.aws]\n"))
    quiet()


def test_limits_make_work_wait_and_say_why(broker_app):
    write(broker_app, config("[providers.lambda]\n", max_nodes=0))
    call = bg.on_h100.spawn()
    wait_until(lambda: any("max_nodes is reached" in t for t in logs()), 30, "max_nodes told")
    assert not held()
    write(broker_app, config("[providers.lambda]\n", budget=0.05))
    wait_until(lambda: any("budget per hour is spent" in t for t in logs()), 30, "budget told")
    assert not held()
    write(broker_app, config("[providers.lambda]\n"))
    assert call.get(timeout=60)["devices"] == "0"
    quiet()


def test_gpu_fallbacks_in_order_within_the_region(broker_app):
    write(broker_app, config("[providers.aws]\n"))  # aws lists no B200: the L4 fallback
    assert bg.fallback_l4.remote()["devices"] == "0"
    mine = [i for i in status().instances if i.for_function and i.gpu == "L4"]
    assert mine and mine[0].provider == "aws" and mine[0].region.startswith("us-")


def test_a_warm_pool_gets_a_node_without_a_call(broker_app):
    from apps import broker_warm

    write(broker_app, config("[providers.aws]\n"))
    with broker_warm.app.run(quiet=True):

        def bought() -> list[m.InstanceInfo]:
            return [i for i in held() if i.gpu == "L4" and i.state == "running"]

        wait_until(bought, 60, "a node bought for the warm pool")
        assert broker_warm.warm.remote() == "0"
    quiet()  # the app stopped: its container ended, the node is given back


def test_idle_nodes_are_given_back(broker_app):
    quiet()
    bought = {i.node_name for i in status().instances}

    def left() -> list[str]:
        nodes = session.api().call("GET", "/nodes", None, m.NodeList).nodes
        return [f"{n.info.name} ({n.state})" for n in nodes if n.info.name in bought]

    # their agents stop at once; the fleet then forgets their nodes (also one whose agent
    # registered after its instance had ended, as a preempted one still starting can)
    try:
        wait_until(lambda: not left(), 30, "the given-back nodes forgotten")
    except AssertionError as e:
        raise AssertionError(f"{e}: still in the fleet: {left()}") from None
    assert any(i.reason == "idle past the keep-alive" for i in status().instances)


def test_usage_totals_agree_with_container_lifetimes(broker_app):
    import sqlite3

    quiet()
    write(broker_app, config("[providers.lambda]\n"))
    for _ in range(2):
        bg.on_h100.remote()
    quiet()  # every container ended (its node was given back after)
    report = session.api().call(
        "GET", "/usage", None, m.UsageReport, params={"by": "function", "app": bg.app.app_id}
    )
    home = Path(os.environ["STRATO_HOME"])
    db = sqlite3.connect(home / "state.db")
    lifetimes = db.execute(
        "SELECT container_id, stopped_at - started_at FROM containers WHERE app_id = ?",
        (bg.app.app_id,),
    ).fetchall()
    db.close()
    assert report.total.containers == len(lifetimes)
    # each container's row is written beside its record, a few ms apart at most
    assert report.total.seconds == pytest.approx(sum(s for _, s in lifetimes), abs=0.2)
    h100 = next(r for r in report.rows if r.key.endswith("/on_h100"))
    assert h100.gpu_s == pytest.approx(h100.seconds)  # one GPU each
    by_provider = session.api().call(
        "GET", "/usage", None, m.UsageReport, params={"by": "provider", "app": bg.app.app_id}
    )
    assert {r.key for r in by_provider.rows} >= {"lambda"}
    assert by_provider.total.cost == pytest.approx(report.total.cost)
    assert by_provider.total.cost > 0


def test_buffer_containers_and_a_gpu_web_endpoint_buy_nodes(broker_app, tmp_path):
    import httpx
    from apps import broker_demand as bd

    quiet()  # no bought node is left for these to use
    write(broker_app, config("[providers.aws]\n", max_nodes=6))
    with bd.app.run(quiet=True):
        # a web endpoint's request (no input is queued: the gateway holds it) buys a node
        r = httpx.get(bd.gpu_web.get_web_url(), timeout=httpx.Timeout(90.0), follow_redirects=True)
        assert r.status_code == 200, r.text
        assert r.json() == {"devices": "0"}
        assert any(i.for_function and i.gpu == "L4" for i in status().instances)
        quiet()

        # one call running, nothing queued, one L4 node held; then buffer_containers=1:
        # the autoscaler wants one more container and no node can take it
        marker = tmp_path / "running"
        call = bd.buffered.spawn(str(marker), 60.0)
        wait_until(marker.exists, 90, "the call running on a bought node")

        def l4() -> list[m.InstanceInfo]:
            return [i for i in held() if i.gpu == "L4"]

        wait_until(lambda: len(l4()) == 1, 30, "one L4 node held (an extra one given back)")
        bd.buffered.update_autoscaler(buffer_containers=1)
        wait_until(
            lambda: len([c for c in containers_of(bd.app.app_id) if c.state == "ready"]) >= 2,
            90,
            "a second container (the buffer) on a node bought for it",
        )
        assert len(l4()) == 2
        on_l4 = {i.node_id for i in l4()}
        assert {c.node_id for c in containers_of(bd.app.app_id)} <= on_l4
        assert call.get(timeout=90) == "0"
    quiet()


def test_a_node_far_dearer_than_what_is_sold_now_is_cordoned_then_given_back(broker_app, tmp_path):
    quiet()
    # spot off: the V100 is bought on demand (~8x AWS's spot price)
    write(broker_app, config("[providers.aws]\n").replace("[broker]\n", "[broker]\nspot = false\n"))
    call = bg.on_aws_v100.spawn(str(tmp_path / "m"), 20.0)

    def on_demand() -> list[m.InstanceInfo]:
        return [i for i in held() if i.gpu == "V100" and not i.spot and i.node_id]

    [node] = wait_until(on_demand, 60, "an on-demand V100 node running")
    wait_until(
        lambda: any(c.node_id == node.node_id for c in containers_of(bg.app.app_id)),
        60,
        "the call's container on it",
    )
    before = status().moves
    write(broker_app, config("[providers.aws]\n"))  # spot is sold again: far cheaper
    wait_until(lambda: status().moves > before, 30, "the dear node cordoned")
    detail = session.api().call("GET", f"/cluster/nodes/{node.node_id}", None, m.NodeDetail)
    assert detail.state == "cordoned"
    assert any("costs more than" in t for t in logs())
    assert call.get(timeout=90)["first"] is True  # its input finished there
    wait_until(
        lambda: any(
            i.instance_id == node.instance_id and i.reason == "idle past the keep-alive"
            for i in status().instances
        ),
        60,
        "the cordoned node given back once idle",
    )
    quiet()


def containers_of(app_id: str) -> list[m.ContainerInfo]:
    listing = session.api().call(
        "GET", "/containers", None, m.ContainerList, params={"app": app_id}
    )
    return [c for c in listing.containers if c.state in ("starting", "ready")]
