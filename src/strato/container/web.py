"""Serving a web endpoint inside the container (``FunctionSpec.web`` is set).

The container dials the control plane's channel (the Unix socket its worker bound in, so
it works with ``block_network=True``) once for its own session (hello, ready, stop) and
then several more times for *tunnels*: each tunnel starts with a ``WebTunnelHello``
frame and then carries raw HTTP/1.1 from the gateway, which pools it as a keep-alive
upstream connection (see ``strato.server.gateway``). On each tunnel this process runs:

- ``fastapi``/``asgi``/``wsgi``: uvicorn's httptools protocol on the user's ASGI app
  (``fastapi_endpoint`` wraps the function in a one-route FastAPI app; a WSGI app goes
  through ``web_wsgi.WsgiToAsgi``), WebSocket upgrades included;
- ``server`` (``web_server(port)``): a byte pipe to ``127.0.0.1:<port>``, where the
  user's process listens.

A tunnel is replaced by a fresh one when it first carries a request, so a few spare ones
are always connected. ``StopContainer`` (scale-down, redeploy) stops dialing, lets the
requests in flight finish, runs the app's shutdown and ``@exit`` hooks, and exits.
Errors in the user's code are logged with the request id the gateway assigned.

Imported only for web functions, so the plain container start path stays lean.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from strato import settings
from strato.client import channel_api
from strato.protocol import frames
from strato.protocol import messages as m

from .failure import describe_failure

if TYPE_CHECKING:
    from uvicorn.server import ServerState

# strato's serving stack in an image (uvicorn, httptools, websockets, uvloop: the deps
# layer's strato.images.deps.SERVING_DIR), appended to sys.path after the image's own
# site-packages: the image needs only what the user's code imports, and a version the
# user installed wins
SERVING_DIR = "/opt/strato/serving"

SPARE_TUNNELS = 4
MAX_TUNNELS = 4096
STOP_GRACE_S = 30.0


class WebContainer:
    def __init__(self, container_id: str, channel: str, token: str, spec: m.FunctionSpec) -> None:
        self.container_id = container_id
        self.channel = channel
        self.token = token
        self.spec = spec
        if spec.web is None:
            raise ValueError(f"{spec.name} is not a web endpoint")
        self.web: m.WebConfig = spec.web
        self.hello = frames.encode(m.WebTunnelHello(container_id, token))
        self.sock = frames.connect(channel)
        self._send_lock = threading.Lock()
        self.sock.sendall(frames.encode(m.ContainerHello(container_id, token)))
        # the channel's reader is a thread (not the serving loop): the answers to the
        # endpoint's own API requests (nested calls) arrive even while a sync call in an
        # async handler blocks the loop, and during @enter before the loop serves
        self.api = channel_api.ChannelApiClient(self._send_frames, lambda: None)
        channel_api.CURRENT = self.api
        self._grace: float | None = None  # set when the control plane says stop
        self._loop_ready = False
        threading.Thread(target=self._read_channel, name="strato-channel", daemon=True).start()
        self.stopping = False
        # set by start(), on the serving loop
        self.loop: asyncio.AbstractEventLoop
        self.factory: Callable[[], asyncio.Protocol]  # a tunnel's server side
        self.count: Callable[[], int]  # connected tunnels
        self._stop: asyncio.Event
        self.pipes: set[PortPipe] = set()
        self.lifespan: Any = None  # uvicorn's lifespan handler
        self.server_state: ServerState | None = None
        self._dialing = 0

    def send(self, msg: object) -> None:
        self._send_frames([msg])

    def _send_frames(self, msgs: list[object]) -> None:
        with self._send_lock:
            self.sock.sendall(b"".join(frames.encode(msg) for msg in msgs))

    # ------------------------------------------------------------------ start-up

    def build(self, target: Any) -> Any:
        """The ASGI app to serve (None for ``web_server``, which only pipes bytes)."""
        if self.spec.is_class:
            if self.web.attr is None:
                raise ValueError(f"{self.spec.name}: a class's web endpoint names its method")
            fn = getattr(target.instance, self.web.attr)
        else:
            fn = target._fn
        kind = self.web.kind
        if kind == "fastapi":
            try:
                from fastapi import FastAPI
            except ImportError:
                raise ImportError(
                    "fastapi_endpoint needs FastAPI in the container's environment: add it to "
                    'the image: .pip_install("fastapi") (the server comes with strato)'
                ) from None

            docs = self.web.docs
            api = FastAPI(
                docs_url="/docs" if docs else None,
                redoc_url="/redoc" if docs else None,
                openapi_url="/openapi.json" if docs else None,
            )
            api.add_api_route("/", fn, methods=[self.web.method])
            return api
        if kind in ("asgi", "wsgi"):
            app = fn()
            if asyncio.iscoroutine(app):
                app = asyncio.get_event_loop().run_until_complete(app)
            if app is None or not callable(app):
                raise TypeError(
                    f"{self.spec.name} is an @{kind}_app: it must return the {kind.upper()} "
                    f"app, not {app!r}"
                )
            if kind == "wsgi":
                from .web_wsgi import WsgiToAsgi

                app = WsgiToAsgi(app)
            return app
        if kind == "server":
            fn()
            wait_for_port(self.web.port, self.web.startup_timeout)
            return None
        raise ValueError(f"unknown web endpoint kind {kind!r}")

    # ------------------------------------------------------------------ serving

    async def start(self, app: Any) -> None:
        """Start the app (lifespan), connect the first tunnels, say ready."""
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._loop_ready = True
        if self._grace is not None:  # told to stop before the loop ran
            self._stop.set()
        if app is not None:
            await self._start_asgi(app)
        else:
            port = self.web.port
            self.factory = lambda: PortPipe(self, port)
            self.count = lambda: len(self.pipes)
        await asyncio.gather(*(self._dial() for _ in range(SPARE_TUNNELS)))
        if self.count() == 0:
            raise ConnectionError(f"could not open any web tunnel to {self.channel}")
        self.send(m.ContainerReady())

    async def run(self) -> None:
        """Serve until the control plane says stop (or goes away, or SIGTERM)."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, self._stop.set)
        await self._stop.wait()
        await self.shutdown(self._grace or STOP_GRACE_S)

    def _read_channel(self) -> None:
        reader = frames.SocketReader(self.sock)
        grace = STOP_GRACE_S
        try:
            while (msg := reader.read()) is not None:
                if isinstance(msg, m.ApiResponse):
                    self.api.deliver(msg)
                elif isinstance(msg, m.StopContainer):
                    grace = msg.grace_s or STOP_GRACE_S
                    break
        except (OSError, frames.FrameError):
            pass
        self.api.close_channel("the container's channel to the control plane closed")
        self._grace = grace
        if self._loop_ready:
            self.loop.call_soon_threadsafe(self._stop.set)

    async def _start_asgi(self, app: Any) -> None:
        try:
            import uvicorn
            from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
            from uvicorn.server import ServerState
        except ImportError as e:
            raise ImportError(
                f"{e}: a web endpoint's container serves it with uvicorn and httptools, which "
                f"come with strato's runtime layer of an image ({SERVING_DIR}) and with the "
                "environment strato runs in; this container's Python has neither: install "
                "strato's server dependencies there (uvicorn[standard])"
            ) from None

        config = uvicorn.Config(
            EdgeMiddleware(app),
            http="httptools",
            ws="auto",
            lifespan="auto",
            log_level="warning",
            access_log=False,
            proxy_headers=False,
            server_header=False,
            date_header=False,
            timeout_keep_alive=10**9,  # the gateway decides when a tunnel closes
        )
        config.load()
        logging.getLogger("uvicorn.error").addFilter(_reported_by_edge)
        self.lifespan = config.lifespan_class(config)
        await self.lifespan.startup()
        if self.lifespan.should_exit:
            raise RuntimeError("the app's lifespan startup failed (see the log above)")
        state = self.server_state = ServerState()
        app_state = self.lifespan.state
        loop = self.loop
        self.factory = lambda: HttpToolsProtocol(
            config=config, server_state=state, app_state=app_state, _loop=loop
        )
        self.count = lambda: len(state.connections)

    async def _dial(self) -> None:
        family, addr = frames.parse_address(self.channel)
        self._dialing += 1
        try:
            if isinstance(addr, str):
                await self.loop.create_unix_connection(lambda: Fresh(self), addr)
            else:
                await self.loop.create_connection(lambda: Fresh(self), *addr)
        except OSError as e:
            if not self.stopping:
                print(f"strato: cannot open a web tunnel: {e}", file=sys.stderr)
        finally:
            self._dialing -= 1

    def tunnel_used(self) -> None:
        """A tunnel took its first request: dial a spare to replace it."""
        if self.stopping or self.count() + self._dialing >= MAX_TUNNELS:
            return
        self.loop.create_task(self._dial())

    async def shutdown(self, grace: float) -> None:
        if self.stopping:
            return
        self.stopping = True
        deadline = time.monotonic() + grace
        state = self.server_state
        if state is not None:
            for conn in list(state.connections):
                conn.shutdown()
        for pipe in list(self.pipes):
            pipe.shutdown()
        while time.monotonic() < deadline:
            busy = (state is not None and (state.connections or state.tasks)) or self.pipes
            if not busy:
                break
            await asyncio.sleep(0.05)
        if self.lifespan is not None:
            await self.lifespan.shutdown()


