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
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import (
    Connection,
    and_,
    bindparam,
    create_engine,
    delete,
    event,
    func,
    select,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.pool import StaticPool

from strato import settings

from . import schema as t
from .dict_entries import DictEntries
from .hot import Hot
from .journal import Journal
from .migrations import migrate
from .queue_entries import QueueEntries
from .rows import (
    CallGraphRows,
    CallRow,
    FinalRow,
    FunctionRow,
    GenItemRow,
    GraphCallRow,
    GraphInputRow,
    InputRow,
    OutputRow,
    PendingRow,
)
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
        self.insert_call = t.calls.insert()
        self.insert_inputs = t.inputs.insert()
        self.finish = (
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
        self.insert_gens = t.gen_items.insert()


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


def _call_params(c: CallRow) -> dict:
    return {
        "call_id": c.call_id,
        "function_id": c.function_id,
        "kind": c.kind,
        "method": c.method,
        "n_inputs": c.n_inputs,
        "closed": c.closed,
        "cancelled": c.cancelled,
        "created_at": c.created_at,
        "expires_at": c.expires_at,
        "parent_input_id": c.parent_input_id,
        "caller_app_id": c.caller_app_id,
    }


def _call_row(r: dict) -> CallRow:
    return CallRow(
        r["call_id"],
        r["function_id"],
        r["kind"],
        r["method"],
        r["n_inputs"],
        bool(r["closed"]),
        bool(r["cancelled"]),
        r["created_at"],
        r["expires_at"],
        r.get("parent_input_id"),
        r.get("caller_app_id"),
    )


def _input_params(i: InputRow) -> dict:
    return {
        "input_id": i.input_id,
        "call_id": i.call_id,
        "idx": i.idx,
        "args": i.args,
        "args_blob": i.args_blob,
        "status": "pending",
        "attempts": 0,
    }


def _final_params(f: FinalRow) -> dict:
    return {
        "b_id": f.input_id,
        "b_status": f.status,
        "b_output": f.output,
        "b_blob": f.output_blob,
        "b_error": f.error,
        "b_error_type": f.error_type,
        "b_tb": f.traceback,
        "b_seq": f.seq,
        "b_at": f.done_at,
    }


def _gen_params(g: GenItemRow) -> dict:
    return {
        "seq": g.seq,
        "call_id": g.call_id,
        "idx": g.idx,
        "gen_index": g.gen_index,
        "data": g.data,
        "blob": g.blob,
    }


def _chunks(items: Sequence[T], size: int = 500) -> Iterable[Sequence[T]]:
    """``items`` in slices of ``size`` (bound parameters per statement stay few)."""
    for at in range(0, len(items), size):
        yield items[at : at + size]


def _run(stmt: Any) -> Callable[[Connection], None]:
    def run(c: Connection) -> None:
        c.execute(stmt)

    return run


class Store:
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
        with self._accept_lock:
            seq = self._journal.append("create_call", [row, rows])
            return self._create_call(row, rows, seq)

    def accept_inputs(
        self, call_id: str, inputs: list[InputRow], closed: bool | None, n_inputs: int | None
    ) -> Write[None]:
        """`add_input_rows`, durable when it returns (see `accept_call`)."""
        rows = [_input_params(i) for i in inputs]
        if self._journal is None:
            w = self._add_inputs(call_id, rows, closed, n_inputs, 0)
            w.wait()
            return w
        with self._accept_lock:
            seq = self._journal.append("add_inputs", [call_id, rows, closed, n_inputs])
            return self._add_inputs(call_id, rows, closed, n_inputs, seq)

    def accept_dict_put(self, dict_id: str, rows: list[list], now: float) -> Write[int]:
        """Dict entries (``[key_hash, key, value, blob]`` each; a later one of a key wins)
        durable when it returns: journaled as `accept_call` is (only when `journaled`),
        then stored by the writer behind it, in queue order, unless the Dict is gone by
        then. The `Write` says how many entries were stored."""
        assert self._journal is not None, "accept_dict_put needs the journal"
        with self._accept_lock:
            seq = self._journal.append("dict_put", [dict_id, rows, now])
            return self._dict_put(dict_id, rows, now, seq)

    def _dict_put(self, dict_id: str, rows: list[list], now: float, journal_seq: int) -> Write[int]:
        # (stored unless the Dict was deleted after the put was accepted; consecutive
        # puts share their statements: `DictEntries.put_run`)
        return self._merged("dict_put", self._dict_run, (dict_id, rows, now), journal_seq)

    def accept_queue_put(
        self,
        qid: str,
        partition: str,
        items: list[bytes],
        now: float,
        expires_at: float,
        request_id: str,
    ) -> Write[None]:
        """Queue items put at ``now``, durable when it returns (journaled as
        `accept_dict_put` is), appended by the writer behind it unless the Queue is gone or
        the request id was used already (`QueueEntries.apply_put`)."""
        assert self._journal is not None, "accept_queue_put needs the journal"
        payload = [qid, partition, items, now, expires_at, request_id]
        with self._accept_lock:
            seq = self._journal.append("queue_put", payload)
            return self._queue_put(
                qid, partition, items, now, expires_at, request_id, journal_seq=seq
            )

    def _queue_put(
        self,
        qid: str,
        partition: str,
        items: list[bytes],
        now: float,
        expires_at: float,
        request_id: str,
        *,
        journal_seq: int,
    ) -> Write[None]:
        key = {"q": qid, "p": partition}
        args = ("put", key, items, now, expires_at, request_id)
        return self._merged("queue_put", self._queue_run, args, journal_seq)

    def accept_queue_take(self, qid: str, partition: str, n: int, request_id: str) -> Write[None]:
        """A get that handed out the first ``n`` items of a partition, durable when it
        returns; the writer deletes them behind it (`QueueEntries.apply_take`)."""
        assert self._journal is not None, "accept_queue_take needs the journal"
        with self._accept_lock:
            seq = self._journal.append("queue_take", [qid, partition, n, request_id])
            return self._queue_take(qid, partition, n, request_id, journal_seq=seq)

    def _queue_take(
        self, qid: str, partition: str, n: int, request_id: str, *, journal_seq: int
    ) -> Write[None]:
        key = {"q": qid, "p": partition}
        args = ("take", key, n, request_id)
        return self._merged("queue_take", self._queue_run, args, journal_seq)

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
        with self._accept_lock:
            seq = self._journal.append("outputs", [rows, items])
            return self._outputs(rows, items, seq)

    def _outputs(self, rows: list[dict], items: list[dict], journal_seq: int) -> Write[None]:
        q = self.q

        def run(c: Connection) -> None:
            if items:
                c.execute(q.insert_gens, items)
            if rows:
                c.execute(q.finish, rows)

        return self._write("outputs", run, None, journal_seq)

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
        """``linger``: a journaled write nobody waits for (see `_Op.linger`)."""
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
    ) -> Write[Any]:
        """A journaled write nobody waits for, run with the consecutive ones of the same
        ``merge`` in its batch (see `_Op.merge`)."""
        op = _Op(name, None, Write(name, self.wait_s), journal_seq=seq, linger=True)
        op.merge, op.args = merge, args
        return self._writer.submit(op)

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

    # ------------------------------------------------------------------ apps

    def create_app(
        self,
        app_id: str,
        name: str | None,
        state: str,
        functions: Sequence[tuple[str, str, bytes]],
        mount: tuple[str, bytes] | None,
        replace_deployed: bool,
        workspace: str = "main",
    ) -> list[str]:
        """Insert an app and its functions. With ``replace_deployed``, an earlier deployed
        app of the same name (in its workspace) is stopped in the same transaction; returns
        the ids of the apps it stopped. Blocks until committed (`queue_create_app` does
        not)."""
        return self.queue_create_app(
            app_id, name, state, functions, mount, replace_deployed, workspace
        ).wait()

    def queue_create_app(
        self,
        app_id: str,
        name: str | None,
        state: str,
        functions: Sequence[tuple[str, str, bytes]],
        mount: tuple[str, bytes] | None,
        replace_deployed: bool,
        workspace: str = "main",
    ) -> Write[list[str]]:
        now = time.time()
        functions = list(functions)

        def run(c: Connection) -> list[str]:
            stopped: list[str] = []
            if replace_deployed and name:
                rows = c.execute(
                    select(t.apps.c.app_id).where(
                        and_(
                            t.apps.c.name == name,
                            t.apps.c.state == "deployed",
                            t.apps.c.workspace == workspace,
                        )
                    )
                ).all()
                stopped = [r[0] for r in rows]
                if stopped:
                    c.execute(
                        update(t.apps)
                        .where(t.apps.c.app_id.in_(stopped))
                        .values(state="stopped", stopped_at=now)
                    )
            c.execute(
                t.apps.insert().values(
                    app_id=app_id, name=name, state=state, created_at=now, workspace=workspace
                )
            )
            if functions:
                c.execute(
                    t.functions.insert(),
                    [
                        {
                            "function_id": fid,
                            "app_id": app_id,
                            "name": fname,
                            "spec": spec,
                            "created_at": now,
                        }
                        for fid, fname, spec in functions
                    ],
                )
            if (
                mount is not None
                and not c.execute(
                    select(t.mounts.c.mount_id).where(t.mounts.c.mount_id == mount[0])
                ).first()
            ):
                c.execute(
                    t.mounts.insert().values(mount_id=mount[0], manifest=mount[1], created_at=now)
                )
            return stopped

        return self._write("create_app", run)

    def set_app_state(self, app_id: str, state: str) -> Write[None]:
        stopped_at = time.time() if state == "stopped" else None

        def run(c: Connection) -> None:
            c.execute(
                update(t.apps)
                .where(t.apps.c.app_id == app_id)
                .values(state=state, stopped_at=stopped_at)
            )

        return self._write("set_app_state", run)

    def apps(self, app_ids: Iterable[str] | None = None) -> list[dict]:
        q = select(t.apps).order_by(t.apps.c.created_at)
        if app_ids is not None:
            q = q.where(t.apps.c.app_id.in_(list(app_ids)))
        return self._read(lambda c: [dict(r._mapping) for r in c.execute(q)])

    def find_app(self, name: str, workspace: str = "main") -> dict | None:
        """The deployed app of that name in ``workspace``, else the newest running
        ephemeral one."""
        q = (
            select(t.apps)
            .where(
                and_(
                    t.apps.c.name == name,
                    t.apps.c.state != "stopped",
                    t.apps.c.workspace == workspace,
                )
            )
            .order_by(t.apps.c.created_at.desc())
        )
        rows = [dict(r._mapping) for r in self._read(lambda c: c.execute(q).all())]
        deployed = [r for r in rows if r["state"] == "deployed"]
        return (deployed or rows)[0] if rows else None

    def functions_of(self, app_id: str) -> list[dict]:
        q = select(t.functions).where(t.functions.c.app_id == app_id)
        return self._read(lambda c: [dict(r._mapping) for r in c.execute(q)])

    def function(self, function_id: str) -> dict | None:
        q = (
            select(t.functions, t.apps.c.state.label("app_state"))
            .join(t.apps, t.apps.c.app_id == t.functions.c.app_id)
            .where(t.functions.c.function_id == function_id)
        )
        r = self._read(lambda c: c.execute(q).first())
        return dict(r._mapping) if r else None

    def add_function(self, app_id: str, function_id: str, name: str, spec: bytes) -> Write[None]:
        stmt = t.functions.insert().values(
            function_id=function_id, app_id=app_id, name=name, spec=spec, created_at=time.time()
        )
        return self._write("add_function", _run(stmt))

    def update_function_spec(self, function_id: str, spec: bytes) -> Write[None]:
        stmt = update(t.functions).where(t.functions.c.function_id == function_id).values(spec=spec)
        return self._write("update_function_spec", _run(stmt))

    def mount(self, mount_id: str) -> bytes | None:
        q = select(t.mounts.c.manifest).where(t.mounts.c.mount_id == mount_id)
        return self._read(lambda c: c.execute(q).scalar())

    # ------------------------------------------------------------------ calls and inputs

    def call(self, call_id: str) -> dict | None:
        r = self._read(lambda c: c.execute(self.q.call, {"call_id": call_id}).first())
        return dict(r._mapping) if r else None

    def create_call(self, row: dict, input_rows: list[dict]) -> bool:
        """Insert a call with its first inputs in one transaction; False when a call with
        that id exists already (a retried request). Blocks until committed
        (`queue_create_call` does not)."""
        return self.queue_create_call(row, input_rows).wait()

    def queue_create_call(self, row: dict, input_rows: list[dict]) -> Write[bool]:
        return self._create_call(row, input_rows, 0)

    def _create_call(self, row: dict, input_rows: list[dict], journal_seq: int) -> Write[bool]:
        q = self.q

        def run(c: Connection) -> bool:
            c.execute(q.insert_call, row)
            if input_rows:
                c.execute(q.insert_inputs, input_rows)
            return True

        def recover(c: Connection, e: BaseException) -> bool:
            if isinstance(e, IntegrityError) and c.execute(q.call, row).first() is not None:
                return False
            raise e

        return self._write("create_call", run, recover, journal_seq)

    # typed forms: callers that use them never name a column or a bind parameter

    def function_row(self, function_id: str) -> FunctionRow | None:
        row = self.function(function_id)
        if row is None:
            return None
        return FunctionRow(
            row["function_id"], row["app_id"], row["name"], row["spec"], row["app_state"]
        )

    def call_row(self, call_id: str) -> CallRow | None:
        row = self.call(call_id)
        return _call_row(row) if row is not None else None

    def create_call_rows(self, call: CallRow, inputs: list[InputRow]) -> bool:
        """`create_call` with typed rows: blocks until committed; False when a call with
        that id exists already (`queue_create_call_rows` does not block)."""
        return self.queue_create_call_rows(call, inputs).wait()

    def queue_create_call_rows(self, call: CallRow, inputs: list[InputRow]) -> Write[bool]:
        return self.queue_create_call(_call_params(call), [_input_params(i) for i in inputs])

    def add_input_rows(
        self, call_id: str, inputs: list[InputRow], closed: bool | None, n_inputs: int | None
    ) -> Write[None]:
        return self.add_inputs(call_id, [_input_params(i) for i in inputs], closed, n_inputs)

    def finish_input_rows(self, finals: list[FinalRow]) -> Write[None]:
        """`finish_inputs` with typed rows: only inputs still pending are updated."""
        return self.finish_inputs([_final_params(f) for f in finals])

    def add_gen_item_rows(self, items: list[GenItemRow]) -> Write[None]:
        return self.add_gen_items([_gen_params(g) for g in items])

    def existing_idx(self, call_id: str, lo: int, hi: int) -> set[int]:
        params = {"call_id": call_id, "lo": lo, "hi": hi}
        rows = self._read(lambda c: c.execute(self.q.existing_idx, params).all())
        return {r[0] for r in rows}

    def add_inputs(
        self, call_id: str, rows: list[dict], closed: bool | None, n_inputs: int | None
    ) -> Write[None]:
        """Insert input rows and update the call's count in one transaction."""
        return self._add_inputs(call_id, rows, closed, n_inputs, 0)

    def _add_inputs(
        self,
        call_id: str,
        rows: list[dict],
        closed: bool | None,
        n_inputs: int | None,
        journal_seq: int,
    ) -> Write[None]:
        values: dict = {}
        if n_inputs is not None:
            values["n_inputs"] = n_inputs
        if closed is not None:
            values["closed"] = closed
        q = self.q

        def run(c: Connection) -> None:
            if rows:
                c.execute(q.insert_inputs, rows)
            if values:
                c.execute(update(t.calls).where(t.calls.c.call_id == call_id).values(**values))

        return self._write("add_inputs", run, None, journal_seq)

    def finish_inputs(self, rows: list[dict]) -> Write[None]:
        """Record final outputs: rows of b_id (the input_id), b_status, b_output, b_blob,
        b_error, b_error_type (may be left out), b_tb, b_seq, b_at. Only inputs still
        pending are updated."""
        if not rows:
            return self._done("finish_inputs")
        params = [r if "b_error_type" in r else {**r, "b_error_type": None} for r in rows]
        return self._write_many("finish_inputs", self.q.finish, params)

    def add_gen_items(self, rows: list[dict]) -> Write[None]:
        if not rows:
            return self._done("add_gen_items")
        return self._write_many("add_gen_items", self.q.insert_gens, list(rows))

    def set_attempts(self, rows: list[tuple[int, int, float | None]]) -> Write[None]:
        """(input_id, attempts, retry_at) after a failed attempt that will be retried."""
        if not rows:
            return self._done("set_attempts")
        params = [{"b_id": i, "b_attempts": a, "b_retry": r} for i, a, r in rows]
        return self._write_many("set_attempts", self.q.set_attempts, params)

    def outputs_after(
        self, call_id: str, after: int, limit: int, with_gens: bool = True
    ) -> list[OutputRow]:
        params = {"call_id": call_id, "after": after, "limit": limit}

        def run(c: Connection) -> tuple[Sequence[Any], Sequence[Any]]:
            finals = c.execute(self.q.finals_after, params).all()
            gens = c.execute(self.q.gens_after, params).all() if with_gens else []
            return finals, gens

        finals, gens = self._read(run)
        out = [OutputRow(r[0], r[1], r[2], r[3], r[4], r[5], r[6], None, r[7]) for r in finals]
        if gens:
            out += [OutputRow(r[0], "success", r[1], r[2], None, None, r[3], r[4]) for r in gens]
            out.sort(key=lambda o: o.seq)
            out = out[:limit]
        return out

    def count_done(self, call_id: str) -> int:
        return self._read(
            lambda c: c.execute(self.q.count_done, {"call_id": call_id}).scalar() or 0
        )

    def cancel_call(self, call_id: str) -> Write[None]:
        stmt = update(t.calls).where(t.calls.c.call_id == call_id).values(cancelled=True)
        return self._write("cancel_call", _run(stmt))

    def cancel_calls(self, call_ids: Sequence[str]) -> Write[None]:
        """Mark calls cancelled (the descendants of a cancelled call)."""
        if not call_ids:
            return self._done("cancel_calls")
        ids = list(call_ids)

        def run(c: Connection) -> None:
            for chunk in _chunks(ids):
                c.execute(
                    update(t.calls).where(t.calls.c.call_id.in_(chunk)).values(cancelled=True)
                )

        return self._write("cancel_calls", run)

    def call_owner(self, call_id: str) -> tuple[str, str | None, float] | None:
        """(the app of the call's function, the app that made the call or None, when
        the call expires), or None when there is no such call."""
        c, f = t.calls.c, t.functions.c
        q = (
            select(f.app_id, c.caller_app_id, c.expires_at)
            .join(t.functions, f.function_id == c.function_id)
            .where(c.call_id == call_id)
        )
        r = self._read(lambda conn: conn.execute(q).first())
        return (r[0], r[1], r[2]) if r is not None else None

    def descendant_calls(
        self, call_ids: Sequence[str], input_ids: Sequence[int], limit: int
    ) -> tuple[list[str], bool]:
        """The calls made by the inputs of ``call_ids`` and by ``input_ids``, and the calls
        their inputs made, recursively: (those not cancelled yet, whether the walk stopped
        at ``limit`` calls before it ended)."""
        c, i = t.calls.c, t.inputs.c

        def run(conn: Connection) -> tuple[list[str], bool]:
            seen: set[str] = set(call_ids)
            walked = 0
            found: list[str] = []
            parents = list(input_ids)
            frontier = list(call_ids)
            while frontier or parents:
                for calls in _chunks(frontier):
                    q = select(i.input_id).where(i.call_id.in_(calls))
                    parents += [r[0] for r in conn.execute(q)]
                frontier = []
                for ids in _chunks(parents):
                    q = select(c.call_id, c.cancelled).where(c.parent_input_id.in_(ids))
                    for call_id, cancelled in conn.execute(q):
                        if call_id in seen:
                            continue
                        if walked >= limit:
                            return found, True
                        walked += 1
                        seen.add(call_id)
                        frontier.append(call_id)
                        if not cancelled:
                            found.append(call_id)
                parents = []
            return found, False

        return self._read(run)

    def call_graph(self, call_id: str, max_depth: int, max_inputs: int) -> CallGraphRows | None:
        """The call, its inputs and the calls they made, recursively (``CallGraphRows``),
        read in one transaction; None when there is no such call."""
        c, i = t.calls.c, t.inputs.c
        f = t.functions.c

        def run(conn: Connection) -> CallGraphRows | None:
            root = conn.execute(
                select(c.call_id, c.function_id, c.method).where(c.call_id == call_id)
            ).first()
            if root is None:
                return None
            calls = [GraphCallRow(root[0], root[1], root[2], None)]
            inputs: list[GraphInputRow] = []
            truncated = False
            level: list[str] = [root[0]]
            for depth in range(max_depth):
                found: list[GraphInputRow] = []
                for chunk in _chunks(level):
                    room = max_inputs - len(inputs) - len(found)
                    q = (
                        select(i.input_id, i.call_id, i.idx, i.out_status)
                        .where(i.call_id.in_(chunk))
                        .order_by(i.input_id)
                        .limit(room + 1)
                    )
                    found += [GraphInputRow(*r) for r in conn.execute(q)]
                    if len(found) + len(inputs) > max_inputs:
                        found = found[: max_inputs - len(inputs)]
                        truncated = True
                        break
                inputs += found
                if truncated or not found:
                    break
                made: list[GraphCallRow] = []
                for ids in _chunks([r.input_id for r in found]):
                    q = (
                        select(c.call_id, c.function_id, c.method, c.parent_input_id)
                        .where(c.parent_input_id.in_(ids))
                        .order_by(c.created_at, c.call_id)
                    )
                    made += [GraphCallRow(r[0], r[1], r[2], r[3]) for r in conn.execute(q)]
                if made and depth == max_depth - 1:
                    truncated = True  # calls one level too deep are left out
                    break
                calls += made
                level = [r.call_id for r in made]
                if not level:
                    break
            fids = sorted({r.function_id for r in calls})
            functions: list[FunctionRow] = []
            for chunk in _chunks(fids):
                q = (
                    select(f.function_id, f.app_id, f.name, f.spec, t.apps.c.state)
                    .join(t.apps, t.apps.c.app_id == f.app_id)
                    .where(f.function_id.in_(chunk))
                )
                functions += [FunctionRow(*r) for r in conn.execute(q)]
            return CallGraphRows(calls, inputs, functions, truncated)

        return self._read(run)

    def pending_inputs(self) -> list[PendingRow]:
        """Every input without a final output, oldest first (for recovery at start)."""
        i = t.inputs.c
        c = t.calls.c
        q = (
            select(
                i.input_id,
                i.call_id,
                i.idx,
                c.function_id,
                i.args,
                i.args_blob,
                i.attempts,
                i.retry_at,
                c.method,
            )
            .join(t.calls, c.call_id == i.call_id)
            .where(i.status == "pending")
            .order_by(i.input_id)
        )
        return [PendingRow(*r) for r in self._read(lambda conn: conn.execute(q).all())]

    def pending_ids_of_call(self, call_id: str) -> list[int]:
        q = select(t.inputs.c.input_id).where(
            and_(t.inputs.c.call_id == call_id, t.inputs.c.status == "pending")
        )
        return self._read(lambda c: [r[0] for r in c.execute(q)])

    def expire(self, now: float) -> int:
        """Delete calls (with their inputs and outputs) past their retention; blocks
        until committed (`queue_expire` does not)."""
        return self.queue_expire(now).wait()

    def queue_expire(self, now: float) -> Write[int]:
        def run(c: Connection) -> int:
            ids = [
                r[0]
                for r in c.execute(
                    select(t.calls.c.call_id).where(t.calls.c.expires_at < now).limit(5000)
                )
            ]
            if ids:
                c.execute(delete(t.inputs).where(t.inputs.c.call_id.in_(ids)))
                c.execute(delete(t.gen_items).where(t.gen_items.c.call_id.in_(ids)))
                c.execute(delete(t.calls).where(t.calls.c.call_id.in_(ids)))
            return len(ids)

        return self._write("expire", run)

    # ------------------------------------------------------------------ nodes, containers, logs

    def upsert_node(
        self, node_id: str, name: str, provider: str, info: bytes, state: str
    ) -> Write[None]:
        values = dict(
            name=name, provider=provider, info=info, state=state, last_heartbeat=time.time()
        )

        def run(c: Connection) -> None:
            exists = c.execute(
                select(t.nodes.c.node_id).where(t.nodes.c.node_id == node_id)
            ).first()
            if exists:
                c.execute(update(t.nodes).where(t.nodes.c.node_id == node_id).values(**values))
            else:
                c.execute(t.nodes.insert().values(node_id=node_id, **values))

        return self._write("upsert_node", run)

    def set_node_state(self, node_id: str, state: str) -> Write[None]:
        stmt = update(t.nodes).where(t.nodes.c.node_id == node_id).values(state=state)
        return self._write("set_node_state", _run(stmt))

    def insert_container(self, row: dict) -> Write[None]:
        stmt = t.containers.insert().values(**row)
        return self._write("insert_container", _run(stmt))

    def set_container_state(
        self, container_id: str, state: str, exit_reason: str | None = None
    ) -> Write[None]:
        values: dict = {"state": state}
        if state in ("stopped", "failed"):
            values["stopped_at"] = time.time()
        if exit_reason is not None:
            values["exit_reason"] = exit_reason
        stmt = (
            update(t.containers).where(t.containers.c.container_id == container_id).values(**values)
        )
        return self._write("set_container_state", _run(stmt))

    def stop_live_containers(self, reason: str) -> list[str]:
        """Mark every container not yet stopped as stopped (at start: an earlier epoch's).
        Blocks until committed (`queue_stop_live_containers` does not)."""
        return self.queue_stop_live_containers(reason).wait()

    def queue_stop_live_containers(self, reason: str) -> Write[list[str]]:
        now = time.time()

        def run(c: Connection) -> list[str]:
            ids = [
                r[0]
                for r in c.execute(
                    select(t.containers.c.container_id).where(
                        t.containers.c.state.notin_(["stopped", "failed"])
                    )
                )
            ]
            if ids:
                c.execute(
                    update(t.containers)
                    .where(t.containers.c.container_id.in_(ids))
                    .values(state="stopped", stopped_at=now, exit_reason=reason)
                )
            return ids

        return self._write("stop_live_containers", run)

    def containers(self, app_id: str | None = None, live_only: bool = True) -> list[dict]:
        q = select(t.containers).order_by(t.containers.c.started_at)
        if app_id:
            q = q.where(t.containers.c.app_id == app_id)
        if live_only:
            q = q.where(t.containers.c.state.notin_(["stopped", "failed"]))
        return self._read(lambda c: [dict(r._mapping) for r in c.execute(q)])

    def nodes(self) -> list[dict]:
        return self._read(lambda c: [dict(r._mapping) for r in c.execute(select(t.nodes))])

    def add_logs(self, rows: list[dict]) -> Write[None]:
        if not rows:
            return self._done("add_logs")
        return self._write_many("add_logs", self.q.insert_logs, list(rows))

    def logs_after(self, app_id: str, after: int, limit: int = 1000) -> list[dict]:
        params = {"app_id": app_id, "after": after, "limit": limit}
        return self._read(
            lambda c: [dict(r._mapping) for r in c.execute(self.q.logs_after, params)]
        )
