"""Web endpoints of every kind, for tests/integration/test_web.py."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import strato

app = strato.App("web-basic")

SERVER_PORT = int(os.environ.get("STRATO_TEST_WEB_SERVER_PORT", "18765"))


@app.function()
@strato.fastapi_endpoint()
def hello(name: str = "world") -> dict:
    return {"hello": name}


@app.function()
@strato.fastapi_endpoint(method="POST", label="echo-json")
def echo(item: dict) -> dict:
    return {"got": item, "n": len(item)}


@app.function()
@strato.fastapi_endpoint(docs=True)
def documented(x: int = 1) -> dict:
    return {"x": x}


@app.function()
@strato.fastapi_endpoint(requires_auth=True)
def secret() -> dict:
    return {"secret": 42}


@app.function()
@strato.fastapi_endpoint()
def boom() -> dict:
    raise ValueError("boom for the access log")


@app.function(timeout=120)
@strato.fastapi_endpoint()
def slow(seconds: float = 1.0) -> dict:
    time.sleep(seconds)
    return {"slept": seconds}


async def raw_app(scope, receive, send):
    """A raw ASGI app: /echo streams the request body back, /chunks and /sse stream out,
    /ws echoes WebSocket messages."""
    if scope["type"] == "lifespan":
        while True:
            msg = await receive()
            await send({"type": msg["type"] + ".complete"})
            if msg["type"] == "lifespan.shutdown":
                return
    if scope["type"] == "websocket":
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        while True:
            msg = await receive()
            if msg["type"] == "websocket.disconnect":
                return
            text = msg.get("text")
            if text is not None:
                await send({"type": "websocket.send", "text": "echo:" + text})
            else:
                await send({"type": "websocket.send", "bytes": msg.get("bytes") or b""})
    # behind /<app>/<label>, path carries the root_path in front (as the ASGI spec has it)
    path = scope["path"][len(scope.get("root_path", "")) :]
    if path == "/echo":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        total = 0
        while True:
            msg = await receive()
            body = msg.get("body", b"")
            total += len(body)
            await send({"type": "http.response.body", "body": body, "more_body": True})
            if not msg.get("more_body"):
                break
        await send({"type": "http.response.body", "body": b""})
        return
    if path in ("/chunks", "/sse"):
        sse = path == "/sse"
        ctype = b"text/event-stream" if sse else b"text/plain"
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-type", ctype)]}
        )
        for i in range(5):
            data = f"data: {i}\n\n" if sse else f"chunk {i}\n"
            await send({"type": "http.response.body", "body": data.encode(), "more_body": True})
            await asyncio.sleep(0.3)
        await send({"type": "http.response.body", "body": b""})
        return
    body = f"raw {path} {scope['query_string'].decode()} client={scope['client']}".encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"text/plain"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


@app.function()
@strato.concurrent(max_inputs=20)
@strato.asgi_app(label="raw")
def raw():
    return raw_app


def wsgi_app(environ, start_response):
    body = environ["wsgi.input"].read()
    out = (
        f"wsgi {environ['REQUEST_METHOD']} {environ['SCRIPT_NAME']}|{environ['PATH_INFO']} "
        f"{environ['QUERY_STRING']} body={len(body)}"
    ).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(out)))])
    return [out]


@app.function()
@strato.wsgi_app()
def wsgi():
    return wsgi_app


# a plain http.server in a process of its own, serving one file from memory (a file on
# disk would outlive the container in the host's /tmp under the process runtime)
PLAIN_SERVER = """
import http.server, sys

class Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path != "/hello.txt":
            self.send_error(404)
            return
        body = b"served by a plain http.server\\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Hello).serve_forever()
"""


@app.function(max_containers=1)
@strato.web_server(port=SERVER_PORT, startup_timeout=20)
def server():
    subprocess.Popen(
        [sys.executable, "-c", PLAIN_SERVER, str(SERVER_PORT)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
