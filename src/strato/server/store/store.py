"""The control plane's state, through SQLAlchemy Core.

SQLite (WAL) by default, PostgreSQL with ``STRATO_DATABASE_URL=postgresql+psycopg://...``:
the same statements serve both.

Writes never run on the caller's thread. Each write method queues its statements for one
writer thread, which runs everything queued so far in one transaction (group commit), in
queue order. A write method returns a `Write` (a future) at once: a caller that needs the
write durable waits for it (``w.wait()``, or ``await w``), or calls `Store.flush` (or
``await Store.aflush()``) for every write queued so far. The write methods that answer
with a value (`create_app`, `create_call`, `expire`, `stop_live_containers`) keep their
blocking meaning; their ``queue_*`` forms return the `Write` instead. A batch that fails
is rolled back and its writes retried one by one (a lost connection or a busy database
up to four times); a write that still fails gets the error on its `Write`, is logged, and
makes the next `flush` raise: no write is dropped without a trace.

Reads see every write queued before them (read-your-writes). A read on the caller's
thread first waits until the writer has committed every write queued before it (when
nothing is queued, there is nothing to wait for) and then reads through that thread's
own connection; `Store.aread` runs a read on the writer thread instead, in queue order
after the writes before it, so the event loop does not wait for the database at all.
Every wait has a timeout (`StoreTimeout`).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import (
    Connection,
    and_,
    bindparam,
    create_engine,
    event,
    func,
    select,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.pool import StaticPool

from strato import settings

from . import schema as t
from .dict_entries import DictEntries
from .hot import Hot
from .journal import Journal
from .migrations import migrate
from .queue_entries import QueueEntries
from .rows import (
    CallRow,
    FinalRow,
    FunctionRow,
    GenItemRow,
    InputRow,
    OutputRow,
    PendingRow,
)
from .store_apps import StoreApps
from .store_calls import (
    StoreCalls,
    _call_params,
    _final_params,
    _gen_params,
    _input_params,
)
from .store_entries import JournaledEntries
from .writer import WAIT_S, StoreClosed, StoreTimeout, Write, WriteFailed, _Op, _Writer

__all__ = [
    "CallRow",
    "FinalRow",
    "FunctionRow",
    "GenItemRow",
    "InputRow",
    "OutputRow",
    "PendingRow",
    "Store",
    "StoreClosed",
    "StoreTimeout",
    "Write",
    "WriteFailed",
    "make_engine",
]

log = logging.getLogger("strato.store")

T = TypeVar("T")

# Fault injection, for benchmarks and tests only: every statement sleeps this long first.
FAULT_DB_LATENCY_ENV = settings.FAULT_DB_LATENCY_MS.name
_sleep = time.sleep  # the fault's sleep (tests count its calls)


def _memory_db(url: str) -> bool:
    if not url.startswith("sqlite"):
        return False
    rest = url.split("://", 1)[1] if "://" in url else ""
    return rest in ("", "/", "/:memory:") or "mode=memory" in rest


def fault_db_latency_ms() -> float:
    """The latency to inject before every statement (fault injection; 0 = off)."""
    return settings.FAULT_DB_LATENCY_MS.get()


def inject_db_latency(engine: Engine, ms: float) -> None:
    """Fault injection: every statement on ``engine`` sleeps ``ms`` first, as if the
    database were across a network (benchmarks show what would wait for it)."""
    delay = ms / 1000.0

    @event.listens_for(engine, "before_cursor_execute")
    def _fault_db_latency(*_args: Any) -> None:
        _sleep(delay)

    log.warning("fault injection: every database statement is delayed by %g ms", ms)


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        if _memory_db(url):  # one database per connection: every thread shares the one
            engine = create_engine(
                url, connect_args={"check_same_thread": False}, poolclass=StaticPool
            )
        else:
            engine = create_engine(url, connect_args={"check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record) -> None:  # pragma: no cover - driver callback
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=5000")
            # checkpoints run on a background thread (Checkpointer), not inside a commit
            cur.execute("PRAGMA wal_autocheckpoint=0")
            cur.execute("PRAGMA journal_size_limit=67108864")
            cur.close()

    else:
        # the writer's connection, the event loop's for reads, and a few more threads'
        engine = create_engine(url, pool_size=4, max_overflow=8, pool_pre_ping=True)
    ms = fault_db_latency_ms()
    if ms > 0:
        inject_db_latency(engine, ms)
    return engine


class _Statements:
    """Hot statements, built once: building a SQLAlchemy statement per call costs more
    than running it."""

    def __init__(self) -> None:
        i, c, g, lg = t.inputs.c, t.calls.c, t.gen_items.c, t.logs.c
        self.call = select(t.calls).where(c.call_id == bindparam("call_id"))
        # (Hot: compiled once, run on the driver's cursor on SQLite; the rows carry every
        # column with a Python-side default, see `with_defaults`)
        self.insert_call = Hot(t.calls.insert())
        self.insert_inputs = Hot(t.inputs.insert())
        self.finish = Hot(
            update(t.inputs)
            .where(and_(i.input_id == bindparam("b_id"), i.status == "pending"))
            .values(
                status="done",
                out_status=bindparam("b_status"),
                output=bindparam("b_output"),
                output_blob=bindparam("b_blob"),
                error=bindparam("b_error"),
                error_type=bindparam("b_error_type"),
                traceback=bindparam("b_tb"),
                done_seq=bindparam("b_seq"),
                done_at=bindparam("b_at"),
            )
        )
        self.finals_after = (
            select(
                i.idx,
                i.out_status,
                i.output,
                i.output_blob,
                i.error,
                i.traceback,
                i.done_seq,
                i.error_type,
            )
            .where(and_(i.call_id == bindparam("call_id"), i.done_seq > bindparam("after")))
            .order_by(i.done_seq)
            .limit(bindparam("limit"))
        )
        self.gens_after = (
            select(g.idx, g.data, g.blob, g.seq, g.gen_index)
            .where(and_(g.call_id == bindparam("call_id"), g.seq > bindparam("after")))
            .order_by(g.seq)
            .limit(bindparam("limit"))
        )
        self.count_done = (
            select(func.count())
            .select_from(t.inputs)
            .where(and_(i.call_id == bindparam("call_id"), i.done_seq.is_not(None)))
        )
        self.existing_idx = select(i.idx).where(
            and_(i.call_id == bindparam("call_id"), i.idx.between(bindparam("lo"), bindparam("hi")))
        )
        self.set_attempts = (
            update(t.inputs)
            .where(i.input_id == bindparam("b_id"))
            .values(attempts=bindparam("b_attempts"), retry_at=bindparam("b_retry"))
        )
        self.insert_logs = t.logs.insert()
        self.logs_after = (
            select(t.logs)
            .where(and_(lg.app_id == bindparam("app_id"), lg.seq > bindparam("after")))
            .order_by(lg.seq)
            .limit(bindparam("limit"))
        )
        self.insert_gens = Hot(t.gen_items.insert())


class Checkpointer:
    """Copies SQLite's write-ahead log into the database from its own thread and
    connection, so that the control plane's event loop never waits for a checkpoint."""

    def __init__(self, path: str, every_s: float = 0.5) -> None:
        self.path = path
        self.every_s = every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="strato-checkpoint", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        conn = sqlite3.connect(self.path, timeout=5.0)
        try:
            while not self._stop.wait(self.every_s):
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
                except sqlite3.Error:
                    pass  # busy now: the next round catches up
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error:
            pass
        finally:
            conn.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


