"""The file side of Volumes, shared by the SDK (in a container and outside) and the worker.

A file travels as blocks of at most ``VOLUME_BLOCK`` bytes, each a content-addressed blob;
only the blocks the control plane lacks are uploaded (small ones many to a request). A
mounted tree is compared with the *base* it was materialised from (or last committed or
reloaded): a file whose size and mtime are unchanged is not read again; one that differs
is hashed, and sent only when its blocks differ. Symbolic links and other non-regular
files in a tree are never followed nor sent.

Lean: stdlib, msgspec and ``strato.protocol`` (it runs in containers).
"""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import msgspec

from strato import exceptions as exc
from strato.protocol import messages as m
from strato.protocol.volumes import norm_path

from .api_base import ApiBase

BLOCK = m.VOLUME_BLOCK
BATCH_BYTES = 4 << 20  # small blobs per upload / download request (a channel frame is <= 16 MiB)
SMALL = 1 << 20  # blocks up to this size travel in batches
INLINE = m.VOLUME_INLINE  # files up to this size travel inside the commit, not as blobs
ALWAYS_SEND = 64 << 10  # blocks up to this size are uploaded without a check first
KEEP_BYTES = 64 << 20  # small files' contents kept from hashing to upload (at most)
CHECK_KEYS = 20_000  # keys per POST /blobs/check
COMMIT_FILES = 20_000  # files per commit request (a larger commit is several)
COMMIT_BYTES = 6 << 20  # and bytes (a channel frame is at most 16 MiB)


class BaseFile(msgspec.Struct, array_like=True):
    """A file as its mount last knew it: what the control plane holds, and its stat then."""

    size: int
    mode: int
    blocks: list[str]
    mtime_ns: int = 0  # in the tree, after it was written there (0: unknown)


class VolumeState(msgspec.Struct):
    """What a container's mount is based on (the worker writes it; a commit or reload in
    the container rewrites it; the worker reads it back for the commit at exit)."""

    volume_id: str
    version: int
    files: dict[str, BaseFile]


class MountedVolume(msgspec.Struct):
    """A volume as a container sees it (``volumes.msgpack`` beside its spec)."""

    volume_id: str
    name: str | None
    path: str  # the mount point, in the container
    read_only: bool
    state_file: str  # VolumeState, in the container ("" for read-only mounts)


_state_dec = msgspec.msgpack.Decoder(VolumeState)
_mounts_dec = msgspec.msgpack.Decoder(list[MountedVolume])
_enc = msgspec.msgpack.Encoder()


def read_state(path: str) -> VolumeState:
    with open(path, "rb") as f:
        return _state_dec.decode(f.read())


def write_state(path: str, state: VolumeState) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(_enc.encode(state))
    os.replace(tmp, path)


def read_mounts(path: str) -> list[MountedVolume]:
    with open(path, "rb") as f:
        return _mounts_dec.decode(f.read())


def write_mounts(path: str, mounts: list[MountedVolume]) -> None:
    with open(path, "wb") as f:
        f.write(_enc.encode(mounts))


# ---------------------------------------------------------------------- hashing


def hash_fd(fd: int) -> tuple[int, list[str]]:
    """Size and block keys of an open file, read from its start."""
    blocks, size = [], 0
    while True:
        chunk = os.pread(fd, BLOCK, size)
        if not chunk:
            break
        blocks.append(hashlib.sha256(chunk).hexdigest())
        size += len(chunk)
        if len(chunk) < BLOCK:
            break
    return size, blocks


@dataclass
class LocalFile:
    """A file to send: where it lies here and what it holds."""

    path: str  # in the volume
    local: str  # on this machine
    size: int
    mode: int
    mtime: float
    blocks: list[str]
    mtime_ns: int = 0
    data: bytes | None = None  # its content, kept from hashing (small files)

    def entry(self) -> m.VolumeFile:
        mtime = max(0.0, self.mtime)
        if 0 < self.size <= INLINE:  # inline: no blob
            data = self.data if self.data is not None else _read_block(self.local, 0, self.size)
            if [hashlib.sha256(data).hexdigest()] != self.blocks:
                raise exc.InvalidError(f"{self.local} changed while it was being sent; retry")
            return m.VolumeFile(self.path, self.size, self.mode & 0o777, mtime, [], data)
        return m.VolumeFile(self.path, self.size, self.mode & 0o777, mtime, self.blocks)


