"""The native sandbox agent (``strato/container/native``) run directly against a channel
socket of the test's: its frames are msgspec's encoding of the messages, byte for byte;
it runs processes as the Python agent does (output, exit codes, stdin, a terminal, files,
tunnels); and a malformed, truncated or oversized frame ends it cleanly (exit 0, never a
signal). The build and its fallback to the Python agent are checked too."""

from __future__ import annotations

import logging
import os
import random
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from strato.exceptions import InvalidError
from strato.protocol import frames
from strato.protocol import messages as m
from strato.worker import native_agent
from strato.worker.launch import NATIVE_AGENT, SANDBOX_ARGS, prepare_launch

pytestmark = pytest.mark.skipif(not shutil.which("cc"), reason="needs a C compiler")


@pytest.fixture(scope="module")
def binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    native_agent.forget_builds()
    got = native_agent.agent_binary(tmp_path_factory.mktemp("cache"))
    assert got is not None, "the native agent does not build here (see the warning)"
    return got


class Agent:
    """The binary with a channel (a Unix socket the test listens on) and a spec."""

    def __init__(self, binary: Path, tmp: Path, entrypoint: list[str] | None = None) -> None:
        self.path = str(tmp / "ch.sock")
        self.srv = socket.socket(socket.AF_UNIX)
        self.srv.bind(self.path)
        self.srv.listen(8)
        self.srv.settimeout(10)
        config = m.SandboxConfig("sb-0123456789abcdef", entrypoint=entrypoint or [])
        spec = m.FunctionSpec("f", "", "", sandbox=config, env={"FROM_SPEC": "yes"})
        (tmp / "spec").write_bytes(msgspec.msgpack.encode(spec))
        env = {
            "PATH": "/nowhere:/usr/local/bin:/usr/bin:/bin",
            "STRATO_CONTAINER_ID": "ct-1",
            "STRATO_CONTAINER_TOKEN": "s3cret-token",
            "STRATO_CHANNEL": "unix:" + self.path,
            "STRATO_CONTAINER_SPEC": str(tmp / "spec"),
            "STRATO_OTHER": "x",
            "PYTHONPATH": "/somewhere",
            "KEPT": "1",
        }
        self.proc = subprocess.Popen([str(binary)], env=env, cwd=tmp)
        self.sock, _ = self.srv.accept()
        self.sock.settimeout(15)
        self.raw: list[bytes] = []  # every body it sent

    def read(self) -> object | None:
        head = self._exactly(4)
        if head is None:
            return None
        body = self._exactly(int.from_bytes(head, "big"))
        assert body is not None, "a frame cut short"
        self.raw.append(body)
        return frames.decode(body)

    def _exactly(self, n: int) -> bytes | None:
        data = b""
        while len(data) < n:
            got = self.sock.recv(n - len(data))
            if not got:
                return None
            data += got
        return data

    def send(self, msg: object) -> None:
        self.sock.sendall(frames.encode(msg))

    def collect(self, pids: set[int]) -> tuple[dict, dict]:
        """Output by (pid, stream) and exits, until every pid in ``pids`` exited."""
        out: dict[tuple[int, int], list] = {}
        exits: dict[int, m.SbExit] = {}
        while not pids <= exits.keys():
            msg = self.read()
            assert msg is not None, "the agent ended"
            if isinstance(msg, m.SbOutput):
                for c in msg.chunks:
                    assert c.pid not in exits, "output after its exit"
                    got = out.setdefault((c.pid, c.stream), [b"", False])
                    assert not got[1], "output past its end"
                    got[0] += c.data
                    got[1] = c.eof
            elif isinstance(msg, m.SbExit):
                exits[msg.pid] = msg
        return out, exits

    def wait(self, timeout: float = 10) -> int:
        code = self.proc.wait(timeout)
        self.sock.close()
        self.srv.close()
        return code

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.sock.close()
        self.srv.close()


@pytest.fixture
def agent(binary: Path, tmp_path: Path) -> Iterator[Agent]:
    a = Agent(binary, tmp_path)
    yield a
    a.close()


def _started(a: Agent) -> None:
    assert a.read() == m.ContainerHello("ct-1", "s3cret-token")
    assert a.read() == m.ContainerReady()


