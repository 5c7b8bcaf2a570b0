"""A Queue's put and get send request ids unique to the process (no syscall each): no
two alike, within the protocol's limit, and a forked child draws ids of its own."""

from __future__ import annotations

import os

import msgspec

from strato.protocol import messages as m
from strato.sdk.queue import _request_id


def test_request_ids_are_unique_and_fit_the_protocol():
    ids = [_request_id() for _ in range(10_000)]
    assert len(set(ids)) == len(ids)
    for rid in ids[:10]:  # (decoding checks the RequestId limits)
        body = msgspec.msgpack.encode(m.QueueGet(1, "", 0.0, rid))
        assert msgspec.msgpack.decode(body, type=m.QueueGet).request_id == rid


def test_a_forked_child_draws_its_own_ids():
    r, w = os.pipe()
    mine = _request_id()
    pid = os.fork()
    if pid == 0:  # the child: its next id, to the parent
        try:
            os.write(w, _request_id().encode())
        finally:
            os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    theirs = os.read(r, 100).decode()
    os.close(r)
    assert theirs[:20] != mine[:20]  # another prefix: not the parent's next id
    assert _request_id()[:20] == mine[:20]
