"""Web endpoints as ported apps write them, in a Debian image that has only Flask: the
serving stack (uvicorn, httptools, websockets) must come from strato, not the image.
For tests/integration/test_web_ported.py."""

from __future__ import annotations

import sys

import strato

image = strato.Image.debian_slim().pip_install("flask")
app = strato.App("web-ported", image=image)


def _where(name: str) -> str | None:
    module = sys.modules.get(name)
    return getattr(module, "__file__", None) if module is not None else None


@app.function()
@strato.wsgi_app()
def flask_app():
    from flask import Flask, Response, jsonify, redirect, request, url_for

    web = Flask(__name__)

    @web.get("/")
    def index():
        return jsonify(
            url=request.url,
            script_root=request.script_root,
            path=request.path,
            link=url_for("item", n=3),
            external=url_for("item", n=3, _external=True),
            uvicorn=_where("uvicorn"),
            flask=_where("flask"),
        )

    @web.get("/item/<int:n>")
    def item(n: int):
        return jsonify(n=n)

    @web.get("/go")
    def go():
        return redirect(url_for("item", n=7))

    @web.post("/json")
    def echo_json():
        return jsonify(got=request.json, length=request.content_length)

    @web.post("/form")
    def echo_form():
        return jsonify(form=request.form.to_dict())

    @web.get("/stream-fail")
    def stream_fail():
        def body():
            yield "first part\n"
            raise RuntimeError("the stream broke half-way")

        return Response(body(), mimetype="text/plain")

    return web


async def _asgi(scope, receive, send):
    """A raw ASGI app (no framework in the image): a WebSocket echo, and the scope's
    paths with where the serving stack was imported from."""
    if scope["type"] == "lifespan":
        while True:
            msg = await receive()
            await send({"type": msg["type"] + ".complete"})
            if msg["type"] == "lifespan.shutdown":
                return
    if scope["type"] == "websocket":
        await receive()
        await send({"type": "websocket.accept"})
        while True:
            msg = await receive()
            if msg["type"] == "websocket.disconnect":
                return
            await send({"type": "websocket.send", "text": "echo:" + (msg.get("text") or "")})
    import json

    body = json.dumps(
        {
            "root_path": scope.get("root_path", ""),
            "path": scope["path"],
            "raw_path": (scope.get("raw_path") or b"").decode(),
            "uvicorn": _where("uvicorn"),
            "httptools": _where("httptools"),
            "websockets": _where("websockets"),
        }
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": body})


@app.function()
@strato.asgi_app(label="sockets")
def sockets():
    return _asgi


# the same app in an image whose user installed uvicorn: theirs serves, not strato's
@app.function(image=image.pip_install("uvicorn"))
@strato.asgi_app(label="own-uvicorn")
def own_uvicorn():
    return _asgi


# an MCP server (the SDK brings uvicorn, not httptools), served over streamable HTTP
@app.function(image=image.pip_install("mcp"))
@strato.asgi_app(label="mcp")
def mcp_server():
    from mcp.server.mcpserver import MCPServer

    server = MCPServer("strato-test")

    @server.tool()
    def add(a: int, b: int) -> int:
        """Add two numbers."""
        return a + b

    return server.streamable_http_app(stateless_http=True, json_response=True)
