"""The package walls: the SDK never imports the server; the container's start path
imports neither the server nor heavy modules."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ["strato.server", "fastapi", "sqlalchemy", "uvicorn", "starlette", "click", "pydantic"]


def _loaded_after(code: str) -> set[str]:
    probe = f"{code}\nimport sys, json\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def _heavy(mods: set[str]) -> list[str]:
    return sorted(m for m in mods if any(m == h or m.startswith(h + ".") for h in HEAVY))


@pytest.mark.parametrize(
    "code",
    [
        "import strato; strato.App; strato.Function; strato.Retries",
        "import strato.sdk.app, strato.sdk.function, strato.client.session",
    ],
)
def test_sdk_does_not_import_the_server(code):
    assert _heavy(_loaded_after(code)) == []


def test_container_start_path_is_lean():
    mods = _loaded_after("import strato.container.runner")
    assert _heavy(mods) == []
    assert "strato.sdk.app" not in mods  # only the user's own module pulls the SDK in
    # nested calls go over the channel: no HTTP client, no server discovery at start
    assert {"strato.client.http", "strato.client.session", "http.client"}.isdisjoint(mods)
    assert "strato.client.channel_api" in mods


def test_probe_sees_heavy_imports():
    # the probe itself must be able to fail
    assert "sqlalchemy" in _heavy(_loaded_after("import strato.server.store"))
