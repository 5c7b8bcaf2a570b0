"""Escape attempts from sandboxes, each a case under every runtime offered for sandboxes
(bwrap and gVisor): the host's files, another sandbox's files and processes, the control
plane's API and channel, a fork bomb, a memory bomb, an exec that never ends, a sandbox
that outlives its timeout. Each asserts the attempt was contained and the platform (and
the sandbox's neighbours) carry on."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import msgspec
import pytest
from conftest import dedicated_server, wait_until

import strato
from strato import exceptions as exc

pytestmark = pytest.mark.slow

if os.geteuid() != 0 or not shutil.which("bwrap") or not shutil.which("runsc"):
    pytest.fail("these tests need root, bubblewrap and runsc (.ci/run installs them)")

RUNTIMES = ["bwrap", "gvisor"]
CHECKOUT = Path(__file__).resolve().parents[2]
PIDS_MAX = 64
# a hello with a guessed secret, and an API request with no hello at all
HELLO = msgspec.msgpack.encode({"t": "hello", "container_id": "ct-x", "token": "guess"}).hex()
API = msgspec.msgpack.encode({"t": "api", "req_id": 1, "method": "GET", "path": "/apps"}).hex()


@pytest.fixture(scope="module")
def cluster(strato_server):
    with dedicated_server({"STRATO_CONTAINER_PIDS_MAX": str(PIDS_MAX)}) as handle:
        app = strato.App.lookup(f"escape-{uuid.uuid4().hex[:8]}", create_if_missing=True)
        yield handle, app


@pytest.fixture(params=RUNTIMES)
def runtime(request):
    return request.param


@pytest.fixture
def make(cluster, runtime):
    made: list[strato.Sandbox] = []

    def make_one(**kw) -> strato.Sandbox:
        sb = strato.Sandbox.create(app=cluster[1], runtime=runtime, timeout=120, **kw)
        made.append(sb)
        return sb

    yield make_one
    for sb in made:
        sb.terminate()


def run(sb: strato.Sandbox, *cmd: str, timeout: float | None = 60) -> tuple[int, str, str]:
    p = sb.exec(*cmd, timeout=timeout)
    return p.wait(), p.stdout.read(), p.stderr.read()


def py(sb: strato.Sandbox, code: str, timeout: float | None = 60) -> tuple[int, str, str]:
    return run(sb, "python3", "-c", code, timeout=timeout)


def test_host_files_are_out_of_reach(make):
    sb = make()
    with tempfile.NamedTemporaryFile(dir="/var/tmp", prefix="strato-escape-") as f:
        f.write(b"host secret")
        f.flush()
        code, out, _ = run(sb, "cat", f.name)
        assert code != 0 and "host secret" not in out
    for path in (str(CHECKOUT / "pyproject.toml"), "/etc/shadow", "/root/.bash_history"):
        code, out, _ = run(sb, "cat", path)
        assert code != 0, f"the sandbox read {path}: {out[:100]!r}"
    # nor the control plane's home (its token, database, blobs)
    code, out, _ = py(sb, f"import os; print(os.listdir({cluster_home()!r}))")
    assert code != 0


def cluster_home() -> str:
    return os.environ.get("STRATO_HOME", "/root/.strato")


def test_other_sandboxes_files_and_processes(make):
    a, b = make(), make()
    assert run(a, "sh", "-c", "echo mine > /tmp/a-secret")[0] == 0
    sleeper = a.exec("sleep", "4242")
    code, out, _ = py(b, "import os; print(os.listdir('/tmp'))")  # (gVisor's ls: EINVAL)
    assert code == 0 and "a-secret" not in out
    code, out, _ = py(
        b,
        "import os\n"
        "seen = []\n"
        "for pid in os.listdir('/proc'):\n"
        "    try: seen.append(open(f'/proc/{pid}/cmdline','rb').read())\n"
        "    except Exception: pass\n"
        "print(any(c == b'sleep\\x00' + b'42' * 2 + b'\\x00' for c in seen), len(seen))",
    )
    assert out.split()[0] == "False", out
    # signalling everything it can see reaches none of a's processes
    run(b, "sh", "-c", "kill -9 -1")
    time.sleep(0.5)
    assert sleeper.poll() is None
    assert run(a, "echo", "still here")[1] == "still here\n"


def test_control_plane_api_and_gateway_are_unreachable(cluster, make):
    handle, _ = cluster
    port = urlsplit(handle.url).port
    sb = make()
    code, out, err = py(
        sb,
        "import socket\n"
        f"for host in ('127.0.0.1', '10.0.2.2', '10.0.2.3'):\n"
        f"  for port in ({port}, {port + 1}):\n"
        "    s = socket.socket(); s.settimeout(2)\n"
        "    try: s.connect((host, port)); print('REACHED', host, port)\n"
        "    except OSError: pass\n",
    )
    assert "REACHED" not in out, out


def test_channel_socket_needs_the_agents_secret(make):
    sb = make()
    # the agent's secret is in neither the processes' environment nor /proc
    code, out, _ = run(sb, "sh", "-c", "env; cat /proc/1/environ 2>/dev/null | tr '\\0' '\\n'")
    assert "STRATO_CONTAINER_TOKEN=" not in out or "STRATO_CONTAINER_TOKEN=000" in out
    assert not any(
        line.startswith("STRATO_CONTAINER_TOKEN=") and set(line.split("=", 1)[1]) - {"0"}
        for line in out.splitlines()
    )
    code, out, err = py(
        sb,
        "import socket, struct\n"
        "for path in ['/run/strato/channel.sock']:\n"
        f"    for body in (bytes.fromhex({HELLO!r}), b'garbage',\n"
        f"                 bytes.fromhex({API!r})):\n"
        "        s = socket.socket(socket.AF_UNIX); s.settimeout(5)\n"
        "        try:\n"
        "            s.connect(path)\n"
        "            s.sendall(struct.pack('>I', len(body)) + body)\n"
        "            got = b''\n"
        "            while (chunk := s.recv(65536)): got += chunk\n"
        "            print('answer', len(got), b'apiresp' in got)\n"
        "        except OSError as e: print('refused', e)\n",
    )
    assert code == 0, err
    assert out.count("answer") == 3, out  # it connects, and is closed
    assert "True" not in out  # no API answer
    # and the sandbox is untouched
    assert run(sb, "echo", "ok")[1] == "ok\n"


def runtime_of(sb: strato.Sandbox) -> str:
    return sb._info.runtime


def test_fork_bomb_is_contained(make):
    sb, neighbour = make(), make()
    bomb = (
        "import os, time\nwhile True:\n    try: os.fork()\n    except OSError: time.sleep(0.01)\n"
    )
    code, _, _ = py(sb, bomb, timeout=5)
    if sb.poll() is None:
        assert code == 124  # killed by its timeout, with its whole process group
        wait_until(
            lambda: run(sb, "echo", "ok")[1] == "ok\n", 30, "the sandbox to serve again", every=0.5
        )
    else:
        # gVisor (ptrace platform): its kernel needs a host thread per running task, and
        # the PIDs limit holds the whole sandbox, so the bomb ends the sandbox it is in
        assert runtime_of(sb) == "gvisor" and code == 137
    assert run(neighbour, "echo", "fine")[1] == "fine\n"
    assert subprocess.run(["echo", "host"], capture_output=True).returncode == 0


def test_memory_bomb_is_reported_as_oom(make):
    sb = make(memory=128)
    p = sb.exec("python3", "-c", "x = b'x' * (1 << 30); print('survived')")
    code = p.wait()
    assert code == 137
    assert "survived" not in p.stdout.read()
    assert "memory" in p.reason, p.reason
    info = strato.Sandbox.from_id(sb.object_id)
    if info.poll() is not None:  # gVisor: the sandbox's kernel went down with it
        assert "memory" in info.reason
    else:  # bwrap: the process alone; the sandbox serves on
        assert run(sb, "echo", "ok")[1] == "ok\n"


def test_exec_that_never_ends_is_killed_by_its_timeout(make):
    sb = make()
    p = sb.exec("sh", "-c", "trap '' TERM; while true; do sleep 1; done", timeout=2)
    assert p.wait() == 124
    assert "timeout" in p.reason


def test_sandbox_outliving_its_timeout_is_killed(cluster, runtime):
    sb = strato.Sandbox.create(app=cluster[1], runtime=runtime, timeout=3)
    p = sb.exec("sh", "-c", "trap '' TERM; sleep 1000")
    with pytest.raises(exc.SandboxTimeoutError):
        sb.wait()
    assert sb.returncode == 124
    assert p.wait() == 137
