"""Server settings: a control plane with ``STRATO_MAX_PAYLOAD`` of 4 MiB refuses anything
larger with an error that names the limit, at the SDK and at the API; and one with
``STRATO_OUTPUT_RETENTION`` of a few seconds forgets outputs past it."""

from __future__ import annotations

import hashlib
import time
import uuid

import pytest
from apps import limits
from conftest import dedicated_server, wait_until

import strato
from strato import exceptions as exc
from strato.client import session
from strato.protocol import messages as m

LIMIT = 4 << 20
RETENTION_S = 4.0


@pytest.fixture(scope="module")
def limits_app(strato_server):
    env = {"STRATO_MAX_PAYLOAD": str(LIMIT), "STRATO_OUTPUT_RETENTION": str(RETENTION_S)}
    with dedicated_server(env) as server:
        with limits.app.run(quiet=True):
            yield server
    strato_server.activate()


def test_under_the_limit_works(limits_app):
    assert limits.nbytes.remote(b"x" * (3 << 20)) == 3 << 20
    assert limits.make_bytes.remote(3 << 20) == b"\x07" * (3 << 20)


def test_argument_over_the_limit_is_refused(limits_app):
    with pytest.raises(exc.RequestSizeError) as info:
        limits.nbytes.remote(b"x" * (LIMIT + 1))
    assert str(LIMIT) in str(info.value)
    assert "STRATO_MAX_PAYLOAD" in str(info.value)


def test_result_over_the_limit_is_an_error(limits_app):
    with pytest.raises(exc.RequestSizeError) as info:
        limits.make_bytes.remote(LIMIT + 1)
    assert str(LIMIT) in str(info.value)
    assert "make_bytes" in str(info.value)
    # the container is fine afterwards
    assert limits.make_bytes.remote(10) == b"\x07" * 10


def test_generator_item_over_the_limit_is_an_error(limits_app):
    got = []
    with pytest.raises(exc.RequestSizeError, match=str(LIMIT)):
        for item in limits.yield_bytes.remote_gen([5, LIMIT + 1, 6]):
            got.append(len(item))
    assert got == [5]


def test_api_refuses_an_inline_input_over_the_limit(limits_app):
    client = session.api()
    fid = limits.nbytes.object_id
    req = m.CreateCall("fc-" + uuid.uuid4().hex, fid, [m.InputItem(0, b"x" * (LIMIT + 1))])
    with pytest.raises(exc.RequestSizeError) as info:
        client.call("POST", "/calls", req, m.Outputs)
    assert str(LIMIT) in str(info.value)


def test_api_refuses_a_blob_over_the_limit(limits_app):
    data = b"y" * (LIMIT + 1)
    with pytest.raises(exc.RequestSizeError) as info:
        session.api().put_blob(hashlib.sha256(data).hexdigest(), data)
    assert str(LIMIT) in str(info.value)


def test_api_refuses_an_input_naming_a_missing_blob(limits_app):
    req = m.CreateCall(
        "fc-" + uuid.uuid4().hex, limits.nbytes.object_id, [m.InputItem(0, None, "ab" * 32)]
    )
    with pytest.raises(exc.InvalidError, match="never uploaded"):
        session.api().call("POST", "/calls", req, m.Outputs)


def test_outputs_are_forgotten_after_their_retention(limits_app):
    call = limits.nbytes.spawn(b"abc")
    assert call.get(timeout=60) == 3
    time.sleep(RETENTION_S + 0.5)
    # expiry runs once a minute, and a second after the control plane starts: restart it
    limits_app.restart()

    def forgotten():
        try:
            strato.FunctionCall.from_id(call.object_id).get(timeout=1)
        except exc.NotFoundError as e:
            return e
        return None

    e = wait_until(forgotten, 30, "the output to expire", every=0.5)
    assert "expired" in str(e)
    assert limits.nbytes.remote(b"abcd") == 4  # newer calls work
