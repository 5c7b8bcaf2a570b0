"""A process in a sandbox (``Sandbox.exec``): Modal's ``ContainerProcess`` with its
``stdin`` (``StreamWriter``) and ``stdout``/``stderr`` (``StreamReader``).

Output is read by long-polls of the control plane (``GET .../output?after=OFFSET``): each
answer carries what the process wrote after the offset the reader has reached, so a
reader that reconnects (or another process, after ``Sandbox.from_id``) loses nothing that
was not read yet; what was read is let go by the control plane."""

from __future__ import annotations

import codecs
import secrets as _secrets
import time
from collections.abc import AsyncIterator, Iterator
from typing import Generic, TypeVar

import msgspec

from strato import exceptions as exc
from strato.client import session
from strato.protocol import messages as m

from .aio import with_aio

T = TypeVar("T", str, bytes)
POLL_S = 50.0  # one long-poll's wait (the control plane answers at once when output comes)


def new_exec_id() -> str:
    return _secrets.token_hex(8)


class StreamReader(Generic[T]):
    """A process's stdout or stderr: ``read()`` all of it, or iterate by line (``for line
    in p.stdout``, ``async for line in p.stdout``); ``read.aio()`` in async code."""

    def __init__(self, sandbox_id: str, pid: int, stream: int, text: bool) -> None:
        self._path = f"/sandboxes/{sandbox_id}/processes/{pid}/output"
        self._stream = stream
        self._text = text
        self._offset = 0
        self._eof = False
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace") if text else None
        self._pending = b"" if not text else ""  # read, not yet handed out (iteration)

    def _chunk(self, timeout: float | None = None) -> bytes | None:
        """The next bytes (b"" when ``timeout`` passed with nothing), None at the end."""
        if self._eof:
            return None
        deadline = None if timeout is None else time.monotonic() + timeout
        api = session.api()
        while True:
            wait = (
                POLL_S if deadline is None else max(0.0, min(POLL_S, deadline - time.monotonic()))
            )
            out: m.ProcessOutput = api.call(
                "GET",
                self._path,
                None,
                m.ProcessOutput,
                params={"stream": self._stream, "after": self._offset, "timeout": wait},
                timeout=wait + 30.0,
            )
            self._offset = out.offset + len(out.data)
            if out.eof:
                self._eof = True
            if out.data:
                return out.data
            if self._eof:
                return None
            if deadline is not None and time.monotonic() >= deadline:
                return b""

    def _decode(self, data: bytes, final: bool = False) -> T:
        if self._decoder is None:
            return data  # type: ignore[return-value]
        return self._decoder.decode(data, final)  # type: ignore[return-value]

    @with_aio
    def read(self) -> T:
        """Everything the stream carries, once it has ended."""
        parts: list = [self._pending]
        self._pending = b"" if not self._text else ""  # type: ignore[assignment]
        while (data := self._chunk()) is not None:
            parts.append(self._decode(data))
        if self._text:
            parts.append(self._decode(b"", final=True))
            return "".join(parts)  # type: ignore[return-value]
        return b"".join(parts)  # type: ignore[return-value]

    def __iter__(self) -> Iterator[T]:
        nl = "\n" if self._text else b"\n"
        buf = self._pending
        while True:
            i = buf.find(nl)  # type: ignore[arg-type]
            if i >= 0:
                line, buf = buf[: i + 1], buf[i + 1 :]
                self._pending = buf
                yield line  # type: ignore[misc]
                continue
            data = self._chunk()
            if data is None:
                tail = buf + (self._decode(b"", final=True) if self._text else b"")  # type: ignore[operator]
                self._pending = b"" if not self._text else ""  # type: ignore[assignment]
                if tail:
                    yield tail  # type: ignore[misc]
                return
            buf += self._decode(data)  # type: ignore[operator]

    async def __aiter__(self) -> AsyncIterator[T]:
        import asyncio

        it = iter(self)
        done = object()
        while (line := await asyncio.to_thread(next, it, done)) is not done:
            yield line  # type: ignore[misc]


