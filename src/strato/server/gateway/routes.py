"""Which function serves a URL: routes by app and label, stable across deploys.

A deployed app named ``shop`` serves its endpoint labelled ``cart`` at
``/shop/cart/...`` (path-based) and at ``shop-cart.localhost`` (host-based). An ephemeral
app (``app.run()``, ``strato serve``) takes the suffix ``-dev`` (``/shop-dev/cart``), as
in Modal, so a test run never hijacks a deployed app's URLs; an unnamed one uses its
app id. App names become URL-safe: lowercased, other characters as ``-``.

Sandbox tunnels (``sb.tunnels()``) have host names of their own,
``<sandbox-id>-<port>.tunnel.<domain>`` (``tunnel_host``): a host whose second label is
``tunnel`` is never an endpoint's, whose host names have one label before the domain.

Route names are unique across apps (``conflict``): a new app whose route name another
live app of another name uses (``WEB`` and ``web``; ``shop-dev`` and the ephemeral
``shop``), or one of whose host names another app's endpoint has (app ``shop-cart`` label
``api`` and app ``shop`` label ``cart-api`` are both ``shop-cart-api.localhost``), is
refused when it is created. Only versions of one app (same name, deployed or not) share
routes: a redeploy, a ``strato serve`` reload. Among them the newest serves; when it
stops, the one before serves again.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from strato.protocol import messages as m


def web_name(workspace: str, name: str | None) -> str | None:
    """The name an app's URLs use: its own in the default workspace, else
    ``<workspace>--<name>`` (as Modal's), so that apps of one name in two workspaces never
    share a URL (a default-workspace app that takes such a name meets the conflict check)."""
    if not name or workspace == "main":
        return name
    return f"{workspace}--{name}"


TUNNEL_LABEL = "tunnel"
_TUNNEL_DOT = TUNNEL_LABEL + "."


def tunnel_host(host: str) -> tuple[str, int] | None:
    """(sandbox id, port) of a sandbox tunnel's host name (``<sandbox-id>-<port>.tunnel.``
    then any domain and port; ``("", 0)`` for a malformed one), or None for a host that
    is not a tunnel's."""
    sub, _, rest = host.partition(".")
    if rest[: len(_TUNNEL_DOT)].lower() != _TUNNEL_DOT:
        return None
    sandbox_id, _, port = sub.lower().rpartition("-")
    if not sandbox_id or not (port.isascii() and port.isdigit()) or not 0 < int(port[:6]) < 65536:
        return "", 0
    return sandbox_id, int(port)


def tunnel_hostname(sandbox_id: str, port: int, domain: str) -> str:
    return f"{sandbox_id}-{port}.{TUNNEL_LABEL}.{domain}"


def route_name(app_id: str, name: str | None, deployed: bool) -> str:
    if not name:
        return app_id
    slug = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-") or app_id
    return slug if deployed else f"{slug}-dev"


@dataclass(frozen=True)
class RouteConflict:
    other_app: str  # the other app's name
    other_app_id: str
    what: str  # the URL the two would share, in words


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
    name: str  # the route name
    order: int
    labels: dict[str, Route] = field(default_factory=dict)
    app_name: str | None = None  # the app's own name: versions of one app share routes


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
        entry = AppRoutes(app_id, rname, self._order, app_name=name)
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

    def conflict(self, name: str | None, deployed: bool, labels: list[str]) -> RouteConflict | None:
        """Whether an app ``name`` with endpoints ``labels`` would shadow a route of
        another live app (case-insensitive; an unnamed app routes by its unique id)."""
        if not name or not labels:
            return None
        rname = route_name("", name, deployed)
        if not rname or rname == "-dev":  # nothing URL-safe in the name: it routes by id
            return None
        hosts = {f"{rname}-{label}".lower(): label for label in labels}
        for entry in self._apps.values():
            if entry.name == rname and entry.app_name == name:
                continue  # another version of the same app
            if entry.name.lower() == rname.lower():
                return RouteConflict(
                    entry.app_name or entry.app_id,
                    entry.app_id,
                    f"/{rname}/... (app {name!r} routes as {rname!r}, as app "
                    f"{entry.app_name or entry.app_id!r} does)",
                )
            for label in entry.labels:
                host = f"{entry.name}-{label}".lower()
                if host in hosts:
                    return RouteConflict(
                        entry.app_name or entry.app_id,
                        entry.app_id,
                        f"{host}.localhost (label {hosts[host]!r} of app {name!r}, and label "
                        f"{label!r} of app {entry.app_name or entry.app_id!r})",
                    )
        return None

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
