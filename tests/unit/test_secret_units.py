"""Secrets without a control plane: the key file, sealing, the store's rows (SQLite and
PostgreSQL), resolving a spec's references, the environment of a start, the SDK's
constructors and the .env parser. Values never appear in a row, an error or a listing."""

from __future__ import annotations

import asyncio
import os
import stat
import time

import pytest
from test_store import store  # noqa: F401 - the store fixture, on SQLite and PostgreSQL

from strato import exceptions as exc
from strato.protocol import messages as m
from strato.sdk.secret import Secret, check_secrets, parse_dotenv
from strato.server import secrets as srv
from strato.server.store.tables_secrets import secrets as table

VALUE = "hunter2-" + os.urandom(6).hex()


def run(coro):
    return asyncio.run(coro)


# ---------------------------------------------------------------------- the key


def test_key_file_is_made_private_and_reused(tmp_path):
    path = tmp_path / "sub" / "secret.key"
    key = srv.load_or_create_key(path)
    assert len(key) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert srv.load_or_create_key(path) == key


def test_a_damaged_key_file_is_refused_without_its_content(tmp_path):
    path = tmp_path / "secret.key"
    path.write_text("not-a-key-" + VALUE)
    with pytest.raises(exc.InvalidError) as e:
        srv.load_or_create_key(path)
    assert VALUE not in str(e.value) and "STRATO_SECRET_KEY_FILE" in str(e.value)


def test_key_path_setting(tmp_path, monkeypatch):
    monkeypatch.setenv("STRATO_SECRET_KEY_FILE", str(tmp_path / "k"))
    assert srv.key_path(tmp_path / "home") == tmp_path / "k"
    monkeypatch.delenv("STRATO_SECRET_KEY_FILE")
    assert srv.key_path(tmp_path / "home") == tmp_path / "home" / "secret.key"


# ---------------------------------------------------------------------- sealing


def test_seal_and_open_bind_the_row_and_the_key():
    c = srv.Cipher(os.urandom(32))
    data = c.seal("st-1", {"A": VALUE})
    assert VALUE.encode() not in data
    assert c.open("st-1", c.key_id, data, "'x'") == {"A": VALUE}
    with pytest.raises(exc.ExecutionError, match="changed or damaged"):
        c.open("st-2", c.key_id, data, "'x'")  # moved to another row
    tampered = data[:-1] + bytes([data[-1] ^ 1])
    with pytest.raises(exc.ExecutionError, match="changed or damaged"):
        c.open("st-1", c.key_id, tampered, "'x'")
    other = srv.Cipher(os.urandom(32))
    with pytest.raises(exc.ExecutionError, match="another key") as e:
        other.open("st-1", c.key_id, data, "'x'")
    assert VALUE not in str(e.value)


# ---------------------------------------------------------------------- the store


def _rows(st):
    return st._read(lambda c: [dict(r._mapping) for r in c.execute(table.select())])


def test_create_list_replace_delete(store):  # noqa: F811
    s = srv.Secrets(store, srv.Cipher(os.urandom(32)))
    info = run(s.create(m.CreateSecret({"TOKEN": VALUE, "USER": "me"}, name="api")))
    assert info.name == "api" and info.n_keys == 2
    anon = run(s.create(m.CreateSecret({"X": VALUE})))
    assert anon.name is None
    assert [i.name for i in s.named()] == ["api"]  # anonymous ones are not listed
    for row in _rows(store):
        assert VALUE.encode() not in row["data"]
        assert VALUE not in repr(row)
    with pytest.raises(exc.AlreadyExistsError, match="--force"):
        run(s.create(m.CreateSecret({"TOKEN": "new"}, name="api")))
    run(s.create(m.CreateSecret({"TOKEN": "new"}, name="api", overwrite=True)))
    spec = m.FunctionSpec("f", "mod", "f", secrets=[m.SecretRef(name="api")])
    assert s.env_for(spec) == {"TOKEN": "new"}
    # a new Secrets (a restarted control plane) reads the rows back
    again = srv.Secrets(store, s.cipher)
    assert again.env_for(spec) == {"TOKEN": "new"}
    assert again.env_for(m.FunctionSpec("g", "m", "g", secrets=[m.SecretRef(anon.secret_id)])) == {
        "X": VALUE
    }
    run(again.delete("api"))
    with pytest.raises(exc.NotFoundError, match="strato secret list"):
        run(again.delete("api"))
    with pytest.raises(exc.NotFoundError, match="was deleted"):
        again.env_for(spec)
    assert [r["name"] for r in _rows(store)] == [None]


