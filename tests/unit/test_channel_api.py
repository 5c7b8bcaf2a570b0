"""The container's API client over its channel, and the router's container entry point."""

from __future__ import annotations

import asyncio
import hashlib
import threading

import msgspec
import pytest

from strato import exceptions as exc
from strato.client import channel_api
from strato.protocol import messages as m
from strato.server.api.router import Principal, Reply, Request, Router, reply


class FakeControlPlane:
    """Answers each ApiRequest sent by the client from another thread, as the channel's
    reader would; records every frame."""

    def __init__(self, answer) -> None:
        self.frames: list[object] = []
        self.answer = answer
        self.client = channel_api.ChannelApiClient(self.send, lambda: 41, timeout=5.0)

    def send(self, msgs: list[object]) -> None:
        self.frames.extend(msgs)
        req = msgs[-1]
        assert isinstance(req, m.ApiRequest)
        resp = self.answer(req)
        if resp is not None:
            threading.Thread(target=self.client.deliver, args=(resp,)).start()


def test_a_request_is_answered_by_its_response():
    def answer(req: m.ApiRequest) -> m.ApiResponse:
        body = msgspec.msgpack.encode(m.FunctionRef("fn-1", req.path))
        return m.ApiResponse(req.req_id, 200, body)

    cp = FakeControlPlane(answer)
    ref = cp.client.call("GET", "/apps/a/functions/f", None, m.FunctionRef, params={"x": 1})
    assert ref == m.FunctionRef("fn-1", "/apps/a/functions/f")
    (req,) = cp.frames
    assert req.query == {"x": "1"} and req.input_id == 41  # the calling code's input


def test_an_error_answer_raises_its_exception():
    def answer(req: m.ApiRequest) -> m.ApiResponse:
        body = msgspec.msgpack.encode(m.ErrorBody("NotFoundError", "no such call"))
        return m.ApiResponse(req.req_id, 404, body)

    with pytest.raises(exc.NotFoundError, match="no such call"):
        FakeControlPlane(answer).client.request_raw("GET", "/calls/fc-1")


def test_a_closed_channel_fails_waiting_and_later_requests():
    cp = FakeControlPlane(lambda req: None)  # never answers
    failed: list[BaseException] = []

    def wait() -> None:
        try:
            cp.client.request_raw("GET", "/health", timeout=30)
        except exc.ConnectionError as e:
            failed.append(e)

    t = threading.Thread(target=wait)
    t.start()
    while not cp.frames:
        threading.Event().wait(0.01)
    cp.client.close_channel("channel gone")
    t.join(10)
    assert not t.is_alive() and len(failed) == 1
    with pytest.raises(exc.ConnectionError, match="channel gone"):
        cp.client.request_raw("GET", "/health")


def test_an_unanswered_request_times_out(monkeypatch):
    monkeypatch.setattr(channel_api, "ANSWER_MARGIN_S", 0.0)
    with pytest.raises(exc.TimeoutError, match="did not answer"):
        FakeControlPlane(lambda req: None).client.request_raw("GET", "/health", timeout=0.05)


def test_a_large_blob_goes_in_chunks_ahead_of_its_request():
    cp = FakeControlPlane(lambda req: m.ApiResponse(req.req_id, 200, msgspec.msgpack.encode({})))
    data = bytes(range(256)) * (5 * channel_api.CHUNK // 256 + 7)
    key = hashlib.sha256(data).hexdigest()
    cp.client.put_blob(key, data)
    *chunks, req = cp.frames
    assert all(isinstance(c, m.BlobChunk) for c in chunks)
    assert b"".join(c.data for c in chunks) == data
    assert [c.last for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert req.path == f"/blobs/{key}" and req.query == {"chunked": "1"} and req.body == b""
    with pytest.raises(exc.InvalidError, match="does not hash"):
        cp.client.put_blob("0" * 64, data)


def _router() -> Router:
    api = Router("t", "0", "admin-token", 1 << 20)

    @api.add("GET", "/open/{x}", "open to containers", container=True)
    async def open_route(req: Request) -> Reply:
        assert req.principal is not None
        return reply({"x": req.path_params["x"], "app": req.principal.app_id})

    @api.add("POST", "/admin", "admin only")
    async def admin(req: Request) -> Reply:
        raise AssertionError("a container reached an admin route")

    return api


def test_dispatch_for_a_container_reaches_only_open_routes():
    api = _router()
    who = Principal("ct-1", "ap-1", "fn-1", None)

    def run(method: str, path: str) -> Reply:
        return asyncio.run(api.dispatch_for(who, method, path, {}, b""))

    ok = run("GET", "/open/7")
    assert ok.status == 200
    assert msgspec.msgpack.decode(ok.body) == {"x": "7", "app": "ap-1"}
    denied = run("POST", "/admin")
    assert denied.status == 401
    assert b"not open to code in a container" in denied.body
    assert run("GET", "/nothing").status == 404
    assert run("POST", "/open/7").status == 400  # method not allowed


def test_a_forked_child_is_refused_before_it_writes(monkeypatch):
    cp = FakeControlPlane(lambda req: None)
    monkeypatch.setattr(channel_api.os, "getpid", lambda: -1)  # as in a forked child
    with pytest.raises(exc.ExecutionError, match="forked"):
        cp.client.request_raw("GET", "/health")
    assert cp.frames == []  # nothing reached the shared socket


def test_api_request_frames_are_bounded():
    from strato.protocol import frames

    def decode(req: m.ApiRequest) -> object:
        return frames.decode(frames.encode(req)[4:])

    assert decode(m.ApiRequest(1, "GET", "/x", {str(i): "v" for i in range(32)}))
    for bad in (
        m.ApiRequest(1, "GET", "/x", {str(i): "v" for i in range(33)}),  # too many params
        m.ApiRequest(1, "GET", "/" + "x" * 2048),  # path too long
        m.ApiRequest(1, "GET", "/x", input_id=-1),  # out of range
    ):
        with pytest.raises(frames.FrameError):
            decode(bad)
    raw = msgspec.msgpack.encode({"t": "api", "req_id": 1, "method": "PATCH", "path": "/x"})
    with pytest.raises(frames.FrameError):
        frames.decode(raw)  # a method no route has
