"""What the call manager's unit tests share: a recording stand-in for a container's
channel session, and a manager over a real SQLite store."""

from __future__ import annotations

import time
from pathlib import Path

import msgspec

from strato.protocol import messages as m
from strato.server.calls.manager import CallManager, Lease
from strato.server.store import Store
from strato.server.store.blobs import BlobStore


class RecordingContainer:
    """Implements what the manager needs of a container session; records what it sends."""

    def __init__(self, container_id: str, function_id: str = "fu-1") -> None:
        self.container_id = container_id
        self.function_id = function_id
        self.state = "ready"
        self.inflight: dict[int, Lease] = {}
        self.last_progress = time.monotonic()
        self.idle_since: float | None = time.monotonic()
        self.sent: list[object] = []

    def send(self, msg: object) -> None:
        self.sent.append(msg)

    def inputs(self) -> list[m.TaskInput]:
        return [i for msg in self.sent if isinstance(msg, m.RunInputs) for i in msg.inputs]


def make_manager(
    store: Store, blobs_dir: Path, spec: m.FunctionSpec, killed: list[str] | None = None
) -> CallManager:
    """A manager whose only function, ``fu-1`` of app ``ap-1``, has ``spec``."""
    store.create_app(
        "ap-1", "demo", "ephemeral", [("fu-1", "f", msgspec.msgpack.encode(spec))], None, False
    )
    return CallManager(
        store,
        BlobStore(blobs_dir),
        blob_threshold=1 << 20,
        max_payload=8 << 20,
        retention_s=3600,
        kill_container=lambda cid, why: (killed if killed is not None else []).append(cid),
        wake_scaler=lambda: None,
    )