class Store(StoreApps, StoreCalls, JournaledEntries):
    def __init__(
        self, url: str, wait_s: float = WAIT_S, journal: Path | bool | None = True
    ) -> None:
        """``journal``: the intake journal's file (`journal.py`), True for the default
        (beside a SQLite database file; none for PostgreSQL or memory), None/False for
        none (then `accept_call` and `accept_inputs` wait for the database)."""
        self.url = url
        self.wait_s = wait_s
        self.engine = make_engine(url)
        # the connection of the thread that made the store (the event loop's) for reads
        self.conn: Connection = self.engine.connect()
        with self.conn.begin():
            migrate(self.conn)
        self.q = _Statements()
        self.dict_entries = DictEntries()  # (the writer thread's)
        self.queue_entries = QueueEntries()  # (the writer thread's)
        # the journaled writes' merged forms (one object each: `_Op.merge` is compared)
        self._dict_run = self.dict_entries.put_run
        self._queue_run = self.queue_entries.apply_run
        self._journal_mark = Hot(update(t.journal_applied).values(seq=bindparam("seq")))
        self._owner = threading.get_ident()
        self._memory = _memory_db(url)  # one shared connection: reads go to the writer
        db = self.engine.url.database
        if journal is True:
            journal = (
                Path(f"{db}.intake")
                if url.startswith("sqlite") and db and not self._memory
                else None
            )
        self._journal = Journal(journal) if isinstance(journal, Path) else None
        self._accept_lock = threading.Lock()  # journal order == queue order
        self._writer = _Writer(
            self.engine,
            wait_s,
            mark_journal=self._mark_journal if self._journal else None,
            journal_done=self._journal.applied if self._journal else None,
        )
        if self._journal is not None:
            self._replay(self._journal)
        self._checkpointer = (
            Checkpointer(db) if url.startswith("sqlite") and db and not self._memory else None
        )

    # ------------------------------------------------------------------ the intake journal

    def _mark_journal(self, conn: Connection, seq: int) -> None:
        self._journal_mark(conn, {"seq": seq})

    def _replay(self, journal: Journal) -> None:
        """Write again what the journal holds past what the database has, then empty it."""
        with self.conn.begin():
            applied = self.conn.execute(select(t.journal_applied.c.seq)).scalar() or 0
        entries = journal.entries()
        todo = [e for e in entries if e[0] > applied]
        for seq, kind, payload in todo:
            if kind == "create_call":
                self._create_call(payload[0], payload[1], seq)
            elif kind == "add_inputs":
                self._add_inputs(payload[0], payload[1], payload[2], payload[3], seq)
            elif kind == "outputs":
                self._outputs(payload[0], payload[1], seq)
            elif kind == "dict_put":
                self._dict_put(payload[0], payload[1], payload[2], seq)
            elif kind == "queue_put":
                self._queue_put(*payload, journal_seq=seq)
            elif kind == "queue_take":
                self._queue_take(*payload, journal_seq=seq)
            else:
                log.error("store: journal entry %d of unknown kind %r skipped", seq, kind)
        if todo:
            log.warning("store: wrote %d accepted writes again from the journal", len(todo))
            self._writer.wait_done(self._writer.queued, max(self.wait_s, 300.0))
        journal.seq = max([applied, *(e[0] for e in entries)])
        if not self._writer.take_failures(self._writer.queued):
            journal.clear()

    def accept_call(self, call: CallRow, inputs: list[InputRow]) -> Write[bool]:
        """`queue_create_call_rows` that is durable when it returns: written to the intake
        journal first (or, without one, committed), so that the caller may answer that
        the call is accepted without waiting for the database. The `Write` says later
        whether the call was new (False: a call with that id existed)."""
        row, rows = _call_params(call), [_input_params(i) for i in inputs]
        if self._journal is None:
            w = self._create_call(row, rows, 0)
            w.wait()
            return w
        return self._journaled(
            "create_call", [row, rows], lambda seq: self._create_call(row, rows, seq)
        )

    def accept_inputs(
        self, call_id: str, inputs: list[InputRow], closed: bool | None, n_inputs: int | None
    ) -> Write[None]:
        """`add_input_rows`, durable when it returns (see `accept_call`)."""
        rows = [_input_params(i) for i in inputs]
        if self._journal is None:
            w = self._add_inputs(call_id, rows, closed, n_inputs, 0)
            w.wait()
            return w
        return self._journaled(
            "add_inputs",
            [call_id, rows, closed, n_inputs],
            lambda seq: self._add_inputs(call_id, rows, closed, n_inputs, seq),
        )

    @property
    def journaled(self) -> bool:
        """Whether `accept_*` are durable without waiting for the database."""
        return self._journal is not None

    def accept_outputs(self, finals: list[FinalRow], gens: list[GenItemRow]) -> Write[None]:
        """`add_gen_item_rows` then `finish_input_rows`, as one write, durable when it
        returns with a journal (see `accept_call`), so that the caller may serve the
        outputs before the database has them. Without a journal it is only queued: the
        caller must wait for the `Write` before serving them."""
        rows = [_final_params(f) for f in finals]
        items = [_gen_params(g) for g in gens]
        if self._journal is None:
            return self._outputs(rows, items, 0)
        return self._journaled(
            "outputs", [rows, items], lambda seq: self._outputs(rows, items, seq)
        )

    def _outputs(self, rows: list[dict], items: list[dict], journal_seq: int) -> Write[None]:
        q = self.q

        def run(c: Connection) -> None:
            if items:
                q.insert_gens(c, items)
            if rows:
                q.finish(c, rows)

        return self._write("outputs", run, None, journal_seq, linger=journal_seq > 0)

    def close(self, timeout: float | None = None) -> None:
        """Commit every queued write, stop the writer, close the connections."""
        limit = self.wait_s if timeout is None else timeout
        if not self._writer.close(limit):
            log.error(
                "store: the writer did not stop within %gs; %d writes may not be committed",
                limit,
                self._writer.queued - self._writer.done,
            )
        self.conn.close()
        self.engine.dispose()
        if self._checkpointer is not None:
            self._checkpointer.stop()
        if self._journal is not None:
            self._journal.close()

    # ------------------------------------------------------------------ writer plumbing

    def _write(
        self,
        name: str,
        run: Callable[[Connection], T],
        recover: Callable[[Connection, BaseException], T] | None = None,
        journal_seq: int = 0,
        linger: bool = False,
    ) -> Write[T]:
        """``linger``: a journaled write nobody waits for (see `_Op.linger`): a call,
        inputs or outputs accepted through the journal (their callers learn the result
        through a callback, if at all)."""
        op = _Op(
            name,
            run,
            Write(name, self.wait_s),
            recover=recover,
            journal_seq=journal_seq,
            linger=linger,
        )
        return self._writer.submit(op)

    def _merged(
        self, name: str, merge: Callable[[Connection, list[Any]], list[Any]], args: Any, seq: int
    ) -> None:
        """A journaled write nobody waits for (it has no future), run with the
        consecutive ones of the same ``merge`` in its batch (see `_Op.merge`)."""
        op = _Op(name, None, None, journal_seq=seq, linger=True)
        op.merge, op.args = merge, args
        self._writer.enqueue(op)

    def _write_many(self, name: str, stmt: Any, params: list[dict]) -> Write[None]:
        """A plain executemany: consecutive ones of one statement share a round trip."""
        return self._writer.submit(
            _Op(name, None, Write(name, self.wait_s), stmt=stmt, params=params)
        )

    def _done(self, name: str) -> Write[None]:
        w: Write[None] = Write(name, self.wait_s)
        w.seq = self._writer.queued
        w.set_result(None)
        return w

    def flush(self, timeout: float | None = None) -> None:
        """Block until every write queued before this call is committed; raises
        `WriteFailed` when any of them failed (each failure is reported once)."""
        seq = self._writer.queued
        self._writer.wait_done(seq, timeout)
        self._raise_failures(seq)

    async def aflush(self, timeout: float | None = None) -> None:
        """`flush` without blocking the event loop."""
        seq = self._writer.queued
        if self._writer.done < seq:
            await self._writer.submit(
                _Op("flush", lambda _c: None, Write("flush", self.wait_s), read=True)
            ).wait_async(timeout)
        self._raise_failures(seq)

    def _raise_failures(self, seq: int) -> None:
        failed = self._writer.take_failures(seq)
        if failed:
            names = ", ".join(sorted({name for _, name, _ in failed}))
            raise WriteFailed(
                f"{len(failed)} store write(s) failed ({names}); first: {failed[0][2]}"
            ) from failed[0][2]

    async def aread(self, method: Callable[..., T], *args: Any, timeout: float | None = None) -> T:
        """Run a read method of this store (``await store.aread(store.call, call_id)``) on
        the writer thread, after the writes queued before it, without blocking the loop."""
        return await self._writer.submit(
            _Op(
                getattr(method, "__name__", "read"),
                lambda _c: method(*args),
                Write("read", self.wait_s),
                read=True,
            )
        ).wait_async(timeout)

    def _read(self, run: Callable[[Connection], T]) -> T:
        """A read that sees every write queued before it."""
        w = self._writer
        if threading.get_ident() == w.thread.ident:  # an aread: the writes before it are in
            assert w.conn is not None
            with w.conn.begin():
                return run(w.conn)
        if self._memory:
            return w.submit(
                _Op("read", lambda c: self._in_tx(c, run), Write("read", self.wait_s), read=True)
            ).wait()
        if w.closed:
            raise StoreClosed("the store is closed")
        w.wait_done(w.queued)
        if threading.get_ident() == self._owner:
            with self.conn.begin():
                return run(self.conn)
        # another thread (rare): a pooled connection for just this read
        with self.engine.connect() as conn, conn.begin():
            return run(conn)

    @staticmethod
    def _in_tx(conn: Connection, run: Callable[[Connection], T]) -> T:
        with conn.begin():
            return run(conn)

    @property
    def batches(self) -> int:
        """Transactions the writer has committed."""
        return self._writer.batches

    # ------------------------------------------------------------------ sequences

    def max_ids(self) -> tuple[int, int, int]:
        """(max input_id, max output seq, max log seq) to resume counters after a restart."""

        def run(c: Connection) -> tuple[int, int, int]:
            max_input = c.execute(select(func.max(t.inputs.c.input_id))).scalar() or 0
            max_seq = max(
                c.execute(select(func.max(t.inputs.c.done_seq))).scalar() or 0,
                c.execute(select(func.max(t.gen_items.c.seq))).scalar() or 0,
            )
            max_log = c.execute(select(func.max(t.logs.c.seq))).scalar() or 0
            return max_input, max_seq, max_log

        return self._read(run)
