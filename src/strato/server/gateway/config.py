"""Gateway settings, from the environment (``STRATO_GATEWAY_*``, ``STRATO_WEB_*``; each is
declared, with its default and meaning, in :mod:`strato.settings`)."""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from strato import settings

from ..listeners import ListenerLimits, fd_budget

TOKEN_HEADER = b"strato-token"


@dataclass
class GatewayConfig:
    host: str = "127.0.0.1"
    port: int = 0  # 0: the control plane's port + 1, else any free port
    port_explicit: bool = False  # STRATO_GATEWAY_PORT was given: fail if it is taken
    enabled: bool = True
    public_url: str | None = None  # the base URL printed and returned by get_web_url()
    http_limit_s: float = settings.WEB_HTTP_LIMIT.default
    max_body: int = settings.WEB_MAX_BODY.default
    wait_timeout_s: float = settings.WEB_WAIT_TIMEOUT.default
    max_waiting: int = settings.WEB_MAX_WAITING.default
    result_ttl_s: float = settings.WEB_RESULT_TTL.default
    result_max_bytes: int = settings.WEB_RESULT_MAX.default
    drain_timeout_s: float = settings.WEB_DRAIN_TIMEOUT.default
    token: str = ""  # the web token that requires_auth endpoints ask for
    limits: ListenerLimits = ListenerLimits(max_connections=10000)  # listeners.py

    @classmethod
    def from_env(
        cls, home: Path, host: str, server_port: int, env: Mapping[str, str] | None = None
    ) -> GatewayConfig:
        env = os.environ if env is None else env
        given_port = settings.GATEWAY_PORT.get(env)
        port = server_port + 1 if given_port is None else given_port
        cfg = cls(
            host=settings.GATEWAY_HOST.get(env) or host,
            port=port,
            port_explicit=given_port is not None,
            enabled=port >= 0,
            public_url=settings.GATEWAY_URL.get(env).rstrip("/") or None,
            http_limit_s=settings.WEB_HTTP_LIMIT.get(env),
            max_body=settings.WEB_MAX_BODY.get(env),
            wait_timeout_s=settings.WEB_WAIT_TIMEOUT.get(env),
            max_waiting=settings.WEB_MAX_WAITING.get(env),
            result_ttl_s=settings.WEB_RESULT_TTL.get(env),
            result_max_bytes=settings.WEB_RESULT_MAX.get(env),
            drain_timeout_s=settings.WEB_DRAIN_TIMEOUT.get(env),
            limits=ListenerLimits.from_env(fd_budget(env).gateway, env),
        )
        cfg.token = settings.WEB_TOKEN.get(env) or load_or_create_web_token(home)
        return cfg


def web_token_path(home: Path) -> Path:
    return home / "web_token"


def load_or_create_web_token(home: Path) -> str:
    """The token ``requires_auth`` endpoints ask for (``Strato-Token: <token>``):
    ``STRATO_WEB_TOKEN`` or ``$STRATO_HOME/web_token``, created on first start. It is not
    the API token: handing it to an endpoint's callers gives them no power over strato."""
    path = web_token_path(home)
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    token = "wt-" + secrets.token_urlsafe(24)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token