class Fresh(asyncio.Protocol):
    """A tunnel not yet used: sends its hello, then hands itself to the server protocol
    at the first request (and asks for a spare)."""

    def __init__(self, owner: WebContainer) -> None:
        self.owner = owner
        self.inner = owner.factory()
        self.transport: asyncio.Transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self.owner.hello)
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self.transport.set_protocol(self.inner)
        self.owner.tunnel_used()
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


class PortPipe(asyncio.Protocol):
    """``web_server``: one tunnel piped to one connection to the user's port."""

    def __init__(self, owner: WebContainer, port: int) -> None:
        self.owner = owner
        self.port = port
        self.transport: asyncio.Transport
        self.peer: _PeerSide | None = None
        self.pending: list[bytes] = []  # bytes for the user's server, until connected
        self.connected = False
        self.busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.owner.pipes.add(self)

    def data_received(self, data: bytes) -> None:
        self.busy = True
        peer = self.peer
        if peer is not None and peer.transport is not None and self.connected:
            peer.transport.write(data)
            return
        self.pending.append(data)
        if peer is None:
            self.peer = _PeerSide(self)
            self.owner.loop.create_task(self._connect(self.peer))

    async def _connect(self, peer: _PeerSide) -> None:
        try:
            await self.owner.loop.create_connection(lambda: peer, "127.0.0.1", self.port)
        except OSError as e:
            print(f"strato: cannot reach the web server on port {self.port}: {e}", file=sys.stderr)
            self.transport.close()
            return
        pending, self.pending = self.pending, []
        self.connected = True
        if pending and peer.transport is not None:
            peer.transport.write(b"".join(pending))

    def eof_received(self) -> bool:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.write_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner.pipes.discard(self)
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()

    def shutdown(self) -> None:
        if not self.busy:
            self.transport.close()


