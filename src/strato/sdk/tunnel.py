"""``Tunnel``: how a port of a sandbox is reached from outside (``sb.tunnels()``), as in
Modal: ``url`` (through the web gateway's own port, HTTP and WebSockets), ``host``/``port``
(a listener of the port's own: TLS where the control plane has a certificate, for
``encrypted_ports``) and, for ``unencrypted_ports``, ``unencrypted_host``/``unencrypted_port``
(plain TCP)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from strato import exceptions as exc
from strato.protocol import messages as m


@dataclass(frozen=True)
class Tunnel:
    host: str
    port: int
    unencrypted_host: str | None = None
    unencrypted_port: int | None = None
    tls: bool = False
    """Whether ``host:port`` speaks TLS (``encrypted_ports`` where the control plane has
    ``STRATO_TLS_CERT``); else it is plain TCP as well."""
    gateway_url: str = ""
    """The port through the web gateway (``http://<sandbox-id>-<port>.tunnel.localhost:
    <gateway port>``); empty where the control plane runs no gateway."""

    @property
    def url(self) -> str:
        """The port's URL: through the web gateway (HTTP, WebSockets), else the port's
        own listener. Anyone with the URL may connect, as in Modal."""
        if self.gateway_url:
            return self.gateway_url
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{self.host}:{self.port}"

    @property
    def tls_socket(self) -> tuple[str, int]:
        return self.host, self.port

    @property
    def tcp_socket(self) -> tuple[str, int]:
        if self.unencrypted_host is None or self.unencrypted_port is None:
            raise exc.InvalidError(
                "this tunnel has no plain TCP socket: give the port in unencrypted_ports"
            )
        return self.unencrypted_host, self.unencrypted_port

    @staticmethod
    def from_info(info: m.TunnelInfo) -> Tunnel:
        if info.unencrypted:
            return Tunnel(
                info.host, info.tunnel_port, info.host, info.tunnel_port, info.tls, info.url
            )
        return Tunnel(info.host, info.tunnel_port, tls=info.tls, gateway_url=info.url)


def check_ports(name: str, ports: Iterable[object] | None) -> list[int]:
    """The ports of ``encrypted_ports``/``unencrypted_ports``, each checked."""
    out: list[int] = []
    for p in ports or ():
        if isinstance(p, bool) or not isinstance(p, int) or not 1 <= p <= 65535:
            raise exc.InvalidError(f"{name}: port {p!r} is out of range: give ports 1 to 65535")
        out.append(p)
    return out
