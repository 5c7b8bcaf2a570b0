"""What every API client of the control plane offers: typed msgpack calls, blobs, and
error bodies turned into ``strato.exceptions``. ``http.ApiClient`` speaks HTTP; code in a
container speaks over its channel (``channel_api.ChannelApiClient``). Lean: it is on the
container's start path."""

from __future__ import annotations

import time

import msgspec

from strato import exceptions as exc
from strato.protocol.messages import ErrorBody

MSGPACK = "application/msgpack"


class Reconnects:
    """The waits between attempts to reach a control plane that does not answer (one that
    restarts is waited for): 50 ms doubling to 1 s, until ``timeout`` seconds are up."""

    def __init__(self, url: str, timeout: float) -> None:
        self.url = url
        self.deadline = time.monotonic() + timeout
        self.delay = 0.05

    def wait(self, failure: BaseException) -> None:
        """Sleep before the next attempt; ``ConnectionError`` once the time is up."""
        if time.monotonic() + self.delay > self.deadline:
            raise exc.ConnectionError(
                f"cannot reach the strato control plane at {self.url} ({failure}); "
                "start it with `strato server start` or set STRATO_SERVER_URL"
            ) from None
        time.sleep(self.delay)
        self.delay = min(self.delay * 2, 1.0)


_encoder = msgspec.msgpack.Encoder()
_decoders: dict[type, msgspec.msgpack.Decoder] = {}
_error_decoder = msgspec.msgpack.Decoder(ErrorBody)


def _decoder(typ: type) -> msgspec.msgpack.Decoder:
    dec = _decoders.get(typ)
    if dec is None:
        dec = _decoders[typ] = msgspec.msgpack.Decoder(typ)
    return dec


class ApiBase:
    """What every API client offers on top of its ``request_raw``: typed calls, blobs and
    errors as ``strato.exceptions``. ``ApiClient`` speaks HTTP; a container's client
    (``client/channel_api.py``) speaks over the container's channel."""

    url: str
    timeout: float
    health: dict | None

    def request_raw(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        *,
        params: dict | None = None,
        timeout: float | None = None,
        content_type: str = MSGPACK,
    ) -> bytes:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def _error(self, status: int, data: bytes) -> BaseException:
        try:
            body = _error_decoder.decode(data)
            cls = exc.ERRORS_BY_NAME.get(body.error, exc.Error)
            return cls(body.message)
        except (msgspec.DecodeError, TypeError):
            return exc.Error(f"control plane answered HTTP {status}: {data[:300]!r}")

    def call(
        self,
        method: str,
        path: str,
        body: object = None,
        response: type | None = None,
        *,
        params: dict | None = None,
        timeout: float | None = None,
    ):
        raw = self.request_raw(
            method,
            path,
            None if body is None else _encoder.encode(body),
            params=params,
            timeout=timeout,
        )
        if response is None:
            return None
        return _decoder(response).decode(raw)

    def get_blob(self, key: str) -> bytes:
        return self.request_raw("GET", f"/blobs/{key}", timeout=max(self.timeout, 300.0))

    def put_blob(self, key: str, data: bytes) -> None:
        self.request_raw(
            "PUT",
            f"/blobs/{key}",
            data,
            timeout=max(self.timeout, 300.0),
            content_type="application/octet-stream",
        )
