"""Apps for the listener and web-routing suites (test_listeners, test_web_routing).

- ``echo``: an ASGI endpoint that answers with the request headers it received (JSON
  pairs), and sleeps ``?sleep=`` seconds first (a request past the HTTP limit gets a
  303); ``echo_auth`` is the same behind ``requires_auth``.
- Apps whose routes collide: ``shop`` label ``cart-api`` and ``shop-cart`` label ``api``
  (both ``shop-cart-api.localhost``); ``web`` and ``WEB``; the deployed ``shop-dev``
  and the ephemeral ``shop`` (which routes as ``shop-dev``).
- ``ping``: a plain function, for a ``.remote()`` while the gateway is under attack.
"""

import asyncio
import json
from urllib.parse import parse_qs

import strato

echo_app = strato.App("strato-test-web-echo")
shop = strato.App("shop")
shop_cart = strato.App("shop-cart")
shop_dev = strato.App("shop-dev")
web_lower = strato.App("web")
web_upper = strato.App("WEB")
pinger = strato.App("strato-test-listeners")


async def headers_app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            msg = await receive()
            await send({"type": msg["type"] + ".complete"})
            if msg["type"] == "lifespan.shutdown":
                return
    query = parse_qs(scope["query_string"].decode())
    if "sleep" in query:
        await asyncio.sleep(float(query["sleep"][0]))
    while (await receive()).get("more_body"):
        pass
    pairs = [[k.decode("latin-1"), v.decode("latin-1")] for k, v in scope["headers"]]
    # behind /<app>/<label>, path carries root_path in front: the path the app routes on
    # is what follows it
    route = scope["path"][len(scope.get("root_path", "")) :]
    body = json.dumps({"headers": pairs, "path": route}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


@echo_app.function()
@strato.concurrent(max_inputs=20)
@strato.asgi_app(label="echo")
def echo():
    return headers_app


@echo_app.function()
@strato.concurrent(max_inputs=20)
@strato.asgi_app(label="echo-auth", requires_auth=True)
def echo_auth():
    return headers_app


@shop.function()
@strato.fastapi_endpoint(label="cart-api")
def shop_cart_api() -> str:
    return "shop"


@shop_cart.function()
@strato.fastapi_endpoint(label="api")
def cart_api() -> str:
    return "shop-cart"


@shop_dev.function()
@strato.fastapi_endpoint(label="cart-api")
def dev_cart_api() -> str:
    return "shop-dev"


@web_lower.function()
@strato.fastapi_endpoint(label="home")
def home_lower() -> str:
    return "web"


@web_upper.function()
@strato.fastapi_endpoint(label="home")
def home_upper() -> str:
    return "WEB"


@pinger.function()
def ping(x: int) -> int:
    return x + 1
