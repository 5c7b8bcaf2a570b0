"""The host names of sandbox tunnels through the web gateway (``routes.tunnel_host``,
``Gateway.tunnel_url``): parsed strictly, never taken for a web endpoint's."""

from __future__ import annotations

import pytest
from proxy_harness import Harness

from strato.server.gateway.routes import tunnel_host


@pytest.mark.parametrize(
    ("host", "want"),
    [
        ("sb-0123abcd-8000.tunnel.localhost:8001", ("sb-0123abcd", 8000)),
        ("SB-0123ABCD-80.TUNNEL.localhost", ("sb-0123abcd", 80)),
        ("sb-1-65535.tunnel.gw.example.com", ("sb-1", 65535)),
        # in the tunnels' names but malformed: a 404, never an endpoint's route
        ("sb-0123abcd.tunnel.localhost", ("", 0)),
        ("sb-0123abcd-0.tunnel.localhost", ("", 0)),
        ("sb-0123abcd-65536.tunnel.localhost", ("", 0)),
        ("sb-0123abcd-８０.tunnel.localhost", ("", 0)),  # (digits, but not ASCII ones)
        ("-80.tunnel.localhost", ("", 0)),
        # not a tunnel's
        ("shop-cart.localhost:8001", None),
        ("tunnel.localhost", None),
        ("sb-1-80.tunnels.localhost", None),
        ("127.0.0.1:8001", None),
        ("localhost", None),
    ],
)
def test_tunnel_host(host, want):
    assert tunnel_host(host) == want


@pytest.mark.parametrize(
    ("gateway_url", "want"),
    [
        ("http://127.0.0.1:8001", "http://sb-1-8000.tunnel.localhost:8001"),
        ("http://[::1]:8001", "http://sb-1-8000.tunnel.localhost:8001"),
        ("http://localhost:8001", "http://sb-1-8000.tunnel.localhost:8001"),
        ("https://gw.example.com", "https://sb-1-8000.tunnel.gw.example.com"),
        ("", None),  # the gateway is off
    ],
)
def test_tunnel_url(gateway_url, want):
    gw = Harness().gw
    gw.url = gateway_url
    assert gw.tunnel_url("sb-1", 8000) == want
    if want is not None:
        assert tunnel_host(want.split("://")[1]) == ("sb-1", 8000)
