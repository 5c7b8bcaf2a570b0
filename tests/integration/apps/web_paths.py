"""Web endpoints behind path-based URLs (``/<app>/<label>``): what FastAPI builds from the
request (``request.url``, ``url_for``, redirects), a response that fails after its head,
and an endpoint no node can ever run. For tests/integration/test_web.py."""

import asyncio

import strato

app = strato.App("web-paths")


@app.function()
@strato.asgi_app()
def api():
    from fastapi import FastAPI, Request
    from fastapi.responses import RedirectResponse, StreamingResponse

    web = FastAPI()

    @web.get("/where")
    def where(request: Request) -> dict:
        return {
            "url": str(request.url),
            "base_url": str(request.base_url),
            "root_path": request.scope["root_path"],
            "link": str(request.url_for("item", n=3)),
        }

    @web.get("/items/{n}")
    def item(n: int) -> dict:
        return {"n": n}

    @web.get("/go")
    def go(request: Request) -> RedirectResponse:
        return RedirectResponse(request.url_for("item", n=7), status_code=307)

    @web.get("/stream-fail")
    def stream_fail() -> StreamingResponse:
        async def body():
            yield b"first part\n"
            await asyncio.sleep(0.05)
            raise RuntimeError("the stream broke half-way")

        return StreamingResponse(body(), media_type="text/plain")

    return web


@app.function(gpu="H100")
@strato.fastapi_endpoint()
def on_gpu() -> dict:
    return {"never": "placed"}
