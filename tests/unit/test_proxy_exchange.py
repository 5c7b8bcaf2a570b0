"""The gateway's HTTP exchanges, byte by byte: a real gateway on loopback between a real
client connection and a container's real tunnel (``proxy_harness.py``), under uvloop (the
control plane's loop) and asyncio's own.

Where a test sends a message in parts, each part is written and the loop runs before the
next is sent, so the gateway reads them apart; where a test needs to know that bytes
were *not* forwarded early, it sends the next part only after the other side has read
the previous one, so that no test depends on a delay.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from proxy_harness import PREFIX, Harness, get, response, run

from strato.server.gateway.exchange import NEXT, Exchange, Phase, PhaseError
from strato.server.gateway.proxy import ClientConn
from strato.server.scheduler import NodeView


@pytest.fixture(params=["uvloop", "asyncio"])
def loop(request) -> str:
    return request.param


async def settle() -> None:
    """Let the gateway (on this loop) read what was just written."""
    for _ in range(3):
        await asyncio.sleep(0.002)


def conn_of(h: Harness) -> ClientConn:
    (conn,) = h.gw.guard.conns
    return conn


# ---------------------------------------------------------------------- the state machine


def test_phases_move_only_as_the_table_says():
    class Gw:
        config = None

    class Conn:
        gw = Gw()

    ex = Exchange(Conn(), "wr-1")  # type: ignore[arg-type]
    assert ex.phase is Phase.HEAD
    with pytest.raises(PhaseError):
        ex._to(Phase.SENT)  # a request not yet read cannot be sent
    ex._to(Phase.QUEUED)
    ex._to(Phase.WAITING)
    with pytest.raises(PhaseError):
        ex._to(Phase.RECEIVING)  # no response before the request went up
    ex._to(Phase.DONE)
    for phase in Phase:
        with pytest.raises(PhaseError):
            ex._to(phase)  # done is final
    # every phase can end, and every phase but HEAD is reached from another
    assert all(Phase.DONE in NEXT[p] for p in Phase if p is not Phase.DONE)
    reached = set().union(*NEXT.values())
    assert reached == set(Phase) - {Phase.HEAD}


# ---------------------------------------------------------------------- one request


def test_request_is_rewritten_and_the_tunnel_reused(loop):
    async def t(h: Harness) -> None:
        tun = await h.tunnel()
        c = await h.client()
        c.send(
            get(
                b"/x?q=1",
                b"connection: keep-alive, x-secret\r\nx-secret: 1\r\nx-forwarded-for: 6.6.6.6\r\n"
                b"strato-token: t\r\nx-kept: yes\r\n",
            )
        )
        line, headers, body = await tun.request()
        assert line == b"GET /x?q=1 HTTP/1.1"
        assert headers[b"x-forwarded-for"] == b"127.0.0.1"
        assert headers[b"x-forwarded-prefix"] == PREFIX
        assert headers[b"x-kept"] == b"yes"
        for hop in (b"x-secret", b"strato-token", b"connection"):
            assert hop not in headers
        rid = headers[b"x-strato-request-id"]
        tun.send(response(b"hello"))
        status, rheaders, body = await c.response()
        assert (status, body) == (200, b"hello")
        assert rheaders[b"x-strato-request-id"] == rid
        # the next request on the connection takes the same tunnel (the only one)
        c.send(get(b"/y"))
        line, headers, _ = await tun.request()
        assert line == b"GET /y HTTP/1.1" and headers[b"x-strato-request-id"] != rid
        tun.send(response(b"again"))
        assert (await c.response())[2] == b"again"
        lines = h.access()
        assert lines[0].startswith("GET /app/ep/x?q=1 200 ") and rid.decode() in lines[0]
        assert len(lines) == 2 and h.endpoint.inflight() == 0

    run(t, loop=loop)


def test_split_request_head_and_body(loop):
    async def t(h: Harness) -> None:
        tun = await h.tunnel()
        c = await h.client()
        raw = get(b"/split", b"content-length: 11\r\n", method=b"POST") + b"hello world"
        for i in range(len(raw)):  # one byte at a time, each read on its own
            c.send(raw[i : i + 1])
            await asyncio.sleep(0)
        line, headers, body = await tun.request()
        assert line == b"POST /split HTTP/1.1" and body == b"hello world"
        tun.send(response())
        assert (await c.response())[0] == 200

    run(t, loop=loop)


@pytest.mark.parametrize("interim", [b"", b"HTTP/1.1 100 Continue\r\n\r\n"])
def test_split_response_head(loop, interim):
    """The response head in two parts, split at every byte: the client gets it whole,
    with the request id, and the body after it."""

    async def t(h: Harness) -> None:
        tun = await h.tunnel()
        c = await h.client()
        raw = interim + response(b"0123456789", extra=b"x-app: 1\r\n")
        for cut in range(1, len(raw)):
            c.send(get(b"/%d" % cut))
            await tun.request()
            tun.send(raw[:cut])
            await settle()
            tun.send(raw[cut:])
            if interim:
                status, _, _ = await c.response()
                assert status == 100
            status, headers, body = await c.response()
            assert (status, body, headers[b"x-app"]) == (200, b"0123456789", b"1")
            assert headers[b"x-strato-request-id"].startswith(b"wr-")
        assert h.gw.endpoints  # (all over the one tunnel)
        assert len(h.access()) == len(raw) - 1

    run(t, loop=loop)


# ---------------------------------------------------------------------- pipelining


def test_pipelined_requests_run_one_at_a_time_in_order(loop):
    async def t(h: Harness) -> None:
        box = h.container()
        tuns = [await h.tunnel(box), await h.tunnel(box)]
        c = await h.client()
        c.send(
            get(b"/a")
            + get(b"/b", b"content-length: 5\r\n", method=b"POST")
            + b"hello"
            + get(b"/c")
        )
        await h.until(lambda: len(conn_of(h).queue) == 3, "the 3 requests to be read")
        # two free tunnels and slots, yet only the first request went up
        assert [ex.phase for ex in conn_of(h).queue] == [Phase.SENT, Phase.QUEUED, Phase.QUEUED]
        assert h.endpoint.inflight() == 1
        tun = tuns[1]  # (the pool hands out the tunnel adopted last)
        line, _, _ = await tun.request()
        assert line == b"GET /a HTTP/1.1"
        tun.send(response(b"A"))
        assert (await c.response())[2] == b"A"
        line, _, body = await tun.request()  # (the same tunnel, back in the pool)
        assert (line, body) == (b"POST /b HTTP/1.1", b"hello")
        tun.send(response(b"B"))
        line, _, _ = await tun.request()
        assert line == b"GET /c HTTP/1.1"
        tun.send(response(b"C"))
        assert [(await c.response())[2] for _ in range(2)] == [b"B", b"C"]

    run(t, loop=loop, max_inputs=2)


def test_many_pipelined_requests_answered_at_once(loop):
    """Thousands of requests that the gateway answers itself (404), pipelined behind one
    that a container serves: all answered, in order, on the one connection."""

    async def t(h: Harness) -> None:
        tun = await h.tunnel()
        c = await h.client()
        n = 3000
        c.send(get(b"/first") + b"GET /nowhere HTTP/1.1\r\nhost: t\r\n\r\n" * n)
        await tun.request()
        tun.send(response(b"first"))
        assert (await c.response())[2] == b"first"
        for _ in range(n):
            status, _, body = await c.response()
            assert status == 404
        assert json.loads(body)["error"] == "Not Found"
        c.send(get(b"/last"))  # the connection still serves
        await tun.request()
        tun.send(response(b"last"))
        assert (await c.response())[2] == b"last"

    run(t, loop=loop)


# ---------------------------------------------------------------------- HEAD


def test_head_response_has_no_body_and_the_tunnel_stays(loop):
    async def t(h: Harness) -> None:
        tun = await h.tunnel()
        c = await h.client()
        c.send(get(b"/h", method=b"HEAD"))
        line, _, _ = await tun.request()
        assert line == b"HEAD /h HTTP/1.1"
        # the length of the body a GET would get, and no body
        tun.send(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n")
        status, headers, _ = await c.response(head_only=True)
        assert status == 200 and headers[b"content-length"] == b"1000"
        c.send(get(b"/after"))
        line, _, _ = await tun.request()  # the same tunnel carries the next one
        assert line == b"GET /after HTTP/1.1"
        tun.send(response(b"next"))
        assert (await c.response())[2] == b"next"

    run(t, loop=loop, wait_timeout_s=5)


# ---------------------------------------------------------------------- 100-continue


@pytest.mark.parametrize("together", [False, True])
def test_expect_100_continue(loop, together):
    """The client waits for the container's ``100 Continue`` before it sends the body;
    the interim head passes as it is, the final one (alone or in the same write) gets
    the request id."""

    async def t(h: Harness) -> None:
        tun = await h.tunnel()
        c = await h.client()
        c.send(get(b"/up", b"expect: 100-continue\r\ncontent-length: 5\r\n", method=b"PUT"))
        line, headers = await _head(tun)
        assert line == b"PUT /up HTTP/1.1" and headers[b"expect"] == b"100-continue"
        tun.send(b"HTTP/1.1 100 Continue\r\n\r\n")
        interim = await c.reader.readuntil(b"\r\n\r\n")
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        c.send(b"hello")
        assert await tun.read(5) == b"hello"
        if together:  # a second interim head and the final one in one write
            tun.send(b"HTTP/1.1 102 Processing\r\n\r\n" + response(b"stored", status=201))
            assert (await c.response())[0] == 102
        else:
            tun.send(response(b"stored", status=201))
        status, headers, body = await c.response()
        assert (status, body) == (201, b"stored")
        assert headers[b"x-strato-request-id"].startswith(b"wr-")

    run(t, loop=loop)


async def _head(tun) -> tuple[bytes, dict[bytes, bytes]]:
    from proxy_harness import parse_head

    return parse_head(await tun.head())


def test_container_gone_after_100_continue_is_a_502(loop):
    async def t(h: Harness) -> None:
        tun = await h.tunnel()
        c = await h.client()
        c.send(get(b"/up", b"expect: 100-continue\r\ncontent-length: 5\r\n", method=b"PUT"))
        await tun.head()
        tun.send(b"HTTP/1.1 100 Continue\r\n\r\n")
        assert (await c.response())[0] == 100
        tun.close()
        status, headers, body = await c.response()
        assert status == 502
        assert json.loads(body)["request_id"] == headers[b"x-strato-request-id"].decode()

    run(t, loop=loop)


# ---------------------------------------------------------------------- 101


UPGRADE = b"connection: Upgrade\r\nupgrade: websocket\r\n"
SWITCH = b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n"


@pytest.mark.parametrize("closer", ["container", "client"])
def test_upgrade_makes_a_two_way_pipe(loop, closer):
    async def t(h: Harness) -> None:
        tun = await h.tunnel()
        c = await h.client()
        # bytes the client sends right after its head wait for the switch
        c.send(get(b"/ws", UPGRADE) + b"early")
        line, headers = await _head(tun)
        assert headers[b"upgrade"] == b"websocket" and headers[b"connection"] == b"upgrade"
        tun.send(SWITCH + b"hi")
        assert await tun.read(5) == b"early"
        status, headers, _ = await c.response(head_only=True)
        assert status == 101 and headers[b"x-strato-request-id"].startswith(b"wr-")
        assert await c.read(2) == b"hi"
        for i in range(3):
            c.send(b"ping%d" % i)
            assert await tun.read(5) == b"ping%d" % i
            tun.send(b"pong%d" % i)
            assert await c.read(5) == b"pong%d" % i
        if closer == "container":
            tun.send(b"bye")
            tun.close()
            assert await c.eof() == b"bye"  # what it sent last, then the end
        else:
            c.close()
            assert await tun.eof() == b""
        await h.until(lambda: len(h.access()) == 1, "the access line")
        assert " 101 " in h.access()[0]
        assert h.endpoint.inflight() == 0

    run(t, loop=loop)


def test_upgrade_refused_by_the_app_closes_the_connection(loop):
    async def t(h: Harness) -> None:
        tun = await h.tunnel()
        c = await h.client()
        c.send(get(b"/ws", UPGRADE))
        await tun.head()
        tun.send(response(b"no websockets here", status=400))
        status, _, body = await c.response()
        assert (status, body) == (400, b"no websockets here")
        assert await c.eof() == b""

    run(t, loop=loop)


def test_switching_protocols_unasked_is_a_502(loop):
    async def t(h: Harness) -> None:
        tun = await h.tunnel()
        c = await h.client()
        c.send(get(b"/plain"))
        await tun.head()
        tun.send(SWITCH)
        assert (await c.response())[0] == 502
        assert await tun.eof() == b""  # the tunnel is dropped

    run(t, loop=loop)


# ---------------------------------------------------------------------- chunked bodies


def test_chunked_response_from_a_slow_container_streams(loop):
    """Each chunk reaches the client before the container sends the next one."""

    async def t(h: Harness) -> None:
        tun = await h.tunnel()
        c = await h.client()
        c.send(get(b"/stream"))
        await tun.request()
        tun.send(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        status, headers, _ = await c.response(head_only=True)
        assert status == 200 and headers[b"transfer-encoding"] == b"chunked"
        for i in range(5):
            piece = b"event %d\n" % i
            tun.send(b"%x\r\n%b\r\n" % (len(piece), piece))
            assert await c.read(len(piece) + 5) == b"%x\r\n%b\r\n" % (len(piece), piece)
        tun.send(b"0\r\n")  # the last chunk, split from its final CRLF
        await settle()
        tun.send(b"\r\n")
        assert await c.read(5) == b"0\r\n\r\n"
        # complete: the tunnel serves the next request
        c.send(get(b"/next"))
        line, _, _ = await tun.request()
        assert line == b"GET /next HTTP/1.1"
        tun.send(response(b"n"))
        assert (await c.response())[2] == b"n"

    run(t, loop=loop)


def test_chunked_request_body_streams_up(loop):
    """The client's chunks reach the container as they come (re-chunked), before the
    client sends the next."""

    async def t(h: Harness) -> None:
        tun = await h.tunnel()
        c = await h.client()
        c.send(get(b"/upload", b"transfer-encoding: chunked\r\n", method=b"POST"))
        line, headers = await _head(tun)
        assert headers[b"transfer-encoding"] == b"chunked"
        for i in range(4):
            piece = b"part %d" % i
            c.send(b"%x\r\n%b\r\n" % (len(piece), piece))
            assert await tun.read(len(piece) + 5) == b"%x\r\n%b\r\n" % (len(piece), piece)
        c.send(b"0\r\n\r\n")
        assert await tun.read(5) == b"0\r\n\r\n"
        tun.send(response(b"got it"))
        assert (await c.response())[2] == b"got it"

    run(t, loop=loop)


def test_body_waits_with_its_request_for_a_container(loop):
    """No container yet: the request and its body wait in the gateway and go up once a
    container is ready."""

    async def t(h: Harness) -> None:
        box = h.container(state="starting")
        tun = await h.tunnel(box)
        c = await h.client()
        c.send(get(b"/w", b"content-length: 6\r\n", method=b"POST") + b"abcdef")
        await h.until(lambda: len(h.endpoint.waiters) == 1, "the request to wait")
        assert h.wakes >= 1  # the scaler was told at once
        h.ready(box)
        line, _, body = await tun.request()
        assert (line, body) == (b"POST /w HTTP/1.1", b"abcdef")
        tun.send(response())
        assert (await c.response())[0] == 200

    run(t, loop=loop)


def test_close_delimited_response(loop):
    async def t(h: Harness) -> None:
        tun = await h.tunnel()
        c = await h.client()
        c.send(get(b"/old"))
        await tun.request()
        tun.send(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nall of it")
        tun.close()
        status, _, body = await c.response()  # (read until the end)
        assert (status, body) == (200, b"all of it")
        await h.until(lambda: len(h.access()) == 1, "the access line")
        assert " 200 " in h.access()[0]

    run(t, loop=loop)


# ---------------------------------------------------------------------- disconnects


def test_client_gone_while_its_head_is_read(loop):
    async def t(h: Harness) -> None:
        tun = await h.tunnel()
        c = await h.client()
        c.send(b"GET /app/ep/x HTTP/1.1\r\nhost: t\r\nx-half")
        await h.until(lambda: conn_of(h).cur is not None, "the head to begin")
        cur = conn_of(h).cur
        assert cur is not None and cur.phase is Phase.HEAD
        c.close()
        await h.until(lambda: not h.gw.guard.conns, "the connection to be released")
        assert h.access() == [] and h.endpoint.inflight() == 0
        # the tunnel never saw it and still serves
        c = await h.client()
        c.send(get(b"/y"))
        line, _, _ = await tun.request()
        assert line == b"GET /y HTTP/1.1"

    run(t, loop=loop)


def test_client_gone_while_waiting_for_a_container(loop):
    async def t(h: Harness) -> None:
        c = await h.client()
        c.send(get(b"/wait"))
        await h.until(lambda: len(h.endpoint.waiters) == 1, "the request to wait")
        c.close()
        await h.until(lambda: not h.endpoint.waiters, "the waiter to leave")
        (line,) = h.access()
        assert " 499 " in line and "the client went away" in line

    run(t, loop=loop)


@pytest.mark.parametrize("phase", [Phase.SENT, Phase.RECEIVING])
def test_client_gone_while_the_container_answers(loop, phase):
    """The client leaves with the request up the tunnel (``SENT``) or the response half
    through (``RECEIVING``): the tunnel is closed (the app sees its client go) and the
    slot is free for the next request."""

    async def t(h: Harness) -> None:
        box = h.container()
        tun = await h.tunnel(box)
        spare = await h.tunnel(box)
        c = await h.client()
        c.send(get(b"/slow"))
        await spare.request()  # (the last adopted goes first)
        if phase is Phase.RECEIVING:
            spare.send(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nhalf")
            await c.response(head_only=True)
        c.close()
        assert await spare.eof() == b""
        (logged,) = h.access()
        assert " 499 " in logged
        assert h.endpoint.inflight() == 0
        c = await h.client()
        c.send(get(b"/next"))
        line, _, _ = await tun.request()
        assert line == b"GET /next HTTP/1.1"

    run(t, loop=loop)


def test_container_gone_before_it_answers_is_a_502(loop):
    async def t(h: Harness) -> None:
        box = h.container()
        second = await h.tunnel(box)
        first = await h.tunnel(box)
        c = await h.client()
        c.send(get(b"/a"))
        await first.request()
        first.close()
        status, headers, body = await c.response()
        assert status == 502
        err = json.loads(body)
        assert err["request_id"] == headers[b"x-strato-request-id"].decode()
        assert "closed the connection" in err["message"]
        # the client's connection goes on, over the other tunnel
        c.send(get(b"/b"))
        line, _, _ = await second.request()
        assert line == b"GET /b HTTP/1.1"
        second.send(response(b"fine"))
        assert (await c.response())[2] == b"fine"

    run(t, loop=loop)


def test_container_gone_in_the_middle_of_a_head_is_a_502(loop):
    async def t(h: Harness) -> None:
        tun = await h.tunnel()
        c = await h.client()
        c.send(get(b"/a"))
        await tun.request()
        tun.send(b"HTTP/1.1 200 OK\r\ncontent-len")
        await settle()
        tun.close()
        assert (await c.response())[0] == 502

    run(t, loop=loop)


@pytest.mark.parametrize(
    "head", [b"content-length: 100", b"Transfer-Encoding: chunked"], ids=["sized", "chunked"]
)
def test_container_gone_in_the_middle_of_a_body(loop, head):
    """The response is cut: the client gets what came, then the connection ends without
    the body's end (nothing can say "error" after the head), and the access line says so."""

    async def t(h: Harness) -> None:
        tun = await h.tunnel()
        c = await h.client()
        c.send(get(b"/a"))
        await tun.request()
        part = b"9\r\nonly this\r\n" if b"chunked" in head else b"only this"
        tun.send(b"HTTP/1.1 200 OK\r\n" + head + b"\r\n\r\n" + part)
        status, _, _ = await c.response(head_only=True)
        assert status == 200
        assert await c.read(len(part)) == part
        tun.close()
        assert await c.eof() == b""
        await h.until(lambda: len(h.access()) == 1, "the access line")
        assert " 200 " in h.access()[0] and "cut short" in h.access()[0]

    run(t, loop=loop)


