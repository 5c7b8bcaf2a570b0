"""Large values a container sends in chunks (``BlobChunk`` frames) on their way to the
blob store. The event loop only counts them: each chunk is written to a temporary file
and hashed on a blob thread (`BLOB_POOL`), in the order the chunks came, and the value is
moved into the store under its sha256 when its last chunk is in (the control plane holds
at most the chunks not yet written). A value over ``max_payload`` is counted, not kept:
its output then fails with a ``RequestSizeError`` naming its size."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import threading
from collections.abc import Callable

from strato.exceptions import InvalidError

from ..store.blobs import BLOB_POOL, BlobStore, BlobWriter

WAIT_S = 60.0  # the longest the loop waits for the chunks still being written
BACKLOG = 64 << 20  # bytes queued for the blob thread before `chunk` waits for it


class _Serial:
    """One connection's blob work, run in order on the shared blob threads."""

    def __init__(self) -> None:
        self._tasks: collections.deque[tuple[Callable[[], None], concurrent.futures.Future]] = (
            collections.deque()
        )
        self._lock = threading.Lock()
        self._running = False
        self._last: concurrent.futures.Future = concurrent.futures.Future()
        self._last.set_result(None)

    def submit(self, fn: Callable[[], None]) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            self._tasks.append((fn, fut))
            self._last = fut
            if not self._running:
                self._running = True
                BLOB_POOL.submit(self._drain)
        return fut

    def _drain(self) -> None:
        while True:
            with self._lock:
                if not self._tasks:
                    self._running = False
                    return
                fn, fut = self._tasks.popleft()
            # the work runs even if a waiter gave up on it: later chunks build on it
            waited = fut.set_running_or_notify_cancel()
            try:
                fn()
            except BaseException as e:
                if waited:
                    fut.set_exception(e)
            else:
                if waited:
                    fut.set_result(None)

    def last(self) -> concurrent.futures.Future:
        """Done when everything submitted so far is."""
        with self._lock:
            return self._last


class Uploads:
    """The uploads of one container connection, matched in order to the outputs that
    name them (``TaskOutput.blob``)."""

    def __init__(self, blobs: BlobStore, max_payload: int) -> None:
        self.blobs = blobs
        self.max_payload = max_payload
        self._serial = _Serial()
        self._size = 0  # of the value now arriving (counted on the loop)
        self._backlog = 0  # bytes handed to the blob thread and not yet written
        self._backlog_lock = threading.Lock()
        self._queued_values = 0  # finished values handed over, not yet taken
        # blob-thread side: the value being written, and the finished ones
        self._writer: BlobWriter | None = None
        self._done: collections.deque[tuple[str | None, int]] = collections.deque()
        self._error: BaseException | None = None

    # ------------------------------------------------------------------ the loop's side

    def chunk(self, data: bytes, last: bool) -> None:
        """Take one chunk; its writing and hashing are queued for a blob thread. Waits
        (at most `WAIT_S`) only when more than `BACKLOG` bytes are still unwritten:
        `chunk_async` waits without blocking the loop."""
        self._take_chunk(data, last)
        if self._backlog > BACKLOG:
            self._wait_sync()

    async def chunk_async(self, data: bytes, last: bool) -> None:
        self._take_chunk(data, last)
        if self._backlog > BACKLOG:
            await self.ready()

    def _take_chunk(self, data: bytes, last: bool) -> None:
        was = self._size
        self._size += len(data)
        if self._size <= self.max_payload:
            with self._backlog_lock:
                self._backlog += len(data)
            self._serial.submit(lambda: self._write(data))
        elif was <= self.max_payload:  # just went over the limit: drop what is written
            self._serial.submit(self._drop)
        if last:
            size, self._size = self._size, 0
            self._serial.submit(lambda: self._finish(size))
            self._queued_values += 1
            if self._queued_values > 4096:
                raise InvalidError("more than 4096 chunked values not named by any output")

    def take(self, claimed: str) -> tuple[str | None, int]:
        """The next finished upload, for an output that names ``claimed``: (key, size),
        key None when it was over the limit. A container that names a blob it did not
        send (another app's, say) is refused. Waits (at most `WAIT_S`) for the chunks
        still being written: ``await ready()`` first to wait without blocking the loop."""
        self._wait_sync()
        return self._take(claimed)

    async def take_async(self, claimed: str) -> tuple[str | None, int]:
        await self.ready()
        return self._take(claimed)

    async def ready(self) -> None:
        """Every chunk taken so far is written (or dropped)."""
        fut = self._serial.last()
        if not fut.done():
            try:
                # shielded: a timeout must not cancel the blob thread's future
                await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(fut)), WAIT_S)
            except TimeoutError:
                raise InvalidError(f"a chunked value was not written within {WAIT_S:g}s") from None

    def _wait_sync(self) -> None:
        try:
            self._serial.last().result(WAIT_S)
        except concurrent.futures.TimeoutError:
            raise InvalidError(f"a chunked value was not written within {WAIT_S:g}s") from None

    def _take(self, claimed: str) -> tuple[str | None, int]:
        if self._error is not None:
            raise InvalidError(f"a chunked value could not be stored: {self._error}")
        if not self._done:
            raise InvalidError(f"an output names blob {claimed[:16]}... that was never sent")
        key, size = self._done.popleft()
        self._queued_values -= 1
        if key is not None and key != claimed:
            raise InvalidError("an output names a blob other than the one sent before it")
        return key, size

    def close(self) -> None:
        """The connection ended: drop a half-sent value (on the blob thread, after the
        chunks before it)."""
        self._serial.submit(self._drop)

    # ------------------------------------------------------------------ the blob thread's side

    def _write(self, data: bytes) -> None:
        try:
            if self._error is None:
                if self._writer is None:
                    self._writer = self.blobs.writer()
                self._writer.write(data)
        except BaseException as e:
            self._error = e
            self._drop()
        finally:
            with self._backlog_lock:
                self._backlog -= len(data)

    def _drop(self) -> None:
        if self._writer is not None:
            self._writer.abort()
            self._writer = None

    def _finish(self, size: int) -> None:
        if size > self.max_payload:
            self._drop()
            self._done.append((None, size))
            return
        if self._error is not None:
            return
        try:
            if self._writer is None:  # an empty value in chunks: odd, but well-formed
                key = self.blobs.put(b"")
            else:
                key = self._writer.finish()
                self._writer = None
        except BaseException as e:
            self._error = e
            self._drop()
            return
        self._done.append((key, size))
