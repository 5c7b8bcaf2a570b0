"""Join tokens: what a worker agent on another machine shows to join this control plane.

A join token is distinct from the API token: it lets an agent register a node (and, once
registered, receive the credential it fetches code and blobs with), nothing else. Tokens
are kept hashed (sha256) in ``$STRATO_HOME/join-tokens.json`` (0600), each with an id and
a name; ``strato server join-token revoke ID`` removes one, and the file is read again at
each agent's hello, so a revoked token lets no new connection in (agents already joined
stay until they disconnect or their node is removed).

A token reads ``stj_<id>_<secret>``: the id finds its record, the secret is checked
against its hash in constant time.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from strato.exceptions import InvalidError, NotFoundError

from . import bearer

PREFIX = "stj_"
FILE = "join-tokens.json"
# the name of the token the ``ray`` provider makes for its agents (its JOIN_TOKEN_NAME):
# only nodes joined with it are of provider ``ray``
RAY_PROVIDER_TOKEN = "ray provider"


@dataclass
class JoinToken:
    id: str
    name: str
    sha256: str
    created_at: float


class JoinTokens:
    """The join tokens of the control plane whose home is ``home``."""

    def __init__(self, home: Path) -> None:
        self.path = home / FILE
        self._ids: tuple[tuple[int, int, int] | None, frozenset[str]] = (None, frozenset())

    def _load(self) -> list[JoinToken]:
        try:
            raw = json.loads(self.path.read_text())
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as e:
            raise InvalidError(
                f"cannot read {self.path}: {e}; remove it and make new tokens"
            ) from e
        return [JoinToken(**t) for t in raw.get("tokens", [])]

    def _save(self, tokens: list[JoinToken]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"tokens": [asdict(t) for t in tokens]}, f, indent=1)
        os.replace(tmp, self.path)

    def create(self, name: str = "") -> tuple[JoinToken, str]:
        """A new token: its record and the token itself (shown once, never stored)."""
        tokens = self._load()
        tid, token, sha256 = bearer.new(PREFIX, 4)
        rec = JoinToken(id=tid, name=name, sha256=sha256, created_at=time.time())
        tokens.append(rec)
        self._save(tokens)
        return rec, token

    def list(self) -> list[JoinToken]:
        return self._load()

    def revoke(self, tid: str) -> JoinToken:
        tokens = self._load()
        keep = [t for t in tokens if t.id != tid]
        if len(keep) == len(tokens):
            raise NotFoundError(
                f"no join token with id {tid!r} (see `strato server join-token list`)"
            )
        self._save(keep)
        return next(t for t in tokens if t.id == tid)

    def ids(self) -> frozenset[str]:
        """The ids of the tokens now valid; the file is read again only when it changed
        (its inode, size or mtime), so asking at every request costs one ``stat``."""
        try:
            st = self.path.stat()
            stamp: tuple[int, int, int] | None = (st.st_ino, st.st_size, st.st_mtime_ns)
        except FileNotFoundError:
            stamp = None
        if stamp != self._ids[0] or stamp is None:
            try:
                self._ids = (stamp, frozenset(t.id for t in self._load()))
            except InvalidError:
                self._ids = (stamp, frozenset())
        return self._ids[1]

    def verify(self, token: str) -> str | None:
        """The id of the token ``token`` is, or None (unknown, revoked, malformed)."""
        rec = self.find(token)
        return rec.id if rec is not None else None

    def find(self, token: str) -> JoinToken | None:
        """The record of the token ``token`` is, or None (unknown, revoked, malformed)."""
        parts = bearer.split(PREFIX, token)
        if parts is None:
            return None
        tid, secret = parts
        try:
            tokens = self._load()
        except InvalidError:
            return None
        for t in tokens:
            if t.id == tid and bearer.same(t.sha256, secret):
                return t
        return None
