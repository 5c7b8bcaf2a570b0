"""Content-addressed blobs on disk: large payloads and shipped source files.

A blob is written through a `BlobWriter`: chunk by chunk into a private temporary file,
hashed as it goes, and moved under its sha256 when complete, so that no more than a chunk
is held in memory. Hashing and writing block, so the event loop hands them to a thread:
`BlobStore.aput` and `BlobStore.aput_stream` (``await``) do, and `calls.uploads` queues
a container's chunks on `BLOB_POOL` itself.

Blobs no row names any more are deleted by the collector (``server/blob_gc.py``) once
older than its grace period. So that a key about to be named in a row is never taken for
garbage, storing content that is already here and asking whether a key is here (`has`,
`size`) make the blob young again (its mtime is set to now).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import secrets
from collections.abc import AsyncIterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from strato.exceptions import InvalidError, NotFoundError, RequestSizeError

_SHA = re.compile(r"^[0-9a-f]{64}$")

# the threads that hash and write blobs for the event loop (hashlib and file writes let
# go of the GIL, so two threads use both cores of a small machine)
BLOB_POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="strato-blobs")


def refresh(path: Path | str) -> bool:
    """Whether the blob at ``path`` exists, made young again for the collector's grace
    period if so (a key someone is about to name in a row)."""
    try:
        os.utime(path)
    except FileNotFoundError:
        return False
    return True


def check_key(key: str) -> str:
    if not _SHA.match(key):
        raise InvalidError(f"bad blob key {key!r}: expected a sha256 in hex")
    return key


class BlobWriter:
    """One blob on its way in: `write` its chunks, then `finish` (or `abort`). Blocking:
    use it off the event loop."""

    def __init__(self, store: BlobStore) -> None:
        self.store = store
        self.size = 0
        self._hash = hashlib.sha256()
        tmp_dir = store.root / "tmp"
        tmp_dir.mkdir(mode=0o700, exist_ok=True)
        self._tmp: Path | None = tmp_dir / f"put-{os.getpid()}-{secrets.token_hex(8)}"
        fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # private
        self._file = os.fdopen(fd, "wb")

    def write(self, data: bytes | memoryview) -> None:
        self._hash.update(data)
        self._file.write(data)
        self.size += len(data)

    def finish(self, key: str | None = None) -> str:
        """Move the blob under its sha256 (checked against ``key`` when given)."""
        self._file.close()
        actual = self._hash.hexdigest()
        if key is not None and key != actual:
            self.abort()
            raise InvalidError(f"blob content does not match its key {key}: got {actual}")
        path = self.store.path(actual)
        assert self._tmp is not None
        if refresh(path):  # stored already: same content
            self.abort()
        else:
            path.parent.mkdir(mode=0o700, exist_ok=True)
            os.replace(self._tmp, path)
            self._tmp = None
        return actual

    def abort(self) -> None:
        self._file.close()
        if self._tmp is not None:
            with contextlib.suppress(OSError):
                self._tmp.unlink()
            self._tmp = None


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(mode=0o700, parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        check_key(key)
        return self.root / key[:2] / key

    def has(self, key: str) -> bool:
        """Whether ``key`` is stored (made young again: see the module's text)."""
        return refresh(self.path(key))

    def size(self, key: str) -> int:
        """The stored blob's size (made young again, as `has` does); `FileNotFoundError`
        when it is not stored."""
        path = self.path(key)
        if not refresh(path):
            raise FileNotFoundError(path)
        return os.stat(path).st_size

    def writer(self) -> BlobWriter:
        return BlobWriter(self)

    def put(self, data: bytes, key: str | None = None) -> str:
        """Store ``data``; its sha256. Blocking: `aput` on the event loop."""
        actual = hashlib.sha256(data).hexdigest()
        if key is not None and key != actual:
            raise InvalidError(f"blob content does not match its key {key}: got {actual}")
        path = self.path(actual)
        if not refresh(path):
            path.parent.mkdir(mode=0o700, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}-{secrets.token_hex(4)}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # private
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        return actual

    async def aput(self, data: bytes, key: str | None = None) -> str:
        """`put` on a blob thread: the event loop goes on meanwhile."""
        return await asyncio.get_running_loop().run_in_executor(BLOB_POOL, self.put, data, key)

    async def aput_stream(
        self, chunks: AsyncIterable[bytes], key: str | None = None, max_size: int | None = None
    ) -> str:
        """Store a blob that arrives in pieces (a request body, say), each written and
        hashed on a blob thread as it comes; over ``max_size`` it is dropped with a
        `RequestSizeError`."""
        loop = asyncio.get_running_loop()
        w = await loop.run_in_executor(BLOB_POOL, self.writer)
        try:
            async for chunk in chunks:
                if max_size is not None and w.size + len(chunk) > max_size:
                    raise RequestSizeError(
                        f"blob is over the limit of {max_size} bytes (STRATO_MAX_PAYLOAD)"
                    )
                await loop.run_in_executor(BLOB_POOL, w.write, chunk)
        except BaseException:
            await loop.run_in_executor(BLOB_POOL, w.abort)
            raise
        return await loop.run_in_executor(BLOB_POOL, w.finish, key)

    def get(self, key: str) -> bytes:
        try:
            return self.path(key).read_bytes()
        except FileNotFoundError:
            raise NotFoundError(f"blob {key} is not stored (expired or never uploaded)") from None

    async def aget(self, key: str) -> bytes:
        """`get` on a blob thread."""
        return await asyncio.get_running_loop().run_in_executor(BLOB_POOL, self.get, key)