def content_id(f: m.VolumeFile) -> list[str]:
    """What identifies a file's content: its blocks (an inline file's: the one block it
    would have)."""
    if f.data:
        return [hashlib.sha256(f.data).hexdigest()]
    return list(f.blocks)


def open_regular(local: str) -> tuple[int, os.stat_result] | None:
    """An open descriptor of a regular file (never through a symbolic link), else None."""
    try:
        fd = os.open(local, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        return None
    return fd, st


def local_file(path: str, local: str) -> LocalFile:
    """Hash one local file (refused when it is not a regular file)."""
    opened = open_regular(local)
    if opened is None:
        raise exc.InvalidError(f"{local} is not a regular file (or cannot be read)")
    fd, st = opened
    try:
        size, blocks = hash_fd(fd)
    finally:
        os.close(fd)
    return LocalFile(path, local, size, st.st_mode, st.st_mtime, blocks, st.st_mtime_ns)


# ---------------------------------------------------------------------- upload / download


def upload(api: ApiBase, files: Iterable[LocalFile]) -> int:
    """Upload the blocks of ``files`` that the control plane lacks; bytes sent."""
    where: dict[str, tuple[str, int, int]] = {}
    kept: dict[str, bytes] = {}
    for f in files:
        if f.size <= INLINE:
            continue  # sent inline with the commit
        if f.data is not None and len(f.blocks) == 1:
            kept[f.blocks[0]] = f.data
        for i, b in enumerate(f.blocks):
            where.setdefault(b, (f.local, i * BLOCK, min(BLOCK, f.size - i * BLOCK)))
    # tiny blocks are sent without asking (asking costs about as much; the control plane
    # keeps one copy), the others only when the control plane lacks them
    missing = [k for k, w in where.items() if w[2] <= ALWAYS_SEND]
    keys = [k for k, w in where.items() if w[2] > ALWAYS_SEND]
    for i in range(0, len(keys), CHECK_KEYS):
        missing += api.call(
            "POST", "/blobs/check", m.BlobCheck(keys[i : i + CHECK_KEYS]), m.MissingBlobs
        ).missing
    sent = 0
    batch: list[bytes] = []
    batch_bytes = 0
    # two requests in flight: one is packed and sent while the control plane stores the other
    with ThreadPoolExecutor(2, thread_name_prefix="strato-volume-upload") as pool:
        pending: list[Future] = []

        def flush() -> None:
            nonlocal batch, batch_bytes
            if batch:
                body = m.BlobBatch(batch)
                pending.append(
                    pool.submit(api.call, "POST", "/volume-blobs", body, m.BlobKeys, timeout=300.0)
                )
                batch, batch_bytes = [], 0
            while len(pending) > 2:
                pending.pop(0).result()

        for key in missing:
            data = kept.get(key)
            if data is None:
                local, offset, length = where[key]
                data = _read_block(local, offset, length)
                if hashlib.sha256(data).hexdigest() != key:
                    raise exc.InvalidError(f"{local} changed while it was being uploaded; retry")
            sent += len(data)
            if len(data) > SMALL:
                api.put_blob(key, data)
                continue
            if batch_bytes + len(data) > BATCH_BYTES:
                flush()
            batch.append(data)
            batch_bytes += len(data)
        flush()
        for fut in pending:
            fut.result()
    return sent


def _read_block(local: str, offset: int, length: int) -> bytes:
    fd = os.open(local, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


def fetch_blocks(
    api: ApiBase, keys: list[str], sizes: dict[str, int]
) -> Iterator[tuple[str, bytes]]:
    """The blobs of ``keys`` (small ones many to a request), each checked against its key."""
    batch: list[str] = []
    batch_bytes = 0

    def take(ks: list[str]) -> Iterator[tuple[str, bytes]]:
        got = api.call("POST", "/volume-blobs/get", m.BlobKeys(ks), m.BlobBatch, timeout=300.0)
        if len(got.blobs) != len(ks):
            raise exc.Error("the control plane answered a different number of blobs")
        yield from zip(ks, got.blobs, strict=True)

    for key in keys:
        size = sizes.get(key, BLOCK)
        if size > SMALL:
            data = api.get_blob(key)
            if hashlib.sha256(data).hexdigest() != key:
                raise exc.Error(f"blob {key} arrived with other content; refused")
            yield key, data
            continue
        if batch_bytes + size > BATCH_BYTES:
            yield from _checked(take(batch))
            batch, batch_bytes = [], 0
        batch.append(key)
        batch_bytes += size
    if batch:
        yield from _checked(take(batch))


def _checked(items: Iterator[tuple[str, bytes]]) -> Iterator[tuple[str, bytes]]:
    for key, data in items:
        if hashlib.sha256(data).hexdigest() != key:
            raise exc.Error(f"blob {key} arrived with other content; refused")
        yield key, data


def block_sizes(files: Iterable[m.VolumeFile]) -> dict[str, int]:
    out: dict[str, int] = {}
    for f in files:
        for i, b in enumerate(f.blocks):
            out[b] = min(BLOCK, f.size - i * BLOCK)
    return out


# ---------------------------------------------------------------------- a mounted tree


def scan(
    root: str, base: dict[str, BaseFile]
) -> tuple[list[LocalFile], list[str], dict[str, BaseFile]]:
    """What changed in the tree at ``root`` against ``base``: files to put, paths deleted,
    and the new base (for files unchanged, or changed and about to be committed)."""
    puts: list[LocalFile] = []
    seen: dict[str, BaseFile] = {}
    todo: list[tuple[str, str, bool]] = []  # files to hash: (path, local, keep the content)
    kept = 0
    stack = [("", root)]
    while stack:
        rel_dir, local_dir = stack.pop()
        try:
            entries = list(os.scandir(local_dir))
        except OSError:
            continue
        for e in entries:
            rel = f"{rel_dir}/{e.name}" if rel_dir else e.name
            try:
                if e.is_dir(follow_symlinks=False):
                    stack.append((rel, e.path))
                    continue
                if not e.is_file(follow_symlinks=False):
                    continue  # symbolic links, sockets, fifos: not part of a volume
                st = e.stat(follow_symlinks=False)
            except OSError:
                continue
            old = base.get(rel)
            if old is not None and old.size == st.st_size and old.mtime_ns == st.st_mtime_ns:
                seen[rel] = old
                continue
            keep = st.st_size <= SMALL and kept + st.st_size <= KEEP_BYTES
            kept += st.st_size if keep else 0
            todo.append((rel, e.path, keep))
    for rel, local, keep in todo:  # (threads do not help: the files are small)
        f = _hashed(rel, local, keep)
        if f is None:
            continue
        seen[rel] = BaseFile(f.size, f.mode, f.blocks, f.mtime_ns)
        old = base.get(rel)
        if old is not None and old.blocks == f.blocks and old.mode == f.mode:
            continue  # touched, not changed
        puts.append(f)
    deletes = sorted(p for p in base if p not in seen)
    return puts, deletes, seen


def _hashed(rel: str, local: str, keep: bool) -> LocalFile | None:
    """A changed file, hashed (its content kept when ``keep``); None when it is no longer
    a regular file."""
    opened = open_regular(local)
    if opened is None:
        return None
    fd, st = opened
    try:
        data = None
        if keep:
            data = os.pread(fd, SMALL + 1, 0)
            size, blocks = len(data), [hashlib.sha256(data).hexdigest()] if data else []
            if size > SMALL:  # it grew meanwhile
                data = None
                size, blocks = hash_fd(fd)
        else:
            size, blocks = hash_fd(fd)
    finally:
        os.close(fd)
    mode = stat.S_IMODE(st.st_mode)
    return LocalFile(rel, local, size, mode, st.st_mtime, blocks, st.st_mtime_ns, data)


def commit_tree(api: ApiBase, volume_id: str, root: str, state: VolumeState) -> VolumeState:
    """Send what changed in the tree at ``root`` since ``state``; the new state."""
    puts, deletes, files = scan(root, state.files)
    if not puts and not deletes:
        return state
    upload(api, puts)
    version = send_commit(api, volume_id, puts, deletes) or state.version
    return VolumeState(volume_id, version, files)


def send_commit(
    api: ApiBase, volume_id: str, puts: list[LocalFile], deletes: list[str]
) -> int | None:
    """Commit ``puts`` (their blocks uploaded) and ``deletes``; the version made. A commit
    larger than one request (``COMMIT_FILES`` files or ``COMMIT_BYTES``) goes as several,
    each merged in turn (per file, the result is the same)."""
    version = None
    entries: list[m.VolumeFile] = []
    size = 0

    def send(last: bool) -> None:
        nonlocal entries, size, version, deletes
        if not entries and not deletes and not last:
            return
        body = m.VolumeCommit(entries, deletes)
        path = f"/volumes/{volume_id}/commit"
        version = api.call("POST", path, body, m.VolumeVersion, timeout=300.0).version
        entries, size, deletes = [], 0, []

    for f in puts:
        e = f.entry()
        cost = len(e.data or b"") + len(e.path) + 70 * len(e.blocks) + 40
        if entries and (len(entries) >= COMMIT_FILES or size + cost > COMMIT_BYTES):
            send(False)
        entries.append(e)
        size += cost
    if entries or deletes:
        send(True)
    return version


def write_file(dest: str, blocks: Iterable[bytes], mode: int) -> int:
    """Write a file atomically (a temporary file renamed over ``dest``); its mtime_ns."""
    parent = os.path.dirname(dest)
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".strato-", dir=parent)
    try:
        with os.fdopen(fd, "wb") as out:
            for b in blocks:
                out.write(b)
        os.chmod(tmp, mode & 0o777)
        if os.path.isdir(dest) and not os.path.islink(dest):
            raise exc.InvalidError(f"{dest} is a directory here; not replaced")
        os.replace(tmp, dest)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return os.stat(dest, follow_symlinks=False).st_mtime_ns


def reload_tree(
    api: ApiBase, root: str, state: VolumeState, manifest: m.VolumeManifest
) -> VolumeState:
    """Bring the tree at ``root`` to ``manifest``: files others changed are fetched and
    replaced, files others deleted are removed; a file changed here and not yet
    committed is left as it is (commit it, or it stays this container's)."""
    local_puts, _, here = scan(root, state.files)
    changed_here = {f.path for f in local_puts}
    new: dict[str, BaseFile] = {}
    want: list[m.VolumeFile] = []
    for f in manifest.files:
        p = norm_path(f.path)
        if p in changed_here:
            continue
        cur = here.get(p)
        if cur is not None and cur.blocks == content_id(f) and cur.mode == f.mode:
            new[p] = cur
            continue
        want.append(f)
    latest = {norm_path(f.path) for f in manifest.files}
    for p in here:
        if p not in latest and p not in changed_here and p in state.files:
            try:
                os.unlink(os.path.join(root, p))
            except OSError:
                pass
    sizes = block_sizes(want)
    blobs: dict[str, bytes] = {}
    # fetched in rounds of at most BATCH_BYTES * 4 held at once
    i = 0
    while i < len(want):
        group: list[m.VolumeFile] = []
        total = 0
        while i < len(want) and (not group or total + want[i].size <= 4 * BATCH_BYTES):
            group.append(want[i])
            total += want[i].size
            i += 1
        keys = [b for f in group for b in dict.fromkeys(f.blocks) if b not in blobs]
        blobs.update(fetch_blocks(api, keys, sizes))
        for f in group:
            p = norm_path(f.path)
            content = [f.data] if f.data is not None else (blobs[b] for b in f.blocks)
            mtime_ns = write_file(os.path.join(root, p), content, f.mode)
            new[p] = BaseFile(f.size, f.mode, content_id(f), mtime_ns)
        blobs.clear()
    for p in changed_here:
        if p in state.files:
            new[p] = state.files[p]
    return VolumeState(state.volume_id, manifest.version, new)
