"""The providers' catalog, traces and configuration file."""

from __future__ import annotations

import textwrap

import pytest

from strato.exceptions import InvalidError
from strato.providers.base import Capabilities, Provider
from strato.providers.catalog import PROVIDERS, gpu_type, load_offers, offers_path
from strato.providers.config import Fault, load_config
from strato.providers.sim import SimProvider
from strato.providers.traces import PreemptionModel, Trace, load_traces

CATALOG = offers_path()
needs_catalog = pytest.mark.skipif(
    not CATALOG.is_file(), reason=f"the offers catalog {CATALOG} is absent (STRATO_SIM_OFFERS)"
)


def test_gpu_names():
    assert gpu_type("A100") == "A100-40GB"
    assert gpu_type("H100-SXM") == "H100"
    assert gpu_type("RTX4090") == "RTX-4090"
    assert gpu_type("l40s") == "L40S"
    assert gpu_type("MI300X") == "MI300X"  # kept as listed
    assert gpu_type("") is None


@needs_catalog
def test_the_catalog_has_13_providers_with_prices():
    offers = load_offers(CATALOG)
    assert {o.provider for o in offers} == set(PROVIDERS)
    assert all(o.price is not None or o.spot_price is not None for o in offers)
    assert all(o.cpu > 0 and o.memory_gib > 0 for o in offers)


@needs_catalog
def test_gcp_gpu_vms_are_host_plus_accelerator():
    offers = load_offers(CATALOG)
    a2 = [
        o
        for o in offers
        if o.provider == "gcp" and o.instance_type == "a2-highgpu-1g" and o.zone == "us-central1-a"
    ]
    assert len(a2) == 1
    # host 0.73948 + accelerator A100 x1 2.93391 (offers.csv)
    assert a2[0].gpu == "A100-40GB" and a2[0].price == pytest.approx(0.73948 + 2.93391)
    assert not [
        o for o in offers if o.provider == "gcp" and o.instance_type.startswith("a2-") and not o.gpu
    ]


@needs_catalog
def test_primeintellect_spot_types_are_spot():
    spot = [o for o in load_offers(CATALOG) if o.instance_type.endswith("__SPOT")]
    assert spot and all(o.price is None and o.spot_price for o in spot)


@needs_catalog
def test_one_sim_provider_per_catalog_provider(tmp_path):
    offers = load_offers(CATALOG)
    for name in PROVIDERS:
        p = SimProvider(
            name,
            offers,
            home=tmp_path,
            channel="unix:/nowhere",
            token="t",
            on_change=lambda ev: None,
        )
        assert isinstance(p, Provider)
        assert p.offers() and all(o.provider == name for o in p.offers())
        assert isinstance(p.capabilities, Capabilities) and p.capabilities.provisions
    aws = SimProvider(
        "aws",
        offers,
        home=tmp_path,
        channel="unix:/x",
        token="t",
        on_change=print,
        regions=["us-east-1"],
    )
    assert aws.capabilities.spot and aws.capabilities.regions == ("us-east-1",)


def test_trace_rates():
    t = Trace("aws", "V100", "us-east-1a", 3600.0, (2, 2, 1, 1, 0, 2))
    # drops: 2->1 and 1->0: 2 preemptions over 8 instance-hours held
    assert t.preemptions_per_hour() == pytest.approx(2 / 8)
    assert t.region == "us-east-1" and t.available(3600 * 4) == 0 and t.available(3600 * 6) == 2
    model = PreemptionModel([t])
    assert model.rate("aws", "V100", "us-east-1") == pytest.approx(0.25)
    assert model.rate("lambda", "H100", "x") == model.default


def test_the_shared_traces_load():
    traces = load_traces()
    if not traces:
        pytest.skip("the spot availability traces are absent (STRATO_SIM_TRACES)")
    assert {t.folder for t in traces} == {"AWS1", "AWS2", "AWS3", "GCP1"}
    assert len(traces) == 21


