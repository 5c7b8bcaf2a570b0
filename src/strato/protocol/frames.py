"""Length-prefixed msgpack frames for the channel (control plane <-> workers, containers).

A frame is a 4-byte big-endian length followed by one msgpack-encoded ``ChannelMessage``.
Both a blocking-socket reader (the container, which keeps its imports lean) and an asyncio
reader (control plane, worker agent) live here.

Every reader checks the length header against a limit *before* it reads (or allocates)
the body: the control plane reads frames from containers, which run untrusted code, so a
header that claims 2 GiB ends the connection after 4 bytes. Decoding validates every
field (``strato.protocol.messages`` carries the numeric ranges), so a frame either decodes
to a well-formed message or raises :class:`FrameError`.
"""

from __future__ import annotations

import socket
import struct

import msgspec

from .messages import BlobChunk, ChannelMessage, TaskOutputs

MAX_FRAME = (1 << 32) - 1  # what the 4-byte header can say: for peers we trust
HELLO_MAX_FRAME = 1 << 20  # the first frame of a connection, before the peer is known
RECV_CHUNK = 1 << 20  # never ask the kernel for more than this at once
CHUNK = 1 << 20  # a container sends a value over this as BlobChunk frames of this size
_LEN = struct.Struct(">I")

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(ChannelMessage)


class FrameError(Exception):
    """The peer sent something that is not a valid frame."""


class FrameTooLarge(FrameError):
    """The peer's length header is over the reader's limit (nothing of it was read)."""


def encode(msg: object) -> bytes:
    body = _encoder.encode(msg)
    return _LEN.pack(len(body)) + body


def decode(body: bytes | memoryview) -> object:
    try:
        return _decoder.decode(body)
    except msgspec.DecodeError as e:
        raise FrameError(f"bad frame: {e}") from e


def split_outputs(msg: TaskOutputs) -> list[object]:
    """The frames that carry ``msg``: each value over :data:`CHUNK` goes ahead of it as
    ``BlobChunk`` frames and the output names it by sha256, so no frame is large."""
    if not any(o.data is not None and len(o.data) > CHUNK for o in msg.outputs):
        return [msg]
    import hashlib  # (here: a sandbox agent imports this module, and never needs it)

    out: list[object] = []
    outputs = []
    for o in msg.outputs:
        if o.data is not None and len(o.data) > CHUNK:
            view = memoryview(o.data)
            n = len(view)
            for i in range(0, n, CHUNK):
                out.append(BlobChunk(bytes(view[i : i + CHUNK]), last=i + CHUNK >= n))
            o = msgspec.structs.replace(o, data=None, blob=hashlib.sha256(o.data).hexdigest())
        outputs.append(o)
    out.append(TaskOutputs(outputs))
    return out


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
    """Reads frames from a blocking socket with one buffer and few syscalls."""

    def __init__(self, sock: socket.socket, limit: int = MAX_FRAME) -> None:
        self._sock = sock
        self._buf = bytearray()
        self.limit = limit

    def has_frame(self) -> bool:
        """Whether a whole frame is buffered already (``read`` will not touch the socket)."""
        buf = self._buf
        return len(buf) >= 4 and len(buf) >= 4 + _LEN.unpack_from(buf)[0]

    def read(self) -> object | None:
        """The next message, or None at end of stream."""
        buf = self._buf
        while True:
            want = 1 << 16
            if len(buf) >= 4:
                (n,) = _LEN.unpack_from(buf)
                if n > self.limit:
                    raise FrameTooLarge(f"frame of {n} bytes is over the limit of {self.limit}")
                if len(buf) >= 4 + n:
                    msg = decode(memoryview(buf)[4 : 4 + n])
                    del buf[: 4 + n]
                    return msg
                want = max(want, min(RECV_CHUNK, 4 + n - len(buf)))
            chunk = self._sock.recv(want)
            if not chunk:
                return None
            buf += chunk


async def read_frame(reader, limit: int = MAX_FRAME) -> object | None:
    """The next message from an asyncio stream (``asyncio.StreamReader``), or None at end
    of stream. A length header over ``limit`` raises :class:`FrameTooLarge` before any of
    the body is read; a stream that ends inside a frame raises :class:`FrameError`."""
    import asyncio

    try:
        head = await reader.readexactly(4)
    except asyncio.IncompleteReadError as e:
        if e.partial:
            raise FrameError("the stream ended inside a frame header") from None
        return None
    (n,) = _LEN.unpack(head)
    if n > limit:
        raise FrameTooLarge(f"frame of {n} bytes is over the limit of {limit}")
    try:
        body = await reader.readexactly(n)
    except asyncio.IncompleteReadError:
        raise FrameError(f"the stream ended inside a frame of {n} bytes") from None
    return decode(body)
