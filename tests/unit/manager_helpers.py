"""What the call manager's unit tests share: a container whose channel records what it
is sent, in a real container registry, a manager over a real SQLite store, and a fleet
over both."""

from __future__ import annotations

import time
from pathlib import Path

import msgspec

from strato.protocol import messages as m
from strato.server.calls.manager import CallManager
from strato.server.containers import Container, ContainerRegistry, ContainerState
from strato.server.fleet import Fleet
from strato.server.scheduler import ContainerRequest, Placement
from strato.server.store import Store
from strato.server.store.blobs import BlobStore


class RecordingPeer:
    """A channel connection (a worker agent's or a container's) that records what it is
    sent."""

    def __init__(self) -> None:
        self.sent: list[object] = []
        self.closed = False

    def send(self, msg: object) -> None:
        self.sent.append(msg)

    def close(self) -> None:
        self.closed = True


def make_fleet(store: Store, calls: CallManager, registry: ContainerRegistry) -> Fleet:
    """A fleet over ``store`` and ``calls`` with no runtime: nodes register through
    ``worker_hello`` with a :class:`RecordingPeer`."""
    return Fleet(
        store,
        calls,
        registry,
        token="t",
        epoch="e",
        http_url="http://127.0.0.1:1",
        channel_address=lambda node_id: "unix:/nonexistent",
        runtime=None,
        on_change=lambda: None,
    )


class RecordingContainer(Container):
    """A ready container of ``function_id`` that records what it is sent."""

    def __init__(self, container_id: str, function_id: str = "fu-1") -> None:
        super().__init__(
            container_id,
            function_id,
            "ap-1",
            "node-1",
            ContainerRequest(cpu=1.0, memory_mb=128, gpu=[]),
            Placement("node-1", None, []),
            state=ContainerState.READY,
            idle_since=time.monotonic(),
        )
        self.sent: list[object] = []

    def send(self, msg: object) -> None:
        self.sent.append(msg)

    def inputs(self) -> list[m.TaskInput]:
        return [i for msg in self.sent if isinstance(msg, m.RunInputs) for i in msg.inputs]


def make_manager(
    store: Store,
    blobs_dir: Path,
    spec: m.FunctionSpec,
    killed: list[str] | None = None,
    containers: ContainerRegistry | None = None,
) -> CallManager:
    """A manager whose only function, ``fu-1`` of app ``ap-1``, has ``spec``."""
    store.create_app(
        "ap-1", "demo", "ephemeral", [("fu-1", "f", msgspec.msgpack.encode(spec))], None, False
    )
    return CallManager(
        store,
        BlobStore(blobs_dir),
        containers=containers if containers is not None else ContainerRegistry(),
        blob_threshold=1 << 20,
        max_payload=8 << 20,
        retention_s=3600,
        kill_container=lambda cid, why: (killed if killed is not None else []).append(cid),
        wake_scaler=lambda: None,
    )


def registry(mgr: CallManager) -> ContainerRegistry:
    """The registry the manager finds its containers in."""
    containers = mgr.ledger.containers
    assert isinstance(containers, ContainerRegistry)
    return containers


def attach(mgr: CallManager, cid: str = "ct-1") -> RecordingContainer:
    """A ready container of ``fu-1``, as the fleet registers it, handed its inputs."""
    c = RecordingContainer(cid, "fu-1")
    registry(mgr).add(c)
    mgr.on_ready("fu-1")
    return c


def die(mgr: CallManager, c: RecordingContainer, running: int, error: str, known: bool) -> None:
    """What the fleet does when a container's process dies."""
    c.state = ContainerState.GONE
    mgr.release_leases(c, running, "died", error, known=known)
    registry(mgr).remove(c)
