"""Blobs on their way in: a container's chunked values (written and hashed on a blob
thread, in order) and streamed puts, checked against what lands on disk."""

from __future__ import annotations

import asyncio
import hashlib

import pytest

from strato.exceptions import InvalidError, RequestSizeError
from strato.server.calls.uploads import Uploads
from strato.server.store.blobs import BlobStore


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _leftovers(blobs: BlobStore) -> list[str]:
    tmp = blobs.root / "tmp"
    return sorted(p.name for p in tmp.iterdir()) if tmp.exists() else []


def test_chunked_values_are_stored_under_their_sha256_in_order(tmp_path):
    blobs = BlobStore(tmp_path / "blobs")
    up = Uploads(blobs, max_payload=1 << 20)
    first = [bytes([i]) * 1000 for i in range(50)]
    second = [b"x" * 10, b"y" * 10]
    for i, c in enumerate(first):
        up.chunk(c, last=i == len(first) - 1)
    for i, c in enumerate(second):
        up.chunk(c, last=i == 1)
    one, two = b"".join(first), b"".join(second)
    assert up.take(_sha(one)) == (_sha(one), len(one))
    assert up.take(_sha(two)) == (_sha(two), len(two))
    assert blobs.get(_sha(one)) == one and blobs.get(_sha(two)) == two
    assert _leftovers(blobs) == []


def test_a_value_over_the_limit_is_counted_not_kept(tmp_path):
    blobs = BlobStore(tmp_path / "blobs")
    up = Uploads(blobs, max_payload=1000)
    for i in range(5):
        up.chunk(b"z" * 400, last=i == 4)
    up.chunk(b"small", last=True)
    assert up.take(_sha(b"z" * 2000)) == (None, 2000)
    assert up.take(_sha(b"small")) == (_sha(b"small"), 5)
    assert not blobs.has(_sha(b"z" * 2000))
    assert _leftovers(blobs) == []


def test_an_output_naming_another_blob_is_refused(tmp_path):
    blobs = BlobStore(tmp_path / "blobs")
    up = Uploads(blobs, max_payload=1000)
    with pytest.raises(InvalidError, match="never sent"):
        up.take(_sha(b"a"))
    up.chunk(b"mine", last=True)
    with pytest.raises(InvalidError, match="other than"):
        up.take(_sha(b"someone else's"))


def test_take_async_waits_for_the_chunks_on_the_blob_thread(tmp_path):
    blobs = BlobStore(tmp_path / "blobs")

    async def main() -> tuple[str | None, int]:
        up = Uploads(blobs, max_payload=64 << 20)
        data = b"q" * (8 << 20)
        for at in range(0, len(data), 1 << 20):
            await up.chunk_async(data[at : at + (1 << 20)], last=at + (1 << 20) >= len(data))
        return await up.take_async(_sha(data))

    key, size = asyncio.run(main())
    assert key is not None and size == 8 << 20
    assert blobs.get(key) == b"q" * (8 << 20)


def test_a_half_sent_value_is_dropped_on_close(tmp_path):
    blobs = BlobStore(tmp_path / "blobs")
    up = Uploads(blobs, max_payload=1000)
    up.chunk(b"part", last=False)
    up.close()
    asyncio.run(up.ready())
    assert _leftovers(blobs) == []


def test_streamed_put_checks_its_key_and_size(tmp_path):
    blobs = BlobStore(tmp_path / "blobs")
    data = b"abc" * 100_000

    async def body(chunk: int = 4096):
        for at in range(0, len(data), chunk):
            yield data[at : at + chunk]

    async def main() -> None:
        assert await blobs.aput_stream(body(), _sha(data)) == _sha(data)
        with pytest.raises(InvalidError, match="does not match"):
            await blobs.aput_stream(body(), _sha(b"other"))
        with pytest.raises(RequestSizeError):
            await blobs.aput_stream(body(), None, max_size=1000)
        assert await blobs.aput(b"small", _sha(b"small")) == _sha(b"small")
        assert await blobs.aget(_sha(data)) == data

    asyncio.run(main())
    assert blobs.get(_sha(b"small")) == b"small"
    assert _leftovers(blobs) == []


def test_a_cancelled_wait_does_not_stop_the_uploads(tmp_path):
    blobs = BlobStore(tmp_path / "blobs")
    up = Uploads(blobs, max_payload=64 << 20)

    async def main() -> tuple[str | None, int]:
        data = b"w" * (4 << 20)
        up.chunk(data, last=True)
        waiter = asyncio.ensure_future(up.ready())
        await asyncio.sleep(0)
        waiter.cancel()  # a channel that went away while its value was being written
        up.chunk(b"next", last=True)
        await up.ready()
        assert up.take(_sha(data)) == (_sha(data), 4 << 20)
        return up.take(_sha(b"next"))

    assert asyncio.run(main()) == (_sha(b"next"), 4)