class StreamWriter:
    """A process's stdin: ``write()`` and ``write_eof()`` buffer, ``drain()`` sends
    (``drain.aio()`` in async code), as Modal's."""

    def __init__(self, sandbox_id: str, pid: int) -> None:
        self._path = f"/sandboxes/{sandbox_id}/processes/{pid}/stdin"
        self._buf = bytearray()
        self._offset = 0  # bytes the control plane has taken
        self._eof = False
        self._eof_sent = False

    def write(self, data: bytes | bytearray | memoryview | str) -> None:
        if self._eof:
            raise exc.InvalidError("stdin was closed with write_eof(); nothing more can be written")
        if isinstance(data, str):
            data = data.encode()
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"write() takes bytes or str, not {type(data).__name__}")
        self._buf += data

    def write_eof(self) -> None:
        self._eof = True

    @with_aio
    def drain(self) -> None:
        """Send what was written (and the end of the stream, after ``write_eof()``)."""
        api = session.api()
        while self._buf or (self._eof and not self._eof_sent):
            part = bytes(self._buf[: m.SANDBOX_CHUNK])
            last = len(part) == len(self._buf)
            reply = api.call(
                "POST",
                self._path,
                m.StdinWrite(part, self._offset, eof=self._eof and last),
                _Offset,
            )
            taken = reply.offset - self._offset
            del self._buf[: max(0, min(taken, len(part)))]
            if taken < len(part):  # the process has exited or closed stdin: drop the rest
                self._buf.clear()
            self._offset = reply.offset
            if self._eof and last:
                self._eof_sent = True


class _Offset(msgspec.Struct):
    offset: int


class ContainerProcess(Generic[T]):
    """A process started by ``Sandbox.exec``."""

    def __init__(self, sandbox_id: str, pid: int, text: bool = True) -> None:
        self.sandbox_id = sandbox_id
        self.pid = pid
        self.stdin = StreamWriter(sandbox_id, pid)
        self.stdout: StreamReader[T] = StreamReader(sandbox_id, pid, 1, text)
        self.stderr: StreamReader[T] = StreamReader(sandbox_id, pid, 2, text)
        self._returncode: int | None = None
        self._reason = ""

    def __repr__(self) -> str:
        return f"ContainerProcess({self.sandbox_id}, pid={self.pid})"

    @property
    def returncode(self) -> int | None:
        return self._returncode

    @property
    def reason(self) -> str:
        """How it ended, when not by itself: "killed by its timeout (5s)", "ran out of
        memory (its limit of 128 MiB)", "killed by SIGKILL"... ("" while it runs)."""
        return self._reason

    def _status(self, timeout: float) -> int | None:
        st: m.ProcessStatus = session.api().call(
            "GET",
            f"/sandboxes/{self.sandbox_id}/processes/{self.pid}/wait",
            None,
            m.ProcessStatus,
            params={"timeout": timeout},
            timeout=timeout + 30.0,
        )
        if st.returncode is not None:
            self._returncode = st.returncode
            self._reason = st.reason
        return st.returncode

    def resize(self, columns: int, rows: int) -> None:
        """Tell a process started with ``pty=True`` its terminal's new size."""
        session.api().call(
            "POST",
            f"/sandboxes/{self.sandbox_id}/processes/{self.pid}/resize",
            m.TerminalSize(rows, columns),
        )

    @with_aio
    def poll(self) -> int | None:
        """Its exit code, or None while it runs."""
        if self._returncode is None:
            self._status(0.0)
        return self._returncode

    @with_aio
    def wait(self) -> int:
        """Wait for it to exit; its exit code (128 + N when killed by signal N, 124 when
        killed by its ``timeout``, 127 for a program that does not exist)."""
        while self._returncode is None:
            self._status(POLL_S)
        return self._returncode
