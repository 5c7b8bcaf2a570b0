"""A sandbox's writable layer, taken for ``sb.snapshot_filesystem()``.

The control plane asks (``SbSnapshot``) after the sandbox's agent has flushed its writes;
this node tars the container's writable layer (:func:`strato.images.snapshot.pack_layer`),
uploads it as a blob (content-addressed: its sha256 is its key) and answers with the
blob's sha256 and size (``SbSnapshotDone``), or with why it cannot.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from strato.images.snapshot import pack_layer
from strato.protocol import messages as m
from strato.runtime.base import RunningContainer

log = logging.getLogger("strato.worker")

_tasks: set[asyncio.Task] = set()


class BlobUploader(Protocol):
    def put_blob(self, key: str, data: bytes) -> None: ...


def _take(rc: RunningContainer | None, scratch: Path, http: BlobUploader) -> tuple[str, int]:
    if rc is None:
        raise RuntimeError("its container is not running on this node any more")
    upper = rc.writable_layer()
    if upper is None:
        raise RuntimeError(
            "its container has no writable layer this node can read (it runs without an "
            "image, or under the 'process' runtime)"
        )
    path, sha256, size = pack_layer(upper, scratch)
    try:
        http.put_blob(sha256, path.read_bytes())
    finally:
        path.unlink(missing_ok=True)
    return sha256, size


async def _answer(
    msg: m.SbSnapshot,
    rc: RunningContainer | None,
    scratch: Path,
    http: BlobUploader,
    send: Callable[[object], None],
) -> None:
    try:
        sha256, size = await asyncio.to_thread(_take, rc, scratch, http)
        done = m.SbSnapshotDone(msg.container_id, msg.req_id, sha256, size)
    except Exception as e:  # noqa: BLE001 - whatever fails is the driver's answer
        log.warning("snapshot of container %s failed: %s", msg.container_id, e)
        done = m.SbSnapshotDone(msg.container_id, msg.req_id, error=str(e)[:4000])
    send(done)


def take(
    msg: m.SbSnapshot,
    rc: RunningContainer | None,
    scratch: Path,
    http: BlobUploader,
    send: Callable[[object], None],
) -> None:
    """Answer ``msg`` in the background (``send`` gets the ``SbSnapshotDone``)."""
    task = asyncio.create_task(_answer(msg, rc, scratch, http, send))
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)
