"""The sandbox agent's own msgpack codec (``strato.container.sandbox_wire``) against
msgspec: every message the agent sends or receives, with varied values, is the same bytes
both ways and decodes to equal values; malformed frames raise ``FrameError``."""

from __future__ import annotations

from typing import Any, Literal

import msgspec
import pytest

from strato.container import sandbox_wire as w
from strato.protocol import frames
from strato.protocol import messages as m
from strato.protocol.framing import FrameError

BIG = (1 << 62) - 1
UNI = "héllo wörld ✓ 🐍"
LONG = "x" * 40  # str8
LONGER = "y" * 300  # str16
HUGE = "z" * 70_000  # str32


CHUNKS: list[tuple[int, Literal[1, 2], bytes, bool, int]] = [
    (1, 1, b"", True, 1),
    (127, 2, b"a" * 31, False, 15),
    (128, 1, b"b" * 255, False, 16),
    (65_535, 2, b"c" * 256, True, 17),
    (65_536, 1, b"d" * 65_536, False, 2),
    (BIG, 2, bytes(range(256)) * 300, True, 1),
]
FILE_RESULTS: list[tuple[int, dict[str, Any]]] = [
    (0, {}),
    (1, {"data": b"\x00\xff" * 40_000}),
    (BIG, {"size": 1 << 40, "is_dir": True, "entries": ["a", UNI, LONG] * 7}),
    (5, {"entries": [f"f{i}" for i in range(70_000)], "is_dir": True}),
    (6, {"error": "x: No such file", "error_kind": "not_found"}),
]
FILE_REQUESTS: list[tuple[int, dict[str, Any]]] = [
    (0, {"op": "stat", "path": "a"}),
    (1, {"op": "read", "path": UNI, "offset": BIG, "length": 1 << 20}),
    (2, {"op": "write", "path": "/x", "data": b"d" * 300, "append": True}),
    (3, {"op": "write", "path": "/x", "data": b"", "truncate": True}),
    (4, {"op": "rm", "path": LONGER, "recursive": True}),
]


def _sizes():
    return [None, m.TerminalSize(1, 1), m.TerminalSize(200, 10_000)]


# (msgspec struct, the lite codec's equivalent) for every message the agent uses
PAIRS: list[tuple[object, w.Struct]] = [
    (m.ContainerHello("ct-1", "tok"), w.ContainerHello("ct-1", "tok")),
    (m.ContainerHello("", UNI + HUGE), w.ContainerHello("", UNI + HUGE)),
    (m.ContainerReady(), w.ContainerReady()),
    (m.SbOutput([]), w.SbOutput([])),
    *[
        (
            m.SbOutput([m.SbChunk(pid, st, data, eof) for _ in range(n)]),
            w.SbOutput([w.SbChunk(pid, st, data, eof) for _ in range(n)]),
        )
        for pid, st, data, eof, n in CHUNKS
    ],
    *[
        (m.SbExit(pid, rc, reason), w.SbExit(pid, rc, reason))
        for pid, rc, reason in [
            (1, 0, ""),
            (2, -1, "x"),
            (3, -32, LONG),
            (4, -33, LONGER),
            (5, -128, UNI),
            (6, -129, ""),
            (7, -32_768, ""),
            (8, -32_769, ""),
            (9, -(1 << 31), ""),
            (10, (1 << 31) - 1, ""),
            (BIG, 255, "killed by SIGKILL"),
        ]
    ],
    *[
        (m.SbFileResult(req, m.FileResult(**kw)), w.SbFileResult(req, w.FileResult(**kw)))
        for req, kw in FILE_RESULTS
    ],
    (m.SbTunnelHello("ct-1", "t" * 512, 0), w.SbTunnelHello("ct-1", "t" * 512, 0)),
    (
        m.SbTunnelHello("ct-2", "tok", BIG, "nothing accepts " + UNI),
        w.SbTunnelHello("ct-2", "tok", BIG, "nothing accepts " + UNI),
    ),
    # received
    *[
        (
            m.SbExec(pid, argv, workdir, env, timeout, pty, size),
            w.SbExec(
                pid,
                argv,
                workdir,
                env,
                timeout,
                pty,
                None if size is None else w.TerminalSize(size.rows, size.cols),
            ),
        )
        for pid, argv, workdir, env, timeout, pty, size in [
            (1, ["true"], None, {}, None, False, None),
            (2, ["sh", "-c", UNI], "/tmp/" + UNI, {"A": "1", "B": ""}, 1.0, True, _sizes()[1]),
            (
                BIG,
                ["a"] * 20,
                LONGER,
                {f"V{i}": LONG for i in range(20)},
                86_400.0,
                True,
                _sizes()[2],
            ),
            (3, [HUGE], "", {"X": HUGE}, 2.5, False, None),
        ]
    ],
    (m.SbResize(1, m.TerminalSize(24, 80)), w.SbResize(1, w.TerminalSize(24, 80))),
    (m.SbStdin(1), w.SbStdin(1)),
    (m.SbStdin(9, b"\x00" * 100_000, True), w.SbStdin(9, b"\x00" * 100_000, True)),
    *[
        (m.SbFile(req, m.FileRequest(**kw)), w.SbFile(req, w.FileRequest(**kw)))
        for req, kw in FILE_REQUESTS
    ],
    (m.SbConfigure(), w.SbConfigure()),
    (
        m.SbConfigure({"A": UNI}, "/w", ["sleep", "100"]),
        w.SbConfigure({"A": UNI}, "/w", ["sleep", "100"]),
    ),
    (m.SbFlow(1, 1, True), w.SbFlow(1, 1, True)),
    (m.SbFlow(BIG, 2, False), w.SbFlow(BIG, 2, False)),
    (m.SbTunnelOpen(0, 1), w.SbTunnelOpen(0, 1)),
    (m.SbTunnelOpen(BIG, 65_535), w.SbTunnelOpen(BIG, 65_535)),
    (m.StopContainer(), w.StopContainer()),
    (m.StopContainer(0.0), w.StopContainer(0.0)),
    (m.StopContainer(1e9), w.StopContainer(1e9)),
]