class _PeerSide(asyncio.Protocol):
    def __init__(self, pipe: PortPipe) -> None:
        self.pipe = pipe
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.pipe.transport.write(data)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.pipe.transport.close()

    def pause_writing(self) -> None:
        self.pipe.transport.pause_reading()

    def resume_writing(self) -> None:
        self.pipe.transport.resume_reading()


class EdgeMiddleware:
    """Sets the ASGI client from ``x-forwarded-for`` and, behind a path-based URL, the
    ``root_path`` from ``x-forwarded-prefix`` (the gateway's ``/<app>/<label>``, which it
    strips), as an ASGI server mounted there would: ``root_path`` is the prefix and
    ``path``/``raw_path`` carry it in front, so ``request.url``, ``url_for`` and redirects
    point back through the gateway while routing still sees the path after the prefix.
    Logs an exception of the user's code with the request id, and answers 500 when no
    response has started (after that, the connection is cut: the client must not take a
    truncated response for a whole one)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        rid = b"-"
        for name, value in scope["headers"]:
            if name == b"x-strato-request-id":
                rid = value
            elif name == b"x-forwarded-for":
                scope["client"] = (value.rpartition(b",")[2].strip().decode("latin-1"), 0)
            elif name == b"x-forwarded-prefix" and value:
                prefix = value.decode("latin-1")
                scope["root_path"] = prefix
                scope["path"] = prefix + scope["path"]
                raw = scope.get("raw_path")
                if raw is not None:
                    scope["raw_path"] = value + raw
        started = False

        async def tracked(message: dict[str, Any]) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception:
            tb = traceback.format_exc()
            print(
                f"request {rid.decode('latin-1')} failed: {scope.get('method', '')} "
                f"{scope.get('path', '')}\n{tb}",
                file=sys.stderr,
                end="",
                flush=True,
            )
            if started or scope["type"] != "http":
                raise
            await send(
                {
                    "type": "http.response.start",
                    "status": 500,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8")],
                }
            )
            await send({"type": "http.response.body", "body": b"Internal Server Error"})


def _reported_by_edge(record: logging.LogRecord) -> bool:
    """Drop uvicorn's own report of an exception of the app: EdgeMiddleware logged it
    already, with the request id (the traceback would be in the logs twice)."""
    return not str(record.msg).startswith("Exception in ASGI application")


def wait_for_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"nothing listens on port {port} {timeout:g}s after the web_server "
                    "function returned: start the server in it (e.g. subprocess.Popen) or "
                    "raise startup_timeout="
                ) from None
            time.sleep(0.05)


def add_serving_stack() -> None:
    """Put strato's serving stack on ``sys.path``, behind everything else (in an image
    built by strato; elsewhere the environment has it, or the import error says what to
    install)."""
    if SERVING_DIR not in sys.path and os.path.isdir(SERVING_DIR):
        sys.path.append(SERVING_DIR)


def serve_web(spec: m.FunctionSpec, target_cls: Any) -> None:
    """The container's main for a web endpoint (called by ``runner.main``)."""
    add_serving_stack()
    wc = WebContainer(
        settings.CONTAINER_ID.required(),
        settings.CHANNEL.required(),
        settings.CONTAINER_TOKEN.required(),
        spec,
    )
    target = target_cls(spec)
    loop = _new_loop()
    asyncio.set_event_loop(loop)
    try:
        target.load()
        target.enter()
        app = wc.build(target)
        loop.run_until_complete(wc.start(app))
    except BaseException as e:  # noqa: BLE001 - reported, then the container exits
        failure = describe_failure(e)
        print(failure.traceback, file=sys.stderr, end="")
        wc.send(failure.init_failed(max_data=frames.CHUNK))
        sys.exit(1)
    try:
        loop.run_until_complete(wc.run())
    finally:
        try:
            target.close()  # @exit hooks
        finally:
            sys.stdout.flush()
            sys.stderr.flush()


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:
        return asyncio.new_event_loop()