def test_runs_processes_as_the_python_agent_does(agent: Agent, tmp_path: Path) -> None:
    _started(agent)
    agent.send(m.SbExec(2, ["sh", "-c", "echo out; echo err >&2; exit 3"]))
    agent.send(m.SbExec(3, ["no-such-program-here", "x"]))
    agent.send(m.SbExec(4, ["sleep", "100"], timeout=1.0))
    agent.send(m.SbExec(5, ["sh", "-c", "kill -9 $$"]))
    agent.send(m.SbExec(6, ["cat"]))
    agent.send(m.SbStdin(6, b"abc" * 100_000))
    agent.send(m.SbStdin(6, b"", eof=True))
    agent.send(
        m.SbExec(7, ["sh", "-c", "echo $FOO $FROM_SPEC $KEPT; env; pwd"], "/tmp", {"FOO": "bar"})
    )
    agent.send(m.SbExec(8, ["pwd"], workdir="/no/such/dir"))
    agent.send(m.SbExec(9, ["sh", "-c", "tty; stty size; read x; echo got $x"], pty=True,
                        size=m.TerminalSize(30, 100)))  # fmt: skip
    agent.send(m.SbStdin(9, b"typed\n"))
    agent.send(m.SbExec(10, ["sh", "-c", "cat /proc/$PPID/environ | tr '\\0' '\\n'"]))
    out, exits = agent.collect({2, 3, 4, 5, 6, 7, 8, 9, 10})
    assert out[(2, 1)] == [b"out\n", True] and out[(2, 2)] == [b"err\n", True]
    assert (exits[2].returncode, exits[2].reason) == (3, "")
    assert exits[3].returncode == 127
    assert b"no-such-program-here" in out[(3, 2)][0] and b"not found" in out[(3, 2)][0]
    assert (exits[4].returncode, exits[4].reason) == (124, "killed by its timeout (1s)")
    assert (exits[5].returncode, exits[5].reason) == (137, "killed by SIGKILL")
    assert out[(6, 1)] == [b"abc" * 100_000, True] and exits[6].returncode == 0
    lines = out[(7, 1)][0].decode().splitlines()
    assert lines[0] == "bar yes 1" and lines[-1] == "/tmp"
    assert not [v for v in lines if v.startswith(("STRATO_", "PYTHONPATH"))], lines
    assert exits[8].returncode == 127 and b"/no/such/dir" in out[(8, 2)][0]
    tty = out[(9, 1)][0].replace(b"\r\n", b"\n")
    assert b"/dev/pts/" in tty and b"30 100\n" in tty and b"got typed\n" in tty
    assert out[(9, 2)] == [b"", True] and exits[9].returncode == 0
    # its token is not in its environment's block (which /proc shows)
    assert exits[10].returncode != 0 or b"s3cret-token" not in out[(10, 1)][0]
    agent.send(m.StopContainer())
    assert agent.read() is None
    assert agent.wait() == 0


def test_frames_are_msgspecs_encoding_byte_for_byte(agent: Agent, tmp_path: Path) -> None:
    _started(agent)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "b").write_text("x")
    (tmp_path / "d" / "a").write_text("hello")
    agent.send(m.SbExec(2, ["sh", "-c", "printf 'ab\\0\\377'; exit 200"]))
    agent.collect({2})
    for i, req in enumerate(
        [
            m.FileRequest("ls", str(tmp_path / "d")),
            m.FileRequest("read", str(tmp_path / "d" / "a"), offset=1, length=3),
            m.FileRequest("stat", str(tmp_path / "d")),
            m.FileRequest("read", str(tmp_path / "missing"), length=3),
            m.FileRequest("write", "rel.txt", data=b"12345", append=True),
            m.FileRequest("mkdir", str(tmp_path / "d"), recursive=True),
            m.FileRequest("mkdir", str(tmp_path / "d")),
            m.FileRequest("rm", str(tmp_path / "d")),
            m.FileRequest("rm", str(tmp_path / "d"), recursive=True),
            m.FileRequest("read", str(tmp_path), length=3),
        ]
    ):
        agent.send(m.SbFile(i, req))
        result = agent.read()
        assert isinstance(result, m.SbFileResult) and result.req_id == i
        if i == 0:
            assert result.result.entries == ["a", "b"] and result.result.is_dir
        if i == 1:
            assert result.result.data == b"ell"
        if i == 3:
            assert result.result.error_kind == "not_found"
            assert result.result.error == f"{tmp_path}/missing: No such file or directory"
        if i == 4:
            assert (tmp_path / "rel.txt").read_bytes() == b"12345"  # (from its workdir)
        if i == 6:
            assert result.result.error_kind == "exists"
        if i == 7:
            assert result.result.error_kind == "not_empty"
        if i == 9:
            assert result.result.error_kind == "is_dir"
    assert not (tmp_path / "d").exists()
    agent.send(m.StopContainer())
    assert agent.read() is None
    assert agent.wait() == 0
    kinds = {type(frames.decode(b)).__name__ for b in agent.raw}
    assert kinds >= {"ContainerHello", "ContainerReady", "SbOutput", "SbExit", "SbFileResult"}
    for body in agent.raw:  # what msgspec makes of the same message is the same bytes
        assert msgspec.msgpack.encode(frames.decode(body)) == body


