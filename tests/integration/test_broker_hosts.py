"""Joined machines behind the broker's ``Provider`` interface, end to end: a worker agent
that joined with a join token (over TCP on this machine) is the ``hosts`` provider's node
and, while it holds no container, its offer at the price it declared; ``strato provider
list`` and ``strato provider offers`` show them."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from cluster_nodes import one_joined_node

from strato.cli.main import main
from strato.client import session
from strato.protocol import messages as m

pytestmark = pytest.mark.slow


def test_a_joined_host_is_listed_with_its_offer_at_its_declared_price():
    env = {"STRATO_NODE_PRICE_PER_HOUR": "0.75", "STRATO_NODE_GPUS": "L4:1"}
    with one_joined_node("broker-hosts-box", env=env):
        st = session.api().call("GET", "/broker", None, m.BrokerStatus)
        hosts = next(p for p in st.providers if p.name == "hosts")
        assert (hosts.kind, hosts.nodes, hosts.offers, hosts.spot) == ("hosts", 1, 1, False)
        [offer] = [o for o in st.offers if o.provider == "hosts"]
        assert (offer.instance_type, offer.gpu, offer.gpu_count) == ("broker-hosts-box", "L4", 1)
        assert offer.price_per_hour == pytest.approx(0.75)
        assert not st.instances  # nothing was bought

        listed = CliRunner().invoke(main, ["provider", "list"])
        assert listed.exit_code == 0, listed.output
        row = next(line for line in listed.output.splitlines() if line.startswith("hosts"))
        assert row.split()[:3] == ["hosts", "yes", "hosts"] and row.split()[-1] == "1"

        offers = CliRunner().invoke(main, ["provider", "offers", "--provider", "hosts"])
        assert offers.exit_code == 0, offers.output
        [line] = [ln for ln in offers.output.splitlines() if "hosts/broker-hosts-box/" in ln]
        assert line.split()[:2] == ["0.750", "L4x1"]
