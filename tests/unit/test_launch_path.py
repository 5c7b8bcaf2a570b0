"""``PATH`` in a container without an image: an isolated one (a minimal root with the
host's ``/usr`` and the interpreter's folders) gets the interpreter's folder and the
default one, never the worker's own entries (they name the worker's folders, and each
exec of a bare name would try them); a process-runtime container shares the host and
keeps the worker's."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from strato.protocol import messages as m
from strato.protocol.images import DEFAULT_PATH
from strato.worker.launch import isolated_path, prepare_launch


def _launch(tmp_path: Path, isolated: bool, env: dict[str, str] | None = None):
    spec = m.FunctionSpec(name="f", module="", qualname="", env=env or {})
    msg = m.ContainerStart("ct-1", "ap-1", "fn-1", spec, None, channel="unix:/nowhere")
    return prepare_launch(
        msg, cache=tmp_path, isolated=isolated, fetch_blob=lambda _: b"", log=lambda _: None
    )


def test_an_isolated_function_without_an_image_gets_the_interpreters_path(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", f"/opt/worker-only/bin{os.pathsep}{os.environ['PATH']}")
    path = _launch(tmp_path, isolated=True).env["PATH"]
    assert (
        path == isolated_path() == os.pathsep.join([os.path.dirname(sys.executable), DEFAULT_PATH])
    )
    assert "/opt/worker-only/bin" not in path


def test_a_process_runtime_function_keeps_the_workers_path(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", f"/opt/worker-only/bin{os.pathsep}/usr/bin")
    assert (
        _launch(tmp_path, isolated=False).env["PATH"] == f"/opt/worker-only/bin{os.pathsep}/usr/bin"
    )


def test_the_functions_own_path_wins(tmp_path):
    launch = _launch(tmp_path, isolated=True, env={"PATH": "/mine/bin"})
    assert launch.env["PATH"] == "/mine/bin"