def test_a_fifo_or_a_process_that_reads_no_stdin_never_stalls_it(
    agent: Agent, tmp_path: Path
) -> None:
    _started(agent)
    os.mkfifo(tmp_path / "fifo")
    agent.send(m.SbFile(0, m.FileRequest("read", str(tmp_path / "fifo"), length=10)))
    agent.send(m.SbExec(2, ["sleep", "100"]))  # reads no stdin: 4 MiB fill its pipe
    for _ in range(4):
        agent.send(m.SbStdin(2, b"x" * (1 << 20)))
    agent.send(m.SbExec(3, ["echo", "still here"]))
    out, exits = agent.collect({3})
    assert out[(3, 1)] == [b"still here\n", True] and exits[3].returncode == 0
    fd = os.open(tmp_path / "fifo", os.O_WRONLY)  # its open ends: the read gets its answer
    os.close(fd)
    while not isinstance(msg := agent.read(), m.SbFileResult):
        pass
    assert msg.req_id == 0 and msg.result.error_kind == "other"  # (a FIFO cannot seek)


def test_a_tunnel_pipes_bytes_to_a_port(agent: Agent) -> None:
    _started(agent)
    port_srv = socket.socket()
    port_srv.bind(("127.0.0.1", 0))
    port_srv.listen(1)
    port = port_srv.getsockname()[1]

    def echo() -> None:
        c, _ = port_srv.accept()
        while data := c.recv(1000):
            c.sendall(data.upper())
        c.close()

    threading.Thread(target=echo, daemon=True).start()
    agent.send(m.SbTunnelOpen(7, port))
    ch, _ = agent.srv.accept()
    ch.settimeout(10)
    head = ch.recv(4)
    body = ch.recv(int.from_bytes(head, "big"))
    assert frames.decode(body) == m.SbTunnelHello("ct-1", "s3cret-token", 7, "")
    assert msgspec.msgpack.encode(frames.decode(body)) == body
    ch.sendall(b"hello tunnel")
    got = b""
    while len(got) < 12:
        got += ch.recv(100)
    assert got == b"HELLO TUNNEL"
    ch.shutdown(socket.SHUT_WR)
    assert ch.recv(100) == b""  # the port's end reaches the client
    ch.close()
    port_srv.close()
    # a port nobody listens on: the hello says why
    agent.send(m.SbTunnelOpen(8, port))
    ch, _ = agent.srv.accept()
    ch.settimeout(10)
    body = ch.recv(65536)[4:]
    hello = frames.decode(body)
    assert isinstance(hello, m.SbTunnelHello) and hello.conn_id == 8
    assert f"nothing accepts connections on port {port}" in hello.error
    ch.close()


def test_the_entrypoint_ends_the_agent_with_its_code(binary: Path, tmp_path: Path) -> None:
    a = Agent(binary, tmp_path, entrypoint=["sh", "-c", "echo entry; exit 7"])
    try:
        _started(a)
        out, exits = a.collect({1})
        assert out[(1, 1)] == [b"entry\n", True] and exits[1].returncode == 7
        assert a.wait() == 7
    finally:
        a.close()


def test_sigterm_kills_its_processes_and_exits(agent: Agent) -> None:
    _started(agent)
    agent.send(m.SbExec(2, ["sh", "-c", "echo $$; exec sleep 100"]))
    pid = b""
    while not pid.endswith(b"\n"):
        msg = agent.read()
        if isinstance(msg, m.SbOutput):
            pid += b"".join(c.data for c in msg.chunks if c.stream == 1)
    agent.proc.terminate()
    assert agent.wait() == 0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _alive(int(pid)):
        time.sleep(0.05)
    assert not _alive(int(pid))


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except OSError:
        return False


def _deep(n: int) -> bytes:
    return b"\x91" * n + b"\x00"


def _tagged(tag: bytes, rest: bytes = b"", n: int = 1) -> bytes:
    return bytes([0x80 | n]) + b"\xa1t" + bytes([0xA0 | len(tag)]) + tag + rest


