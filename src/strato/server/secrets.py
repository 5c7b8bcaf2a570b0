"""Secrets: named and anonymous key/value maps that become environment variables of the
containers of the functions that name them.

- **At rest** a secret's map is msgpack, encrypted with AES-GCM (the ``cryptography``
  package) under a 256-bit key that lives outside the database: the file
  ``STRATO_SECRET_KEY_FILE`` (default ``$STRATO_HOME/secret.key``, made with mode 0600 on
  first use). The secret's id is the associated data, so a row's ciphertext cannot be
  moved to another row. ``key_id`` (a fingerprint of the key) says which key sealed a row,
  so a control plane started with another key says so instead of failing obscurely.
- **In specs** a function names its secrets (``SecretRef``: a name, or the id of an
  anonymous one); values are never in a spec, a log line, an API answer or an error.
- **At a container's start** the fleet asks `Secrets.env_for` for the plain values and
  sends them to the worker in ``ContainerStart.secret_env``, which exists only in that
  frame and the container's environment.

The rows' ciphertexts are cached in memory (this process is the store's only writer), so
starting a container reads nothing from the database. An anonymous secret belongs to the
app it was made for (``claim``) and is deleted when that app stops (``release``); one
never claimed (its app was refused, or its client died first) goes after
``ORPHAN_AFTER_S``.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import secrets as pysecrets
import time
from dataclasses import dataclass
from pathlib import Path

import msgspec
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import Connection, delete, select, update

from strato import exceptions as exc
from strato import settings
from strato.protocol import messages as m

from .store import Store
from .store.tables_secrets import secrets as secrets_table
from .store.tables_workspaces import DEFAULT_WORKSPACE
from .workspaces import ACTING

log = logging.getLogger("strato.secrets")

KEY_BYTES = 32
NONCE_BYTES = 12
FORMAT = 1  # the first byte of a row's data: AES-GCM, 12-byte nonce, msgpack map
ORPHAN_AFTER_S = 3600.0  # an anonymous secret no app claimed is deleted after this


def key_path(home: Path) -> Path:
    """Where the secret key lives: ``STRATO_SECRET_KEY_FILE``, else ``$STRATO_HOME/secret.key``."""
    return settings.SECRET_KEY_FILE.get() or home / "secret.key"


def load_or_create_key(path: Path) -> bytes:
    """The key in ``path`` (base64 of 32 bytes); a new random one, written with mode 0600,
    when the file does not exist."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        key = os.urandom(KEY_BYTES)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process made it first
            return load_or_create_key(path)
        with os.fdopen(fd, "w") as f:
            f.write(base64.urlsafe_b64encode(key).decode() + "\n")
            f.flush()
            os.fsync(f.fileno())
        log.info("made a new secret key in %s", path)
        return key
    try:
        key = base64.urlsafe_b64decode(text.strip().encode())
    except ValueError:
        key = b""
    if len(key) != KEY_BYTES:
        raise exc.InvalidError(
            f"{path} is not a strato secret key (32 bytes, base64): put the right key file "
            "back (STRATO_SECRET_KEY_FILE), or move this one away to make a new key (the "
            "secrets the old key encrypted can then not be read)"
        )
    if path.stat().st_mode & 0o077:
        log.warning("the secret key %s can be read by other users: chmod 600 it", path)
    return key


class Cipher:
    """Seals and opens secret maps with one key (AES-GCM, the secret's id as associated
    data)."""

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError("a secret key is 32 bytes")
        self._aead = AESGCM(key)
        self.key_id = hashlib.sha256(b"strato secret key\0" + key).hexdigest()[:16]

    def seal(self, secret_id: str, values: dict[str, str]) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        plain = msgspec.msgpack.encode(values)
        return bytes([FORMAT]) + nonce + self._aead.encrypt(nonce, plain, secret_id.encode())

    def open(self, secret_id: str, key_id: str, data: bytes, label: str) -> dict[str, str]:
        """The map of a row; ``label`` names the secret in errors (never its values)."""
        if key_id != self.key_id:
            raise exc.ExecutionError(
                f"secret {label} was encrypted with another key (key id {key_id}; this "
                f"control plane's is {self.key_id}): start it with that key file "
                "(STRATO_SECRET_KEY_FILE), or create the secret again"
            )
        if len(data) < 1 + NONCE_BYTES or data[0] != FORMAT:
            raise exc.ExecutionError(f"secret {label} is stored in an unknown format")
        nonce, sealed = data[1 : 1 + NONCE_BYTES], data[1 + NONCE_BYTES :]
        try:
            plain = self._aead.decrypt(nonce, sealed, secret_id.encode())
        except InvalidTag:
            raise exc.ExecutionError(
                f"secret {label} cannot be decrypted: its stored data was changed or damaged; "
                "create it again"
            ) from None
        return msgspec.msgpack.decode(plain, type=dict[str, str])


