"""Secrets end to end, with the real control plane and containers: a function (and a
class) with ``secrets=[...]`` sees them as environment variables, a function without
does not; the CLI creates, lists and deletes named ones; an unknown name refuses the app
and changes nothing; and no value is anywhere in the control plane's files (database,
journal, logs) or API answers."""

from __future__ import annotations

import hashlib
import importlib
import os
import secrets as pysecrets
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import dedicated_server, wait_until

from strato import exceptions as exc
from strato.cli.main import main as cli_main
from strato.client import session
from strato.protocol import messages as m

# values the test makes up: searched for everywhere afterwards
NAMED = "named-" + pysecrets.token_hex(12)
NAMED_2 = "replaced-" + pysecrets.token_hex(12)
FROM_DICT = "dict-" + pysecrets.token_hex(12)
LOCAL = "local-" + pysecrets.token_hex(12)
DOTENV = "dotenv-" + pysecrets.token_hex(12)
VALUES = (NAMED, NAMED_2, FROM_DICT, LOCAL, DOTENV)


def digest(v: str) -> str:
    return hashlib.sha256(v.encode()).hexdigest()


def cli(*args: str) -> str:
    result = CliRunner().invoke(cli_main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def cli_fails(*args: str) -> str:
    result = CliRunner().invoke(cli_main, list(args))
    assert result.exit_code != 0
    return result.output


@pytest.fixture(scope="module")
def secrets_app(strato_server):
    strato_server.activate()
    cli("secret", "create", "itest-named", f"ITEST_NAMED={NAMED}", "OTHER=x")
    os.environ["ITEST_DICT_VALUE"] = FROM_DICT
    os.environ["ITEST_LOCAL"] = LOCAL
    try:
        sys.modules.pop("apps.secrets_app", None)
        mod = importlib.import_module("apps.secrets_app")
    finally:
        del os.environ["ITEST_DICT_VALUE"], os.environ["ITEST_LOCAL"]
    with mod.app.run(quiet=True):
        yield mod


def test_functions_with_secrets_see_them_and_others_do_not(secrets_app):
    assert secrets_app.with_secrets.remote() == {
        "ITEST_NAMED": digest(NAMED),
        "ITEST_DICT": digest(FROM_DICT),
        "ITEST_LOCAL": digest(LOCAL),
    }
    assert secrets_app.without_secrets.remote() == dict.fromkeys(secrets_app.KEYS)
    assert secrets_app.WithSecret().look.remote() == {
        "ITEST_NAMED": digest(NAMED),
        "ITEST_DICT": None,
        "ITEST_LOCAL": None,
    }


def test_the_spec_carries_ids_not_values(secrets_app, strato_server):
    import sqlite3

    import msgspec

    db = sqlite3.connect(f"file:{strato_server.home / 'state.db'}?mode=ro", uri=True)
    try:
        fid = secrets_app.with_secrets.object_id
        (raw,) = db.execute("SELECT spec FROM functions WHERE function_id = ?", (fid,)).fetchone()
    finally:
        db.close()
    spec = msgspec.msgpack.decode(raw, type=m.FunctionSpec)
    assert [r.name for r in spec.secrets] == ["itest-named", None, None]
    assert all(r.secret_id.startswith("st-") for r in spec.secrets)


def test_cli_list_replace_dotenv_delete(server, tmp_path):
    out = cli("secret", "list")
    assert "itest-named" in out and NAMED not in out
    assert "already" in cli_fails("secret", "create", "itest-named", f"ITEST_NAMED={NAMED_2}")
    out = cli("secret", "create", "itest-named", f"ITEST_NAMED={NAMED_2}", "--force")
    assert "replaced" in out and NAMED_2 not in out
    env = tmp_path / "prod.env"
    env.write_text(f"# comment\nexport DOTENV_KEY='{DOTENV}'\n")
    out = cli("secret", "create", "itest-dotenv", "--from-dotenv", str(env))
    assert "DOTENV_KEY" in out and DOTENV not in out
    assert "itest-dotenv" in cli("secret", "list")
    assert "deleted" in cli("secret", "delete", "itest-dotenv", "--yes")
    assert "itest-dotenv" not in cli("secret", "list")
    assert "no secret named" in cli_fails("secret", "delete", "itest-dotenv", "--yes")


def test_bad_input_changes_nothing(server):
    api = session.api()
    before = api.call("GET", "/secrets", None, m.SecretList).secrets
    n_apps = len(api.call("GET", "/apps", None, m.AppList).apps)
    out = cli_fails("secret", "create", "bad name!", "A=b")
    assert "secret name" in out
    out = cli_fails("secret", "create", "itest-odd", f"not-a-pair-{NAMED}")
    assert "not KEY=VALUE" in out and NAMED not in out
    out = cli_fails("secret", "create", "itest-odd", f"STRATO_X={NAMED}")
    assert "reserved" in out and NAMED not in out
    out = cli_fails("secret", "create", "itest-odd", f"1BAD={NAMED}")
    assert NAMED not in out
    with pytest.raises(exc.InvalidError):  # the API's own checks, past the CLI's
        api.call("POST", "/secrets", m.CreateSecret({"ok": "v"}, name="-dash-first"))
    from apps import secrets_unknown

    with pytest.raises(exc.NotFoundError, match="strato secret create itest-no-such-secret"):
        secrets_unknown.app.deploy()
    assert api.call("GET", "/secrets", None, m.SecretList).secrets == before
    assert len(api.call("GET", "/apps", None, m.AppList).apps) == n_apps


def test_a_deleted_secret_fails_the_start_clearly(server):
    from apps import secrets_deleted

    cli("secret", "create", "itest-temp", "ITEST_TEMP=x")
    with secrets_deleted.app.run(quiet=True):
        cli("secret", "delete", "itest-temp", "--yes")
        with pytest.raises(exc.NotFoundError, match="'itest-temp' of has_temp was deleted"):
            secrets_deleted.has_temp.remote()
        cli("secret", "create", "itest-temp", "ITEST_TEMP=again")  # made again: it starts
        assert wait_until(_retry(secrets_deleted.has_temp.remote), 60, "a start with it")


def _retry(f):
    """``f()``, or None while it fails (its starts back off after the failed one)."""

    def attempt():
        try:
            return f()
        except exc.NotFoundError:
            return None

    return attempt


def test_secrets_survive_a_sigkill_of_the_control_plane(server):
    from apps import secrets_deleted

    with dedicated_server({}) as h:
        cli("secret", "create", "itest-temp", "ITEST_TEMP=durable")
        h.restart()  # SIGKILL, then start again on the same home (and key)
        assert "itest-temp" in cli("secret", "list")
        with secrets_deleted.app.run(quiet=True):
            assert secrets_deleted.has_temp.remote() is True


def _anonymous(home: Path) -> int:
    import sqlite3

    db = sqlite3.connect(f"file:{home / 'state.db'}?mode=ro", uri=True)
    try:
        return db.execute("SELECT count(*) FROM secrets WHERE name IS NULL").fetchone()[0]
    finally:
        db.close()


def test_an_apps_anonymous_secrets_go_when_it_stops(server):
    import strato

    app = strato.App("strato-test-secrets-anonymous")
    shared = strato.Secret.from_dict({"ITEST_DICT": FROM_DICT})

    @app.function(secrets=[shared], serialized=True)
    def f() -> str:
        return hashlib.sha256(os.environ["ITEST_DICT"].encode()).hexdigest()

    @app.function(secrets=[shared], serialized=True)
    def g() -> bool:
        return "ITEST_DICT" in os.environ

    before = _anonymous(server.home)
    for _ in range(2):  # the same App run twice: each run has its own
        with app.run(quiet=True):
            assert f.remote() == digest(FROM_DICT) and g.remote() is True
            assert _anonymous(server.home) == before + 1  # one, shared by both functions
        wait_until(lambda: _anonymous(server.home) == before, 30, "its secret deleted")


def _files(home: Path):
    for p in home.rglob("*"):
        if p.is_file() and not p.is_symlink() and p.name != "secret.key":
            yield p


def test_no_value_anywhere(secrets_app, server):
    """After the runs above: the database (and its WAL), the intake journal, the logs and
    every other file of the control plane's home, and its API answers, hold no value."""
    api = session.api()
    secrets_app.with_secrets.remote()  # a fresh start's worth of logs too
    key = server.home / "secret.key"
    assert key.exists() and (key.stat().st_mode & 0o777) == 0o600
    needles = [v.encode() for v in VALUES]
    found = []
    for p in _files(server.home):
        try:
            data = p.read_bytes()
        except OSError:
            continue
        found += [(str(p), v) for v in needles if v in data]
    assert not found, found
    assert list((server.home / "logs").glob("*")), "the control plane's logs were searched"
    app_id = secrets_app.app.app_id
    answers = [
        api.request_raw("GET", "/secrets"),
        api.request_raw("GET", "/apps"),
        api.request_raw("GET", f"/apps/{app_id}"),
        api.request_raw("GET", f"/apps/{app_id}/logs"),
        api.request_raw("GET", "/containers"),
        api.request_raw("GET", "/schedules"),
        api.request_raw("GET", "/openapi.json"),
    ]
    assert not [v for v in needles for a in answers if v in a]
