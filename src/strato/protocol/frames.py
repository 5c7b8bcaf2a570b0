"""Length-prefixed msgpack frames for the channel (control plane <-> workers, containers).

A frame is a 4-byte big-endian length followed by one msgpack-encoded ``ChannelMessage``.
Both a blocking-socket reader (the container, which keeps its imports lean) and an asyncio
reader (control plane, worker agent) live here; the frame layer without msgspec (length
header, limits, connect, the socket reader) is :mod:`strato.protocol.framing`.

Every reader checks the length header against a limit *before* it reads (or allocates)
the body: the control plane reads frames from containers, which run untrusted code, so a
header that claims 2 GiB ends the connection after 4 bytes. Decoding validates every
field (``strato.protocol.messages`` carries the numeric ranges), so a frame either decodes
to a well-formed message or raises :class:`FrameError`.
"""

from __future__ import annotations

import socket

import msgspec

from . import framing
from .framing import (  # noqa: F401 - frames.X is the channel's API
    HELLO_MAX_FRAME,
    MAX_FRAME,
    RECV_CHUNK,
    FrameError,
    FrameTooLarge,
    connect,
    parse_address,
)
from .framing import LEN as _LEN
from .messages import BlobChunk, ChannelMessage, TaskOutputs

CHUNK = 1 << 20  # a container sends a value over this as BlobChunk frames of this size

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(ChannelMessage)


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


class SocketReader(framing.SocketReader):
    """Reads ``ChannelMessage`` frames from a blocking socket (see :mod:`.framing`)."""

    def __init__(self, sock: socket.socket, limit: int = MAX_FRAME) -> None:
        super().__init__(sock, decode, limit)


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
