"""Length-prefixed msgpack frames for the channel (control plane <-> workers, containers).

A frame is a 4-byte big-endian length followed by one msgpack-encoded ``ChannelMessage``.
Both a blocking-socket reader (the container, which keeps its imports lean) and an asyncio
reader (control plane, worker agent) live here.
"""

from __future__ import annotations

import socket
import struct

import msgspec

from .messages import ChannelMessage

MAX_FRAME = 1 << 31  # 2 GiB: payload limits are enforced long before this
_LEN = struct.Struct(">I")

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(ChannelMessage)


class FrameError(Exception):
    """The peer sent something that is not a valid frame."""


def encode(msg: object) -> bytes:
    body = _encoder.encode(msg)
    return _LEN.pack(len(body)) + body


def decode(body: bytes | memoryview) -> object:
    try:
        return _decoder.decode(body)
    except msgspec.DecodeError as e:
        raise FrameError(f"bad frame: {e}") from e


def parse_address(address: str) -> tuple[str, object]:
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

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buf = bytearray()

    def read(self) -> object | None:
        """The next message, or None at end of stream."""
        buf = self._buf
        while True:
            if len(buf) >= 4:
                (n,) = _LEN.unpack_from(buf)
                if n > MAX_FRAME:
                    raise FrameError(f"frame of {n} bytes is over the limit")
                if len(buf) >= 4 + n:
                    msg = decode(memoryview(buf)[4 : 4 + n])
                    del buf[: 4 + n]
                    return msg
            chunk = self._sock.recv(
                max(1 << 16, 4 + (_LEN.unpack_from(buf)[0] if len(buf) >= 4 else 0) - len(buf))
            )
            if not chunk:
                return None
            buf += chunk


async def read_frame(reader) -> object | None:  # reader: asyncio.StreamReader
    """The next message from an asyncio stream, or None at end of stream."""
    import asyncio

    try:
        head = await reader.readexactly(4)
    except asyncio.IncompleteReadError:
        return None
    (n,) = _LEN.unpack(head)
    if n > MAX_FRAME:
        raise FrameError(f"frame of {n} bytes is over the limit")
    try:
        body = await reader.readexactly(n)
    except asyncio.IncompleteReadError:
        return None
    return decode(body)