MALFORMED = {
    "not msgpack": b"\xc1",
    "not a map": b"\x05",
    "no tag": b"\x81\xa1x\x01",
    "trailing bytes": _tagged(b"stop") + b"\x00",
    "truncated body": b"\x82\xa1t\xa6sbexec\xa3pid",
    "invalid utf-8": b"\x81\xa1t\xa2\xff\xfe",
    "a surrogate": b"\x81\xa1t\xa3\xed\xa0\x80",
    "deep nesting": b"\x82\xa1t\xa4stop\xa1x" + _deep(100),
    "a map that claims 4G pairs": b"\xdf\xff\xff\xff\xff\xa1t",
    "an array that claims 4G items": b"\x82\xa1t\xa4stop\xa1x\xdd\xff\xff\xff\xff",
    "a bin that claims 4G bytes": b"\x82\xa1t\xa4stop\xa1x\xc6\xff\xff\xff\xff",
    "a str that claims 64K bytes": b"\x82\xa1t\xa4stop\xa1x\xda\xff\xff",
    "an ext type": b"\x82\xa1t\xa4stop\xa1x\xd4\x01\x01",
    "a map key that is a list": b"\x82\xa1t\xa4stop\x90\x01",
    "an exec without argv": msgspec.msgpack.encode({"t": "sbexec", "pid": 2}),
    "an exec with a string pid": msgspec.msgpack.encode({"t": "sbexec", "pid": "2", "argv": ["x"]}),
    "argv that is not strings": msgspec.msgpack.encode({"t": "sbexec", "pid": 2, "argv": [1]}),
    "env that is not strings": msgspec.msgpack.encode(
        {"t": "sbexec", "pid": 2, "argv": ["true"], "env": {"A": 1}}
    ),
    "a size of 3": msgspec.msgpack.encode(
        {"t": "sbexec", "pid": 2, "argv": ["true"], "size": [1, 2, 3]}
    ),
    "stdin that is text": msgspec.msgpack.encode({"t": "sbstdin", "pid": 2, "data": "x"}),
    "a file request that is a list": msgspec.msgpack.encode(
        {"t": "sbfile", "req_id": 1, "request": []}
    ),
    "flow without paused": msgspec.msgpack.encode({"t": "sbflow", "pid": 2, "stream": 1}),
    "a bool as an int": msgspec.msgpack.encode({"t": "sbtunopen", "conn_id": True, "port": 1}),
    "a uint64 past int64": (
        b"\x83\xa1t\xa9sbtunopen\xa7conn_id\xcf" + b"\xff" * 8 + b"\xa4port\x01"
    ),
}


@pytest.mark.parametrize("body", list(MALFORMED.values()), ids=list(MALFORMED))
def test_a_malformed_frame_ends_it_cleanly(agent: Agent, body: bytes) -> None:
    _started(agent)
    agent.send(m.SbExec(2, ["sleep", "100"]))
    agent.sock.sendall(len(body).to_bytes(4, "big") + body)
    assert agent.read() is None  # it hung up
    assert agent.wait() == 0  # (a signal would be negative)


@pytest.mark.parametrize(
    "data",
    [
        b"\xff\xff\xff\xff",  # a length over any limit: nothing of it is read
        b"\x7f\xff\xff\xff" + b"x" * 100,  # 2 GiB announced, then the end
        b"\x00\x00\x01\x00" + b"\x81" * 10,  # cut short, then the end
        b"\x00\x00",  # a header cut short
    ],
    ids=["4 GiB", "2 GiB then eof", "truncated", "short header"],
)
def test_an_oversized_or_truncated_frame_ends_it_cleanly(agent: Agent, data: bytes) -> None:
    _started(agent)
    agent.sock.sendall(data)
    agent.sock.shutdown(socket.SHUT_WR)
    assert agent.read() is None
    assert agent.wait() == 0