def test_config_file(tmp_path):
    p = tmp_path / "providers.toml"
    p.write_text(
        textwrap.dedent(
            """
            [broker]
            max_nodes = 3
            budget_per_hour = 12.5
            [providers.aws]
            regions = ["us-east-1"]
            max_nodes = 2
            credentials = { key = "secret" }
            [providers.lambda]
            enabled = false
            [[sim.faults]]
            kind = "out_of_capacity"
            provider = "aws"
            region = "us-east-1"
            times = 1
            """
        )
    )
    cfg = load_config(p)
    assert cfg is not None and cfg.max_nodes == 3 and cfg.budget_per_hour == 12.5
    assert cfg.enabled == ["aws"] and cfg.providers["aws"].max_nodes == 2
    assert "secret" not in repr(cfg.providers["aws"])  # credentials never shown
    [f] = cfg.faults
    assert f.matches("aws", "us-east-1", "V100") and not f.matches("aws", "us-east-2", "V100")
    assert f.take() and not f.take()
    assert load_config(tmp_path / "absent.toml") is None


@pytest.mark.parametrize(
    "text, says",
    [
        ("[providers.nosuch]\n", "unknown provider"),
        ('[providers.aws]\nkind = "real"\n', "only 'sim'"),
        ("[broker]\nmax_nodes = -1\n", "max_nodes"),
        ('[[sim.faults]]\nkind = "meteor"\n', "fault kind"),
        ('[[sim.faults]]\nkind = "slow"\nwhen = 1\n', "unknown fault keys"),
        ("[broker\n", "not a valid TOML"),
    ],
)
def test_bad_config_files_say_what_to_fix(tmp_path, text, says):
    p = tmp_path / "providers.toml"
    p.write_text(text)
    with pytest.raises(InvalidError, match=says):
        load_config(p)


def test_fault_matching_defaults_to_everything():
    f = Fault("error")
    assert f.matches("runpod", "CA", None) and f.take() and f.take()


def test_local_is_a_provider_with_one_fixed_node(tmp_path):
    from strato.providers.base import ProvisionError
    from strato.providers.local import LocalProvider

    local = LocalProvider(tmp_path, "unix:/nowhere", "t")
    assert isinstance(local, Provider)
    assert not local.capabilities.provisions and local.offers() == []
    with pytest.raises(ProvisionError):
        local.provision(load_offers(CATALOG)[0] if CATALOG.is_file() else None, spot=False)  # type: ignore[arg-type]


@needs_catalog
def test_preemption_faults_by_time_and_by_cue_file(tmp_path):
    """``after_s`` takes a spot instance back that long after it runs; ``when_file`` once
    the file exists (and removes it), however long the instance has run."""
    from strato.providers.base import Instance, InstanceState

    offers = [o for o in load_offers(CATALOG) if o.provider == "aws" and o.spot_price]
    cue = tmp_path / "cue"
    faults = [
        Fault("preempt", provider="aws", after_s=10.0, times=1),
        Fault("preempt", provider="aws", when_file=str(cue), times=1),
    ]
    p = SimProvider(
        "aws", offers, home=tmp_path, channel="unix:/x", token="t",
        on_change=lambda ev: None, faults=lambda: faults,
    )  # fmt: skip

    def running(at: float) -> Instance:
        inst = Instance("i-" + str(len(p._instances)), offers[0], spot=True)
        inst.state, inst.running_at = InstanceState.RUNNING, at
        p._instances[inst.instance_id] = inst
        return inst

    a = running(100.0)
    p.check(105.0)  # 5 s: neither fault is due
    assert a.state == InstanceState.RUNNING
    cue.touch()
    p.check(106.0)  # the cue: taken back at once, the cue consumed
    assert a.state == InstanceState.PREEMPTED and not cue.exists()
    b = running(200.0)
    p.check(211.0)  # 11 s after it ran: the timed fault
    assert b.state == InstanceState.PREEMPTED
    c = running(300.0)
    cue.touch()
    p.check(400.0)  # both faults used up
    assert c.state == InstanceState.RUNNING and cue.exists()
