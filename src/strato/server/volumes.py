"""Volumes in the control plane: names, manifests and commits.

A volume's files are content-addressed blobs in the blob store (``cp.blobs``); its latest
manifest is the rows of ``volume_files`` (path -> blocks, size, mode, mtime). A commit
names the files it puts and the paths it deletes and is merged into the latest version
in one transaction on the store's writer thread (so commits are serialised): files it
does not name keep what others committed, and of two commits of one file the later
wins. A commit whose blocks are not all stored, or that would take the volume over
``STRATO_VOLUME_MAX_BYTES``, is refused and changes nothing.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from sqlalchemy import Connection, delete, insert, select, update

from strato import exceptions as exc
from strato.protocol import messages as m
from strato.protocol.volumes import check_name, norm_path, under

from .store import Store
from .store.blobs import BlobStore
from .store.tables_volumes import volume_files, volumes
from .store.tables_workspaces import DEFAULT_WORKSPACE
from .store.writer import Write, _Op

T = TypeVar("T")
ID_PREFIX = "vo-"


def _entry(r: Any, data: bool = True) -> m.VolumeFile:
    blocks = r.blocks.split() if r.blocks else []
    return m.VolumeFile(r.path, r.size, r.mode, r.mtime, blocks, r.data if data else None)


def _parents(paths: Iterable[str]) -> set[str]:
    """Every directory that holds one of ``paths``."""
    out: set[str] = set()
    for p in paths:
        while "/" in p:
            p = p.rsplit("/", 1)[0]
            if p in out:
                break
            out.add(p)
    return out


def _info(r: Any) -> m.VolumeInfo:
    return m.VolumeInfo(r.volume_id, r.name, r.created_at, r.version, r.size, r.n_files)


class VolumeService:
    def __init__(self, store: Store, blobs: BlobStore, max_bytes: int) -> None:
        self.store = store
        self.blobs = blobs
        self.max_bytes = max_bytes

    async def _tx(self, name: str, run: Callable[[Connection], T]) -> T:
        """``run`` in a transaction of its own on the store's writer thread (after the
        writes queued before it). An exception rolls it back and reaches the caller only."""

        def in_tx(conn: Connection) -> T:
            if conn.in_transaction():
                conn.commit()
            with conn.begin():
                return run(conn)

        op = _Op(name, in_tx, Write(name, self.store.wait_s), read=True)
        return await self.store._writer.submit(op).wait_async()

    # ------------------------------------------------------------------ volumes

    @staticmethod
    def _find(conn: Connection, ref: str, workspace: str | None = None) -> Any:
        """The volume ``ref`` (an id or a name) names in ``workspace``; ``None``: an id
        in any workspace (the API routes resolve every ref in the caller's workspace
        first), a name in the default one."""
        by_id = ref.startswith(ID_PREFIX)
        where = volumes.c.volume_id == ref if by_id else volumes.c.name == ref
        if workspace is not None or not by_id:
            where = where & (volumes.c.workspace == (workspace or DEFAULT_WORKSPACE))
        row = conn.execute(select(volumes).where(where)).first()
        if row is None:
            if ref.startswith(ID_PREFIX):
                raise exc.NotFoundError(f"volume {ref} does not exist (deleted?)")
            raise exc.NotFoundError(
                f"no volume named {ref!r}: create it with `strato volume create {ref}` or "
                "Volume.from_name(name, create_if_missing=True)"
            )
        return row

    async def resolve(self, ref: str, workspace: str | None) -> str:
        """The id of the volume ``ref`` names in ``workspace`` (see ``_find``)."""
        return await self._tx("volume", lambda c: self._find(c, ref, workspace).volume_id)

    def resolve_now(self, ref: str, workspace: str) -> str:
        """``resolve``, blocking (an app's specs, checked as it is created)."""
        return self.store._read(lambda c: self._find(c, ref, workspace).volume_id)

    async def create(self, req: m.CreateVolume, workspace: str = DEFAULT_WORKSPACE) -> m.VolumeInfo:
        name = check_name(req.name) if req.name is not None else None

        def run(conn: Connection) -> m.VolumeInfo:
            if name is not None:
                where = (volumes.c.name == name) & (volumes.c.workspace == workspace)
                row = conn.execute(select(volumes).where(where)).first()
                if row is not None:
                    if not req.exists_ok:
                        raise exc.AlreadyExistsError(f"a volume named {name!r} exists already")
                    return _info(row)
                if not req.create_if_missing and req.exists_ok:
                    self._find(conn, name, workspace)  # raises NotFoundError
            vid = ID_PREFIX + secrets.token_hex(8)
            values = dict(volume_id=vid, name=name, created_at=time.time(), workspace=workspace)
            conn.execute(insert(volumes).values(version=0, size=0, n_files=0, **values))
            return m.VolumeInfo(vid, name, values["created_at"])  # type: ignore[arg-type]

        return await self._tx("create_volume", run)

    async def info(self, ref: str) -> m.VolumeInfo:
        return await self._tx("volume", lambda c: _info(self._find(c, ref)))

    async def named(self, workspace: str = DEFAULT_WORKSPACE) -> m.VolumeList:
        def run(conn: Connection) -> m.VolumeList:
            where = volumes.c.name.is_not(None) & (volumes.c.workspace == workspace)
            q = select(volumes).where(where).order_by(volumes.c.name)
            return m.VolumeList([_info(r) for r in conn.execute(q)])

        return await self._tx("list_volumes", run)

    async def delete(self, ref: str) -> None:
        def run(conn: Connection) -> None:
            vid = self._find(conn, ref).volume_id
            conn.execute(delete(volume_files).where(volume_files.c.volume_id == vid))
            conn.execute(delete(volumes).where(volumes.c.volume_id == vid))

        await self._tx("delete_volume", run)

    # ------------------------------------------------------------------ files

    async def manifest(self, ref: str, prefix: str = "", data: bool = True) -> m.VolumeManifest:
        """The latest version's files under ``prefix`` (with small files' content when
        ``data``)."""
        prefix = norm_path(prefix, root_ok=True)

        def run(conn: Connection) -> m.VolumeManifest:
            row = self._find(conn, ref)
            q = select(volume_files).where(volume_files.c.volume_id == row.volume_id)
            files = [_entry(r, data) for r in conn.execute(q) if under(r.path, prefix)]
            return m.VolumeManifest(row.volume_id, row.version, files)

        return await self._tx("volume_manifest", run)

    async def file(self, ref: str, path: str) -> m.VolumeFile:
        path = norm_path(path)

        def run(conn: Connection) -> m.VolumeFile:
            vid = self._find(conn, ref).volume_id
            q = select(volume_files).where(
                volume_files.c.volume_id == vid, volume_files.c.path == path
            )
            r = conn.execute(q).first()
            if r is None:
                raise exc.NotFoundError(f"no file {path!r} in volume {ref}")
            return _entry(r)

        return await self._tx("volume_file", run)

    async def commit(self, ref: str, req: m.VolumeCommit) -> m.VolumeVersion:
        puts = {norm_path(f.path): f for f in req.puts}
        deletes = [norm_path(p) for p in req.deletes]
        recursive = [norm_path(p, root_ok=True) for p in req.recursive_deletes]
        await asyncio.to_thread(self._check_blocks, puts)
        return await self._tx(
            "commit_volume",
            lambda c: self._apply(c, ref, puts, deletes, recursive, req.missing_ok),
        )

    def _check_blocks(self, puts: dict[str, m.VolumeFile]) -> None:
        """Every block is stored, and a file's blocks add up to its size."""
        sizes: dict[str, int] = {}
        for p, f in puts.items():
            if f.data is not None:
                if f.blocks or len(f.data) != f.size:
                    raise exc.InvalidError(
                        f"{p}: an inline file has no blocks and exactly its size in data"
                    )
                continue
            total = 0
            for b in f.blocks:
                if b not in sizes:
                    try:
                        sizes[b] = self.blobs.size(b)  # (kept young for the collector)
                    except FileNotFoundError:
                        raise exc.InvalidError(
                            f"{p}: its block {b} is not uploaded; upload it to /blobs first "
                            "(nothing was committed)"
                        ) from None
                total += sizes[b]
            if total != f.size:
                raise exc.InvalidError(
                    f"{p}: its blocks hold {total} bytes, not the {f.size} it claims"
                )

    def _apply(
        self,
        conn: Connection,
        ref: str,
        puts: dict[str, m.VolumeFile],
        deletes: list[str],
        recursive: list[str],
        missing_ok: bool,
    ) -> m.VolumeVersion:
        row = self._find(conn, ref)
        vid = row.volume_id
        have = {
            r.path: r.size
            for r in conn.execute(
                select(volume_files.c.path, volume_files.c.size).where(
                    volume_files.c.volume_id == vid
                )
            )
        }
        dirs = _parents(have)
        gone: set[str] = set()
        for p in deletes:
            if p in have:
                gone.add(p)
            elif p in dirs:
                raise exc.InvalidError(
                    f"{p!r} is a directory in volume {ref}: remove it with recursive=True"
                )
            elif not missing_ok:
                raise exc.NotFoundError(f"no file {p!r} in volume {ref}")
        for prefix in recursive:
            hits = [q for q in have if under(q, prefix)]
            if not hits and not missing_ok:
                raise exc.NotFoundError(f"no file or directory {prefix!r} in volume {ref}")
            gone.update(hits)
        put_dirs = _parents(puts)
        clash = next((p for p in puts if p in put_dirs), None)
        if clash is not None:
            raise exc.InvalidError(f"{clash!r} is both a file and a directory in this commit")
        # the last commit wins, for paths too: a file it puts replaces a directory of that
        # name (and what it holds), a directory it needs replaces a file of that name
        for d in put_dirs:
            if d in have:
                gone.add(d)
        for p in puts:
            if p in dirs:
                gone.update(q for q in have if under(q, p) and q != p)
        size = (
            row.size
            - sum(have[p] for p in gone)
            - sum(have.get(p, 0) for p in puts if p not in gone)
        )
        size += sum(f.size for f in puts.values())
        if size > self.max_bytes:
            raise exc.RequestSizeError(
                f"volume {row.name or vid} would hold {size} bytes, over its limit of "
                f"{self.max_bytes} bytes (STRATO_VOLUME_MAX_BYTES); nothing was committed"
            )
        version = row.version + 1
        targets = gone | set(puts)
        if targets:
            keys = list(targets)
            for i in range(0, len(keys), 500):
                conn.execute(
                    delete(volume_files).where(
                        volume_files.c.volume_id == vid, volume_files.c.path.in_(keys[i : i + 500])
                    )
                )
        if puts:
            conn.execute(
                insert(volume_files),
                [
                    dict(
                        volume_id=vid,
                        path=p,
                        size=f.size,
                        mode=f.mode & 0o777,
                        mtime=f.mtime or time.time(),
                        blocks=" ".join(f.blocks),
                        data=f.data,
                        version=version,
                    )
                    for p, f in puts.items()
                ],
            )
        n_files = len(set(have).difference(gone).union(puts))
        conn.execute(
            update(volumes)
            .where(volumes.c.volume_id == vid)
            .values(version=version, size=size, n_files=n_files)
        )
        return m.VolumeVersion(version, size, n_files)

    async def copy(self, ref: str, req: m.VolumeCopy) -> m.VolumeVersion:
        """Copy files (or directories, recursively) within a volume, as ``cp``: one source
        into ``dst`` (a directory when it is one or ends with ``/``), several into the
        directory ``dst``."""
        srcs = [norm_path(p) for p in req.src_paths]
        dst = norm_path(req.dst, root_ok=True)
        into_dir = req.dst.endswith("/") or len(srcs) > 1 or not dst

        def run(conn: Connection) -> m.VolumeVersion:
            vid = self._find(conn, ref).volume_id
            rows = {
                r.path: r
                for r in conn.execute(select(volume_files).where(volume_files.c.volume_id == vid))
            }
            dst_is_dir = into_dir or any(under(q, dst) and q != dst for q in rows)
            puts: dict[str, m.VolumeFile] = {}
            for src in srcs:
                base = src.rsplit("/", 1)[-1]
                target = f"{dst}/{base}".lstrip("/") if dst_is_dir else dst
                if src in rows:
                    e = _entry(rows[src])
                    puts[target] = m.VolumeFile(
                        target, e.size, e.mode, time.time(), e.blocks, e.data
                    )
                    continue
                inside = [q for q in rows if under(q, src)]
                if not inside:
                    raise exc.NotFoundError(f"no file or directory {src!r} in volume {ref}")
                if not req.recursive:
                    raise exc.InvalidError(f"{src!r} is a directory: copy it with recursive=True")
                for q in inside:
                    e = _entry(rows[q])
                    t = f"{target}/{q[len(src) + 1 :]}".lstrip("/")
                    puts[t] = m.VolumeFile(t, e.size, e.mode, time.time(), e.blocks, e.data)
            for f in puts.values():  # named again: young for the blob collector (blob_gc.py)
                for b in f.blocks:
                    self.blobs.has(b)
            return self._apply(conn, ref, puts, [], [], True)

        return await self._tx("copy_volume_files", run)
