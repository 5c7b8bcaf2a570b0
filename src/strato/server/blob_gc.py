"""The blob collector: deletes blobs that no live row names (mark and sweep).

**Mark**: the keys named by the store's rows, read page by page on the store's thread
(`Store.aread`: each page sees every write queued before it, and the event loop never
waits), plus the live sandboxes' specs held in memory:

- ``inputs.args_blob`` and ``inputs.output_blob`` (a call's inputs and outputs live until
  the call expires: its rows are deleted then), ``gen_items.blob``;
- ``dict_entries.value_blob`` (a Dict value over the blob threshold);
- ``volume_files.blocks`` (every volume's files: only the latest manifest is kept);
- the specs of functions whose app runs, or stopped less than the grace period ago: their
  code mount's files (``mounts.manifest``), their image's ``add_local_*`` files and
  ``SnapshotLayer`` blobs; and every mount made less than the grace period ago;
- the sandboxes this process runs (their spec is in memory only);
- every sandbox snapshot's layer (``snapshot_layers``): its image is held by the client,
  which may start sandboxes from it at any time (no API deletes a snapshot yet).

Queue items never name blobs: an item is at most ``QUEUE_ITEM_MAX_BYTES`` (1 MiB) and is
kept inline (``queue_items.data``, or in memory: ``state/queue_memory.py``).

**Sweep**: every file under the store's root not marked and last modified longer ago than
the grace period is deleted. The grace period covers what no row names *yet*: an upload
in flight, a value journaled and answered but not yet applied by the writer (a Dict put,
outputs: the journal is applied within moments, far inside the grace period's default of
a day), a key a client was told is present (`/blobs/check`) or handed (a snapshot's
layer) before it names it in a row. Naming a key again refreshes the blob
(`store.blobs.refresh`): a row written while the mark pages through the tables names a
blob that is young. A file is renamed aside, its age checked again, then unlinked, so a
blob refreshed between the check and the delete is put back. Leftovers of interrupted
uploads (``tmp/``, ``*.tmp*``) past the grace period are deleted too.

Worker nodes' caches of blobs (``worker/mounts.py``) are left alone: a node only fetches
what its containers use, and its copies are hard-linked into mounted trees.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import msgspec
from sqlalchemy import or_, select, true, tuple_
from sqlalchemy.engine import Connection

from strato.protocol import images
from strato.protocol import messages as m
from strato.protocol.mounts import decode_manifest

from .store import schema as t
from .store import tables_sandboxes as tsb
from .store import tables_state as ts
from .store import tables_volumes as tv
from .store.blobs import BlobStore
from .store.store import Store

log = logging.getLogger("strato.blobs")

PAGE = 2000  # rows per read on the store's thread
_HEX = frozenset("0123456789abcdef")
_SPEC = msgspec.msgpack.Decoder(m.FunctionSpec)


@dataclass
class GcResult:
    kept: int = 0  # blobs kept (named by a row, or young)
    kept_young: int = 0  # of them, unreferenced but within the grace period
    deleted: int = 0
    bytes_freed: int = 0
    marked: int = 0  # keys the rows name
    dry_run: bool = False

    def message(self) -> m.BlobGcReport:
        return m.BlobGcReport(
            self.kept, self.kept_young, self.deleted, self.bytes_freed, self.marked, self.dry_run
        )


def image_keys(image: images.ImageSpec | None) -> Iterator[str]:
    for step in image.steps if image is not None else ():
        if isinstance(step, images.SnapshotLayer):
            yield step.sha256
        elif isinstance(step, images.AddFiles):
            for _dest, sha, _mode in step.files:
                yield sha


class Collector:
    """Mark and sweep of ``blobs`` against ``store``'s rows (see the module's text)."""

    def __init__(
        self,
        store: Store,
        blobs: BlobStore,
        grace_s: float,
        live_specs: Callable[[], Iterable[m.FunctionSpec]] = tuple,
    ) -> None:
        self.store = store
        self.blobs = blobs
        self.grace_s = grace_s
        self.live_specs = live_specs  # specs held in memory only (sandboxes)
        self._lock = asyncio.Lock()  # one collection at a time

    # ------------------------------------------------------------------ mark

    async def _rows(self, pk: list[Any], cols: list[Any], where: Any) -> AsyncIterator[Any]:
        """The rows matching ``where`` (their ``cols``), ``PAGE`` at a time in primary-key
        order, each page read on the store's thread."""
        last: tuple | None = None
        key = pk[0] if len(pk) == 1 else tuple_(*pk)
        while True:
            q = select(*pk, *cols).where(where)
            if last is not None:
                q = q.where(key > (last[0] if len(pk) == 1 else tuple_(*last)))
            q = q.order_by(*pk).limit(PAGE)

            def run(c: Connection, q: Any = q) -> list[Any]:
                return list(c.execute(q))

            page = await self.store.aread(self.store._read, run)
            for r in page:
                yield r[len(pk) :]
            if len(page) < PAGE:
                return
            last = tuple(page[-1][: len(pk)])

    async def mark(self, now: float) -> set[str]:
        keys: set[str] = set()
        i = t.inputs.c
        async for args_blob, output_blob in self._rows(
            [i.input_id],
            [i.args_blob, i.output_blob],
            or_(i.args_blob.isnot(None), i.output_blob.isnot(None)),
        ):
            keys.update(k for k in (args_blob, output_blob) if k is not None)
        g = t.gen_items.c
        async for (blob,) in self._rows([g.seq], [g.blob], g.blob.isnot(None)):
            keys.add(blob)
        d = ts.dict_entries.c
        async for (blob,) in self._rows(
            [d.dict_id, d.key_hash], [d.value_blob], d.value_blob.isnot(None)
        ):
            keys.add(blob)
        v = tv.volume_files.c
        async for (blocks,) in self._rows([v.volume_id, v.path], [v.blocks], v.blocks != ""):
            keys.update(blocks.split())
        # functions of apps that run (or stopped within the grace period), and sandboxes
        cutoff = now - self.grace_s
        f, a = t.functions.c, t.apps.c
        live_apps = select(a.app_id).where(
            or_(a.state != "stopped", a.stopped_at.is_(None), a.stopped_at >= cutoff)
        )
        sl = tsb.snapshot_layers.c  # a snapshot's image is the client's: kept for it
        async for (sha,) in self._rows([sl.sha256], [sl.sha256], true()):
            keys.add(sha)
        mount_ids: set[str] = set()
        async for (spec,) in self._rows([f.function_id], [f.spec], f.app_id.in_(live_apps)):
            self._mark_spec(_SPEC.decode(spec), keys, mount_ids)
        for s in self.live_specs():
            self._mark_spec(s, keys, mount_ids)
        mt = t.mounts.c
        for ids in _chunks(sorted(mount_ids)):
            async for (manifest,) in self._rows([mt.mount_id], [mt.manifest], mt.mount_id.in_(ids)):
                keys.update(_manifest_keys(manifest))
        async for (manifest,) in self._rows([mt.mount_id], [mt.manifest], mt.created_at >= cutoff):
            keys.update(_manifest_keys(manifest))
        return keys

    @staticmethod
    def _mark_spec(spec: m.FunctionSpec, keys: set[str], mount_ids: set[str]) -> None:
        if spec.mount_id is not None:
            mount_ids.add(spec.mount_id)
        keys.update(image_keys(spec.image))

    # ------------------------------------------------------------------ sweep

    def sweep(self, marked: set[str], now: float, dry_run: bool) -> GcResult:
        """Delete what is unmarked and older than the grace period (blocking: a thread)."""
        res = GcResult(dry_run=dry_run)
        cutoff = now - self.grace_s
        root = self.blobs.root
        aside = root / "tmp"
        aside.mkdir(mode=0o700, exist_ok=True)
        for shard in _dirs(root):
            for e in _files(shard):
                name = e.name
                if len(name) != 64 or not _HEX.issuperset(name):  # an interrupted put's
                    if ".tmp" in name:
                        _drop_stale(e.path, cutoff, dry_run)
                    continue
                if name in marked:
                    res.kept += 1
                    continue
                try:
                    st = e.stat()
                except FileNotFoundError:
                    continue
                if st.st_mtime >= cutoff:
                    res.kept += 1
                    res.kept_young += 1
                    continue
                if dry_run:
                    res.deleted += 1
                    res.bytes_freed += st.st_size
                    continue
                freed = _delete(e.path, str(aside / f"gc-{name}-{secrets.token_hex(4)}"), cutoff)
                if freed is None:  # named again meanwhile
                    res.kept += 1
                    res.kept_young += 1
                elif freed >= 0:
                    res.deleted += 1
                    res.bytes_freed += freed
        for e in _files(str(aside)):  # uploads a crash interrupted
            if not e.name.startswith("gc-"):
                _drop_stale(e.path, cutoff, dry_run)
        return res

    # ------------------------------------------------------------------ both

    async def collect(self, dry_run: bool = False) -> GcResult:
        async with self._lock:
            t0 = time.monotonic()
            now = time.time()
            marked = await self.mark(now)
            res = await asyncio.to_thread(self.sweep, marked, now, dry_run)
            res.marked = len(marked)
            log.info(
                "blob gc%s: %d blobs kept (%d unreferenced but younger than %gs), %d "
                "deleted, %d bytes freed; %d keys named by rows (%.1fs)",
                " (dry run: nothing deleted)" if dry_run else "",
                res.kept,
                res.kept_young,
                self.grace_s,
                res.deleted,
                res.bytes_freed,
                res.marked,
                time.monotonic() - t0,
            )
            return res

    async def run(self, interval_s: float) -> None:
        """Collect every ``interval_s`` (a background loop: ``cp.spawn_loop``)."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.collect()
            except asyncio.CancelledError:
                raise
            except Exception:  # the next round tries again
                log.exception("blob gc failed")


def _manifest_keys(manifest: bytes) -> Iterator[str]:
    for root in decode_manifest(manifest).roots:
        for f in root:
            yield f.sha256


def _chunks(items: list[str], size: int = 500) -> Iterator[list[str]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _dirs(root: os.PathLike[str] | str) -> Iterator[str]:
    with os.scandir(root) as it:
        for e in it:
            if len(e.name) == 2 and _HEX.issuperset(e.name) and e.is_dir(follow_symlinks=False):
                yield e.path


def _files(folder: str) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(folder) as it:
            return [e for e in it if e.is_file(follow_symlinks=False)]
    except FileNotFoundError:
        return []


def _drop_stale(path: str, cutoff: float, dry_run: bool) -> None:
    with contextlib.suppress(FileNotFoundError):
        if os.stat(path).st_mtime < cutoff and not dry_run:
            os.unlink(path)


def _delete(path: str, aside: str, cutoff: float) -> int | None:
    """Rename the blob aside, check its age again (a `refresh` may have come between the
    first look and the rename), and unlink it; its size, None when it was put back, -1
    when it was gone already."""
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return -1
    st = os.stat(aside)
    if st.st_mtime >= cutoff:
        os.replace(aside, path)  # (a new copy meanwhile has the same content)
        return None
    os.unlink(aside)
    return st.st_size
