"""Bearer secrets of the form ``<prefix><id>_<secret>`` (join tokens, node credentials):
the id finds the record, which keeps only the sha256 of the secret, compared in constant
time. The secret is random (``token_urlsafe(24)``: 192 bits), so a plain hash suffices: no
one can guess a secret from it (a slow KDF guards low-entropy passwords, not these)."""

from __future__ import annotations

import hashlib
import hmac
import secrets

MAX_LEN = 200


def new(prefix: str, id_bytes: int) -> tuple[str, str, str]:
    """(id, the whole token to hand out once, the sha256 hex of its secret to keep)."""
    tid = secrets.token_hex(id_bytes)
    secret = secrets.token_urlsafe(24)
    return tid, f"{prefix}{tid}_{secret}", digest(secret)


def split(prefix: str, token: str) -> tuple[str, str] | None:
    """(id, secret) of a token of this kind, or None when it is not one."""
    if not token.startswith(prefix) or len(token) > MAX_LEN:
        return None
    tid, _, secret = token[len(prefix) :].partition("_")
    return (tid, secret) if tid and secret else None


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def same(kept: str, secret: str) -> bool:
    """Whether ``secret`` is the one whose digest is ``kept`` (constant time)."""
    return hmac.compare_digest(kept, digest(secret))
