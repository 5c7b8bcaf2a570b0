"""Sandboxes end to end (issue 9): a real control plane, real containers under bwrap and
gVisor (and the plain ``process`` runtime for what does not depend on isolation)."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
import uuid

import pytest
from conftest import dedicated_server, wait_until

import strato
from strato import exceptions as exc

pytestmark = pytest.mark.slow

ISOLATING = [r for r in ("bwrap", "gvisor") if shutil.which("bwrap" if r == "bwrap" else "runsc")]
if os.geteuid() != 0 or len(ISOLATING) < 2:
    pytest.fail("these tests need root, bubblewrap and runsc (.ci/run installs them)")


@pytest.fixture(scope="module")
def app(strato_server):
    strato_server.activate()
    return strato.App.lookup(f"sandbox-test-{uuid.uuid4().hex[:8]}", create_if_missing=True)


@pytest.fixture(params=ISOLATING)
def runtime(request, server):
    return request.param


@pytest.fixture
def sb(app, runtime):
    sandbox = strato.Sandbox.create(app=app, runtime=runtime, timeout=120)
    yield sandbox
    sandbox.terminate()


def test_exec_streams_output_and_exit_code(sb):
    p = sb.exec("sh", "-c", "echo out; echo err >&2; exit 3")
    assert p.stdout.read() == "out\n"
    assert p.stderr.read() == "err\n"
    assert p.wait() == 3
    assert p.returncode == 3
    assert p.poll() == 3


def test_stdin_and_iteration_by_line(sb):
    p = sb.exec("python3", "-c", "import sys\nfor line in sys.stdin: print(line.strip().upper())")
    p.stdin.write("hello\nworld\n")
    p.stdin.write_eof()
    p.stdin.drain()
    assert list(p.stdout) == ["HELLO\n", "WORLD\n"]
    assert p.wait() == 0


def test_poll_while_running_then_exit(sb):
    p = sb.exec("sh", "-c", "read x; echo got $x")
    assert p.poll() is None
    p.stdin.write(b"1\n")
    p.stdin.drain()
    assert p.stdout.read() == "got 1\n"
    assert p.wait() == 0


def test_missing_program_exits_127_with_the_shells_message(sb):
    p = sb.exec("no-such-program-here", "x")
    assert p.wait() == 127
    err = p.stderr.read()
    assert "no-such-program-here" in err and "not found" in err


def test_exec_env_workdir_and_binary_output(sb):
    p = sb.exec("sh", "-c", "echo $FOO; pwd", env={"FOO": "bar"}, workdir="/tmp")
    assert p.stdout.read() == "bar\n/tmp\n"
    p = sb.exec(
        "python3", "-c", "import sys; sys.stdout.buffer.write(bytes(range(256)))", text=False
    )
    assert p.stdout.read() == bytes(range(256))


def test_large_output_streams_with_flow_control(sb):
    # 24 MiB: more than the control plane holds unread (the agent is paused and resumed)
    n = 24 << 20
    p = sb.exec("python3", "-c", f"import sys; sys.stdout.buffer.write(b'x' * {n})", text=False)
    time.sleep(1.0)  # let it fill what the control plane holds before anyone reads
    got = 0
    for line in p.stdout:
        got += len(line)
    assert got == n
    assert p.wait() == 0


def test_exec_timeout_kills_the_process(sb):
    p = sb.exec("sleep", "1000", timeout=1)
    assert p.wait() == 124


def test_terminated_sandbox_raises_on_exec(app, runtime):
    sb = strato.Sandbox.create(app=app, runtime=runtime)
    assert sb.exec("true").wait() == 0
    sb.terminate()
    with pytest.raises(exc.SandboxTerminatedError):
        sb.wait()
    assert sb.returncode == 137
    sb.wait(raise_on_termination=False)
    with pytest.raises(exc.SandboxTerminatedError):
        sb.exec("true")


def test_sandbox_past_its_timeout_is_killed(app, runtime):
    sb = strato.Sandbox.create(app=app, runtime=runtime, timeout=2)
    p = sb.exec("sleep", "1000")
    with pytest.raises(exc.SandboxTimeoutError):
        sb.wait()
    assert sb.returncode == 124
    assert "timeout" in sb.reason
    assert p.wait() == 137


def test_idle_timeout(app):
    sb = strato.Sandbox.create(app=app, runtime="bwrap", idle_timeout=1)
    assert sb.exec("true").wait() == 0
    with pytest.raises(exc.SandboxTimeoutError):
        sb.wait()


def test_entrypoint_sets_the_return_code(app, runtime):
    sb = strato.Sandbox.create("sh", "-c", "exit 7", app=app, runtime=runtime)
    sb.wait()
    assert sb.returncode == 7
    assert sb.poll() == 7


def test_from_id_reattaches_and_reads_unread_output(app):
    sb = strato.Sandbox.create(app=app, runtime="bwrap")
    p = sb.exec("sh", "-c", "echo one; echo two")
    assert p.wait() == 0
    again = strato.Sandbox.from_id(sb.object_id)
    assert again.poll() is None
    from strato.container_process import ContainerProcess

    assert ContainerProcess(again.object_id, p.pid).stdout.read() == "one\ntwo\n"
    again.terminate()


def test_names_tags_list_and_from_name(app):
    name = f"box-{uuid.uuid4().hex[:6]}"
    sb = strato.Sandbox.create(app=app, runtime="bwrap", name=name, tags={"k": "v"})
    try:
        assert strato.Sandbox.from_name(app.name, name).object_id == sb.object_id
        with pytest.raises(exc.AlreadyExistsError):
            strato.Sandbox.create(app=app, runtime="bwrap", name=name)
        sb.set_tags({"k": "w", "team": "a"})
        assert sb.get_tags() == {"k": "w", "team": "a"}
        ids = [s.object_id for s in strato.Sandbox.list(app_id=app.app_id, tags={"team": "a"})]
        assert ids == [sb.object_id]
        assert strato.Sandbox.list(app_id=app.app_id, tags={"team": "b"}) == []
    finally:
        sb.terminate()
    with pytest.raises(exc.NotFoundError):
        strato.Sandbox.from_name(app.name, name)


def test_aio_twins(app):
    async def main():
        sb = strato.Sandbox.create(app=app, runtime="bwrap")
        p = await sb.exec.aio("sh", "-c", "echo a; echo b")
        lines = [line async for line in p.stdout]
        assert lines == ["a\n", "b\n"]
        assert await p.wait.aio() == 0
        assert await sb.poll.aio() is None
        await sb.terminate.aio()
        await sb.wait.aio(raise_on_termination=False)
        assert sb.returncode == 137

    asyncio.run(main())


def test_bad_input(app):
    with pytest.raises(exc.InvalidError):
        strato.Sandbox.create(app=app, runtime="nope")
    with pytest.raises(exc.InvalidError):
        strato.Sandbox.create(app=app, timeout=0)
    with pytest.raises(exc.InvalidError):
        strato.Sandbox.create(runtime="bwrap")  # no app outside a container
    with pytest.raises(exc.NotFoundError):
        strato.Sandbox.from_id("sb-0000000000000000")


def test_a_stopped_app_ends_its_sandboxes(strato_server):
    app = strato.App.lookup(f"sandbox-stop-{uuid.uuid4().hex[:8]}", create_if_missing=True)
    sb = strato.Sandbox.create(app=app, runtime="bwrap")
    assert sb.exec("true").wait() == 0
    app.stop()
    wait_until(lambda: sb.poll() is not None, 30, "the sandbox to end with its app")
    assert sb.returncode == 137


def test_files_write_read_append_seek_ls_mkdir_rm(sb):
    sb.mkdir("/tmp/work/deep", parents=True)
    with sb.open("/tmp/work/a.txt", "w") as f:
        f.write("hello\n")
        f.write("world\n")
    with sb.open("/tmp/work/a.txt", "a") as f:
        f.write("again\n")
    with sb.open("/tmp/work/a.txt") as f:
        assert f.readline() == "hello\n"
        assert f.read() == "world\nagain\n"
        f.seek(6)
        assert f.read(5) == "world"
        assert f.tell() == 11
        f.seek(-6, 2)
        assert f.read() == "again\n"
    with sb.open("/tmp/work/a.txt") as f:
        assert list(f) == ["hello\n", "world\n", "again\n"]
    # what a process wrote is what the file API reads, and the other way round
    assert sb.exec("cat", "/tmp/work/a.txt").stdout.read() == "hello\nworld\nagain\n"
    with sb.open("/tmp/work/b.bin", "wb") as f:
        f.write(bytes(range(256)))
    with sb.open("/tmp/work/b.bin", "r+b") as f:
        f.seek(10)
        f.write(b"\xff\xff")
        f.seek(0)
        data = f.read()
    assert data[:10] == bytes(range(10)) and data[10:12] == b"\xff\xff" and len(data) == 256
    assert sb.ls("/tmp/work") == ["a.txt", "b.bin", "deep"]
    with pytest.raises(exc.SandboxFilesystemNotFoundError):
        sb.open("/tmp/work/missing.txt")
    with pytest.raises(FileNotFoundError):  # the Python class too
        sb.ls("/tmp/nowhere")
    with pytest.raises(exc.SandboxFilesystemFileExistsError):
        sb.open("/tmp/work/a.txt", "x")
    with pytest.raises(exc.SandboxFilesystemDirectoryNotEmptyError):
        sb.rm("/tmp/work")
    sb.rm("/tmp/work/a.txt")
    sb.rm("/tmp/work", recursive=True)
    assert "work" not in sb.ls("/tmp")
    with pytest.raises(exc.InvalidError):
        sb.open("/tmp/x", "rw")


def test_large_file_moves_in_chunks(sb):
    n = (5 << 20) + 123  # several chunks, not a multiple of one
    p = sb.exec(
        "python3", "-c", f"open('/tmp/big', 'wb').write(bytes(i % 251 for i in range({n})))"
    )
    assert p.wait() == 0
    with sb.open("/tmp/big", "rb") as f:
        data = f.read()
    assert data == bytes(i % 251 for i in range(n))
    with sb.open("/tmp/big2", "wb") as f:
        f.write(data)
    p = sb.exec(
        "python3",
        "-c",
        "import hashlib; print(hashlib.sha256(open('/tmp/big2','rb').read()).hexdigest())",
    )
    import hashlib

    assert p.stdout.read().strip() == hashlib.sha256(data).hexdigest()


def test_a_driver_that_disconnects_does_not_end_the_sandbox(app):
    script = (
        "import os, strato\n"
        f"app = strato.App.lookup({app.name!r})\n"
        "sb = strato.Sandbox.create(app=app, runtime='bwrap')\n"
        "sb.exec('sh', '-c', 'sleep 1; echo later > /tmp/note')\n"
        "print(sb.object_id, flush=True)\n"
        "os._exit(0)\n"  # no goodbye: its connection just drops
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    sb = strato.Sandbox.from_id(out.stdout.strip())
    assert sb.poll() is None
    wait_until(
        lambda: sb.exec("cat", "/tmp/note").stdout.read() == "later\n",
        30,
        "the sandbox's process to write its note",
        every=0.5,
    )
    sb.terminate()


def test_a_control_plane_restart_reports_its_sandboxes_terminated(strato_server):
    with dedicated_server({}) as handle:
        app = strato.App.lookup("restart-sb", create_if_missing=True)
        sb = strato.Sandbox.create(app=app, runtime="bwrap")
        assert sb.exec("true").wait() == 0
        handle.restart()
        again = strato.Sandbox.from_id(sb.object_id)
        assert again.poll() == 137
        assert "control plane restarted" in again.reason
        with pytest.raises(exc.SandboxTerminatedError):
            again.wait()
        with pytest.raises(exc.SandboxTerminatedError):
            again.exec("true")


def test_warm_pool_hands_out_a_started_sandbox_configured_as_asked(strato_server):
    env = {"STRATO_SANDBOX_WARM_POOL": "1", "STRATO_SANDBOX_RUNTIME": "bwrap"}
    with dedicated_server(env):
        app = strato.App.lookup("pool-sb", create_if_missing=True)
        wait_until(  # the pool's sandbox is up: it is no sandbox of the app's
            lambda: any(
                c["function_id"].startswith("fn-sb-") and c["state"] == "ready"
                for c in containers()
            ),
            60,
            "the warm pool to fill",
        )
        sb = strato.Sandbox.create(
            app=app, env={"GREETING": "hi"}, workdir="/tmp", name="pooled", tags={"a": "b"}
        )
        out = sb.exec("sh", "-c", "echo $GREETING; pwd").stdout.read()
        assert out == "hi\n/tmp\n"
        assert [s.object_id for s in strato.Sandbox.list(app_id=app.app_id)] == [sb.object_id]
        assert strato.Sandbox.from_name("pool-sb", "pooled").get_tags() == {"a": "b"}
        # one right after (the pool refills in the background, or it starts cold)
        other = strato.Sandbox.create("sh", "-c", "echo entry; exit 4", app=app)
        other.wait()
        assert other.returncode == 4
        sb.terminate()


def containers() -> list[dict]:
    from strato.client import session

    raw = session.api().request_raw("GET", "/containers")
    import msgspec

    return msgspec.msgpack.decode(raw)["containers"]


def test_a_function_drives_a_sandbox_over_its_channel(app):
    from apps import sandbox_driver

    with sandbox_driver.app.run(quiet=True):
        got = sandbox_driver.drive.remote(
            "open('/tmp/result.txt', 'w').write('42')\nprint('computed')"
        )
        assert got["out"] == "computed\n" and got["code"] == 0 and got["written"] == "42"
        assert got["id"] in got["listed"]
        # a sandbox of another app (this test's) is not its to reach
        other = strato.Sandbox.create(app=app, runtime="bwrap")
        try:
            assert sandbox_driver.peek.remote(other.object_id).startswith("NotFoundError")
        finally:
            other.terminate()


def test_secrets_and_volumes(app, runtime):
    import io

    secret = strato.Secret.from_dict({"API_KEY": "s3cret"})
    vol = strato.Volume.from_name(f"sb-vol-{uuid.uuid4().hex[:6]}", create_if_missing=True)
    with vol.batch_upload() as batch:
        batch.put_file(io.BytesIO(b"input data"), "/in.txt")
    sb = strato.Sandbox.create(
        app=app, runtime=runtime, secrets=[secret], volumes={"/data": vol}, timeout=120
    )
    out = sb.exec("sh", "-c", "echo $API_KEY; cat /data/in.txt; echo out > /data/out.txt")
    assert out.stdout.read() == "s3cret\ninput data"
    assert out.wait() == 0
    sb.terminate()
    sb.wait(raise_on_termination=False)

    # what it wrote reaches the volume when it ends (the worker commits it)
    def committed() -> bool:
        try:
            return b"".join(vol.read_file("/out.txt")) == b"out\n"
        except exc.NotFoundError:
            return False

    wait_until(committed, 30, "the sandbox's commit", every=0.2)
    with pytest.raises(exc.NotFoundError):
        strato.Sandbox.create(app=app, runtime=runtime, secrets=[strato.Secret.from_name("nope")])
    # a secret for one process only
    sb = strato.Sandbox.create(app=app, runtime=runtime, timeout=120)
    p = sb.exec("sh", "-c", "echo $TOKEN", secrets=[strato.Secret.from_dict({"TOKEN": "t0k"})])
    assert p.stdout.read() == "t0k\n"
    assert sb.exec("sh", "-c", "echo [$TOKEN]").stdout.read() == "[]\n"
    with pytest.raises(exc.NotFoundError):
        sb.exec("true", secrets=[strato.Secret.from_name("nope")])
    sb.terminate()


def strato_cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "strato.cli.main", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_list_exec_logs_stop(app):
    sb = strato.Sandbox.create(app=app, runtime="bwrap", name="cli-box")
    listed = strato_cli("sandbox", "list", "--app", app.name)
    assert sb.object_id in listed.stdout and "cli-box" in listed.stdout
    run = strato_cli("sandbox", "exec", sb.object_id, "sh", "-c", "tr a-z A-Z; echo e >&2; exit 5",
                     stdin="piped in\n")  # fmt: skip
    assert (run.returncode, run.stdout, run.stderr) == (5, "PIPED IN\n", "e\n")
    assert strato_cli("sandbox", "stop", sb.object_id).returncode == 0
    sb.wait(raise_on_termination=False)
    assert sb.returncode == 137
    entry = strato.Sandbox.create("sh", "-c", "echo from entrypoint", app=app, runtime="bwrap")
    assert strato_cli("sandbox", "logs", entry.object_id).stdout == "from entrypoint\n"
    gone = strato_cli("sandbox", "exec", sb.object_id, "true")
    assert gone.returncode != 0 and "has ended" in gone.stderr


def test_the_entrypoints_own_streams(app, runtime):
    sb = strato.Sandbox.create(
        "python3", "-c", "import sys\nfor l in sys.stdin: print('got', l.strip())\nsys.exit(9)",
        app=app, runtime=runtime, timeout=60,
    )  # fmt: skip
    sb.stdin.write("one\ntwo\n")  # (written while it starts: it waits for the agent)
    sb.stdin.write_eof()
    sb.stdin.drain()
    assert list(sb.stdout) == ["got one\n", "got two\n"]
    assert sb.stderr.read() == ""
    sb.wait()
    assert sb.returncode == 9


def test_sandboxes_are_never_stopped_to_make_room(strato_server):
    # a node of 1 CPU holds 8 sandboxes of 0.125: the 9th waits, and none is evicted
    with dedicated_server({"STRATO_NODE_CPU": "1"}):
        app = strato.App.lookup("full-node", create_if_missing=True)
        boxes = [strato.Sandbox.create(app=app, runtime="bwrap") for _ in range(8)]
        for sb in boxes:
            assert sb.exec("true").wait() == 0
        late = strato.Sandbox.create(app=app, runtime="bwrap", timeout=5)
        with pytest.raises(exc.SandboxTimeoutError):
            late.wait()  # it never got room
        assert all(sb.poll() is None for sb in boxes)
        boxes[0].terminate()
        for sb in boxes[1:]:
            assert sb.exec("echo", "alive").stdout.read() == "alive\n"


def test_a_dead_worker_agent_ends_its_sandboxes_with_the_reason(strato_server):
    import signal

    from conftest import processes_of

    with dedicated_server({}) as handle:
        app = strato.App.lookup("worker-dies", create_if_missing=True)
        sb = strato.Sandbox.create(app=app, runtime="bwrap")
        assert sb.exec("true").wait() == 0
        agents = [pid for pid, cmd in processes_of(handle.home) if "-m strato.worker" in cmd]
        assert len(agents) == 1, processes_of(handle.home)
        os.kill(agents[0], signal.SIGKILL)
        wait_until(lambda: sb.poll() is not None, 30, "the sandbox to be reported ended")
        assert sb.returncode == 137
        assert "worker agent" in sb.reason, sb.reason
        handle.wait_for_worker()  # a new agent: new sandboxes run again
        again = strato.Sandbox.create(app=app, runtime="bwrap")
        assert again.exec("echo", "back").stdout.read() == "back\n"
        again.terminate()


def test_exec_on_a_terminal(sb):
    p = sb.exec(
        "sh", "-c", "tty; stty size; read line; echo got $line; echo err >&2",
        pty=True, pty_size=(100, 30),
    )  # fmt: skip
    p.stdin.write("typed\n")
    p.stdin.drain()
    assert p.wait() == 0
    out = p.stdout.read().replace("\r\n", "\n")
    assert "/dev/pts/" in out, out
    assert "30 100\n" in out
    assert "typed\n" in out.replace("got typed", "")  # the terminal echoes what was typed
    assert "got typed\n" in out
    assert "err\n" in out and p.stderr.read() == ""


@pytest.mark.skipif(not shutil.which("tmux"), reason="needs tmux")
def test_strato_shell_on_a_real_terminal_under_tmux(server):
    sock = f"strato-shell-{uuid.uuid4().hex[:6]}"
    env = " ".join(f"{k}={os.environ[k]}" for k in ("STRATO_SERVER_URL", "STRATO_HOME"))
    cmd = f"env {env} {sys.executable} -m strato.cli.main shell --runtime bwrap; echo SHELL-EXITED=$?; sleep 60"  # noqa: E501

    def tmux(*args: str) -> str:
        return subprocess.run(
            ["tmux", "-L", sock, *args], capture_output=True, text=True, timeout=30
        ).stdout

    def screen() -> str:
        return tmux("capture-pane", "-p", "-t", "t")

    tmux("new-session", "-d", "-s", "t", "-x", "100", "-y", "30", cmd)
    try:
        wait_until(lambda: "$" in screen() or "#" in screen(), 60, "the shell's prompt")
        tmux("send-keys", "-t", "t", "echo hello-$((40+2)); tty; stty size", "Enter")
        wait_until(lambda: "hello-42" in screen(), 30, "the command's output")
        size = tmux("display", "-p", "-t", "t", "#{pane_height} #{pane_width}").strip()
        wait_until(lambda: size in screen(), 30, f"the terminal's size ({size}): {screen()}")
        assert "/dev/pts/" in screen()
        tmux("resize-window", "-t", "t", "-x", "90", "-y", "20")
        size = tmux("display", "-p", "-t", "t", "#{pane_height} #{pane_width}").strip()
        assert size != "30 100"
        asked = [0.0]

        def new_size_shown() -> bool:
            # the resize travels to the sandbox on its own (SIGWINCH, then a request): a
            # `stty size` typed before it lands prints the old size, so ask again until
            # the new one shows (on a busy machine the first answer may be the old size)
            if size in screen():
                return True
            if time.monotonic() - asked[0] > 2.0:
                tmux("send-keys", "-t", "t", "clear; stty size", "Enter")
                asked[0] = time.monotonic()
            return False

        wait_until(new_size_shown, 30, f"the new size ({size}) to reach the sandbox")
        tmux("send-keys", "-t", "t", "exit 3", "Enter")
        wait_until(lambda: "SHELL-EXITED=3" in screen(), 30, "the shell to end with its code")
    finally:
        tmux("kill-server")


def test_a_sandbox_in_an_image(strato_server, runtime):
    cache = os.environ.get("STRATO_TEST_IMAGE_CACHE", "/tmp/strato-test-image-cache")
    with dedicated_server({"STRATO_IMAGE_CACHE": cache}):
        app = strato.App.lookup("image-sb", create_if_missing=True)
        image = strato.Image.debian_slim().pip_install("humanize")  # (the isolation tests')
        sb = strato.Sandbox.create(app=app, image=image, runtime=runtime, timeout=600)
        p = sb.exec("python3", "-c", "import humanize; print(humanize.naturalsize(2000000))")
        assert p.stdout.read() == "2.0 MB\n", p.stderr.read()
        assert sb.exec("cat", "/etc/debian_version").wait() == 0
        sb.terminate()


def test_a_missing_workdir_is_made_for_the_sandbox_and_refused_for_an_exec(app, runtime):
    """A sandbox's own ``workdir`` that its root lacks is made (as Docker's WORKDIR); an
    exec's ``workdir`` that does not exist ends that exec with 127 and the reason, and the
    sandbox carries on (its agent used to die of the FileNotFoundError)."""
    sandbox = strato.Sandbox.create(app=app, runtime=runtime, timeout=120, workdir="/tmp/w/x")
    try:
        p = sandbox.exec("pwd")
        assert p.wait() == 0 and p.stdout.read().strip() == "/tmp/w/x"
        p = sandbox.exec("pwd", workdir="/no/such/dir")
        assert p.wait() == 127
        assert "/no/such/dir" in p.stderr.read()
        p = sandbox.exec("echo", "alive")
        assert p.wait() == 0 and p.stdout.read().strip() == "alive"
    finally:
        sandbox.terminate()
