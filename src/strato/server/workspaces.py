"""Workspaces and their API tokens: who a request comes from.

A workspace owns apps (and through them functions, calls, logs, usage, sandboxes) and
Dicts, Queues, Volumes and Secrets. A token belongs to one workspace and carries a role:
``admin`` (everything in its workspace, tokens too), ``developer`` (run, deploy, change
objects) or ``read-only`` (only routes that change nothing). The installation's own token
(``$STRATO_HOME/token``, or ``STRATO_TOKEN`` on the server) is the operator's: admin of
every workspace (``main`` unless the request names another) and the only one that may use
the operator routes (nodes, providers, the cluster, workspaces). The embedded default thus
keeps one workspace, ``main``, and needs no setup.

A workspace token reads ``st_<token_id>_<secret>``: the id finds its row, whose sha256 of
the secret is compared in constant time (``hmac.compare_digest``; an unknown or revoked id
costs the same hash and comparison). The secret is 32 random bytes, so a plain sha256
suffices: a slow KDF protects guessable passwords, and nobody can guess 256 random bits
from their hash. Rows are cached in memory; revoking one changes the cache in the same
step, so the next request with it is refused (HTTP requests and local-channel requests are
each checked).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from contextvars import ContextVar
from dataclasses import dataclass
from functools import cached_property

from sqlalchemy import Connection, select, update

from strato import exceptions as exc
from strato.protocol import messages as m

from .state.db import StateDb
from .store import Store
from .store.schema import apps as apps_table
from .store.tables_workspaces import DEFAULT_WORKSPACE, api_tokens, workspaces

ROLES = ("admin", "developer", "read-only")
# what each role may use: a route's access level is one of read, write, admin, operator
_ALLOWED = {
    "read-only": frozenset({"read"}),
    "developer": frozenset({"read", "write"}),
    "admin": frozenset({"read", "write", "admin"}),
}
_NAME = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,46}[a-z0-9])?$")
_TOKEN = re.compile(r"^st_([0-9a-f]{16})_([A-Za-z0-9_-]{20,128})$")
_DUMMY = hashlib.sha256(b"no such token").digest()


@dataclass(frozen=True)
class Caller:
    """Who sent a request: the workspace it acts in and its role there (``operator``:
    the installation's token, which may act in any workspace and use operator routes)."""

    workspace: str
    role: str
    operator: bool = False
    token_id: str | None = None

    def may(self, access: str) -> bool:
        return self.operator or access in _ALLOWED.get(self.role, ())


INSTALLATION = Caller(DEFAULT_WORKSPACE, "admin", operator=True)
ANONYMOUS = Caller(DEFAULT_WORKSPACE, "none")  # may use no route that needs a token
# the workspace the current API request acts in (set by the router for each request), for
# the hooks that run inside it without a request of their own (an app's specs' secrets)
ACTING: ContextVar[str] = ContextVar("strato_workspace", default=DEFAULT_WORKSPACE)


def check_workspace_name(name: str) -> str:
    if not _NAME.match(name):
        raise exc.InvalidError(
            f"workspace name {name!r}: use 1 to 48 lowercase letters, digits and inner '-'"
        )
    return name


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


@dataclass
class _Token:
    token_id: str
    workspace: str
    role: str
    name: str
    digest: bytes
    created_at: float
    revoked: bool

    @cached_property
    def caller(self) -> Caller:  # (made once: a frozen dataclass costs ~2 us to build)
        return Caller(self.workspace, self.role, token_id=self.token_id)


class Workspaces:
    """The workspaces, their tokens (cached), and which workspace each app belongs to."""

    def __init__(self, store: Store, installation_token: str) -> None:
        self.db = StateDb(store)
        self._installation = installation_token.encode()
        self._tokens: dict[str, _Token] = {}
        self.names: set[str] = set(self.db.run_now("workspaces", _names))
        # app id -> workspace (an app's never changes); read once, then kept by Apps
        self.app_ws: dict[str, str] = dict(self.db.run_now("app-workspaces", _app_workspaces))

    # ------------------------------------------------------------------ who is asking

    async def authenticate(self, token: bytes, workspace: str | None) -> Caller | None:
        """The caller a bearer token makes, acting in ``workspace`` (``STRATO_WORKSPACE``)
        when given; ``None`` for a wrong, unknown or revoked token. A workspace token
        naming another workspace, or an operator naming one that does not exist, is
        refused with a message that says so."""
        if hmac.compare_digest(token, self._installation):
            if workspace and workspace != DEFAULT_WORKSPACE:
                if workspace not in self.names:
                    raise exc.AuthError(
                        f"STRATO_WORKSPACE={workspace!r}: no such workspace; "
                        f"`strato workspace create {workspace}` makes it"
                    )
                return Caller(workspace, "admin", operator=True)
            return INSTALLATION
        caller = await self._verify(token.decode("latin-1"))
        if caller is not None and workspace and workspace != caller.workspace:
            raise exc.AuthError(
                f"this token belongs to workspace {caller.workspace!r}, not "
                f"STRATO_WORKSPACE={workspace!r}: unset it or use a token of that workspace"
            )
        return caller

    async def _verify(self, token: str) -> Caller | None:
        match = _TOKEN.match(token)
        if match is None:
            return None
        token_id, secret = match.groups()
        row = self._tokens.get(token_id)
        if row is None:
            row = await self.db.read("token", lambda c: _token_row(c, token_id))
            if row is not None:
                self._tokens[token_id] = row
        ok = hmac.compare_digest(_digest(secret), row.digest if row is not None else _DUMMY)
        if row is None or row.revoked or not ok:
            return None
        return row.caller

    def still_valid(self, caller: Caller) -> bool:
        """Whether the token ``caller`` came with is still valid (not revoked): checked on
        each request of a connection that authenticated once (the local channel)."""
        if caller.token_id is None:
            return True
        row = self._tokens.get(caller.token_id)
        return row is not None and not row.revoked

    def cached(self, token_id: str) -> Caller | None:
        """The caller of a token seen valid since this process started (a dashboard
        session's), unless it was revoked since (``None``: log in again)."""
        row = self._tokens.get(token_id)
        if row is None or row.revoked:
            return None
        return row.caller

    # ------------------------------------------------------------------ workspaces

    def check_exists(self, name: str) -> None:
        if name not in self.names:
            raise exc.NotFoundError(f"no workspace named {name!r}; `strato workspace list`")

    async def create(self, name: str) -> m.WorkspaceInfo:
        check_workspace_name(name)
        now = time.time()

        def run(c: Connection) -> None:
            if c.execute(select(workspaces.c.name).where(workspaces.c.name == name)).first():
                raise exc.AlreadyExistsError(f"workspace {name!r} exists already")
            c.execute(workspaces.insert().values(name=name, created_at=now))

        await self.db.run("create-workspace", run)
        self.names.add(name)
        return m.WorkspaceInfo(name, now)

    async def list(self) -> m.WorkspaceList:
        rows = await self.db.read(
            "workspaces",
            lambda c: c.execute(select(workspaces).order_by(workspaces.c.name)).all(),
        )
        return m.WorkspaceList([m.WorkspaceInfo(r.name, r.created_at) for r in rows])

    # ------------------------------------------------------------------ tokens

    async def create_token(self, workspace: str, req: m.CreateToken) -> m.NewToken:
        if req.role not in ROLES:
            raise exc.InvalidError(f"role {req.role!r}: use one of {', '.join(ROLES)}")
        self.check_exists(workspace)
        token_id = secrets.token_hex(8)
        secret = secrets.token_urlsafe(32)
        row = _Token(token_id, workspace, req.role, req.name, _digest(secret), time.time(), False)
        values = {
            "token_id": row.token_id,
            "workspace": row.workspace,
            "role": row.role,
            "name": row.name,
            "secret_sha256": row.digest,
            "created_at": row.created_at,
            "revoked": False,
        }
        await self.db.run("create-token", lambda c: c.execute(api_tokens.insert().values(values)))
        self._tokens[token_id] = row
        return m.NewToken(_info(row), f"st_{token_id}_{secret}")

    async def list_tokens(self, workspace: str) -> m.TokenList:
        t = api_tokens
        q = select(t).where(t.c.workspace == workspace).order_by(t.c.created_at)
        rows = await self.db.read("tokens", lambda c: [_row(r) for r in c.execute(q)])
        return m.TokenList([_info(r) for r in rows])

    async def revoke(self, workspace: str, token_id: str) -> None:
        """Revoke a token of ``workspace``: refused from the next request on."""
        t = api_tokens

        def run(c: Connection) -> int:
            where = (t.c.token_id == token_id) & (t.c.workspace == workspace)
            return c.execute(update(t).where(where).values(revoked=True)).rowcount

        if not await self.db.run("revoke-token", run):
            raise exc.NotFoundError(f"no token {token_id} in workspace {workspace!r}")
        cached = self._tokens.get(token_id)
        if cached is not None:
            cached.revoked = True


def _names(c: Connection) -> list[str]:
    return [r[0] for r in c.execute(select(workspaces.c.name))]


def _app_workspaces(c: Connection) -> list[tuple[str, str]]:
    return [(r[0], r[1]) for r in c.execute(select(apps_table.c.app_id, apps_table.c.workspace))]


def _row(r) -> _Token:
    return _Token(r.token_id, r.workspace, r.role, r.name, r.secret_sha256, r.created_at, r.revoked)


def _token_row(c: Connection, token_id: str) -> _Token | None:
    r = c.execute(select(api_tokens).where(api_tokens.c.token_id == token_id)).first()
    return _row(r) if r is not None else None


def _info(r: _Token) -> m.TokenInfo:
    return m.TokenInfo(r.token_id, r.workspace, r.role, r.name, r.created_at, r.revoked)
