"""What the web gateway's listener limits guarantee (``server/listeners.py``), on a real
gateway on loopback (``proxy_harness.py``): the connection limit, the header read timeout,
the idle keep-alive timeout, 431 for heads over the size or count limit, 400 for what is
not HTTP. The guard's sweep runs every second, so the timeouts here are short and the
waits a few seconds at most."""

from __future__ import annotations

import asyncio
import json

from proxy_harness import Harness, get, response, run

from strato.server.listeners import SWEEP_EVERY_S, ListenerLimits

SHORT_S = 0.5


def limits(**kw) -> ListenerLimits:
    base = dict(max_connections=100, header_timeout_s=30.0, keepalive_s=30.0)
    base.update(kw)
    return ListenerLimits(**base)  # type: ignore[arg-type]


def test_connections_over_the_limit_get_a_503():
    async def t(h: Harness) -> None:
        held = [await h.client(), await h.client()]
        await h.until(lambda: len(h.gw.guard.conns) == 2, "two connections admitted")
        over = await h.client()
        status, headers, body = await over.response()
        assert status == 503 and json.loads(body)["message"] == "too many connections"
        assert await over.eof() == b""
        assert h.gw.guard.refused == 1
        held[0].close()
        await h.until(lambda: len(h.gw.guard.conns) == 1, "a place to free up")
        again = await h.client()
        again.send(b"GET /__strato/health HTTP/1.1\r\nhost: t\r\n\r\n")
        assert (await again.response())[0] == 200

    run(t, limits=limits(max_connections=2))


def test_a_head_not_complete_in_time_is_closed_however_it_trickles():
    async def t(h: Harness) -> None:
        tun = await h.tunnel()
        t0 = asyncio.get_running_loop().time()
        slow = await h.client()
        slow.send(b"GET /app/ep/ HTTP/1.1\r\nhost: t\r\nx-a: ")

        async def trickle() -> None:
            while True:
                slow.send(b"a")
                await asyncio.sleep(0.1)

        task = asyncio.create_task(trickle())
        try:
            assert await slow.closed()
        finally:
            task.cancel()
        # (not before the timeout; the sweep's second, not the trickle, sets when)
        assert asyncio.get_running_loop().time() - t0 >= SHORT_S
        assert h.gw.guard.timed_out == 1
        # a request whose head is complete in time is served, however long its answer
        c = await h.client()
        c.send(get(b"/fine"))
        await tun.request()
        await asyncio.sleep(SHORT_S + SWEEP_EVERY_S)
        tun.send(response(b"late but fine"))
        assert (await c.response())[2] == b"late but fine"

    run(t, limits=limits(header_timeout_s=SHORT_S))


def test_idle_keep_alive_connections_are_closed():
    async def t(h: Harness) -> None:
        c = await h.client()
        c.send(b"GET /__strato/health HTTP/1.1\r\nhost: t\r\n\r\n")
        assert (await c.response())[0] == 200
        assert await c.closed()
        assert h.gw.guard.timed_out == 0  # (idle, not a slow head)

    run(t, limits=limits(keepalive_s=SHORT_S))


def test_heads_over_the_limits_get_a_431():
    async def t(h: Harness) -> None:
        big = await h.client()
        big.send(b"GET / HTTP/1.1\r\nhost: t\r\nx-big: " + b"a" * 3000 + b"\r\n\r\n")
        status, headers, body = await big.response()
        assert status == 431 and headers[b"connection"] == b"close"
        assert "STRATO_MAX_HEADER_BYTES" in json.loads(body)["message"]
        assert await big.closed()
        many = await h.client()
        many.send(b"GET / HTTP/1.1\r\n" + b"".join(b"x-%d: 1\r\n" % i for i in range(11)) + b"\r\n")
        status, _, body = await many.response()
        assert status == 431 and "STRATO_MAX_HEADERS" in json.loads(body)["message"]
        # a flood is read and dropped for a while (the client reads the 431), then cut
        flood = await h.client()
        flood.send(b"GET / HTTP/1.1\r\nx-flood: ")
        for _ in range(40):
            flood.send(b"a" * 65536)
        assert (await flood.response())[0] == 431
        assert await flood.closed()
        # at the limits is fine
        ok = await h.client()
        ok.send(b"GET /x HTTP/1.1\r\n" + b"".join(b"x-%d: 1\r\n" % i for i in range(10)) + b"\r\n")
        assert (await ok.response())[0] == 404

    run(t, limits=limits(max_header_bytes=2048, max_headers=10))


def test_431_waits_for_the_requests_before_it():
    """A pipelined head over the limit behind a request in flight: that request's
    response comes whole first, then the 431, then the close."""

    async def t(h: Harness) -> None:
        tun = await h.tunnel()
        c = await h.client()
        c.send(get(b"/first") + b"GET / HTTP/1.1\r\nx-big: " + b"a" * 3000 + b"\r\n\r\n")
        await tun.request()
        tun.send(response(b"first, whole"))
        assert (await c.response())[2] == b"first, whole"
        assert (await c.response())[0] == 431
        assert await c.closed()

    run(t, limits=limits(max_header_bytes=2048))


def test_what_is_not_http_gets_a_400_after_the_requests_before_it():
    async def t(h: Harness) -> None:
        tun = await h.tunnel()
        c = await h.client()
        c.send(get(b"/first") + b"\x16\x03\x01 not http at all\r\n\r\n")
        await tun.request()
        tun.send(response(b"first"))
        assert (await c.response())[2] == b"first"
        status, _, body = await c.response()
        assert status == 400 and json.loads(body)["message"] == "invalid HTTP request"
        assert await c.closed()
        # a malformed chunked body: the request in flight ends with the 400
        c = await h.client()
        c.send(get(b"/up", b"transfer-encoding: chunked\r\n", method=b"POST"))
        await tun.head()
        c.send(b"not-hex\r\n")
        assert (await c.response())[0] == 400
        assert await tun.eof() == b""
        assert await c.closed()

    run(t)
