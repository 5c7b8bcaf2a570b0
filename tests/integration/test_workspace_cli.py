"""``strato workspace create|list`` and ``strato token create|list|revoke`` against the
real control plane, with ``STRATO_TOKEN`` / ``STRATO_WORKSPACE`` selecting who acts."""

from __future__ import annotations

import secrets

from click.testing import CliRunner

from strato.cli.main import main as cli_main
from strato.client import session


def strato(*args: str, ok: bool = True, **env: str) -> str:
    session.reset()  # (a new token or workspace: a new client)
    try:
        result = CliRunner().invoke(cli_main, list(args), env=env or None)
    finally:
        session.reset()
    assert (result.exit_code == 0) == ok, (args, result.exit_code, result.output)
    return result.output


def test_workspaces_and_tokens_from_the_cli(server):
    ws = "cli-" + secrets.token_hex(3)
    assert f"created workspace '{ws}'" in strato("workspace", "create", ws)
    assert ws in strato("workspace", "list") and "main" in strato("workspace", "list")
    admin = strato("token", "create", "--role", "admin", STRATO_WORKSPACE=ws).splitlines()[0]
    assert admin.startswith("st_")
    dev = strato("token", "create", "--name", "ci", STRATO_TOKEN=admin).splitlines()[0]
    dev_id = dev.split("_")[1]
    listed = strato("token", "list", STRATO_TOKEN=admin)
    assert dev_id in listed and "developer" in listed and "ci" in listed
    # a developer token: no token admin, no operator commands; its workspace's apps only
    assert "admin access" in strato("token", "list", ok=False, STRATO_TOKEN=dev)
    assert "installation's token" in strato("workspace", "list", ok=False, STRATO_TOKEN=dev)
    assert "belongs to workspace" in strato(
        "app", "list", ok=False, STRATO_TOKEN=dev, STRATO_WORKSPACE="main"
    )
    assert f"revoked token {dev_id}" in strato("token", "revoke", dev_id, STRATO_TOKEN=admin)
    assert "revoked" in strato("token", "list", STRATO_TOKEN=admin)
    assert "revoked token" in strato("app", "list", ok=False, STRATO_TOKEN=dev)
