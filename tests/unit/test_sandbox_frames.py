"""The control plane's side of a sandbox: output buffers by offset, flow control, and the
checks on every frame its agent sends (a frame that does not fit ends that sandbox)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from strato.protocol import frames
from strato.protocol import messages as m
from strato.server.sandboxes import manager as mg
from strato.server.sandboxes import processes as pr
from strato.server.sandboxes.buffers import StreamBuffer


def test_stream_buffer_reads_by_offset_and_lets_go_of_what_was_read():
    b = StreamBuffer()
    b.append(b"hello ")
    b.append(b"world")
    assert b.read(0, 100) == (0, b"hello world")
    assert b.read(3, 4) == (3, b"lo w")
    assert b.start == 3 and b.held == 8  # before 3 is gone
    assert b.read(0, 100) == (3, b"lo world")  # what is gone is not read again
    assert b.read(11, 100) == (11, b"")
    assert b.held == 0
    assert not b.done(11)
    b.eof = True
    assert b.done(11)
    assert not b.done(5)


class FakeContainer:
    def __init__(self) -> None:
        self.container_id = "ct-1"
        self.node_id = "node-1"
        self.sent: list[object] = []

    def send(self, msg: object) -> None:
        self.sent.append(msg)


def make_manager() -> tuple[mg.Sandboxes, mg.Sandbox, FakeContainer]:
    cp = SimpleNamespace(
        fleet=SimpleNamespace(nodes={}),
        store=SimpleNamespace(_write=lambda name, run: None),
    )
    sandboxes = mg.Sandboxes(cp)  # type: ignore[arg-type]
    spec = m.FunctionSpec("sandbox", "", "", sandbox=m.SandboxConfig("sb-" + "0" * 16))
    sb = mg.Sandbox("sb-" + "0" * 16, "ap-1", None, {}, "bwrap", spec, 300.0, None)
    s = FakeContainer()
    sb.container = s  # type: ignore[assignment]
    sb.status = "running"
    sb.processes[2] = pr.Process(2, "ab" * 8, StreamBuffer(), StreamBuffer())
    sandboxes.live[sb.sandbox_id] = sb
    sandboxes._by_container[s.container_id] = sb
    return sandboxes, sb, s


def test_output_and_exit_reach_the_process():
    async def main():
        sandboxes, sb, s = make_manager()
        sandboxes.on_frame(s, m.SbOutput([m.SbChunk(2, 1, b"out"), m.SbChunk(2, 2, b"err")]))
        sandboxes.on_frame(s, m.SbOutput([m.SbChunk(2, 1, b"", eof=True)]))
        sandboxes.on_frame(s, m.SbExit(2, 3))
        out = await sandboxes.output(sb, 2, 1, 0, 0.0)
        assert (out.data, out.eof, out.returncode) == (b"out", True, 3)
        err = await sandboxes.output(sb, 2, 2, 0, 0.0)
        assert (err.data, err.eof) == (b"err", False)

    asyncio.run(main())


@pytest.mark.parametrize(
    "frame, why",
    [
        (m.SbOutput([m.SbChunk(9, 1, b"x")]), "does not have"),
        (m.SbExit(9, 0), "does not have"),
        (m.SbFileResult(5, m.FileResult()), "never made"),
        (m.TaskOutputs([]), "may not send"),
        (m.ApiRequest(1, "GET", "/apps"), "may not send"),
    ],
)
def test_a_frame_that_does_not_fit_ends_the_sandbox(frame, why):
    async def main():
        sandboxes, _, s = make_manager()
        with pytest.raises(frames.FrameError, match=why):
            sandboxes.on_frame(s, frame)

    asyncio.run(main())


def test_output_past_its_end_is_refused():
    async def main():
        sandboxes, _, s = make_manager()
        sandboxes.on_frame(s, m.SbOutput([m.SbChunk(2, 1, b"", eof=True)]))
        with pytest.raises(frames.FrameError, match="past its end"):
            sandboxes.on_frame(s, m.SbOutput([m.SbChunk(2, 1, b"more")]))

    asyncio.run(main())


def test_flow_control_pauses_resumes_and_refuses_an_agent_that_ignores_it():
    async def main():
        sandboxes, sb, s = make_manager()
        chunk = b"x" * m.SANDBOX_CHUNK
        n = pr.FLOW_LIMIT // len(chunk) + 1
        for _ in range(n):
            sandboxes.on_frame(s, m.SbOutput([m.SbChunk(2, 1, chunk)]))
        assert s.sent == [m.SbFlow(2, 1, paused=True)]
        # the reader catches up: the stream is resumed
        offset = 0
        while offset < n * len(chunk):
            out = await sandboxes.output(sb, 2, 1, offset, 0.0)
            offset = out.offset + len(out.data)
        await sandboxes.output(sb, 2, 1, offset, 0.0)
        assert s.sent[-1] == m.SbFlow(2, 1, paused=False)
        # an agent that keeps sending past the limit and its slack is dropped
        with pytest.raises(frames.FrameError, match="flow limit"):
            for _ in range((pr.FLOW_LIMIT + pr.FLOW_SLACK) // len(chunk) + 2):
                sandboxes.on_frame(s, m.SbOutput([m.SbChunk(2, 1, chunk)]))

    asyncio.run(main())


def test_stdin_offsets_make_a_resent_write_harmless():
    async def main():
        sandboxes, sb, s = make_manager()
        s.peer = object()  # (connected)
        assert await sandboxes.stdin(sb, 2, m.StdinWrite(b"abc", 0)) == 3
        assert await sandboxes.stdin(sb, 2, m.StdinWrite(b"abcdef", 0, eof=True)) == 6
        assert [x for x in s.sent if isinstance(x, m.SbStdin)] == [
            m.SbStdin(2, b"abc"),
            m.SbStdin(2, b"def", eof=True),
        ]

    asyncio.run(main())