def test_bad_values_change_nothing(store):  # noqa: F811
    s = srv.Secrets(store, srv.Cipher(os.urandom(32)))
    with pytest.raises(exc.InvalidError, match="reserved") as e:
        run(s.create(m.CreateSecret({"STRATO_TOKEN": VALUE}, name="a")))
    with pytest.raises(exc.InvalidError, match="NUL") as e:
        run(s.create(m.CreateSecret({"K": VALUE + "\0"}, name="a")))
    assert VALUE not in str(e.value)
    assert s.named() == [] and _rows(store) == []


def test_resolve_fills_ids_and_refuses_unknown_names(store):  # noqa: F811
    s = srv.Secrets(store, srv.Cipher(os.urandom(32)))
    info = run(s.create(m.CreateSecret({"A": VALUE}, name="db")))
    refs = s.resolve([m.SecretRef(name="db")], "f")
    assert refs == [m.SecretRef(secret_id=info.secret_id, name="db")]
    with pytest.raises(exc.NotFoundError, match="strato secret create nope"):
        s.resolve([m.SecretRef(name="nope")], "f")
    with pytest.raises(exc.NotFoundError):
        s.resolve([m.SecretRef(secret_id="st-0123456789abcdef")], "f")
    with pytest.raises(exc.InvalidError, match=r"required keys \['B'\]") as e:
        s.resolve([m.SecretRef(name="db", required_keys=["A", "B"])], "f")
    assert VALUE not in str(e.value)


def test_later_secrets_win(store):  # noqa: F811
    s = srv.Secrets(store, srv.Cipher(os.urandom(32)))
    a = run(s.create(m.CreateSecret({"K": "a", "A": "1"})))
    b = run(s.create(m.CreateSecret({"K": "b"})))
    spec = m.FunctionSpec(
        "f", "m", "f", secrets=[m.SecretRef(a.secret_id), m.SecretRef(b.secret_id)]
    )
    assert s.env_for(spec) == {"K": "b", "A": "1"}


# ---------------------------------------------------------------------- the SDK


def test_sdk_constructors(tmp_path, monkeypatch):
    with pytest.raises(exc.InvalidError, match="secret name"):
        Secret.from_name("bad name!")
    with pytest.raises(exc.InvalidError, match="environment variable name"):
        Secret.from_dict({"1X": "v"})
    with pytest.raises(exc.InvalidError, match="not a str"):
        Secret.from_dict({"X": 5})
    with pytest.raises(exc.InvalidError, match="reserved"):
        Secret.from_dict({"STRATO_X": VALUE})
    assert Secret.from_dict({"A": "1", "B": None})._values == {"A": "1"}
    monkeypatch.setenv("MY_LOCAL", VALUE)
    assert Secret.from_local_environ(["MY_LOCAL"])._values == {"MY_LOCAL": VALUE}
    with pytest.raises(exc.InvalidError, match="NOT_SET_HERE"):
        Secret.from_local_environ(["NOT_SET_HERE"])
    (tmp_path / ".env").write_text(f"A={VALUE}\n")
    assert Secret.from_dotenv(tmp_path)._values == {"A": VALUE}
    assert Secret.from_dotenv(tmp_path / ".env")._values == {"A": VALUE}
    with pytest.raises(exc.InvalidError, match="no file"):
        Secret.from_dotenv(tmp_path / "missing")
    s = Secret.from_dict({"A": VALUE})
    assert VALUE not in repr(s)
    with pytest.raises(exc.InvalidError, match="list of strato.Secret"):
        check_secrets(s)
    with pytest.raises(exc.InvalidError, match="not dict"):
        check_secrets([{"A": "b"}])


def test_sdk_secrets_in_a_container_read_nothing(monkeypatch, tmp_path):
    """The app's module is imported in its container, where the .env file is not."""
    monkeypatch.setenv("STRATO_IN_CONTAINER", "1")
    assert Secret.from_dotenv(tmp_path / "nowhere")._values == {}
    assert Secret.from_local_environ(["NOT_SET_HERE"])._values == {}