def test_mangled_frames_never_crash_it(binary: Path, tmp_path: Path) -> None:
    rng = random.Random(1234)
    valid = [
        frames.encode(msg)[4:]
        for msg in (
            m.SbExec(2, ["true"], "/tmp", {"A": "b"}, 5.0, True, m.TerminalSize(2, 3)),
            m.SbStdin(2, b"data", eof=True),
            m.SbFile(1, m.FileRequest("stat", "/tmp", offset=1, length=2, data=b"x")),
            m.SbConfigure({"A": "b"}, "/tmp", []),
            m.SbFlow(2, 1, True),
            m.SbResize(2, m.TerminalSize(5, 6)),
            m.StopContainer(),
        )
    ]
    for i in range(30):
        body = bytearray(rng.choice(valid))
        for _ in range(rng.randint(1, 4)):
            action = rng.random()
            at = rng.randrange(len(body))
            if action < 0.5:
                body[at] = rng.randrange(256)
            elif action < 0.75:
                del body[at:]
            else:
                body[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        d = tmp_path / str(i)
        d.mkdir()
        a = Agent(binary, d)
        try:
            _started(a)
            a.sock.sendall(len(body).to_bytes(4, "big") + bytes(body))
            a.sock.shutdown(socket.SHUT_WR)
            while a.read() is not None:
                pass
            assert a.wait() in (0, 1), bytes(body)  # never a signal (negative)
        finally:
            a.close()


# ---------------------------------------------------------------- the build and its fallback


def _launch(tmp_path: Path, isolated: bool = True, channel: str = "unix:/nowhere"):
    spec = m.FunctionSpec("f", "", "", sandbox=m.SandboxConfig("sb-0123456789abcdef"))
    msg = m.ContainerStart("ct-1", "ap-1", "fn-1", spec, None, channel=channel)
    return prepare_launch(
        msg, cache=tmp_path / "cache", isolated=isolated, fetch_blob=lambda _: b"",
        log=lambda _: None,
    )  # fmt: skip


def test_an_isolated_sandbox_runs_the_native_agent(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    native_agent.forget_builds()
    launch = _launch(tmp_path)
    assert launch.argv == [NATIVE_AGENT]
    # in the container's folder (bound read-only), a link to the machine's build
    (bind,) = [b for b in launch.binds if NATIVE_AGENT.startswith(b.dst + "/")]
    assert bind.readonly
    placed = Path(bind.src) / os.path.basename(NATIVE_AGENT)
    built = next((tmp_path / "xdg" / "strato" / "sandbox-agent").glob("*/strato-sandbox-agent"))
    assert os.access(placed, os.X_OK) and os.path.samefile(placed, built)
    assert "PYTHONPATH" not in launch.env
    assert not [b for b in launch.binds if b.dst.endswith("/src/strato")]
    # the process runtime, a channel whose host is a name, or the setting: the Python one
    assert _launch(tmp_path, isolated=False).argv[1:] == SANDBOX_ARGS
    assert _launch(tmp_path, channel="tcp:cp.example:7000").argv[1:] == SANDBOX_ARGS
    assert _launch(tmp_path, channel="tcp:10.0.0.1:7000").argv == [NATIVE_AGENT]
    monkeypatch.setenv("STRATO_SANDBOX_AGENT", "python")
    assert _launch(tmp_path).argv[1:] == SANDBOX_ARGS


def test_without_a_compiler_sandboxes_run_the_python_agent(
    tmp_path: Path, monkeypatch, caplog
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    native_agent.forget_builds()
    try:
        with caplog.at_level(logging.WARNING, logger="strato.worker"):
            assert _launch(tmp_path).argv[1:] == SANDBOX_ARGS
            assert _launch(tmp_path).argv[1:] == SANDBOX_ARGS
        warnings = [r.getMessage() for r in caplog.records if "native sandbox agent" in r.message]
        assert len(warnings) == 1, warnings  # once
        assert "no-such-cc" in warnings[0] and "Python agent" in warnings[0]
        monkeypatch.setenv("STRATO_SANDBOX_AGENT", "native")
        with pytest.raises(InvalidError, match="STRATO_SANDBOX_AGENT=native"):
            _launch(tmp_path)
        # a compiler that fails says why too
        monkeypatch.setenv("CC", "cc -DSTRATO_NO_SUCH_FLAG_ -Wno-error -include /no/such.h")
        native_agent.forget_builds()
        with pytest.raises(InvalidError, match="no/such.h"):
            _launch(tmp_path)
    finally:
        native_agent.forget_builds()


def test_a_cleared_cache_is_built_again_and_old_builds_go(tmp_path: Path) -> None:
    native_agent.forget_builds()
    cache = tmp_path / "c"
    stale = cache / "sandbox-agent" / "0123"
    stale.mkdir(parents=True)
    os.utime(stale, (0, 0))  # built long ago, of other sources
    recent = cache / "sandbox-agent" / "4567"
    recent.mkdir()
    first = native_agent.agent_binary(cache)
    assert first is not None and first.is_file()
    assert not stale.exists() and recent.exists()
    shutil.rmtree(first.parent)
    again = native_agent.agent_binary(cache)
    assert again == first and again.is_file()
    native_agent.forget_builds()
