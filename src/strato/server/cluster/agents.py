"""The control plane's listener for worker agents on other machines.

``STRATO_AGENT_PORT`` opens it (on ``STRATO_HOST``; by default, when the API listens
beyond loopback, on the API's port + 2). With ``STRATO_TLS_CERT`` and ``STRATO_TLS_KEY``
it speaks TLS. An agent's first frame is a ``WorkerHello`` whose token is a join token
(``join_tokens.py``): anything else, or a wrong token, closes the connection. Its node is
of provider ``joined`` (``ray`` for the Ray provider's token) whatever it claims
(``joined_hello``). After that the connection is the node's: its agent's messages (as a
local agent's) and the relay of its containers' channel connections (``relay.py``). Its
welcome carries the node's credential (``node_credentials.py``), never the API token; a
node whose join token is revoked loses its credential and its connection within a second.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from strato import settings
from strato.exceptions import InvalidError
from strato.protocol import frames
from strato.protocol import messages as m

from ..fleet_nodes import Peer
from .join_tokens import RAY_PROVIDER_TOKEN, JoinToken, JoinTokens
from .node_credentials import NodeCredentials

if TYPE_CHECKING:
    from ..control import ControlPlane

log = logging.getLogger("strato.cluster")

HELLO_TIMEOUT_S = 10.0
REVOCATION_CHECK_S = 1.0


class AgentPeer(Peer):
    """A joined agent's connection: closing it aborts at once (a node cut off must not
    keep the control plane flushing into a dead link)."""

    def close(self) -> None:
        transport = self.writer.transport
        if not transport.is_closing():
            transport.abort()


def api_tls_options(cert: Path | None, key: Path | None) -> dict[str, Any]:
    """uvicorn's options for the HTTP API: HTTPS with ``STRATO_TLS_CERT`` and
    ``STRATO_TLS_KEY`` (the agent listener's certificate), plain HTTP without. A file that
    cannot be read or a key that does not match stops the start, naming the variable."""
    if cert is None:
        return {}
    try:
        server_ssl(cert, key)
    except (OSError, ssl.SSLError) as e:
        raise InvalidError(
            f"cannot use STRATO_TLS_CERT={cert} with STRATO_TLS_KEY={key or cert}: {e}"
        ) from None
    return {"ssl_certfile": str(cert), "ssl_keyfile": str(key or cert)}


def server_ssl(cert: Path | None, key: Path | None) -> ssl.SSLContext | None:
    if cert is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(cert), str(key) if key is not None else None)
    return ctx


def joined_hello(hello: m.WorkerHello, token: JoinToken) -> m.WorkerHello:
    """``hello`` as a node that joined with ``token``: its provider is ``joined`` (``ray``
    for the Ray provider's agents), whatever it claimed, so that an agent can never speak
    as this machine's own node or a bought one (a node's id derives from its provider)."""
    provider = "joined"
    if hello.node.provider == "ray" and token.name == RAY_PROVIDER_TOKEN:
        provider = "ray"
    if hello.node.provider == provider:
        return hello
    return msgspec.structs.replace(
        hello, node=msgspec.structs.replace(hello.node, provider=provider)
    )


class AgentListener:
    def __init__(self, cp: ControlPlane, host: str, port: int, tls: ssl.SSLContext | None):
        self.cp = cp
        self.host = host
        self.port = port
        self.tls = tls
        self.tokens = JoinTokens(cp.config.home)
        self.credentials = NodeCredentials(self.tokens)
        self.server: asyncio.AbstractServer | None = None
        self.peers: set[AgentPeer] = set()

    async def start(self) -> int:
        self.server = await asyncio.start_server(
            self._on_agent, self.host, self.port, ssl=self.tls, limit=1 << 20, backlog=256
        )
        self.port = self.server.sockets[0].getsockname()[1]
        self.cp.spawn_loop(self._watch_revocations(), "join-token-revocations")
        log.info(
            "listening for worker agents on %s:%d (%s)",
            self.host,
            self.port,
            "TLS" if self.tls else "plain TCP: set STRATO_TLS_CERT and STRATO_TLS_KEY",
        )
        return self.port

    async def _watch_revocations(self) -> None:
        """Cut off the agents whose join token was revoked (their credentials are)."""
        while True:
            await asyncio.sleep(REVOCATION_CHECK_S)
            for node_id in self.credentials.revoked_join_tokens():
                node = self.cp.fleet.nodes.get(node_id)
                log.warning("node %s: its join token was revoked; its agent is cut off", node_id)
                if node is not None and node.peer is not None:
                    node.peer.close()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for p in list(self.peers):
            p.close()

    async def _on_agent(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        peer = AgentPeer(writer)
        where = writer.get_extra_info("peername")
        try:
            first = await asyncio.wait_for(
                frames.read_frame(reader, frames.HELLO_MAX_FRAME), HELLO_TIMEOUT_S
            )
            if not isinstance(first, m.WorkerHello):
                log.warning("agent listener: %s sent no worker hello; closed", where)
                return
            token = self.tokens.find(first.token)
            if token is None:
                log.warning("agent listener: %s showed an unknown join token; closed", where)
                return
            hello = joined_hello(first, token)
            log.info("agent %s (%s) joined with join token %s", first.node.name, where, token.id)
            self.peers.add(peer)
            await self.cp.agent_session(hello, peer, reader, token.id)
        except frames.FrameError as e:
            log.warning("agent listener: dropped %s before its hello: %s", where, e)
        except (TimeoutError, ConnectionError, ssl.SSLError) as e:
            log.debug("agent connection from %s closed: %s", where, e)
        finally:
            self.peers.discard(peer)
            peer.close()


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def is_loopback(host: str) -> bool:
    return host in LOOPBACK or host.startswith("127.")


def agent_listener(cp: ControlPlane) -> AgentListener | None:
    """The listener ``STRATO_AGENT_PORT`` asks for (see the module's doc), or None."""
    port = settings.AGENT_PORT.get()
    host = cp.config.host
    if port is None:
        if is_loopback(host):
            return None
        port = cp.config.port + 2 if cp.config.port else 0
    cert = settings.TLS_CERT.get()
    tls = server_ssl(cert, settings.TLS_KEY.get())
    if tls is None and not is_loopback(host):
        log.warning(
            "worker agents join on %s:%s over plain TCP: the join token and the node "
            "credentials handed to agents travel unencrypted; set STRATO_TLS_CERT and "
            "STRATO_TLS_KEY",
            host,
            port,
        )
    return AgentListener(cp, host, port, tls)


MIN_EXPOSED_TOKEN = 16  # characters of API token a control plane beyond loopback needs


def check_exposure(host: str, token: str) -> list[str]:
    """What a control plane listening on ``host`` must have: beyond loopback, a real API
    token (raises ``InvalidError`` without one, so that it never starts exposed); returns
    the warnings to log (plain HTTP and plain agent TCP, without a certificate)."""
    if is_loopback(host):
        return []
    if len(token.strip()) < MIN_EXPOSED_TOKEN:
        raise InvalidError(
            f"refusing to listen on {host} (beyond loopback) without an API token of at "
            f"least {MIN_EXPOSED_TOKEN} characters: unset STRATO_TOKEN (one is made in "
            "$STRATO_HOME/token) or set it to a long random secret"
        )
    if settings.TLS_CERT.get() is not None:
        return []  # HTTPS and TLS for agents (api_tls_options, agent_listener)
    return [
        f"the API listens on {host} over plain HTTP: its token travels unencrypted; set "
        "STRATO_TLS_CERT and STRATO_TLS_KEY (HTTPS), put it behind a TLS-terminating proxy "
        "or keep it on a private network",
        "worker agents join over plain TCP: set STRATO_TLS_CERT and STRATO_TLS_KEY "
        "(and give agents --tls-ca)",
    ]
