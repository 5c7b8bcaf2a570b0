"""The worker's end of a zygote's ``SOCK_SEQPACKET`` sockets: typed messages
(:mod:`strato.protocol.zygote`), each report with the pid of the process that sent it
(``SO_PASSCRED``: in this worker's PID namespace)."""

from __future__ import annotations

import array
import asyncio
import os
import socket
import sys

import msgspec

from strato.protocol import zygote as zp
from strato.runtime.supervise import STREAM_LIMIT


class Channel:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        sock.setblocking(False)
        self._queue: asyncio.Queue[tuple[zp.ForkReport, int | None] | None] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(sock.fileno(), self._readable)
        self._open = True

    def _readable(self) -> None:
        space = socket.CMSG_SPACE(12)
        while True:
            try:
                data, ancdata, _, _ = self.sock.recvmsg(1 << 16, space)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data, ancdata = b"", []
            if not data:
                self._eof()
                return
            pid = None
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = int.from_bytes(payload[:4], sys.byteorder, signed=True)
            try:
                report = zp.decode_report(data)
            except msgspec.DecodeError:
                continue
            self._queue.put_nowait((report, pid))

    def _eof(self) -> None:
        if self._open:
            self._open = False
            self._loop.remove_reader(self.sock.fileno())
            self._queue.put_nowait(None)

    async def get(self, timeout: float | None = None) -> tuple[zp.ForkReport, int | None] | None:
        """The next report and its sender's pid, or ``None`` at end of file."""
        return await asyncio.wait_for(self._queue.get(), timeout)

    def send(self, msg: zp.ForkRequest | zp.WorkerAnswer, fds: list[int] | None = None) -> None:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        self.sock.setblocking(True)
        try:
            self.sock.sendmsg([zp.encode(msg)], anc)
        finally:
            self.sock.setblocking(False)

    def close(self) -> None:
        self._eof()
        self.sock.close()


def socketpair() -> tuple[socket.socket, socket.socket]:
    """(the worker's end, the other): the worker's end learns its peers' pids."""
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    mine.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    return mine, theirs


async def pipe_reader(fd: int) -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=STREAM_LIMIT, loop=loop)
    pipe = os.fdopen(fd, "rb", buffering=0)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader, loop=loop), pipe)
    return reader
