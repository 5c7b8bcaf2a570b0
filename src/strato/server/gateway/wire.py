"""HTTP/1.1 bytes of the gateway: the gateway's own responses, the request head it writes
to a container, and the scan of a container's response head.

Pure functions over bytes, no I/O: the exchange (``exchange.py``) calls them.
"""

from __future__ import annotations

import json
from typing import NamedTuple

HOP_BY_HOP = frozenset(
    (
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authorization",
        b"proxy-authenticate",
        b"strato-token",  # the web token is the gateway's, never the app's
        # the gateway's own, never the client's (a forged one would reach the app)
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"x-forwarded-prefix",
        b"x-forwarded-port",
        b"x-forwarded-server",
        b"x-real-ip",
        b"forwarded",
        b"x-strato-request-id",
    )
)
# Connection tokens that name no header to strip
CONNECTION_OPTIONS = frozenset((b"close", b"keep-alive", b"upgrade"))
MAX_RESPONSE_HEAD = 65536
REASONS = {
    200: "OK",
    303: "See Other",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    408: "Request Timeout",
    413: "Content Too Large",
    421: "Misdirected Request",
    431: "Request Header Fields Too Large",
    499: "Client Closed Request",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


def simple_response(
    status: int,
    body: bytes,
    rid: str,
    *,
    content_type: bytes = b"application/json",
    close: bool = False,
    extra: list[tuple[bytes, bytes]] | None = None,
) -> bytes:
    head = [
        f"HTTP/1.1 {status} {REASONS.get(status, '')}\r\n".encode(),
        b"content-type: " + content_type + b"\r\n",
        b"content-length: " + str(len(body)).encode() + b"\r\n",
        b"x-strato-request-id: " + rid.encode() + b"\r\n",
    ]
    for k, v in extra or ():
        head.append(k + b": " + v + b"\r\n")
    if close:
        head.append(b"connection: close\r\n")
    head.append(b"\r\n")
    return b"".join(head) + body


def error_body(status: int, message: str, rid: str) -> bytes:
    body = {"error": REASONS.get(status, "Error"), "message": message, "request_id": rid}
    return json.dumps(body).encode()


def connection_tokens(value: bytes) -> set[bytes]:
    """The header names a ``Connection`` header makes hop-by-hop."""
    out = set()
    for token in value.lower().split(b","):
        token = token.strip()
        if token and token not in CONNECTION_OPTIONS:
            out.add(token)
    return out


def upstream_head(
    *,
    method: bytes,
    target: bytes,
    version: str,
    headers: list[tuple[bytes, bytes]],
    drop: set[bytes] | None,
    client_ip: bytes,
    host: str,
    rid: str,
    prefix: bytes,
    chunked: bool,
    upgrade: bool,
) -> list[bytes]:
    """The request head as the container sees it: hop-by-hop headers (and those the
    client's ``Connection`` header names) dropped, the gateway's forwarding headers and
    request id added, the body re-chunked where the client chunked it."""
    out = [method, b" ", target, b" HTTP/", version.encode(), b"\r\n"]
    for name, value in headers:
        if name in HOP_BY_HOP or name[:6] == b"proxy-" or (drop is not None and name in drop):
            continue
        out += (name, b": ", value, b"\r\n")
    out += (b"x-forwarded-for: ", client_ip, b"\r\n")
    if host:
        out += (b"x-forwarded-host: ", host.encode("latin-1"), b"\r\n")
    out += (b"x-forwarded-proto: http\r\nx-strato-request-id: ", rid.encode(), b"\r\n")
    if prefix:
        out += (b"x-forwarded-prefix: ", prefix, b"\r\n")
    if chunked:
        out.append(b"transfer-encoding: chunked\r\n")
    if upgrade:
        for name, value in headers:
            if name == b"upgrade":
                out += (b"connection: upgrade\r\nupgrade: ", value, b"\r\n")
                break
    out.append(b"\r\n")
    return out


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"


class BadResponse(Exception):
    """The container's response head is not HTTP/1.1, or too large."""


class HeadScan(NamedTuple):
    """What a scan of a container's first response bytes found."""

    interim: bytes  # complete interim (1xx other than 101) heads: for the client as they are
    final: bytes  # the final head and what follows it, the request id added; b"" if none yet
    raw_final: bytes  # the same bytes as the container sent them (for the response parser)
    rest: bytes  # an incomplete head, kept until more bytes come
    status: int  # the final head's status; 0 while it is incomplete


def scan_response_head(buf: bytes, rid: str) -> HeadScan:
    """Find the final response head in ``buf``: interim ``1xx`` heads pass as they are,
    the final head (``101`` included) gets ``x-strato-request-id``. Raises
    ``BadResponse``."""
    start = 0
    while True:
        end = buf.find(b"\r\n\r\n", start)
        if end < 0:
            if len(buf) - start > MAX_RESPONSE_HEAD:
                raise BadResponse("the endpoint's response head is over 64 KiB")
            return HeadScan(buf[:start], b"", b"", buf[start:], 0)
        if buf[start : start + 5] != b"HTTP/":
            raise BadResponse("the endpoint sent an invalid HTTP response")
        try:
            status = int(buf[start + 9 : start + 12])
        except ValueError:
            raise BadResponse("the endpoint sent an invalid HTTP response") from None
        if 100 <= status < 200 and status != 101:
            start = end + 4
            continue
        final = buf[start:end] + b"\r\nx-strato-request-id: " + rid.encode() + buf[end:]
        return HeadScan(buf[:start], final, buf[start:], b"", status)


def body_is_framed(raw: bytes) -> bool:
    """Whether the response whose head begins ``raw`` says where its body ends (chunked,
    or a ``content-length``), so that a close before that end is a response cut short,
    not its end. Asked only when a tunnel closes under a response."""
    end = raw.find(b"\r\n\r\n")
    head = (raw if end < 0 else raw[:end]).lower()
    return b"\r\ntransfer-encoding:" in head or b"\r\ncontent-length:" in head
