"""The one thread that writes the control plane's state.

Callers queue writes (`_Op`) and get a `Write` (a future) back at once. The thread takes
everything queued so far, runs it in one transaction (group commit) in queue order, and
resolves each future. A batch that fails is rolled back and its writes are retried one by
one, so that one bad write cannot take the others down with it; a write that still fails
is logged, gets its error on its future and is kept for the next ``flush`` to raise.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from sqlalchemy import Connection
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, OperationalError

from .hot import Hot

log = logging.getLogger("strato.store")

T = TypeVar("T")

WAIT_S = 30.0  # the longest any caller waits for the writer, unless it says otherwise
MAX_BATCH = 512  # writes per transaction
LINGER_S = 0.010  # how long a batch of lingering writes waits for more (see _Op.linger)
RETRIES = 4  # tries of one write whose connection was lost or whose database was busy


class StoreTimeout(TimeoutError):
    """The writer did not get to a write (or to the writes before a read) in time."""


class StoreClosed(RuntimeError):
    """A write or a read after `Store.close`."""


class WriteFailed(RuntimeError):
    """Writes queued before a `flush` failed (each is logged, and its `Write` holds why)."""


class Write(concurrent.futures.Future, Generic[T]):  # type: ignore[type-arg]
    """One queued write: its result once the writer has committed it.

    ``w.wait(timeout)`` blocks; ``await w`` (or ``await w.wait_async(timeout)``) does not
    block the event loop. It cannot be cancelled: once queued, a write is committed or
    reported."""

    def __init__(self, name: str, default_timeout: float) -> None:
        super().__init__()
        self.name = name
        self.seq = 0
        self._timeout = default_timeout

    def cancel(self) -> bool:
        return False

    def wait(self, timeout: float | None = None) -> T:
        limit = self._timeout if timeout is None else timeout
        try:
            return self.result(limit)
        except concurrent.futures.TimeoutError:
            raise StoreTimeout(
                f"the store's writer did not commit {self.name} within {limit:g}s"
            ) from None

    async def wait_async(self, timeout: float | None = None) -> T:
        limit = self._timeout if timeout is None else timeout
        try:
            return await asyncio.wait_for(asyncio.wrap_future(self), limit)
        except TimeoutError:
            raise StoreTimeout(
                f"the store's writer did not commit {self.name} within {limit:g}s"
            ) from None

    def __await__(self) -> Generator[Any, None, T]:
        return self.wait_async().__await__()


@dataclass(slots=True)
class _Op:
    name: str
    run: Callable[[Connection], Any] | None  # None: a plain executemany of ``stmt``
    # its result once committed; None for a journaled write nobody waits for (a Dict put,
    # a Queue put or take: durable already, the writer only stores it behind)
    future: Write | None
    read: bool = False
    stmt: Any = None
    params: list[dict] | None = None
    # after the write failed with this error in a transaction of its own, gives its
    # result from a fresh transaction (or raises): create_call's "exists already"
    recover: Callable[[Connection, BaseException], Any] | None = None
    journal_seq: int = 0  # its entry in the intake journal (0: not journaled)
    # a journaled write nobody waits for (a Dict put, a Queue put or take): a batch made
    # only of such writes waits up to LINGER_S for more, to share one commit
    linger: bool = False
    # consecutive writes of a batch with the same ``merge`` run as one call (instead of
    # ``run``): ``merge(conn, [their args, in order])`` returns their results, in order.
    # Journaled Queue puts and takes, Dict puts: one check and one statement of each
    # kind for the whole run instead of several per write
    merge: Callable[[Connection, list[Any]], list[Any]] | None = None
    args: Any = None
    seq: int = 0  # its place in the queue (set when queued)

    def resolve(self, result: Any) -> None:
        if self.future is not None:
            self.future.set_result(result)


def _transient(e: BaseException) -> bool:
    """A lost connection or a busy database: worth another try (a `Hot` statement on
    SQLite raises the driver's own error)."""
    return isinstance(e, (OperationalError, sqlite3.OperationalError)) or (
        isinstance(e, DBAPIError) and bool(e.connection_invalidated)
    )


class _Writer:
    """The thread that owns every write: takes what is queued, commits it as one
    transaction, resolves each write's future, and records how far it got."""

    def __init__(
        self,
        engine: Engine,
        wait_s: float,
        max_batch: int = MAX_BATCH,
        mark_journal: Callable[[Connection, int], None] | None = None,
        journal_done: Callable[[int], None] | None = None,
    ) -> None:
        self.engine = engine
        # records, in a batch's transaction, the last journal entry the batch applies;
        # then told when that transaction is over
        self.mark_journal = mark_journal
        self.journal_done = journal_done
        self.wait_s = wait_s
        self.max_batch = max_batch
        self._q: queue.SimpleQueue[_Op | None] = queue.SimpleQueue()
        # set by a queued write that ends a linger (see _linger): lingering writes do not
        # wake the thread, so that it does not take the GIL from the event loop per write
        self._wake = threading.Event()
        self._lock = threading.Lock()  # seq order == queue order
        self._cond = threading.Condition()
        self.queued = 0  # seq of the last op queued
        self.done = 0  # every op up to this seq is committed or reported
        self.failures: list[tuple[int, str, BaseException]] = []
        self.batches = 0  # transactions committed (for tests and stats)
        self.closed = False
        self.lingering = False  # a batch of lingering writes waits for more (_linger)
        self._waiting = 0  # callers blocked in wait_done
        self.conn: Connection | None = None
        # told (on this thread) how long each read and each committed batch took (metrics)
        self.on_op: Callable[[str, float], None] | None = None
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="strato-store-writer", daemon=True)
        self.thread.start()
        self._ready.wait(wait_s)
        if self._start_error is not None:
            raise self._start_error

    # ------------------------------------------------------------------ callers' side

    def submit(self, op: _Op) -> Write:
        """Queue a write someone may wait for; returns its future."""
        assert op.future is not None
        self.enqueue(op)
        return op.future

    def enqueue(self, op: _Op) -> None:
        """Queue a write (one without a future: nobody learns its result, a failure is
        still logged and kept for the next ``flush``)."""
        with self._lock:
            if self.closed:
                raise StoreClosed(f"the store is closed: {op.name} was not queued")
            self.queued += 1
            op.seq = self.queued
            if op.future is not None:
                op.future.seq = op.seq
            self._q.put(op)
        if not op.linger:
            self._wake.set()

    def wait_done(self, seq: int, timeout: float | None = None) -> None:
        if self.done >= seq:
            return
        if threading.get_ident() == self.thread.ident:
            raise RuntimeError("the store's writer cannot wait for its own queue")
        limit = self.wait_s if timeout is None else timeout
        with self._cond:
            self._waiting += 1  # (a batch of lingering writes starting now does not wait)
        try:
            if self.lingering and not self.closed:  # one waits for more: end it now
                nudge = _Op("nudge", lambda _c: None, Write("nudge", self.wait_s), read=True)
                self.submit(nudge)
            with self._cond:
                if not self._cond.wait_for(lambda: self.done >= seq, limit):
                    raise StoreTimeout(
                        f"the store's writer did not reach the writes queued before this "
                        f"within {limit:g}s ({seq - self.done} still queued)"
                    )
        finally:
            with self._cond:
                self._waiting -= 1

    def take_failures(self, upto: int) -> list[tuple[int, str, BaseException]]:
        with self._cond:
            mine = [f for f in self.failures if f[0] <= upto]
            self.failures = [f for f in self.failures if f[0] > upto]
        return mine

    def close(self, timeout: float) -> bool:
        """Commit what is queued, then stop; False when the thread did not stop in time."""
        with self._lock:
            if self.closed:
                return True
            self.closed = True
            self._q.put(None)
        self._wake.set()
        self.thread.join(timeout)
        return not self.thread.is_alive()

    # ------------------------------------------------------------------ the thread

    def _run(self) -> None:
        try:
            self.conn = self.engine.connect()
        except BaseException as e:
            self._start_error = e
            self._ready.set()
            return
        self._ready.set()
        carry: _Op | None = None
        try:
            while True:
                op = carry if carry is not None else self._q.get()
                carry = None
                if op is None:
                    break
                if op.read:
                    t0 = time.perf_counter()
                    self._read(op)
                    self._timed("read", t0)
                    self._processed(op.seq)
                    continue
                batch = [op]
                stop = False
                while len(batch) < self.max_batch:
                    try:
                        nxt = self._q.get_nowait()
                    except queue.Empty:
                        break
                    if nxt is None:
                        stop = True
                        break
                    if nxt.read:  # a read ends the batch: it must see the writes before it
                        carry = nxt
                        break
                    batch.append(nxt)
                if not stop and carry is None and all(o.linger for o in batch):
                    stop, carry = self._linger(batch)
                t0 = time.perf_counter()
                self._commit(batch)
                self._timed("write_batch", t0)
                self._processed(batch[-1].seq)
                if stop:
                    break
        finally:
            self.conn.close()

    def _linger(self, batch: list[_Op]) -> tuple[bool, _Op | None]:
        """Add to a batch of lingering writes what comes within LINGER_S, until a write
        someone waits for, or a read (returned, to run after the batch); returns whether
        the writer is to stop, and that read. Sleeps until then or until `submit` wakes
        it (for anything but a lingering write), then takes what was queued meanwhile."""
        deadline = time.monotonic() + LINGER_S
        self.lingering = True
        try:
            while True:
                self._wake.clear()  # (before the queue is read: no wake-up is missed)
                while len(batch) < self.max_batch:
                    try:
                        nxt = self._q.get_nowait()
                    except queue.Empty:
                        break
                    if nxt is None:
                        return True, None
                    if nxt.read:
                        return False, nxt
                    batch.append(nxt)
                    if not nxt.linger:
                        return False, None
                left = deadline - time.monotonic()
                if len(batch) >= self.max_batch or self._waiting or left <= 0:
                    return False, None
                self._wake.wait(left)
        finally:
            self.lingering = False

    def _timed(self, kind: str, t0: float) -> None:
        if self.on_op is not None:
            try:
                self.on_op(kind, time.perf_counter() - t0)
            except Exception:  # metrics must never stop the writer
                pass

    def _processed(self, seq: int) -> None:
        with self._cond:
            self.done = seq
            self._cond.notify_all()

    def _read(self, op: _Op) -> None:
        assert op.run is not None and op.future is not None and self.conn is not None
        try:
            result = op.run(self.conn)
        except BaseException as e:
            op.future.set_exception(e)
        else:
            op.future.set_result(result)

    def _execute(self, conn: Connection, batch: list[_Op]) -> list[Any]:
        """Run a batch in the open transaction; consecutive plain writes of the same
        statement go to the database as one executemany."""
        results: list[Any] = []
        i = 0
        while i < len(batch):
            op = batch[i]
            if op.merge is not None:
                j = i + 1
                while j < len(batch) and batch[j].merge is op.merge:
                    j += 1
                results += op.merge(conn, [o.args for o in batch[i:j]])
                i = j
                continue
            if op.run is not None:
                results.append(op.run(conn))
                i += 1
                continue
            params = list(op.params or ())
            j = i + 1
            while j < len(batch) and batch[j].run is None and batch[j].stmt is op.stmt:
                params += batch[j].params or ()
                j += 1
            if params and isinstance(op.stmt, Hot):
                op.stmt(conn, params)
            elif params:
                conn.execute(op.stmt, params)
            results += [None] * (j - i)
            i = j
        self._mark(conn, batch)
        return results

    def _mark(self, conn: Connection, ops: list[_Op]) -> None:
        top = max(op.journal_seq for op in ops)
        if top and self.mark_journal is not None:
            self.mark_journal(conn, top)

    def _journal_done(self, ops: list[_Op]) -> None:
        top = max(op.journal_seq for op in ops)
        if top and self.journal_done is not None:
            self.journal_done(top)

    def _commit(self, batch: list[_Op]) -> None:
        conn = self.conn
        assert conn is not None
        try:
            with conn.begin():
                results = self._execute(conn, batch)
        except Exception as e:
            if len(batch) > 1:
                log.warning(
                    "store: a batch of %d writes failed (%s); retrying them one by one",
                    len(batch),
                    e,
                )
            for op in batch:
                self._one(op)
        else:
            self.batches += 1
            for op, r in zip(batch, results, strict=True):
                op.resolve(r)
        self._journal_done(batch)

    def _one(self, op: _Op) -> None:
        conn = self.conn
        assert conn is not None
        delay = 0.05
        for attempt in range(1, RETRIES + 1):
            try:
                with conn.begin():
                    result = self._execute(conn, [op])[0]
            except Exception as e:
                if op.recover is not None and not _transient(e):
                    try:
                        with conn.begin():
                            result = op.recover(conn, e)
                            self._mark(conn, [op])
                    except Exception as e2:
                        self._failed(op, e2)
                    else:
                        op.resolve(result)
                    return
                if _transient(e) and attempt < RETRIES:
                    time.sleep(delay)
                    delay *= 4
                    continue
                self._failed(op, e)
                return
            else:
                self.batches += 1
                op.resolve(result)
                return

    def _failed(self, op: _Op, e: BaseException) -> None:
        log.error("store: %s failed and was not applied: %s", op.name, e)
        with self._cond:
            self.failures.append((op.seq, op.name, e))
            del self.failures[:-1000]
        if op.future is not None:
            op.future.set_exception(e)
