"""Which function serves a URL: routes by app and label, stable across deploys.

A deployed app named ``shop`` serves its endpoint labelled ``cart`` at
``/shop/cart/...`` (path-based) and at ``shop-cart.localhost`` (host-based). An ephemeral
app (``app.run()``, ``strato serve``) takes the suffix ``-dev`` (``/shop-dev/cart``), as
in Modal, so a test run never hijacks a deployed app's URLs; an unnamed one uses its
app id. App names become URL-safe: lowercased, other characters as ``-``.

Several live apps may claim one route name (a redeploy, a ``strato serve`` reload): the
newest serves it; when it stops, the one before serves again.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from strato.protocol import messages as m


def route_name(app_id: str, name: str | None, deployed: bool) -> str:
    if not name:
        return app_id
    slug = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-") or app_id
    return slug if deployed else f"{slug}-dev"


@dataclass(frozen=True)
class Route:
    app_id: str
    name: str  # the route name of the app
    label: str
    function_id: str
    requires_auth: bool


@dataclass
class AppRoutes:
    app_id: str
    name: str
    order: int
    labels: dict[str, Route] = field(default_factory=dict)


class RouteTable:
    def __init__(self) -> None:
        self._apps: dict[str, AppRoutes] = {}
        self._order = 0
        self._by_path: dict[tuple[str, str], Route] = {}
        self._by_host: dict[str, Route] = {}

    def add_app(
        self, app_id: str, name: str | None, deployed: bool, specs: list[tuple[str, m.FunctionSpec]]
    ) -> AppRoutes | None:
        """Register the web endpoints of an app ((function id, spec) pairs)."""
        rname = route_name(app_id, name, deployed)
        self._order += 1
        entry = AppRoutes(app_id, rname, self._order)
        for fid, spec in specs:
            if spec.web is None:
                continue
            entry.labels[spec.web.label] = Route(
                app_id, rname, spec.web.label, fid, spec.web.requires_auth
            )
        if not entry.labels:
            return None
        self._apps[app_id] = entry
        self._rebuild()
        return entry

    def remove_app(self, app_id: str) -> AppRoutes | None:
        entry = self._apps.pop(app_id, None)
        if entry is not None:
            self._rebuild()
        return entry

    def app(self, app_id: str) -> AppRoutes | None:
        return self._apps.get(app_id)

    def _rebuild(self) -> None:
        by_path: dict[tuple[str, str], Route] = {}
        for entry in sorted(self._apps.values(), key=lambda e: e.order):
            for label, route in entry.labels.items():
                by_path[(entry.name, label)] = route  # the newest app wins
        self._by_path = by_path
        self._by_host = {f"{n}-{label}": r for (n, label), r in by_path.items()}

    def current(self, name: str, label: str) -> Route | None:
        return self._by_path.get((name, label))

    def resolve_path(self, path: str) -> tuple[Route, int] | None:
        """(route, length of the ``/<app>/<label>`` prefix) for a request path."""
        if not path.startswith("/"):
            return None
        first = path.find("/", 1)
        if first < 0:
            return None
        second = path.find("/", first + 1)
        end = len(path) if second < 0 else second
        route = self._by_path.get((path[1:first], path[first + 1 : end]))
        return (route, end) if route is not None else None

    def resolve_host(self, host: str) -> Route | None:
        """The route of a host-based URL (``<app>-<label>.localhost[:port]``)."""
        sub, dot, _ = host.partition(".")
        return self._by_host.get(sub.lower()) if dot else None

    def routes(self) -> list[Route]:
        return list(self._by_path.values())
