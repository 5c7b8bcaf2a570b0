"""A sandbox's container starts the sandbox agent alone (``python -S -m
strato.container.sandbox_entry``): under gVisor every module imported costs its start a
few milliseconds, so the agent must not pull in the function runner's imports."""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

import strato.container.sandbox_agent as sandbox_agent
from strato.protocol import messages as m
from strato.worker.launch import compile_strato, prepare_launch

HEAVY = (
    "strato.container.runner",
    "cloudpickle",
    "asyncio",
    "shutil",
    "hashlib",
    "strato.client",
    "typing_extensions",
    "msgspec",  # the agent's own codec: strato.container.sandbox_wire
    "strato.protocol.messages",
    "strato.protocol.frames",
    "datetime",
    "decimal",
    "uuid",
)


def _launch(tmp_path: Path, sandbox: m.SandboxConfig | None, isolated: bool):
    spec = m.FunctionSpec(name="f", module="", qualname="", sandbox=sandbox)
    msg = m.ContainerStart("ct-1", "ap-1", "fn-1", spec, None, channel="unix:/nowhere")
    return prepare_launch(
        msg, cache=tmp_path, isolated=isolated, fetch_blob=lambda _: b"", log=lambda _: None
    )


def test_a_sandbox_runs_the_agent_without_the_runners_imports(tmp_path: Path) -> None:
    launch = _launch(tmp_path, m.SandboxConfig("sb-0123456789abcdef"), isolated=False)
    assert launch.argv[1:] == ["-S", "-m", "strato.container.sandbox_entry"]
    # the real entry (as -m runs it), with the interpreter, flags and path of its launch:
    # it imports the agent, then stops at its spec (a file that is not there); at exit
    # the process lists the modules it loaded
    env = {**launch.env, "STRATO_CONTAINER_SPEC": str(tmp_path / "no-spec")}
    code = (
        "import atexit, runpy, sys; "
        "atexit.register(lambda: print('LOADED', *(k for k, v in sys.modules.items() if v), "
        "file=sys.stderr)); "
        f"runpy.run_module({launch.argv[-1]!r}, run_name='__main__', alter_sys=True)"
    )
    out = subprocess.run(
        [*launch.argv[:-2], "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert "no-spec" in out.stderr and "LOADED" in out.stderr, out.stderr[-2000:]
    loaded = set(out.stderr.split("LOADED", 1)[1].split())
    assert {"strato.container.sandbox_agent", "strato.container.sandbox_wire"} <= loaded
    assert not loaded & set(HEAVY), loaded & set(HEAVY)


def test_a_function_keeps_the_runner(tmp_path: Path) -> None:
    for isolated in (False, True):
        launch = _launch(tmp_path, None, isolated)
        assert launch.argv[1:] == ["-m", "strato.container"]


def test_strato_is_compiled_for_containers() -> None:
    compile_strato()
    cached = importlib.util.cache_from_source(sandbox_agent.__file__)
    assert Path(cached).is_file(), cached