def _ids() -> list[str]:
    return [f"{i}-{type(lite).__name__}" for i, (_, lite) in enumerate(PAIRS)]


def _fields(obj: object) -> dict:
    """A struct of either kind as plain values (nested structs too)."""
    if isinstance(obj, w.Struct):
        return {f[0]: _fields(getattr(obj, f[0])) for f in obj.FIELDS}
    if isinstance(obj, msgspec.Struct):
        return {f: _fields(getattr(obj, f)) for f in obj.__struct_fields__}
    if isinstance(obj, list):
        return [_fields(x) for x in obj]  # type: ignore[return-value]
    return obj  # type: ignore[return-value]


@pytest.mark.parametrize(("real", "lite"), PAIRS, ids=_ids())
def test_the_lite_codec_is_msgspec_byte_for_byte(real: object, lite: w.Struct) -> None:
    assert w.encode(lite) == frames.encode(real)
    body = w.encode_body(lite)
    # msgspec decodes the lite codec's bytes, and the lite codec msgspec's
    assert frames.decode(body) == real
    assert _fields(real) == _fields(lite)
    if type(lite) in w.RECEIVED.values():
        decoded = w.decode(frames.encode(real)[4:])
        assert decoded == lite, (decoded, lite)
        assert type(decoded) is type(lite)


def test_every_message_the_agent_uses_is_covered() -> None:
    covered = {type(lite) for _, lite in PAIRS}
    messages = {
        c for c in vars(w).values() if isinstance(c, type) and issubclass(c, w.Struct) and c.TAG
    }
    assert messages <= covered, messages - covered
    for cls in messages:  # the same tag and fields, in the same order, as the real ones
        real = getattr(m, cls.__name__)
        assert real.__struct_config__.tag == cls.TAG
        assert real.__struct_fields__ == tuple(f[0] for f in cls.FIELDS)


def test_other_messages_decode_to_other() -> None:
    msg = w.decode(frames.encode(m.ContainerReady())[4:])
    assert isinstance(msg, w.Other) and msg.tag == "ready"


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"\x81",  # a map of one entry, then nothing
        b"\xc1",  # never used
        b"\xd4\x00\x00",  # ext: nothing of the agent's
        b"\x92\x01\x02",  # not a map
        b"\x81\xa1t\x01",  # a tag that is not a string
        b"\xdf\xff\xff\xff\xff",  # a map claiming 4 billion entries
        b"\xdd\xff\xff\xff\xff",  # an array claiming as many
        b"\xc6\xff\xff\xff\xf0abc",  # bytes claiming 4 GiB
        b"\xdb\x00\x00\x00\x05ab",  # a truncated string
        b"\xa2\xff\xfe",  # not UTF-8
        b"\x91" * 100_000 + b"\xc0",  # nested past any message's depth
        frames.encode(m.SbStdin(1, b"abc"))[4:] + b"\x00",  # trailing bytes
        frames.encode(m.SbExec(1, ["true"]))[4:-1],  # truncated
        msgspec.msgpack.encode({"t": "sbexec", "pid": 1}),  # no argv
        msgspec.msgpack.encode({"t": "sbexec", "pid": "1", "argv": ["a"]}),  # pid a string
        msgspec.msgpack.encode({"t": "sbexec", "pid": True, "argv": ["a"]}),  # pid a bool
        msgspec.msgpack.encode({"t": "sbexec", "pid": 1, "argv": [b"a"]}),  # argv bytes
        msgspec.msgpack.encode({"t": "sbexec", "pid": 1, "argv": ["a"], "env": {"A": 1}}),
        msgspec.msgpack.encode({"t": "sbresize", "pid": 1, "size": [1]}),  # half a size
        msgspec.msgpack.encode({"t": "sbresize", "pid": 1, "size": {"rows": 1}}),
        msgspec.msgpack.encode({"t": "sbfile", "req_id": 1, "request": {"op": "ls"}}),
        msgspec.msgpack.encode({"t": "sbstdin", "pid": 1, "data": "text"}),
    ],
)
def test_malformed_frames_raise_frame_error(body: bytes) -> None:
    with pytest.raises(FrameError):
        w.decode(body)


def test_every_truncation_of_a_frame_raises_frame_error() -> None:
    body = frames.encode(
        m.SbFile(7, m.FileRequest("write", "/a/" + UNI, data=b"x" * 300, append=True))
    )[4:]
    for n in range(len(body)):
        with pytest.raises(FrameError):
            w.decode(body[:n])


def test_the_spec_the_agent_reads() -> None:
    spec = m.FunctionSpec(
        name="sb",
        module="",
        qualname="",
        env={"A": UNI},
        sandbox=m.SandboxConfig("sb-0123456789abcdef", ["sleep", "9"], "/work"),
        image=None,
        volumes=[],
    )
    got = w.load_sandbox_spec(msgspec.msgpack.encode(spec))
    assert (got.env, got.entrypoint, got.workdir) == ({"A": UNI}, ["sleep", "9"], "/work")
    plain = m.FunctionSpec(name="f", module="m", qualname="f")
    with pytest.raises(FrameError, match="no sandbox"):
        w.load_sandbox_spec(msgspec.msgpack.encode(plain))
