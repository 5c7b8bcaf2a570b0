"""Workspaces and tokens (``server/workspaces.py``) on a real store: tokens are kept as
hashes, checked in constant time (an unknown id costs the same comparison), revoked at
once; route access levels and roles; migration v6 moves earlier rows to ``main`` and
makes names unique per workspace."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import IntegrityError

from strato import exceptions as exc
from strato.protocol import messages as m
from strato.server import workspaces as wsmod
from strato.server.api.router import Route, check_access
from strato.server.store import Store
from strato.server.store.migrations import LATEST, current_version
from strato.server.store.tables_workspaces import api_tokens
from strato.server.workspaces import Caller, Workspaces

INSTALL = "installation-token-" + "x" * 20


@pytest.fixture
def store(db_url):
    s = Store(db_url)
    yield s
    s.close()


def _run(coro):
    return asyncio.run(coro)


def test_a_token_authenticates_as_its_workspace_and_role_and_only_its_hash_is_kept(store):
    spaces = Workspaces(store, INSTALL)
    _run(spaces.create("acme"))
    new = _run(spaces.create_token("acme", m.CreateToken("read-only", "ci")))
    assert new.token.startswith(f"st_{new.info.token_id}_")
    caller = _run(Workspaces(store, INSTALL).authenticate(new.token.encode(), None))
    assert caller == Caller("acme", "read-only", token_id=new.info.token_id)  # (a new cache)
    secret = new.token.split("_", 2)[2]
    rows = store._read(lambda c: [dict(r._mapping) for r in c.execute(select(api_tokens))])
    assert len(rows) == 1 and len(rows[0]["secret_sha256"]) == 32
    assert secret.encode() not in repr(rows).encode() and secret not in repr(rows)
    wrong = new.token[:-2] + ("AA" if not new.token.endswith("AA") else "BB")
    assert _run(spaces.authenticate(wrong.encode(), None)) is None
    assert _run(spaces.authenticate(b"st_0123456789abcdef_" + b"y" * 43, None)) is None
    assert _run(spaces.authenticate(b"garbage", None)) is None


def test_revoking_takes_effect_at_once(store):
    spaces = Workspaces(store, INSTALL)
    new = _run(spaces.create_token("main", m.CreateToken("developer")))
    caller = _run(spaces.authenticate(new.token.encode(), None))
    assert caller is not None and spaces.still_valid(caller)
    _run(spaces.revoke("main", new.info.token_id))
    assert not spaces.still_valid(caller)  # an open connection's next request
    assert _run(spaces.authenticate(new.token.encode(), None)) is None
    assert _run(Workspaces(store, INSTALL).authenticate(new.token.encode(), None)) is None
    with pytest.raises(exc.NotFoundError):  # another workspace's token: as a missing one
        _run(spaces.revoke("other", new.info.token_id))


def test_unknown_and_wrong_tokens_take_the_same_comparison(store, monkeypatch):
    spaces = Workspaces(store, INSTALL)
    new = _run(spaces.create_token("main", m.CreateToken("developer")))
    seen: list[tuple[int, int]] = []
    real = wsmod.hmac.compare_digest

    def counting(a, b):
        seen.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(wsmod.hmac, "compare_digest", counting)
    token_id = new.info.token_id
    for token in (
        new.token,  # right
        f"st_{token_id}_{'z' * 43}",  # known id, wrong secret
        f"st_{'f' * 16}_{'z' * 43}",  # unknown id
    ):
        seen.clear()
        _run(spaces.authenticate(token.encode(), None))
        # the installation token's comparison, then one of two sha256 digests
        assert seen[-1] == (32, 32) and len(seen) == 2, seen


def test_the_installation_token_acts_in_any_workspace_a_workspace_token_in_its_own(store):
    spaces = Workspaces(store, INSTALL)
    assert _run(spaces.authenticate(INSTALL.encode(), None)) == wsmod.INSTALLATION
    with pytest.raises(exc.AuthError, match="workspace create nope"):
        _run(spaces.authenticate(INSTALL.encode(), "nope"))
    _run(spaces.create("acme"))
    assert _run(spaces.authenticate(INSTALL.encode(), "acme")) == Caller("acme", "admin", True)
    new = _run(spaces.create_token("acme", m.CreateToken("admin")))
    assert _run(spaces.authenticate(new.token.encode(), "acme")).workspace == "acme"
    with pytest.raises(exc.AuthError, match="belongs to workspace 'acme'"):
        _run(spaces.authenticate(new.token.encode(), "main"))
    with pytest.raises(exc.AlreadyExistsError):
        _run(spaces.create("acme"))
    with pytest.raises(exc.InvalidError):
        _run(spaces.create("Bad Name"))
    with pytest.raises(exc.InvalidError, match="role"):
        _run(spaces.create_token("acme", m.CreateToken("root")))


def test_route_access_levels_and_roles():
    async def h(_):
        raise AssertionError

    get, post = Route("GET", "/apps", h, ""), Route("POST", "/apps", h, "")
    nodes, tokens = Route("GET", "/nodes", h, ""), Route("POST", "/tokens", h, "", access="admin")
    assert (get.access, post.access, nodes.access, tokens.access) == (
        "read",
        "write",
        "operator",
        "admin",
    )
    allowed = {
        role: [r.access for r in (get, post, nodes, tokens) if Caller("w", role).may(r.access)]
        for role in ("read-only", "developer", "admin")
    }
    assert allowed == {
        "read-only": ["read"],
        "developer": ["read", "write"],
        "admin": ["read", "write", "admin"],
    }
    assert all(wsmod.INSTALLATION.may(r.access) for r in (get, post, nodes, tokens))
    with pytest.raises(exc.PermissionDeniedError, match="read-only"):
        check_access(Caller("w", "read-only"), post)
    with pytest.raises(ValueError):
        Route("GET", "/x", h, "", access="root")


def test_migration_v6_moves_rows_to_main_and_makes_names_unique_per_workspace(store):
    url = store.url
    with store.conn.begin():  # back to version 5: no workspaces, names unique everywhere
        for stmt in (
            "DROP TABLE api_tokens",
            "DROP TABLE workspaces",
            "DROP TABLE dicts",
            "CREATE TABLE dicts (dict_id VARCHAR(64) PRIMARY KEY, name VARCHAR(64) UNIQUE, "
            "created_at FLOAT NOT NULL, heartbeat_at FLOAT)",
            "ALTER TABLE apps DROP COLUMN workspace",
            "INSERT INTO dicts VALUES ('di-1', 'shared', 0, NULL)",
            "INSERT INTO apps (app_id, name, state, created_at) VALUES "
            "('ap-1', 'old', 'deployed', 0)",
            "UPDATE schema_version SET version = 5",
        ):
            store.conn.execute(text(stmt))
    store.close()
    again = Store(url)
    try:
        with again.conn.begin():
            assert current_version(again.conn) == LATEST  # v6 and every later one applied
            c = again.conn
            assert c.execute(text("SELECT workspace FROM dicts")).all() == [("main",)]
            assert c.execute(text("SELECT workspace FROM apps")).all() == [("main",)]
            assert c.execute(text("SELECT name FROM workspaces")).all() == [("main",)]
            c.execute(text("INSERT INTO dicts VALUES ('di-2', 'shared', 0, NULL, 'acme')"))
        with pytest.raises(IntegrityError), again.conn.begin():
            again.conn.execute(text("INSERT INTO dicts VALUES ('di-3', 'shared', 0, NULL, 'main')"))
    finally:
        again.close()
