"""Tables of Secret (on the shared schema metadata).

``secrets``: one row per secret, named (``strato secret create``) or anonymous (an app's
``Secret.from_dict`` / ``from_dotenv`` / ``from_local_environ``, with no name, owned by
the app it was made for and deleted when that app stops). ``data``
is the secret's key/value map, encrypted with AES-GCM under a key kept outside the
database (``server/secrets.py``); ``key_id`` says which key. No column holds a value or
a key name in the clear.
"""

from __future__ import annotations

from sqlalchemy import Column, Float, Index, LargeBinary, String, Table

from .schema import metadata

secrets = Table(
    "secrets",
    metadata,
    Column("secret_id", String(64), primary_key=True),
    Column("name", String(64), nullable=True),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("key_id", String(32), nullable=False),  # a fingerprint of the key that encrypted it
    Column("data", LargeBinary, nullable=False),  # version byte + nonce + AES-GCM ciphertext
    Column("app_id", String(64), nullable=True, index=True),  # an anonymous one's app
    # a name is unique within its workspace (NULLs never collide)
    Column("workspace", String(64), nullable=False, server_default="main"),
    Index("uq_secrets_workspace_name", "workspace", "name", unique=True),
)
