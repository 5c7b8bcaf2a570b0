"""Gateway settings, from the environment (``STRATO_GATEWAY_*``, ``STRATO_WEB_*``)."""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from strato.exceptions import InvalidError

from ..listeners import ListenerLimits, fd_budget

DEFAULT_HTTP_LIMIT_S = 150.0  # Modal's: a request still unanswered then gets a 303
DEFAULT_MAX_BODY = 4 << 30  # request bodies stream through; over this they get a 413
DEFAULT_WAIT_S = 120.0  # a request waits this long for a container, then gets a 503
DEFAULT_MAX_WAITING = 2000  # requests waiting per endpoint; more get a 503 at once
DEFAULT_RESULT_TTL_S = 600.0  # a 303's result stays fetchable this long
DEFAULT_RESULT_MAX_BYTES = 64 << 20  # largest result kept for a 303
DEFAULT_DRAIN_S = 600.0  # longest a replaced version may keep serving its requests
TOKEN_HEADER = b"strato-token"


def _num(env, name: str, default: float) -> float:
    raw = env.get(name)
    if raw in (None, ""):
        return default
    try:
        return float(raw)
    except ValueError:
        raise InvalidError(f"{name}={raw!r} is not a number") from None


@dataclass
class GatewayConfig:
    host: str = "127.0.0.1"
    port: int = 0  # 0: the control plane's port + 1, else any free port
    port_explicit: bool = False  # STRATO_GATEWAY_PORT was given: fail if it is taken
    enabled: bool = True
    public_url: str | None = None  # the base URL printed and returned by get_web_url()
    http_limit_s: float = DEFAULT_HTTP_LIMIT_S
    max_body: int = DEFAULT_MAX_BODY
    wait_timeout_s: float = DEFAULT_WAIT_S
    max_waiting: int = DEFAULT_MAX_WAITING
    result_ttl_s: float = DEFAULT_RESULT_TTL_S
    result_max_bytes: int = DEFAULT_RESULT_MAX_BYTES
    drain_timeout_s: float = DEFAULT_DRAIN_S
    token: str = ""  # the web token that requires_auth endpoints ask for
    limits: ListenerLimits = ListenerLimits(max_connections=10000)  # listeners.py

    @classmethod
    def from_env(cls, home: Path, host: str, server_port: int, env=None) -> GatewayConfig:
        env = os.environ if env is None else env
        raw_port = env.get("STRATO_GATEWAY_PORT", "")
        explicit = raw_port not in ("", None)
        port = int(_num(env, "STRATO_GATEWAY_PORT", 0)) if explicit else server_port + 1
        cfg = cls(
            host=env.get("STRATO_GATEWAY_HOST", host),
            port=port,
            port_explicit=explicit,
            enabled=port >= 0,
            public_url=(env.get("STRATO_GATEWAY_URL") or "").rstrip("/") or None,
            http_limit_s=_num(env, "STRATO_WEB_HTTP_LIMIT", DEFAULT_HTTP_LIMIT_S),
            max_body=int(_num(env, "STRATO_WEB_MAX_BODY", DEFAULT_MAX_BODY)),
            wait_timeout_s=_num(env, "STRATO_WEB_WAIT_TIMEOUT", DEFAULT_WAIT_S),
            max_waiting=int(_num(env, "STRATO_WEB_MAX_WAITING", DEFAULT_MAX_WAITING)),
            result_ttl_s=_num(env, "STRATO_WEB_RESULT_TTL", DEFAULT_RESULT_TTL_S),
            result_max_bytes=int(_num(env, "STRATO_WEB_RESULT_MAX", DEFAULT_RESULT_MAX_BYTES)),
            drain_timeout_s=_num(env, "STRATO_WEB_DRAIN_TIMEOUT", DEFAULT_DRAIN_S),
            limits=ListenerLimits.from_env(fd_budget(env).gateway, env),
        )
        cfg.token = env.get("STRATO_WEB_TOKEN") or load_or_create_web_token(home)
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
