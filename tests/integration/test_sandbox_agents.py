"""Both sandbox agents end to end: the native one (the default where it builds) and the
Python one (``STRATO_SANDBOX_AGENT=python``, and where no C compiler works), under bwrap
and gVisor, behave the same for the core of the sandbox API."""

from __future__ import annotations

import os
import shutil
import sys
import uuid

import pytest
from conftest import dedicated_server

import strato
from strato import exceptions as exc
from strato.protocol.images import DEFAULT_PATH

pytestmark = pytest.mark.slow

ISOLATING = [r for r in ("bwrap", "gvisor") if shutil.which("bwrap" if r == "bwrap" else "runsc")]
if os.geteuid() != 0 or len(ISOLATING) < 2:
    pytest.fail("these tests need root, bubblewrap and runsc (.ci/run installs them)")


AGENTS = ["native", "python"] if shutil.which("cc") else ["python"]  # (native: it builds)


@pytest.fixture(scope="module", params=AGENTS)
def agent(request, strato_server):
    with dedicated_server({"STRATO_SANDBOX_AGENT": request.param}):
        app = strato.App.lookup(f"agents-{uuid.uuid4().hex[:8]}", create_if_missing=True)
        yield request.param, app


@pytest.fixture(params=ISOLATING)
def sb(request, agent):
    kind, app = agent
    sandbox = strato.Sandbox.create(app=app, runtime=request.param, timeout=120)
    yield kind, sandbox
    sandbox.terminate()


def test_the_agent_asked_for_runs(sb):
    kind, sandbox = sb
    script = "test -x /run/strato/container/sandbox-agent && echo native; "
    script += "test -d /run/strato/src && echo py"
    found = sandbox.exec("sh", "-c", script).stdout.read().split()
    assert found == (["native"] if kind == "native" else ["py"])


def test_exec_output_codes_stdin_and_timeout(sb):
    _, sandbox = sb
    p = sandbox.exec("sh", "-c", "echo out; echo err >&2; exit 3")
    assert (p.stdout.read(), p.stderr.read(), p.wait()) == ("out\n", "err\n", 3)
    p = sandbox.exec("sh", "-c", "read x; echo got $x $FOO; pwd", env={"FOO": "f"}, workdir="/tmp")
    p.stdin.write(b"1\n")
    p.stdin.write_eof()
    p.stdin.drain()
    assert p.stdout.read() == "got 1 f\n/tmp\n" and p.wait() == 0
    p = sandbox.exec("no-such-program-here")
    assert p.wait() == 127 and "not found" in p.stderr.read()
    assert sandbox.exec("sh", "-c", "kill -9 $$").wait() == 137
    assert sandbox.exec("sleep", "100", timeout=1).wait() == 124
    p = sandbox.exec("env")
    assert "STRATO_" not in p.stdout.read() and p.wait() == 0


def test_path_is_the_interpreters_and_the_standard_one(sb):
    # an image-less sandbox's root has the host's /usr and the interpreter's folders, not
    # the worker's other PATH entries (its own environment would leak into the sandbox)
    _, sandbox = sb
    p = sandbox.exec("sh", "-c", 'echo "$PATH"; python -c "import sys; print(sys.prefix)"')
    assert p.wait() == 0, p.stderr.read()
    path, prefix = p.stdout.read().split()
    assert path == os.pathsep.join([os.path.dirname(sys.executable), DEFAULT_PATH])
    assert prefix == sys.prefix  # `python` is strato's interpreter, as on the worker


def test_a_terminal_and_files(sb):
    _, sandbox = sb
    p = sandbox.exec("sh", "-c", "tty; stty size", pty=True, pty_size=(80, 24))
    assert p.wait() == 0
    out = p.stdout.read().replace("\r\n", "\n")
    assert "/dev/pts/" in out and "24 80\n" in out
    sandbox.mkdir("/tmp/a/b", parents=True)
    with sandbox.open("/tmp/a/b/f.txt", "w") as f:
        f.write("hello")
    with sandbox.open("/tmp/a/b/f.txt") as f:
        assert f.read() == "hello"
    assert sandbox.ls("/tmp/a/b") == ["f.txt"]
    with pytest.raises(exc.SandboxFilesystemNotFoundError):
        sandbox.open("/tmp/a/missing")
    with pytest.raises(exc.SandboxFilesystemDirectoryNotEmptyError):
        sandbox.rm("/tmp/a")
    sandbox.rm("/tmp/a", recursive=True)
    assert "a" not in sandbox.ls("/tmp")


@pytest.mark.parametrize("runtime", ISOLATING)
def test_the_entrypoint_sets_the_code(agent, runtime):
    _, app = agent
    sandbox = strato.Sandbox.create("sh", "-c", "echo hi; exit 7", app=app, runtime=runtime)
    sandbox.wait()
    assert sandbox.returncode == 7
    assert sandbox.stdout.read() == "hi\n"
