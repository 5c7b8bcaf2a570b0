"""Large values a container sends in chunks (``BlobChunk`` frames) on their way to the
blob store: written to a temporary file as they come (the control plane holds at most a
chunk of one in memory), hashed, and moved into the store under their sha256 when the
last chunk arrives. A value over ``max_payload`` is counted, not kept: its output then
fails with a ``RequestSizeError`` naming its size."""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
from pathlib import Path

from strato.exceptions import InvalidError

from ..store.blobs import BlobStore


class Uploads:
    """The uploads of one container connection, matched in order to the outputs that
    name them (``TaskOutput.blob``)."""

    def __init__(self, blobs: BlobStore, max_payload: int) -> None:
        self.blobs = blobs
        self.max_payload = max_payload
        self._tmp: Path | None = None
        self._file = None
        self._hash = hashlib.sha256()
        self._size = 0
        self._done: list[tuple[str | None, int]] = []  # (sha256 or None if too big, size)

    def chunk(self, data: bytes, last: bool) -> None:
        self._size += len(data)
        if self._size <= self.max_payload:
            if self._file is None:
                tmp_dir = self.blobs.root / "tmp"
                tmp_dir.mkdir(exist_ok=True)
                self._tmp = tmp_dir / f"upload-{os.getpid()}-{secrets.token_hex(8)}"
                self._file = open(self._tmp, "wb")  # noqa: SIM115 - closed in _finish/close
            self._file.write(data)
            self._hash.update(data)
        elif self._file is not None:  # over the limit: keep counting, drop what we have
            self._discard()
        if last:
            self._finish()
        if len(self._done) > 4096:
            raise InvalidError("more than 4096 chunked values not named by any output")

    def _finish(self) -> None:
        if self._size > self.max_payload:
            self._done.append((None, self._size))
        else:
            key = self._hash.hexdigest()
            if self._file is not None:
                self._file.close()
                self._file = None
                path = self.blobs.path(key)
                path.parent.mkdir(exist_ok=True)
                os.replace(self._tmp, path)
                self._tmp = None
            else:  # an empty value in chunks: odd, but well-formed
                self.blobs.put(b"")
            self._done.append((key, self._size))
        self._hash = hashlib.sha256()
        self._size = 0

    def take(self, claimed: str) -> tuple[str | None, int]:
        """The next finished upload, for an output that names ``claimed``: (key, size),
        key None when it was over the limit. A container that names a blob it did not
        send (another app's, say) is refused."""
        if not self._done:
            raise InvalidError(f"an output names blob {claimed[:16]}... that was never sent")
        key, size = self._done.pop(0)
        if key is not None and key != claimed:
            raise InvalidError("an output names a blob other than the one sent before it")
        return key, size

    def _discard(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tmp is not None:
            with contextlib.suppress(OSError):
                self._tmp.unlink()
            self._tmp = None

    def close(self) -> None:
        """The connection ended: drop a half-sent value."""
        self._discard()
