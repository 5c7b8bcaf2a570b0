"""Control-plane configuration, from the environment (``STRATO_*``)."""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from strato.client.config import strato_home
from strato.exceptions import InvalidError

DEFAULT_PORT = 7749


def _num(env, name: str, default: float) -> float:
    raw = env.get(name)
    if raw in (None, ""):
        return default
    try:
        return float(raw)
    except ValueError:
        raise InvalidError(f"{name}={raw!r} is not a number") from None


@dataclass
class ServerConfig:
    home: Path
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    database_url: str = ""
    blob_threshold: int = 1 << 20  # payloads over this go to the blob store
    max_payload: int = 256 << 20  # payloads over this are refused
    output_retention_s: float = 7 * 24 * 3600
    runtime: str | None = None
    start_local_worker: bool = True
    ephemeral_app_timeout_s: float = 60.0  # an app.run() whose client went silent is stopped
    # the largest channel frame a container may send (0: 16 MiB; values over 1 MiB come
    # in chunks); a frame over it drops the container before any of it is read (issue 14)
    max_frame: int = 0

    @classmethod
    def from_env(cls, env: dict | None = None, **overrides) -> ServerConfig:
        env = os.environ if env is None else env
        home = strato_home(env)
        cfg = cls(
            home=home,
            host=env.get("STRATO_HOST", "127.0.0.1"),
            port=int(_num(env, "STRATO_PORT", DEFAULT_PORT)),
            database_url=env.get("STRATO_DATABASE_URL", ""),
            blob_threshold=int(_num(env, "STRATO_BLOB_THRESHOLD", 1 << 20)),
            max_payload=int(_num(env, "STRATO_MAX_PAYLOAD", 256 << 20)),
            output_retention_s=_num(env, "STRATO_OUTPUT_RETENTION", 7 * 24 * 3600),
            runtime=env.get("STRATO_RUNTIME") or None,
            start_local_worker=env.get("STRATO_LOCAL_WORKER", "1") != "0",
            max_frame=int(_num(env, "STRATO_MAX_FRAME", 0)),
        )
        for k, v in overrides.items():
            setattr(cfg, k, v)
        if cfg.max_frame > 0:
            cfg.max_frame = max(4 << 20, min(cfg.max_frame, (1 << 32) - 1))
        if not cfg.database_url:
            cfg.database_url = f"sqlite:///{cfg.home / 'state.db'}"
        return cfg

    @property
    def channel_socket(self) -> Path:
        return self.home / "run" / "channel.sock"

    def ensure_dirs(self) -> None:
        for sub in ("", "run", "blobs", "logs", "worker"):
            (self.home / sub).mkdir(parents=True, exist_ok=True)

    def load_or_create_token(self) -> str:
        """The API token: ``STRATO_TOKEN`` or ``$STRATO_HOME/token``, created on first start."""
        if os.environ.get("STRATO_TOKEN"):
            return os.environ["STRATO_TOKEN"]
        path = self.home / "token"
        if path.exists():
            return path.read_text().strip()
        token = secrets.token_urlsafe(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        return token