def test_parse_dotenv():
    text = """
# a comment
export A=1
B = two words  # trailing comment
C='single # kept'
D="line\\nbreak \\"q\\""
E=
"""
    assert parse_dotenv(text) == {
        "A": "1",
        "B": "two words",
        "C": "single # kept",
        "D": 'line\nbreak "q"',
        "E": "",
    }
    with pytest.raises(exc.InvalidError, match="line 2") as e:
        parse_dotenv(f"A=1\n{VALUE}\n")
    assert VALUE not in str(e.value)
    with pytest.raises(exc.InvalidError, match="not closed"):
        parse_dotenv("A='open")


class FakeClient:
    def __init__(self) -> None:
        self.created: list[m.CreateSecret] = []

    def call(self, method, path, body, response):
        assert (method, path) == ("POST", "/secrets")
        self.created.append(body)
        return m.SecretInfo(f"st-{len(self.created):016x}", None, 0.0, 0.0)


def test_app_and_function_secrets_resolve_once_each():
    import strato

    shared = Secret.from_dict({"SHARED": VALUE})
    own = Secret.from_dict({"OWN": "1"})
    app = strato.App("secret-units", secrets=[shared])

    @app.function(secrets=[own, Secret.from_name("named")], serialized=True)
    def f():
        pass

    @app.function(serialized=True)
    def g():
        pass

    client = FakeClient()
    specs = app._with_secrets(client, [f._spec, g._spec])
    assert [r.name for r in specs[0].secrets] == [None, None, "named"]
    assert specs[1].secrets == [specs[0].secrets[0]]  # the app's secret, created once
    assert [c.values for c in client.created] == [{"SHARED": VALUE}, {"OWN": "1"}]
    assert VALUE not in repr(specs)
    again = app._with_secrets(client, [f._spec])  # another app created: its own ones
    assert len(client.created) == 4 and again[0].secrets[0] != specs[0].secrets[0]
    with pytest.raises(exc.InvalidError, match=r"App\(secrets=...\)"):
        strato.App("x", secrets=shared)


def test_anonymous_secrets_live_as_long_as_their_app(store, monkeypatch):  # noqa: F811
    s = srv.Secrets(store, srv.Cipher(os.urandom(32)))
    named = run(s.create(m.CreateSecret({"A": "1"}, name="kept")))
    mine = run(s.create(m.CreateSecret({"A": VALUE})))
    other = run(s.create(m.CreateSecret({"A": "2"})))
    store.create_app("ap-1", "a", "deployed", [], None, False)
    spec = m.FunctionSpec(
        "f", "m", "f", secrets=[m.SecretRef(mine.secret_id), m.SecretRef(named.secret_id, "kept")]
    )
    s.claim(m.AppInfo("ap-1", "a", "deployed", 0.0), [spec])
    s.release("ap-2")  # another app: nothing of its own
    assert s.env_for(spec) == {"A": "1"}  # (the named one is last: it wins)
    s.release("ap-1")
    store.flush()
    assert {r["secret_id"] for r in _rows(store)} == {named.secret_id, other.secret_id}
    # an anonymous one no app claimed goes after ORPHAN_AFTER_S (at the next start, or the
    # next anonymous one made)
    later = time.time() + srv.ORPHAN_AFTER_S + 1
    monkeypatch.setattr(srv.time, "time", lambda: later)
    again = srv.Secrets(store, s.cipher)
    store.flush()
    assert [r["secret_id"] for r in _rows(store)] == [named.secret_id]
    assert [i.name for i in again.named()] == ["kept"]


def test_anonymous_secrets_of_apps_stopped_while_down_go_at_start(store):  # noqa: F811
    s = srv.Secrets(store, srv.Cipher(os.urandom(32)))
    a = run(s.create(m.CreateSecret({"A": "1"})))
    store.create_app("ap-1", "a", "deployed", [], None, False)
    s.claim(
        m.AppInfo("ap-1", "a", "deployed", 0.0),
        [m.FunctionSpec("f", "m", "f", secrets=[m.SecretRef(a.secret_id)])],
    )
    store.set_app_state("ap-1", "stopped")  # ... and the control plane died before release
    store.flush()
    srv.Secrets(store, s.cipher)
    store.flush()
    assert _rows(store) == []
