"""API requests over the channel (``ApiRequest`` frames), from containers and local clients.

A container holds no API token: its channel connection, opened with its own secret, is its
credential, valid while the container lives. Each request runs the route it names, as
``Principal(container, app, function, input)``, through ``Router.dispatch_for``: only
routes open to containers, each scoped to the container's app (``scope.py``).

A client on this machine may send its requests over the channel socket too (a
``ClientHello`` with a token first): the same routes as HTTP, without HTTP's parsing on
either side (``client/local_channel.py``), as that token's workspace and role; a workspace
token is checked again on each request, so revoking it ends its connections' requests at
once. A container acts in its app's workspace, as a developer.

A request runs at once up to its first wait (most of a Dict's and a Queue's answer
without one), then as a task, so a long-poll does not hold up a container's outputs; at
most ``MAX_INFLIGHT`` at once per connection (more are refused at once), and all of them
end with the connection.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import types
from collections.abc import Coroutine, Generator
from typing import TYPE_CHECKING, Any

from strato import exceptions as exc
from strato.protocol import frames
from strato.protocol import messages as m
from strato.protocol.framing import LEN as _LEN
from strato.server.store.blobs import check_key

from ..store.tables_workspaces import DEFAULT_WORKSPACE
from ..workspaces import INSTALLATION, Caller
from .router import Principal, Reply, error_reply, reply

if TYPE_CHECKING:
    from ..calls.uploads import Uploads
    from ..containers import Container
    from ..fleet import Peer
    from .router import Router

log = logging.getLogger("strato.api.channel")

MAX_INFLIGHT = 256  # requests of one container at once (each a task, maybe a long-poll)
CLIENT_MAX_INFLIGHT = 8192  # of a local client (which HTTP would let open as many sockets)
_BLOBS = "/blobs/"


class ChannelRequests:
    """The API requests of one channel connection: a container's (``container`` and
    ``uploads`` given) or a local client's that showed a token (``caller``: who that token
    makes it; ``refusal``: why each of its requests is refused, for a valid token that
    named a workspace it may not act in)."""

    def __init__(
        self,
        router: Router,
        peer: Peer,
        container: Container | None = None,
        uploads: Uploads | None = None,
        caller: Caller = INSTALLATION,
        refusal: exc.Error | None = None,
    ) -> None:
        self.router = router
        self.container = container
        self.caller = caller
        self.refusal = refusal
        if container is not None:  # code in a container acts in its app's workspace
            ws = router.workspaces.app_ws if router.workspaces is not None else {}
            self.caller = Caller(ws.get(container.app_id, DEFAULT_WORKSPACE), "developer")
        self.peer = peer
        self.uploads = uploads
        self.tasks: set[asyncio.Task] = set()
        self.limit = MAX_INFLIGHT if container is not None else CLIENT_MAX_INFLIGHT

    async def take(self, req: m.ApiRequest) -> None:
        """Start one request (called by the connection's reader, in frame order)."""
        if req.method == "PUT" and req.query.get("chunked") == "1" and self.uploads is not None:
            # a large blob sent as BlobChunk frames just ahead: claimed here, in order
            self._answer(req.req_id, await self._chunked_blob(req))
            return
        self.start(req)

    def start(self, req: m.ApiRequest) -> None:
        """Start one request that is not a chunked upload (in frame order)."""
        if len(self.tasks) >= self.limit:
            self._answer(
                req.req_id,
                error_reply(
                    exc.ExecutionError(
                        f"over {self.limit} API requests of this connection at once: "
                        "wait for some of its calls to finish"
                    )
                ),
            )
            return
        # run at once, up to its first wait: a request that does not wait (a Dict read
        # from the cache, a Queue op served from memory) is answered here, without a task
        # and a turn of the loop; one that waits goes on as a task from there
        ctx = contextvars.copy_context()
        coro = self._run(req)
        try:
            awaiting = ctx.run(coro.send, None)
        except StopIteration:
            return
        task = asyncio.get_running_loop().create_task(
            _go_on(coro, awaiting), name="api-request", context=ctx
        )
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _run(self, req: m.ApiRequest) -> None:
        s = self.container
        who = None  # a local client with the API token
        if s is not None:  # the calling code's input, only when this container holds it
            input_id = req.input_id if req.input_id in s.inflight else None
            who = Principal(s.container_id, s.app_id, s.function_id, input_id)
        try:
            if self.refusal is not None:
                raise self.refusal
            spaces = self.router.workspaces
            if spaces is not None and not spaces.still_valid(self.caller):
                raise exc.AuthError("this connection's token was revoked")
            out = await self.router.dispatch_for(
                who, req.method, req.path, req.query, req.body, self.caller
            )
        except exc.Error as e:
            out = error_reply(e)
        except Exception:  # a bug must answer, not leave the caller waiting
            log.exception("channel request %s %s failed", req.method, req.path)
            out = error_reply(exc.InternalError(f"{req.method} {req.path} failed"))
        self._answer(req.req_id, out)

    async def _chunked_blob(self, req: m.ApiRequest) -> Reply:
        assert self.uploads is not None
        if not req.path.startswith(_BLOBS):
            raise exc.InvalidError(f"only a blob upload may be chunked, not {req.path}")
        key, size = await self.uploads.take_async(check_key(req.path[len(_BLOBS) :]))
        if key is None:
            return error_reply(
                exc.RequestSizeError(
                    f"blob of {size} bytes is over the limit of {self.uploads.max_payload} "
                    "bytes (STRATO_MAX_PAYLOAD)"
                )
            )
        return reply({})

    def _answer(self, req_id: int, out: Reply) -> None:
        self.peer.send(m.ApiResponse(req_id, out.status, out.body))

    def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()


@types.coroutine
def _go_on(coro: Coroutine[Any, Any, None], awaiting: Any) -> Generator[Any, Any, None]:
    """The rest of a coroutine whose first step ran already and stopped at ``awaiting``
    (what it awaits, handed to the task that runs this): drives it on as a task would."""
    while True:
        try:
            sent = yield awaiting
        except GeneratorExit:  # this one is closed unfinished: so is the coroutine
            coro.close()
            raise
        except BaseException as e:  # a cancellation: into the coroutine, as a task would
            try:
                awaiting = coro.throw(e)
            except StopIteration:
                return
        else:
            try:
                awaiting = coro.send(sent)
            except StopIteration:
                return


class ClientFrames(asyncio.Protocol):
    """A local client's connection once its hello is read: each frame is parsed as its
    bytes arrive and its request started at once (`ChannelRequests.start`), with no
    reader task woken per frame. ``done`` resolves when the connection ends."""

    def __init__(self, requests: ChannelRequests, limit: int, transport: Any) -> None:
        self.requests = requests
        self.limit = limit  # the largest frame
        self.transport = transport
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._buf = bytearray()

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        at = 0
        try:
            while len(buf) - at >= 4:
                (n,) = _LEN.unpack_from(buf, at)
                if n > self.limit:
                    raise frames.FrameTooLarge(
                        f"frame of {n} bytes is over the limit of {self.limit}"
                    )
                if len(buf) - at - 4 < n:
                    break
                msg = frames.decode(memoryview(buf)[at + 4 : at + 4 + n])
                at += 4 + n
                if not isinstance(msg, m.ApiRequest):
                    raise frames.FrameError(f"a client may not send {type(msg).__name__}")
                self.requests.start(msg)
        except frames.FrameError as e:
            log.warning("channel: dropped a client: %s", e)
            buf.clear()
            self.transport.close()
            return
        del buf[:at]

    def eof_received(self) -> bool:
        return False  # (the transport closes)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)
