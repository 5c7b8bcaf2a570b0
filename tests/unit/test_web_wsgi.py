"""The WSGI adapter of web endpoints (``container/web_wsgi.py``) driven as uvicorn drives
it: an ASGI scope, ``receive`` giving the body in parts, ``send`` collecting the
response, with werkzeug (what Flask is built on) as the WSGI app."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterable
from typing import Any

import pytest
from werkzeug.wrappers import Request, Response

from strato.container.web_wsgi import WsgiToAsgi

PREFIX = "/shop/api"


def scope(path: str, *, method: str = "GET", query: bytes = b"", headers=()) -> dict[str, Any]:
    """What the container's EdgeMiddleware makes of a request to ``PREFIX + path``."""
    return {
        "type": "http",
        "method": method,
        "path": PREFIX + path,
        "raw_path": (PREFIX + path).encode(),
        "root_path": PREFIX,
        "query_string": query,
        "headers": [(b"host", b"127.0.0.1:8001"), *headers],
        "http_version": "1.1",
        "scheme": "http",
    }


def call(
    app: Callable[..., Iterable[bytes]], sc: dict[str, Any], parts: list[bytes] | None = None
) -> tuple[list[dict[str, Any]], BaseException | None]:
    """Run one request through the adapter; the messages sent, and what it raised."""
    parts = parts or [b""]
    incoming = [
        {"type": "http.request", "body": p, "more_body": i < len(parts) - 1}
        for i, p in enumerate(parts)
    ]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def main() -> BaseException | None:
        try:
            await WsgiToAsgi(app)(sc, receive, send)
        except Exception as e:  # noqa: BLE001 - returned for the test to look at
            return e
        return None

    return sent, asyncio.run(main())


def body_of(sent: list[dict[str, Any]]) -> bytes:
    return b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


def test_json_body_in_parts_reads_through_readinto():
    @Request.application
    def app(request: Request) -> Response:
        return Response(json.dumps(request.get_json()), content_type="application/json")

    payload = json.dumps({"a": 1, "b": ["x" * 3000]}).encode()
    parts = [payload[:10], payload[10:2000], payload[2000:]]
    sc = scope(
        "/json",
        method="POST",
        headers=[(b"content-type", b"application/json"), (b"content-length", b"%d" % len(payload))],
    )
    sent, error = call(app, sc, parts)
    assert error is None
    assert sent[0]["status"] == 200
    assert json.loads(body_of(sent)) == {"a": 1, "b": ["x" * 3000]}


def test_form_body_and_readinto_at_the_end():
    seen: dict[str, Any] = {}

    def app(environ, start_response):
        stream = environ["wsgi.input"]
        buf = bytearray(4)
        got = b""
        while n := stream.readinto(buf):
            got += bytes(buf[:n])
        seen["body"] = got
        seen["after"] = stream.readinto(buf)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    sent, error = call(app, scope("/f", method="POST"), [b"k=v&", b"n=", b"2"])
    assert error is None and body_of(sent) == b"ok"
    assert seen == {"body": b"k=v&n=2", "after": 0}


def test_path_prefix_is_script_name_and_urls_carry_it():
    @Request.application
    def app(request: Request) -> Response:
        out = {
            "script_name": request.environ["SCRIPT_NAME"],
            "path_info": request.environ["PATH_INFO"],
            "url": request.url,
            "root_url": request.root_url,
        }
        return Response(json.dumps(out))

    sent, error = call(app, scope("/a/b", query=b"x=1"))
    assert error is None
    assert json.loads(body_of(sent)) == {
        "script_name": PREFIX,
        "path_info": "/a/b",
        "url": f"http://127.0.0.1:8001{PREFIX}/a/b?x=1",
        "root_url": f"http://127.0.0.1:8001{PREFIX}/",
    }


def test_without_a_prefix_script_name_is_empty():
    def app(environ, start_response):
        start_response("200 OK", [])
        return [f"{environ['SCRIPT_NAME']}|{environ['PATH_INFO']}".encode()]

    sc = scope("/x")
    sc.update(path="/x", raw_path=b"/x", root_path="")
    sent, _ = call(app, sc)
    assert body_of(sent) == b"|/x"


@pytest.mark.parametrize("after", [0, 1], ids=["before-the-body", "after-a-chunk"])
def test_app_failing_after_its_head_raises_and_never_ends_the_response(after):
    """A failure once the head went out must reach the server (which cuts the connection):
    the response is never ended as if it were whole."""

    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])

        def body():
            for _ in range(after):
                yield b"first part\n"
            raise RuntimeError("broke half-way")

        return body()

    sent, error = call(app, scope("/s"))
    assert isinstance(error, RuntimeError)
    if after:
        assert sent[0]["type"] == "http.response.start" and body_of(sent) == b"first part\n"
    else:  # nothing went out yet: the server can still answer 500
        assert sent == []
    assert not any(m.get("more_body") is False for m in sent)
