"""Content-addressed blobs on disk: large payloads and shipped source files."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from strato.exceptions import InvalidError

_SHA = re.compile(r"^[0-9a-f]{64}$")


def check_key(key: str) -> str:
    if not _SHA.match(key):
        raise InvalidError(f"bad blob key {key!r}: expected a sha256 in hex")
    return key


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(mode=0o700, parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        check_key(key)
        return self.root / key[:2] / key

    def has(self, key: str) -> bool:
        return self.path(key).exists()

    def put(self, data: bytes, key: str | None = None) -> str:
        actual = hashlib.sha256(data).hexdigest()
        if key is not None and key != actual:
            raise InvalidError(f"blob content does not match its key {key}: got {actual}")
        path = self.path(actual)
        if not path.exists():
            path.parent.mkdir(mode=0o700, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # private
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        return actual

    def get(self, key: str) -> bytes:
        try:
            return self.path(key).read_bytes()
        except FileNotFoundError:
            from strato.exceptions import NotFoundError

            raise NotFoundError(f"blob {key} is not stored (expired or never uploaded)") from None
