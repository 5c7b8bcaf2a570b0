"""Control-plane configuration, from the environment (``STRATO_*``)."""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from strato import settings

DEFAULT_PORT = settings.PORT.default
# a container's frames are kept from 4 MiB (values come in 1 MiB chunks plus a cut error
# text) to what a 32-bit length prefix can say
MIN_FRAME, MAX_FRAME = 4 << 20, (1 << 32) - 1


@dataclass
class ServerConfig:
    home: Path
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    database_url: str = ""
    blob_threshold: int = settings.BLOB_THRESHOLD.default  # over it: to the blob store
    max_payload: int = settings.MAX_PAYLOAD.default  # payloads over this are refused
    output_retention_s: float = settings.OUTPUT_RETENTION.default
    runtime: str | None = None
    start_local_worker: bool = True
    ephemeral_app_timeout_s: float = 60.0  # an app.run() whose client went silent is stopped
    # the largest channel frame a container may send (0: the default; values over 1 MiB
    # come in chunks); a frame over it drops the container before any of it is read
    max_frame: int = 0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> ServerConfig:
        """The configuration the ``STRATO_*`` variables give (``strato.settings``);
        ``overrides`` replace fields after that."""
        cfg = cls(
            home=settings.HOME.get(env),
            host=settings.HOST.get(env),
            port=settings.PORT.get(env),
            database_url=settings.DATABASE_URL.get(env),
            blob_threshold=settings.BLOB_THRESHOLD.get(env),
            max_payload=settings.MAX_PAYLOAD.get(env),
            output_retention_s=settings.OUTPUT_RETENTION.get(env),
            runtime=settings.RUNTIME.get(env) or None,
            start_local_worker=settings.LOCAL_WORKER.get(env),
            max_frame=settings.MAX_FRAME.get(env),
        )
        for k, v in overrides.items():
            setattr(cfg, k, v)
        if cfg.max_frame > 0:
            cfg.max_frame = max(MIN_FRAME, min(cfg.max_frame, MAX_FRAME))
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
        given = settings.TOKEN.get()
        if given and not given.startswith("st_"):  # (a workspace token is a client's)
            return given
        path = self.home / "token"
        if path.exists():
            return path.read_text().strip()
        token = secrets.token_urlsafe(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        return token