@dataclass
class _Row:
    secret_id: str
    name: str | None
    created_at: float
    updated_at: float
    key_id: str
    data: bytes
    app_id: str | None = None  # an anonymous secret's app, once it is created
    workspace: str = DEFAULT_WORKSPACE

    def info(self, n_keys: int = 0) -> m.SecretInfo:
        return m.SecretInfo(self.secret_id, self.name, self.created_at, self.updated_at, n_keys)

    @property
    def label(self) -> str:
        return repr(self.name) if self.name else f"{self.secret_id} (anonymous)"


def check_values(values: dict[str, str]) -> None:
    """Environment variables a secret may set. Errors name keys, never values."""
    reserved = sorted(k for k in values if k.startswith("STRATO_"))
    if reserved:
        raise exc.InvalidError(f"secret keys {reserved} are reserved (STRATO_*): rename them")
    bad = sorted(k for k, v in values.items() if "\0" in v)
    if bad:
        raise exc.InvalidError(
            f"the values of secret keys {bad} contain a NUL byte, which an environment "
            "variable cannot hold"
        )


class Secrets:
    """The control plane's secrets: create, list, delete, resolve a spec's references,
    and the environment of a container's start."""

    def __init__(self, store: Store, cipher: Cipher) -> None:
        self.store = store
        self.cipher = cipher
        self._rows: dict[str, _Row] = {}
        self._by_name: dict[tuple[str, str], str] = {}  # (workspace, name) -> id
        for r in store._read(lambda c: c.execute(select(secrets_table)).all()):
            row = _Row(**dict(r._mapping))
            self._rows[row.secret_id] = row
            if row.name is not None:
                self._by_name[row.workspace, row.name] = row.secret_id
        # anonymous secrets of apps stopped while their delete was not yet written
        live = {a["app_id"] for a in store.apps() if a["state"] != "stopped"}
        self._drop(
            [r for r in self._rows.values() if r.name is None and r.app_id and r.app_id not in live]
        )
        self._drop_orphans(time.time())

    @classmethod
    def open(cls, store: Store, home: Path) -> Secrets:
        return cls(store, Cipher(load_or_create_key(key_path(home))))

    # ------------------------------------------------------------------ API

    async def create(self, req: m.CreateSecret, workspace: str = DEFAULT_WORKSPACE) -> m.SecretInfo:
        """A named secret of ``workspace`` (``strato secret create``; replaced with
        ``overwrite``) or an anonymous one. Durable when it returns."""
        check_values(req.values)
        now = time.time()
        if req.name is None:
            self._drop_orphans(now)
        old = self._rows.get(self._by_name.get((workspace, req.name), "")) if req.name else None
        if old is not None and not req.overwrite:
            raise exc.AlreadyExistsError(
                f"secret {req.name!r} exists already: pass --force (overwrite=True) to "
                "replace its values, or choose another name"
            )
        if old is not None:
            row = _Row(old.secret_id, old.name, old.created_at, now, self.cipher.key_id, b"")
        else:
            row = _Row("st-" + pysecrets.token_hex(8), req.name, now, now, self.cipher.key_id, b"")
        row.workspace = workspace
        row.data = self.cipher.seal(row.secret_id, dict(req.values))
        values = {
            "name": row.name,
            "updated_at": row.updated_at,
            "key_id": row.key_id,
            "data": row.data,
            "workspace": row.workspace,
        }
        t = secrets_table

        def run(c: Connection) -> None:
            if old is not None:
                c.execute(update(t).where(t.c.secret_id == row.secret_id).values(**values))
            else:
                c.execute(
                    t.insert().values(secret_id=row.secret_id, created_at=row.created_at, **values)
                )

        # in memory first (the loop runs one request at a time up to here), so a second
        # create of the name cannot pass the check above before this one is written
        self._rows[row.secret_id] = row
        if row.name is not None:
            self._by_name[workspace, row.name] = row.secret_id
        try:
            await self.store._write("secret_create", run)
        except Exception:
            if old is not None:
                self._rows[old.secret_id] = old
            else:
                self._rows.pop(row.secret_id, None)
                if row.name is not None:
                    self._by_name.pop((workspace, row.name), None)
            raise exc.ExecutionError(
                f"secret {row.label} could not be stored; see the control plane's log"
            ) from None
        log.info(
            "secret %s %s (%d keys)", row.label, "replaced" if old else "created", len(req.values)
        )
        return row.info(len(req.values))

    def named(self, workspace: str = DEFAULT_WORKSPACE) -> list[m.SecretInfo]:
        """The named secrets of ``workspace``, by name (anonymous ones belong to their
        apps)."""
        return [
            self._rows[sid].info()
            for (ws, _), sid in sorted(self._by_name.items())
            if ws == workspace and sid in self._rows
        ]

    async def delete(self, name: str, workspace: str = DEFAULT_WORKSPACE) -> None:
        sid = self._by_name.get((workspace, name))
        if sid is None:
            raise exc.NotFoundError(f"no secret named {name!r}; `strato secret list` lists them")
        t = secrets_table
        await self.store._write(
            "secret_delete", lambda c: c.execute(delete(t).where(t.c.secret_id == sid))
        )
        self._rows.pop(sid, None)
        self._by_name.pop((workspace, name), None)
        log.info("secret %r deleted", name)

    # ------------------------------------------------------------------ anonymous ones

    def claim(self, info: m.AppInfo, specs: list[m.FunctionSpec]) -> None:
        """The anonymous secrets of an app just created are that app's."""
        ids = {
            ref.secret_id
            for spec in specs
            for ref in spec.secrets
            if ref.name is None and ref.secret_id in self._rows
        }
        mine = [self._rows[sid] for sid in ids if self._rows[sid].app_id is None]
        if not mine:
            return
        for row in mine:
            row.app_id = info.app_id
        t = secrets_table
        owned = [row.secret_id for row in mine]
        self.store._write(
            "secret_claim",
            lambda c: c.execute(
                update(t).where(t.c.secret_id.in_(owned)).values(app_id=info.app_id)
            ),
        )

    def release(self, app_id: str) -> None:
        """An app stopped: its anonymous secrets go (its containers have their values)."""
        self._drop([r for r in self._rows.values() if r.name is None and r.app_id == app_id])

    def _drop_orphans(self, now: float) -> None:
        self._drop(
            [
                r
                for r in self._rows.values()
                if r.name is None and r.app_id is None and r.created_at < now - ORPHAN_AFTER_S
            ]
        )

    def _drop(self, rows: list[_Row]) -> None:
        if not rows:
            return
        gone = [r.secret_id for r in rows]
        for sid in gone:
            self._rows.pop(sid, None)
        t = secrets_table
        self.store._write(
            "secret_drop", lambda c: c.execute(delete(t).where(t.c.secret_id.in_(gone)))
        )
        log.info("deleted %d anonymous secrets of stopped or refused apps", len(gone))

    # ------------------------------------------------------------------ functions

    def _row_of(self, ref: m.SecretRef, workspace: str) -> _Row | None:
        """The secret ``ref`` names in ``workspace`` (another workspace's: ``None``)."""
        if ref.name is not None:  # by name first: a secret made again under its name counts
            sid = self._by_name.get((workspace, ref.name))
            if sid is not None:
                return self._rows.get(sid)
        row = self._rows.get(ref.secret_id) if ref.secret_id else None
        return row if row is not None and row.workspace == workspace else None

    def resolve(self, refs: list[m.SecretRef], owner: str) -> list[m.SecretRef]:
        """``refs`` with the ids of named secrets filled in, in the workspace of the
        request being served (``ACTING``); ``NotFoundError`` for a name or id that does
        not exist there, ``InvalidError`` for a missing required key. ``owner`` names the
        function in errors. Changes nothing."""
        workspace = ACTING.get()
        out = []
        for ref in refs:
            row = self._row_of(ref, workspace)
            if row is None:
                if ref.name is not None:
                    raise exc.NotFoundError(
                        f"{owner}: secret {ref.name!r} not found; create it with `strato "
                        f"secret create {ref.name} KEY=VALUE ...`"
                    )
                raise exc.NotFoundError(
                    f"{owner}: secret {ref.secret_id or '(no id)'} not found; "
                    "Secret.from_dict(...) secrets are created when the app is"
                )
            if ref.required_keys:
                have = self.cipher.open(row.secret_id, row.key_id, row.data, row.label)
                missing = sorted(set(ref.required_keys) - set(have))
                if missing:
                    raise exc.InvalidError(
                        f"{owner}: secret {row.label} lacks the required keys {missing}"
                    )
            ws = "" if workspace == DEFAULT_WORKSPACE else workspace  # ("": the default)
            out.append(msgspec.structs.replace(ref, secret_id=row.secret_id, workspace=ws))
        return out

    def env_for(self, spec: m.FunctionSpec) -> dict[str, str]:
        """The environment of a function's secrets for one container's start."""
        return self.env_of(spec.secrets, spec.name)

    def env_of(self, refs: list[m.SecretRef], owner: str) -> dict[str, str]:
        """The environment variables of ``refs`` (a function's, a sandbox's), later ones
        winning. Raises ``NotFoundError`` for a secret deleted since the deploy and
        ``ExecutionError`` for one this key cannot open (never with values)."""
        env: dict[str, str] = {}
        for ref in refs:
            row = self._row_of(ref, ref.workspace or DEFAULT_WORKSPACE)
            if row is None:
                label = repr(ref.name) if ref.name else ref.secret_id
                raise exc.NotFoundError(
                    f"secret {label} of {owner} was deleted: create it again (`strato "
                    "secret create`) or deploy the app without it"
                )
            env.update(self.cipher.open(row.secret_id, row.key_id, row.data, row.label))
        return env
