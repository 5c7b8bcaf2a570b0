"""Sandboxes' processes and files: the agent's frames, exec, output, stdin, file
operations, terminal sizes and waits on a running sandbox (``SandboxProcesses``, the half
of ``Sandboxes`` that drives what runs inside; the lifecycle is ``manager.py``).

Each frame from a sandbox's agent is checked (``on_frame``): a frame about a process the
sandbox does not have, an output past its end or past the flow limit ends that sandbox,
and nothing else. Processes' output is held here, per stream, in a bounded buffer read by
offset (``StreamBuffer``); past ``FLOW_LIMIT`` unread bytes the agent is told to stop
reading that stream (``SbFlow``), so a process that writes faster than its driver reads
blocks on its own pipe. Every wait is a long-poll on ``Sandbox.changed``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import msgspec

from strato import exceptions as exc
from strato.protocol import frames
from strato.protocol import messages as m

from ..containers import Container
from .buffers import StreamBuffer as StreamBufferT

if TYPE_CHECKING:
    from ..control import ControlPlane
    from ..fleet import Fleet
    from .manager import Sandbox


FLOW_LIMIT = 4 << 20  # unread output held per stream before its agent pauses it
FLOW_SLACK = 8 << 20  # what may still arrive after the pause (frames in flight)
READ_LIMIT = 1 << 20  # one output answer carries at most this
MAX_PROCESSES = 4096  # processes one sandbox may have started
KEEP_ENDED = 256  # ended processes whose output is kept per sandbox
FILE_TIMEOUT_S = 30.0
OOM_ASK_S = 2.0  # an exit by SIGKILL waits this long at most for the worker's OOM count
LINGER_S = 0.002  # output that is not its stream's end waits this long for more, or the end
MAX_FILE_REQUESTS = 64  # file operations under way at once per sandbox


@dataclass(eq=False)
class Process:
    pid: int
    exec_id: str
    stdout: StreamBufferT
    stderr: StreamBufferT
    returncode: int | None = None
    reason: str = ""
    stdin_offset: int = 0
    stdin_closed: bool = False

    def stream(self, n: int) -> StreamBufferT:
        return self.stdout if n == 1 else self.stderr


class SandboxProcesses:
    """What ``Sandboxes`` does with a running sandbox's processes and files (a mixin: its
    state is ``Sandboxes``' and each ``Sandbox``'s)."""

    cp: ControlPlane
    fleet: Fleet
    _by_container: dict[str, Sandbox]

    # ------------------------------------------------------------------ the agent's frames

    def on_frame(self, s: Container, msg: object) -> None:
        """A frame from a sandbox's agent; a frame that does not fit what the sandbox has
        raises ``FrameError`` (the channel loop then ends that sandbox)."""
        sb = self._by_container.get(s.container_id)
        if sb is None:
            raise frames.FrameError(f"container {s.container_id} is not a sandbox's")
        if isinstance(msg, m.SbOutput):
            for c in msg.chunks:
                p = sb.processes.get(c.pid)
                if p is None:
                    raise frames.FrameError(f"output of process {c.pid}, which it does not have")
                buf = p.stream(c.stream)
                if buf.eof:
                    if c.data or not c.eof:
                        raise frames.FrameError(f"output of process {c.pid} past its end")
                    continue
                buf.append(c.data)
                buf.eof = c.eof
                if buf.held > FLOW_LIMIT + FLOW_SLACK:
                    raise frames.FrameError(
                        f"output of process {c.pid} past the flow limit (it was paused)"
                    )
                if buf.held > FLOW_LIMIT and not buf.paused and not buf.eof:
                    buf.paused = True
                    s.send(m.SbFlow(c.pid, c.stream, paused=True))
            sb.last_active = time.monotonic()
            sb.notify()
        elif isinstance(msg, m.SbFileResult):
            if msg.req_id >= sb.next_file:
                raise frames.FrameError(f"a file result for request {msg.req_id}, never made")
            fut = sb.files.pop(msg.req_id, None)  # None: its requester gave up
            if fut is not None and not fut.done():
                fut.set_result(msg.result)
        elif isinstance(msg, m.SbExit):
            p = sb.processes.get(msg.pid)
            if p is None:
                raise frames.FrameError(f"exit of process {msg.pid}, which it does not have")
            if msg.reason == "killed by SIGKILL" and self._ask_oom(sb, s):
                sb.held_exits.append(msg)  # until the worker's count, or OOM_ASK_S
                return
            self._exited(sb, msg)
        else:
            raise frames.FrameError(f"a sandbox may not send {type(msg).__name__}")

    def _ask_oom(self, sb: Sandbox, s: Container) -> bool:
        """Ask the sandbox's worker how many OOM kills its cgroup has seen; False when
        it cannot be asked."""
        node = self.fleet.nodes.get(s.node_id)
        if node is None or node.peer is None:
            return False
        if not sb.held_exits:
            node.peer.send(m.SbOomQuery(s.container_id))
            loop = asyncio.get_running_loop()
            loop.call_later(OOM_ASK_S, self._release_held, sb, None)
        return True

    def oom_count(self, container_id: str, count: int) -> None:
        """The worker's answer: exits held since are OOM kills if the count grew."""
        sb = self._by_container.get(container_id)
        if sb is not None:
            self._release_held(sb, count)

    def _release_held(self, sb: Sandbox, count: int | None) -> None:
        held, sb.held_exits = sb.held_exits, []
        oom = count is not None and count > sb.oom_kills
        if count is not None:
            sb.oom_kills = max(sb.oom_kills, count)
        limit = sb.spec.resources.memory_limit_mb
        for msg in held:
            if oom:
                what = f"its limit of {limit} MiB" if limit else "the node's memory"
                msg = m.SbExit(msg.pid, msg.returncode, f"ran out of memory ({what})")
            self._exited(sb, msg)

    def _exited(self, sb: Sandbox, msg: m.SbExit) -> None:
        p = sb.processes.get(msg.pid)
        if p is not None and p.returncode is None:
            p.returncode, p.reason = msg.returncode, msg.reason
        if msg.pid == 1 and not sb.ended:  # the entrypoint: the sandbox ends with it
            sb.status = "success" if msg.returncode == 0 else "failure"
            sb.returncode, sb.reason = msg.returncode, msg.reason
        sb.last_active = time.monotonic()
        self._forget_ended(sb)
        sb.notify()

    @staticmethod
    def _forget_ended(sb: Sandbox) -> None:
        ended = [p for p in sb.processes.values() if p.returncode is not None and p.pid != 1]
        for p in ended[: max(0, len(ended) - KEEP_ENDED)]:
            del sb.processes[p.pid]
            sb.by_exec.pop(p.exec_id, None)

    # ------------------------------------------------------------------ processes

    def _check_live(self, sb: Sandbox) -> None:
        if sb.ended:
            raise exc.SandboxTerminatedError(
                f"sandbox {sb.sandbox_id} has ended ({sb.status}: {sb.reason}); create a new one"
            )

    async def exec(self, sb: Sandbox, req: m.ExecRequest, wait_s: float) -> int | None:
        """Start a process; its pid, or None while the sandbox still starts after
        ``wait_s`` (ask again with the same ``exec_id``)."""
        deadline = time.monotonic() + wait_s
        while True:
            self._check_live(sb)
            pid = sb.by_exec.get(req.exec_id)
            if pid is not None:
                return pid
            s = sb.container
            if sb.status == "running" and s is not None and s.peer is not None:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            try:
                await asyncio.wait_for(sb.changed.wait(), left)
            except TimeoutError:
                return None
        env = dict(req.env)
        if req.secrets:  # their values for this process only (never kept)
            env.update(self._secret_values(sb, req.secrets))
        if sb.next_pid - 1 > MAX_PROCESSES:
            raise exc.InvalidError(
                f"sandbox {sb.sandbox_id} has started {MAX_PROCESSES} processes, its most"
            )
        pid = sb.next_pid
        sb.next_pid += 1
        sb.processes[pid] = Process(pid, req.exec_id, StreamBufferT(), StreamBufferT())
        sb.by_exec[req.exec_id] = pid
        sb.last_active = time.monotonic()
        s.send(m.SbExec(pid, list(req.argv), req.workdir, env, req.timeout, req.pty, req.size))
        return pid

    def _secret_values(self, sb: Sandbox, refs: Sequence[m.SecretRef]) -> dict[str, str]:
        """The environment of ``refs`` (names resolved by the secrets' spec hook)."""
        spec = msgspec.structs.replace(sb.spec, secrets=list(refs), schedule=None)
        for hook in self.cp.apps.spec_hooks:
            spec = hook(spec, False)
        if self.fleet.secret_env is None:
            raise exc.InvalidError("this control plane serves no secrets")
        return self.fleet.secret_env(spec)

    def process(self, sb: Sandbox, pid: int) -> Process:
        p = sb.processes.get(pid)
        if p is None:
            raise exc.NotFoundError(f"sandbox {sb.sandbox_id} has no process {pid} (or forgot it)")
        return p

    async def output(
        self, sb: Sandbox, pid: int, stream: int, after: int, wait_s: float
    ) -> m.ProcessOutput:
        deadline = time.monotonic() + wait_s
        lingered = False
        while True:
            p = self.process(sb, pid)
            buf = p.stream(stream)
            offset, data = buf.read(after, READ_LIMIT)
            if buf.paused and buf.held < FLOW_LIMIT // 2 and sb.container is not None:
                buf.paused = False
                sb.container.send(m.SbFlow(pid, stream, paused=False))  # type: ignore[arg-type]
            done = buf.done(offset + len(data))
            if data and not done and not lingered and len(data) < READ_LIMIT:
                # its end often follows at once (a short command): one answer, not two
                lingered = True
                try:
                    await asyncio.wait_for(sb.changed.wait(), LINGER_S)
                except TimeoutError:
                    pass
                continue
            if data or done:
                sb.last_active = time.monotonic()
                return m.ProcessOutput(data, offset, done, p.returncode if done else None)
            left = deadline - time.monotonic()
            if left <= 0:
                return m.ProcessOutput(b"", offset, False, None)
            try:
                await asyncio.wait_for(sb.changed.wait(), left)
            except TimeoutError:
                pass

    async def stdin(self, sb: Sandbox, pid: int, req: m.StdinWrite) -> int:
        """Pass bytes on to the process's stdin; the offset the control plane has
        reached. (The entrypoint's stdin may be written while the sandbox starts: this
        waits for its agent.)"""
        p = self.process(sb, pid)
        if not sb.ended and not (sb.container is not None and sb.container.peer is not None):
            await self.wait_running(sb, FILE_TIMEOUT_S)
        p = self.process(sb, pid)
        if req.offset > p.stdin_offset:
            raise exc.InvalidError(
                f"stdin of process {pid}: offset {req.offset} is past the {p.stdin_offset} "
                "bytes written so far"
            )
        data = req.data[p.stdin_offset - req.offset :]
        if p.stdin_closed or p.returncode is not None or sb.ended:
            return p.stdin_offset  # nobody reads it any more (as a closed pipe)
        p.stdin_offset += len(data)
        p.stdin_closed = req.eof
        sb.last_active = time.monotonic()
        if (data or req.eof) and sb.container is not None:
            sb.container.send(m.SbStdin(pid, data, req.eof))
        return p.stdin_offset

    async def file(self, sb: Sandbox, req: m.FileRequest) -> m.FileResult:
        """One file operation by the sandbox's agent (as the sandbox's user)."""
        self._check_live(sb)
        s = sb.container
        if sb.status != "running" or s is None or s.peer is None:
            await self.wait_running(sb, FILE_TIMEOUT_S)
            s = sb.container
            assert s is not None
        if len(sb.files) >= MAX_FILE_REQUESTS:
            raise exc.InvalidError(
                f"sandbox {sb.sandbox_id} has {MAX_FILE_REQUESTS} file operations under way"
            )
        req_id = sb.next_file
        sb.next_file += 1
        fut: asyncio.Future[m.FileResult] = asyncio.get_running_loop().create_future()
        sb.files[req_id] = fut
        sb.last_active = time.monotonic()
        s.send(m.SbFile(req_id, req))
        try:
            return await asyncio.wait_for(fut, FILE_TIMEOUT_S)
        except TimeoutError:
            raise exc.FilesystemExecutionError(
                f"{req.op} {req.path}: the sandbox did not answer in {FILE_TIMEOUT_S:g}s"
            ) from None
        finally:
            sb.files.pop(req_id, None)

    async def wait_running(self, sb: Sandbox, wait_s: float) -> None:
        deadline = time.monotonic() + wait_s
        while not (sb.status == "running" and sb.container and sb.container.peer):
            self._check_live(sb)
            left = deadline - time.monotonic()
            if left <= 0:
                raise exc.SandboxTimeoutError(
                    f"sandbox {sb.sandbox_id} is not up after {wait_s:g}s"
                )
            try:
                await asyncio.wait_for(sb.changed.wait(), left)
            except TimeoutError:
                pass

    def resize(self, sb: Sandbox, pid: int, size: m.TerminalSize) -> None:
        """A terminal's new size (a process started with ``pty``)."""
        p = self.process(sb, pid)
        if p.returncode is None and sb.container is not None:
            sb.container.send(m.SbResize(pid, size))

    async def wait_process(self, sb: Sandbox, pid: int, wait_s: float) -> m.ProcessStatus:
        deadline = time.monotonic() + wait_s
        while True:
            p = self.process(sb, pid)
            if p.returncode is not None:
                return m.ProcessStatus(p.returncode, p.reason)
            left = deadline - time.monotonic()
            if left <= 0:
                return m.ProcessStatus(None, "")
            try:
                await asyncio.wait_for(sb.changed.wait(), left)
            except TimeoutError:
                pass
