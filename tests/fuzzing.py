"""What the API fuzz tests share: a control plane without a worker agent (the fuzz creates
apps with arbitrary specs, and none of them should start containers on this machine), and
msgpack bodies whose integers fit msgpack's range."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import msgspec
from conftest import ServerHandle, free_port, restore_env

from strato.client.config import start_server


def fit(value):
    """msgpack carries ints from -2^63 to 2^64-1: clamp bigger ones to those ends."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return max(-(1 << 63), min(value, (1 << 64) - 1))
    if isinstance(value, list):
        return [fit(v) for v in value]
    if isinstance(value, dict):
        return {fit(k): fit(v) for k, v in value.items()}
    return value


def msgpack_body(ctx, value) -> bytes:
    """schemathesis's serializer for ``application/msgpack`` (register it with
    ``schemathesis.serializer("application/msgpack")(msgpack_body)``)."""
    return msgspec.msgpack.encode(fit(value))


@contextlib.contextmanager
def agentless_control_plane(prefix: str) -> Iterator[ServerHandle]:
    """A control plane in a fresh home with ``STRATO_LOCAL_WORKER=0``; stopped and its
    home removed afterwards (also when it failed to start)."""
    home = Path(tempfile.mkdtemp(prefix=prefix))
    port = free_port()
    handle = ServerHandle(home, f"http://127.0.0.1:{port}", port)
    (home / "logs").mkdir(parents=True, exist_ok=True)
    saved = {k: os.environ.get(k) for k in ("STRATO_LOCAL_WORKER", "STRATO_TOKEN")}
    os.environ["STRATO_LOCAL_WORKER"] = "0"
    os.environ.pop("STRATO_TOKEN", None)
    try:
        try:
            start_server(handle.url, home, None, 60.0)
        finally:
            restore_env(saved)
        yield handle
    finally:
        try:
            handle.stop()
        finally:
            shutil.rmtree(home, ignore_errors=True)
