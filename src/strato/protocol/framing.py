"""The frame layer of the channel, with no codec: a frame is a 4-byte big-endian length
followed by its msgpack body. Standard library only: a sandbox's agent reads and writes
frames with its own small codec (``strato.container.sandbox_wire``) and must not import
msgspec; everything else uses ``strato.protocol.frames``, which adds msgspec's codec.

Every reader checks the length header against a limit *before* it reads (or allocates)
the body: a header that claims 2 GiB ends the connection after 4 bytes.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable

MAX_FRAME = (1 << 32) - 1  # what the 4-byte header can say: for peers we trust
HELLO_MAX_FRAME = 1 << 20  # the first frame of a connection, before the peer is known
RECV_CHUNK = 1 << 20  # never ask the kernel for more than this at once
LEN = struct.Struct(">I")


class FrameError(Exception):
    """The peer sent something that is not a valid frame."""


class FrameTooLarge(FrameError):
    """The peer's length header is over the reader's limit (nothing of it was read)."""


def parse_address(address: str) -> tuple[str, str | tuple[str, int]]:
    """``unix:/path`` or ``tcp:host:port`` -> (family, sockaddr)."""
    if address.startswith("unix:"):
        return "unix", address[5:]
    if address.startswith("tcp:"):
        host, _, port = address[4:].rpartition(":")
        return "tcp", (host, int(port))
    raise ValueError(f"bad channel address {address!r}: use unix:/path or tcp:host:port")


def connect(address: str, timeout: float = 10.0) -> socket.socket:
    family, addr = parse_address(address)
    if family == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.settimeout(timeout)
    sock.connect(addr)
    sock.settimeout(None)
    return sock


class SocketReader:
    """Reads frames from a blocking socket with one buffer and few syscalls; ``decode``
    turns a frame's body into its message (raising :class:`FrameError`)."""

    def __init__(
        self,
        sock: socket.socket,
        decode: Callable[[memoryview], object],
        limit: int = MAX_FRAME,
    ) -> None:
        self._sock = sock
        self._decode = decode
        self._buf = bytearray()
        self.limit = limit

    def has_frame(self) -> bool:
        """Whether a whole frame is buffered already (``read`` will not touch the socket)."""
        buf = self._buf
        return len(buf) >= 4 and len(buf) >= 4 + LEN.unpack_from(buf)[0]

    def read(self) -> object | None:
        """The next message, or None at end of stream."""
        buf = self._buf
        while True:
            want = 1 << 16
            if len(buf) >= 4:
                (n,) = LEN.unpack_from(buf)
                if n > self.limit:
                    raise FrameTooLarge(f"frame of {n} bytes is over the limit of {self.limit}")
                if len(buf) >= 4 + n:
                    msg = self._decode(memoryview(buf)[4 : 4 + n])
                    del buf[: 4 + n]
                    return msg
                want = max(want, min(RECV_CHUNK, 4 + n - len(buf)))
            chunk = self._sock.recv(want)
            if not chunk:
                return None
            buf += chunk
