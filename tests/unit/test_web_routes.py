"""Web routes unique across apps (``RouteTable.conflict``) and the listeners' open-file
budget (``listeners.fd_budget``), without a server."""

from __future__ import annotations

import resource

import pytest

from strato.protocol import messages as m
from strato.server.gateway.routes import RouteTable
from strato.server.listeners import RESERVE_MIN, fd_budget


def spec(name: str, label: str) -> m.FunctionSpec:
    return m.FunctionSpec(name=name, module="x", qualname=name, web=m.WebConfig("asgi", label))


def table(*apps: tuple[str, str | None, bool, list[str]]) -> RouteTable:
    t = RouteTable()
    for app_id, name, deployed, labels in apps:
        t.add_app(app_id, name, deployed, [(f"fu-{app_id}-{x}", spec(x, x)) for x in labels])
    return t


@pytest.mark.parametrize(
    ("existing", "new", "clash"),
    [
        # host names: shop-cart-api.localhost both
        (("ap-1", "shop", True, ["cart-api"]), ("shop-cart", True, ["api"]), "shop"),
        (("ap-1", "shop-cart", True, ["api"]), ("shop", True, ["cart-api"]), "shop-cart"),
        # the same route name from another app name (case, punctuation)
        (("ap-1", "web", True, ["home"]), ("WEB", True, ["other"]), "web"),
        (("ap-1", "my_app", True, ["x"]), ("my-app", True, ["y"]), "my_app"),
        # the -dev suffix of ephemeral apps counts, both ways
        (("ap-1", "shop", False, ["x"]), ("shop-dev", True, ["y"]), "shop"),
        (("ap-1", "shop-dev", True, ["x"]), ("shop", False, ["y"]), "shop-dev"),
        # no clash: the same app redeploying or reloading, another name, no endpoints
        (("ap-1", "shop", True, ["x"]), ("shop", True, ["x", "y"]), None),
        (("ap-1", "shop", False, ["x"]), ("shop", False, ["x"]), None),
        (("ap-1", "shop", True, ["x"]), ("shop", False, ["x"]), None),
        (("ap-1", "shop", True, ["x"]), ("shops", True, ["x"]), None),
        (("ap-1", "shop", True, ["x"]), ("shop-cart", True, []), None),
        (("ap-1", "shop", True, ["x"]), (None, False, ["x"]), None),
    ],
)
def test_route_conflicts(existing, new, clash):
    got = table(existing).conflict(*new)
    assert (got.other_app if got else None) == clash


def test_fd_budget_splits_the_limit_and_leaves_a_reserve():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        b = fd_budget({"STRATO_MAX_OPEN_FILES": "1200"})
        assert b.limit == 1200 == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        assert (b.gateway, b.api, b.channel) == (472, 188, 283)
        assert b.gateway + b.api + b.channel + max(RESERVE_MIN, b.limit // 10) <= b.limit
        b = fd_budget({"STRATO_MAX_OPEN_FILES": "1200", "STRATO_API_MAX_CONNECTIONS": "50"})
        assert b.api == 50
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
