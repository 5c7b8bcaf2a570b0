"""100 idle sandboxes alive at once on one (2-core) machine: a sandbox created without
``cpu=`` reserves a small share of a core (``STRATO_SANDBOX_CPU``), so they are all
admitted, and each answers an exec while the others stay up."""

from __future__ import annotations

import os
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import dedicated_server

import strato

pytestmark = pytest.mark.slow

if os.geteuid() != 0 or not shutil.which("bwrap"):
    pytest.fail("this test needs root and bubblewrap (.ci/run installs them)")

N = 100


def test_a_hundred_idle_bwrap_sandboxes_each_answer(strato_server):
    with dedicated_server({}):
        app = strato.App.lookup(f"idle-{uuid.uuid4().hex[:8]}", create_if_missing=True)
        made: list[strato.Sandbox] = []
        try:
            for _ in range(N):
                made.append(strato.Sandbox.create(app=app, runtime="bwrap", timeout=900))

            def answer(i: int) -> str:
                return made[i].exec("echo", f"sandbox {i}", timeout=120).stdout.read()

            with ThreadPoolExecutor(8) as pool:
                answers = list(pool.map(answer, range(N)))
            assert answers == [f"sandbox {i}\n" for i in range(N)]
            assert all(sb.poll() is None for sb in made)  # all alive at once
        finally:
            for sb in made:
                sb.terminate()
