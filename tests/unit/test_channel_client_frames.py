"""A local client's frames, parsed as their bytes arrive (``ClientFrames``): a frame cut
anywhere across reads, several in one read, each request started once in order; a frame
over the limit or one a client may not send ends the connection."""

from __future__ import annotations

import asyncio

from strato.protocol import frames
from strato.protocol import messages as m
from strato.server.api.channel import ClientFrames


class _Requests:
    def __init__(self) -> None:
        self.started: list[int] = []

    def start(self, req: m.ApiRequest) -> None:
        self.started.append(req.req_id)


class _Transport:
    closed = False

    def close(self) -> None:
        self.closed = True


def _proto(limit: int = 1 << 20) -> tuple[ClientFrames, _Requests, _Transport]:
    requests, transport = _Requests(), _Transport()
    return ClientFrames(requests, limit, transport), requests, transport  # type: ignore[arg-type]


def _req(i: int, body: bytes = b"") -> bytes:
    return frames.encode(m.ApiRequest(i, "POST", f"/queues/q{i}/put", {}, body))


def test_frames_cut_anywhere_or_together_start_each_request_once_in_order():
    async def body() -> None:
        proto, requests, transport = _proto()
        data = b"".join(_req(i, b"x" * (i * 37)) for i in range(1, 40))
        for cut in (1, 3, 4, 5, 17, 100, 4096):
            requests.started.clear()
            for at in range(0, len(data), cut):
                proto.data_received(data[at : at + cut])
            assert requests.started == list(range(1, 40))
        assert not transport.closed
        proto.connection_lost(None)
        assert proto.done.done()

    asyncio.run(body())


def test_a_frame_over_the_limit_or_not_a_request_ends_the_connection():
    async def body() -> None:
        proto, requests, transport = _proto(limit=100)
        proto.data_received(_req(1) + _req(2, b"x" * 200) + _req(3))
        assert requests.started == [1]  # the large one ends it: nothing after it runs
        assert transport.closed

        proto, requests, transport = _proto()
        proto.data_received(frames.encode(m.ClientHello("token")) + _req(4))
        assert requests.started == []
        assert transport.closed

    asyncio.run(body())
