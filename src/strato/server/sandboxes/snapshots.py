"""``sb.snapshot_filesystem()``: a sandbox's files as a new image.

The sandbox's agent first flushes its writes (a ``sync`` file operation: under gVisor the
sentry may hold them), then the sandbox's node tars the container's writable layer and
uploads it as a blob (``SbSnapshot`` -> ``SbSnapshotDone``, ``worker/snapshots.py``). The
image is the sandbox's image plus one ``SnapshotLayer`` step naming that blob, so it is
content-addressed like any image (the same files, the same image id) and is built into the
node's image cache like any other step when a sandbox or a function first uses it.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import TYPE_CHECKING

from sqlalchemy import Connection, insert, select

from strato import exceptions as exc
from strato.protocol import images
from strato.protocol import messages as m

from ..store.tables_sandboxes import snapshot_layers

if TYPE_CHECKING:
    from .manager import Sandbox, Sandboxes

SNAPSHOT_TIMEOUT_S = 600.0  # tar and upload of the writable layer


class Snapshots:
    def __init__(self, sandboxes: Sandboxes) -> None:
        self.sandboxes = sandboxes
        self._ids = itertools.count(1)
        # req id -> (node id, container id, the answer's future)
        self.pending: dict[int, tuple[str, str, asyncio.Future[m.SbSnapshotDone]]] = {}

    async def take(self, sb: Sandbox) -> m.SnapshotImage:
        if sb.ended:
            raise exc.SandboxTerminatedError(
                f"sandbox {sb.sandbox_id} has ended ({sb.status}: {sb.reason}): a snapshot "
                "needs a running sandbox"
            )
        base = sb.spec.image
        if base is None or sb.runtime == "process":
            raise exc.InvalidError(
                f"sandbox {sb.sandbox_id} runs without an image (on the host's files): "
                "snapshot_filesystem() needs one made with Sandbox.create(image=...) under "
                "the bwrap or gvisor runtime"
            )
        await self.sandboxes.file(sb, m.FileRequest(op="sync", path="/"))  # flush its writes
        s = sb.container
        node = self.sandboxes.fleet.nodes.get(s.node_id) if s is not None else None
        if s is None or node is None or node.peer is None:
            raise exc.SandboxTerminatedError(f"sandbox {sb.sandbox_id}: its node is gone")
        req_id = next(self._ids)
        fut: asyncio.Future[m.SbSnapshotDone] = asyncio.get_running_loop().create_future()
        self.pending[req_id] = (s.node_id, s.container_id, fut)
        node.peer.send(m.SbSnapshot(s.container_id, req_id))
        try:
            done = await asyncio.wait_for(fut, SNAPSHOT_TIMEOUT_S)
        except TimeoutError:
            raise exc.SandboxTimeoutError(
                f"sandbox {sb.sandbox_id}: its node did not take the snapshot in "
                f"{SNAPSHOT_TIMEOUT_S:g}s"
            ) from None
        finally:
            self.pending.pop(req_id, None)
        if done.error:
            raise exc.ExecutionError(f"snapshot of sandbox {sb.sandbox_id} failed: {done.error}")
        if not self.sandboxes.cp.blobs.has(done.sha256):
            raise exc.ExecutionError(
                f"snapshot of sandbox {sb.sandbox_id}: its node did not upload the layer"
            )
        await self._record(done)
        layer = images.SnapshotLayer(sha256=done.sha256, size=done.size)
        spec = images.ImageSpec([*base.steps, layer])
        return m.SnapshotImage(spec, images.image_id(spec))

    async def _record(self, done: m.SbSnapshotDone) -> None:
        """Record the layer (before the client gets its image): the blob collector keeps
        every recorded layer, as the image may be used at any time later."""
        layers = snapshot_layers.c

        def run(c: Connection) -> None:
            known = select(layers.sha256).where(layers.sha256 == done.sha256)
            if c.execute(known).first() is None:
                c.execute(
                    insert(snapshot_layers).values(
                        sha256=done.sha256, size=done.size, created_at=time.time()
                    )
                )

        await self.sandboxes.store._write("snapshot_layer", run)

    def done(self, node_id: str, msg: m.SbSnapshotDone) -> None:
        """A node's answer; one to a question not asked of it (for that container) is
        dropped."""
        entry = self.pending.get(msg.req_id)
        if entry is None or entry[0] != node_id or entry[1] != msg.container_id:
            return
        if not entry[2].done():
            entry[2].set_result(msg)