@pytest.mark.parametrize(
    "garbage",
    [b"SMTP ready\r\n\r\n", b"HTTP/1.1 2x0 OK\r\n\r\n", b"HTTP/1.1 200 OK\r\nbad\r\n\r\n"],
)
def test_garbage_from_the_container_is_a_502(loop, garbage):
    async def t(h: Harness) -> None:
        tun = await h.tunnel()
        c = await h.client()
        c.send(get(b"/a"))
        await tun.request()
        tun.send(garbage)
        assert (await c.response())[0] == 502
        assert await tun.eof() == b""

    run(t, loop=loop)


def test_invalid_bytes_in_a_response_body_reset_the_client(loop):
    async def t(h: Harness) -> None:
        tun = await h.tunnel()
        c = await h.client()
        c.send(get(b"/a"))
        await tun.request()
        tun.send(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n")
        assert (await c.response(head_only=True))[0] == 200
        assert await c.read(8) == b"3\r\nabc\r\n"
        tun.send(b"zz\r\n")  # not a chunk size
        assert await c.eof() == b""
        assert await tun.eof() == b""

    run(t, loop=loop)


def test_a_tunnel_that_speaks_unasked_is_dropped(loop):
    async def t(h: Harness) -> None:
        tun = await h.tunnel()
        box = next(iter(h.endpoint.backends.values()))
        assert box.tunnels == 1
        tun.send(b"HTTP/1.1 200 OK\r\n\r\n")
        assert await tun.eof() == b""
        await h.until(lambda: box.tunnels == 0, "the tunnel to go")
        assert box.idle == []

    run(t, loop=loop)


# ---------------------------------------------------------------------- the gateway's own


def test_unknown_url_is_a_404_and_the_connection_goes_on(loop):
    async def t(h: Harness) -> None:
        tun = await h.tunnel()
        c = await h.client()
        c.send(b"GET /nope/x HTTP/1.1\r\nhost: t\r\n\r\n")
        status, headers, body = await c.response()
        assert status == 404 and b"connection" not in headers
        c.send(get(b"/x"))
        await tun.request()
        tun.send(response(b"ok"))
        assert (await c.response())[2] == b"ok"

    run(t, loop=loop)


def test_body_over_the_limit_is_a_413_the_client_reads(loop):
    async def t(h: Harness) -> None:
        tun = await h.tunnel()
        # declared too large: answered at once, the body read and dropped
        c = await h.client()
        c.send(get(b"/big", b"content-length: 5000\r\n", method=b"POST") + b"x" * 2000)
        status, headers, body = await c.response()
        assert status == 413 and headers[b"connection"] == b"close"
        c.send(b"x" * 3000)
        assert await c.eof() == b""
        # chunked past the limit while it streams up: 413, the tunnel dropped
        c = await h.client()
        c.send(get(b"/big", b"transfer-encoding: chunked\r\n", method=b"POST"))
        await tun.head()
        c.send(b"200\r\n" + b"y" * 0x200 + b"\r\n")
        assert await tun.read(0x200 + 7) == b"200\r\n" + b"y" * 0x200 + b"\r\n"
        c.send(b"201\r\n" + b"z" * 0x201 + b"\r\n")  # one byte over, in all
        assert (await c.response())[0] == 413
        assert await tun.eof() == b""  # (not a byte of what went over)

    run(t, loop=loop, max_body=1024)


def test_waiting_too_long_is_a_503(loop):
    async def t(h: Harness) -> None:
        c = await h.client()
        c.send(get(b"/never"))
        status, _, body = await c.response()
        assert status == 503 and "STRATO_WEB_WAIT_TIMEOUT" in json.loads(body)["message"]
        assert not h.endpoint.waiters

    run(t, loop=loop, wait_timeout_s=0.2)


@pytest.mark.parametrize("gpus", [{}, {"A100": [0]}], ids=["no-gpu", "other-gpu"])
def test_an_endpoint_no_node_can_run_is_a_503_at_once(loop, gpus):
    async def t(h: Harness) -> None:
        h.fleet.nodes = [NodeView("node-a", "local", None, 0.0, 4.0, 8192, gpus)]
        c = await h.client()
        c.send(get(b"/a"))
        status, _, body = await c.response()
        message = json.loads(body)["message"]
        assert status == 503
        assert "no node of this cluster can run ep" in message and "H100" in message
        assert not h.endpoint.waiters
        await h.until(lambda: len(h.access()) == 1, "the access line")
        assert " 503 " in h.access()[0] and "H100" in h.access()[0]

    run(t, loop=loop, gpu="H100", wait_timeout_s=60)


def test_an_endpoint_a_node_can_run_waits_for_its_container(loop):
    async def t(h: Harness) -> None:
        h.fleet.nodes = [NodeView("node-a", "local", None, 0.0, 4.0, 8192, {"H100": [0]})]
        h.fleet.nodes[0].gpus_in_use.add(0)  # busy now, but it could run it
        c = await h.client()
        c.send(get(b"/a"))
        await h.until(lambda: len(h.endpoint.waiters) == 1, "the request to wait")
        tun = await h.tunnel()
        await tun.request()
        tun.send(response(b"late"))
        assert (await c.response())[2] == b"late"

    run(t, loop=loop, gpu="H100", wait_timeout_s=60)


def test_http_limit_redirects_to_the_result(loop):
    async def t(h: Harness) -> None:
        tun = await h.tunnel()
        c = await h.client()
        c.send(get(b"/long"))
        await tun.request()
        status, headers, _ = await c.response()
        assert status == 303
        location = headers[b"location"]
        assert location.startswith(b"/__strato/results/")
        # the exchange goes on without its client; the connection serves another request
        c.send(b"GET " + location + b" HTTP/1.1\r\nhost: t\r\n\r\n")
        await settle()
        tun.send(response(b"finally"))
        status, headers, body = await c.response()
        assert status == 200 and body.endswith(b"finally")

    run(t, loop=loop, http_limit_s=0.2)


def test_requires_auth_needs_the_web_token(loop):
    async def t(h: Harness) -> None:
        tun = await h.tunnel()
        c = await h.client()
        c.send(get(b"/s"))
        assert (await c.response())[0] == 401
        c = await h.client()
        c.send(get(b"/s", b"strato-token: wt-test-token\r\n"))
        _, headers = await _head(tun)
        assert b"strato-token" not in headers
        tun.send(response())
        assert (await c.response())[0] == 200

    run(t, loop=loop, requires_auth=True)


# ---------------------------------------------------------------------- backpressure


def test_a_slow_client_pauses_the_container(loop):
    """A client that does not read: the gateway stops reading the tunnel (instead of
    buffering the response), and reads again once the client does."""

    async def t(h: Harness) -> None:
        tun = await h.tunnel()
        c = await h.client()
        c.send(get(b"/big"))
        await tun.request()
        size = 64 << 20
        tun.send(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % size)
        piece = b"x" * (1 << 20)

        async def produce() -> None:
            for _ in range(size // len(piece)):
                tun.send(piece)
                await tun.writer.drain()

        producer = asyncio.create_task(produce())
        ex = conn_of(h).queue[0]
        await h.until(lambda: ex.up is not None and ex.up.paused, "the tunnel to be paused")
        assert not producer.done()  # (it cannot finish: nothing reads the client's side)
        buffered = conn_of(h).transport.get_write_buffer_size()
        assert buffered < 8 << 20, f"the gateway buffered {buffered} bytes for a slow client"
        status, _, _ = await c.response(head_only=True)
        got = 0
        while got < size:
            got += len(await asyncio.wait_for(c.reader.read(1 << 20), 10))
        assert status == 200 and got == size
        await producer
        c.send(get(b"/next"))  # and the tunnel, reading again, serves the next one
        await tun.request()
        tun.send(response(b"small"))
        assert (await c.response())[2] == b"small"

    run(t, loop=loop)


def test_a_slow_container_pauses_the_client(loop):
    """A container that does not read a large upload: the gateway stops reading the
    client instead of buffering the body."""

    async def t(h: Harness) -> None:
        tun = await h.tunnel()
        c = await h.client()
        size = 64 << 20
        c.send(get(b"/up", b"content-length: %d\r\n" % size, method=b"POST"))
        await tun.head()
        piece = b"y" * (1 << 20)

        async def upload() -> None:
            for _ in range(size // len(piece)):
                c.send(piece)
                await c.writer.drain()

        uploader = asyncio.create_task(upload())
        conn = conn_of(h)
        await h.until(lambda: conn.paused != 0, "the client to be paused")
        assert not uploader.done()
        got = 0
        while got < size:
            got += len(await asyncio.wait_for(tun.reader.read(1 << 20), 10))
        assert got == size
        await uploader
        tun.send(response(b"stored"))
        assert (await c.response())[2] == b"stored"

    run(t, loop=loop)


# ---------------------------------------------------------------------- what the scaler sees


def test_the_scaler_sees_waiting_requests_as_queued_and_slots_in_use_as_in_flight(loop):
    async def t(h: Harness) -> None:
        box = h.container()
        tun = await h.tunnel(box)
        busy = await h.client()
        busy.send(get(b"/a"))
        await tun.request()
        waiting = await h.client()
        waiting.send(get(b"/b"))  # (one slot, taken: it waits)
        await h.until(lambda: len(h.endpoint.waiters) == 1, "the second request to wait")
        stats = h.gw.stats(h.calls.fn, 0.0)
        assert (stats.queued, stats.inflight) == (1, 1)
        (c,) = stats.containers
        assert (c.container_id, c.state, c.inflight) == (box.container_id, "ready", 1)
        assert c.idle_since is None
        tun.send(response(b"a"))
        assert (await busy.response())[2] == b"a"
        await tun.request()  # the waiter took the slot
        stats = h.gw.stats(h.calls.fn, 0.0)
        assert (stats.queued, stats.inflight) == (0, 1)
        tun.send(response(b"b"))
        assert (await waiting.response())[2] == b"b"
        stats = h.gw.stats(h.calls.fn, 0.0)
        assert (stats.queued, stats.inflight) == (0, 0)
        assert stats.containers[0].idle_since is not None and box.idle_since is not None

    run(t, loop=loop, max_inputs=1)
