"""The control plane's state, through SQLAlchemy Core.

SQLite (WAL) by default, PostgreSQL with ``STRATO_DATABASE_URL=postgresql+psycopg://...``:
the same statements serve both. The control plane is one asyncio process, so one
connection serves it; every method is one short transaction.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

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

from . import schema as t
from .migrations import migrate


@dataclass
class PendingRow:
    input_id: int
    call_id: str
    idx: int
    function_id: str
    args: bytes | None
    args_blob: str | None
    attempts: int
    retry_at: float | None
    method: str | None


@dataclass
class OutputRow:
    idx: int
    status: str
    data: bytes | None
    blob: str | None
    error: str | None
    traceback: str | None
    seq: int
    gen_index: int | None = None


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record) -> None:  # pragma: no cover - driver callback
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=5000")
            # checkpoints run on a background thread (Checkpointer), not inside a commit on
            # the event loop
            cur.execute("PRAGMA wal_autocheckpoint=0")
            cur.execute("PRAGMA journal_size_limit=67108864")
            cur.close()

        return engine
    return create_engine(url, pool_size=2, pool_pre_ping=True)


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
                traceback=bindparam("b_tb"),
                done_seq=bindparam("b_seq"),
                done_at=bindparam("b_at"),
            )
        )
        self.finals_after = (
            select(i.idx, i.out_status, i.output, i.output_blob, i.error, i.traceback, i.done_seq)
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


class Store:
    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        self.conn: Connection = self.engine.connect()
        with self.conn.begin():
            migrate(self.conn)
        self.q = _Statements()
        db = self.engine.url.database
        self._checkpointer = (
            Checkpointer(db) if url.startswith("sqlite") and db and db != ":memory:" else None
        )

    def close(self) -> None:
        self.conn.close()
        self.engine.dispose()
        if self._checkpointer is not None:
            self._checkpointer.stop()

    # ------------------------------------------------------------------ sequences

    def max_ids(self) -> tuple[int, int, int]:
        """(max input_id, max output seq, max log seq) to resume counters after a restart."""
        c = self.conn
        with c.begin():
            max_input = c.execute(select(func.max(t.inputs.c.input_id))).scalar() or 0
            max_seq = max(
                c.execute(select(func.max(t.inputs.c.done_seq))).scalar() or 0,
                c.execute(select(func.max(t.gen_items.c.seq))).scalar() or 0,
            )
            max_log = c.execute(select(func.max(t.logs.c.seq))).scalar() or 0
        return max_input, max_seq, max_log

    # ------------------------------------------------------------------ apps

    def create_app(
        self,
        app_id: str,
        name: str | None,
        state: str,
        functions: Sequence[tuple[str, str, bytes]],
        mount: tuple[str, bytes] | None,
        replace_deployed: bool,
    ) -> list[str]:
        """Insert an app and its functions. With ``replace_deployed``, an earlier deployed
        app of that name is stopped; the ids of the apps stopped so are returned."""
        now = time.time()
        stopped: list[str] = []
        with self.conn.begin():
            if replace_deployed and name:
                rows = self.conn.execute(
                    select(t.apps.c.app_id).where(
                        and_(t.apps.c.name == name, t.apps.c.state == "deployed")
                    )
                ).all()
                stopped = [r[0] for r in rows]
                if stopped:
                    self.conn.execute(
                        update(t.apps)
                        .where(t.apps.c.app_id.in_(stopped))
                        .values(state="stopped", stopped_at=now)
                    )
            self.conn.execute(
                t.apps.insert().values(app_id=app_id, name=name, state=state, created_at=now)
            )
            if functions:
                self.conn.execute(
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
                and not self.conn.execute(
                    select(t.mounts.c.mount_id).where(t.mounts.c.mount_id == mount[0])
                ).first()
            ):
                self.conn.execute(
                    t.mounts.insert().values(mount_id=mount[0], manifest=mount[1], created_at=now)
                )
        return stopped

    def set_app_state(self, app_id: str, state: str) -> None:
        with self.conn.begin():
            self.conn.execute(
                update(t.apps)
                .where(t.apps.c.app_id == app_id)
                .values(state=state, stopped_at=time.time() if state == "stopped" else None)
            )

    def apps(self, app_ids: Iterable[str] | None = None) -> list[dict]:
        q = select(t.apps).order_by(t.apps.c.created_at)
        if app_ids is not None:
            q = q.where(t.apps.c.app_id.in_(list(app_ids)))
        with self.conn.begin():
            return [dict(r._mapping) for r in self.conn.execute(q)]

    def find_app(self, name: str) -> dict | None:
        """The deployed app of that name, else the newest running ephemeral one."""
        with self.conn.begin():
            rows = self.conn.execute(
                select(t.apps)
                .where(and_(t.apps.c.name == name, t.apps.c.state != "stopped"))
                .order_by(t.apps.c.created_at.desc())
            ).all()
        rows = [dict(r._mapping) for r in rows]
        deployed = [r for r in rows if r["state"] == "deployed"]
        return (deployed or rows or [None])[0]

    def functions_of(self, app_id: str) -> list[dict]:
        with self.conn.begin():
            return [
                dict(r._mapping)
                for r in self.conn.execute(
                    select(t.functions).where(t.functions.c.app_id == app_id)
                )
            ]

    def function(self, function_id: str) -> dict | None:
        with self.conn.begin():
            r = self.conn.execute(
                select(t.functions, t.apps.c.state.label("app_state"))
                .join(t.apps, t.apps.c.app_id == t.functions.c.app_id)
                .where(t.functions.c.function_id == function_id)
            ).first()
        return dict(r._mapping) if r else None

    def add_function(self, app_id: str, function_id: str, name: str, spec: bytes) -> None:
        with self.conn.begin():
            self.conn.execute(
                t.functions.insert().values(
                    function_id=function_id,
                    app_id=app_id,
                    name=name,
                    spec=spec,
                    created_at=time.time(),
                )
            )

    def update_function_spec(self, function_id: str, spec: bytes) -> None:
        with self.conn.begin():
            self.conn.execute(
                update(t.functions)
                .where(t.functions.c.function_id == function_id)
                .values(spec=spec)
            )

    def mount(self, mount_id: str) -> bytes | None:
        with self.conn.begin():
            return self.conn.execute(
                select(t.mounts.c.manifest).where(t.mounts.c.mount_id == mount_id)
            ).scalar()

    # ------------------------------------------------------------------ calls and inputs

    def call(self, call_id: str) -> dict | None:
        with self.conn.begin():
            r = self.conn.execute(self.q.call, {"call_id": call_id}).first()
        return dict(r._mapping) if r else None

    def create_call(self, row: dict, input_rows: list[dict]) -> bool:
        """Insert a call with its first inputs in one transaction; False when a call with
        that id exists already (a retried request)."""
        try:
            with self.conn.begin():
                self.conn.execute(self.q.insert_call, row)
                if input_rows:
                    self.conn.execute(self.q.insert_inputs, input_rows)
        except IntegrityError:
            if self.call(row["call_id"]) is None:
                raise
            return False
        return True

    def existing_idx(self, call_id: str, lo: int, hi: int) -> set[int]:
        with self.conn.begin():
            rows = self.conn.execute(
                self.q.existing_idx, {"call_id": call_id, "lo": lo, "hi": hi}
            ).all()
        return {r[0] for r in rows}

    def add_inputs(
        self, call_id: str, rows: list[dict], closed: bool | None, n_inputs: int | None
    ) -> None:
        """Insert input rows and update the call's count in one transaction."""
        with self.conn.begin():
            if rows:
                self.conn.execute(self.q.insert_inputs, rows)
            values: dict = {}
            if n_inputs is not None:
                values["n_inputs"] = n_inputs
            if closed is not None:
                values["closed"] = closed
            if values:
                self.conn.execute(
                    update(t.calls).where(t.calls.c.call_id == call_id).values(**values)
                )

    def finish_inputs(self, rows: list[dict]) -> None:
        """Record final outputs: rows of input_id, out_status, output, output_blob, error,
        traceback, done_seq, done_at. Only inputs still pending are updated."""
        if rows:
            with self.conn.begin():
                self.conn.execute(self.q.finish, rows)

    def add_gen_items(self, rows: list[dict]) -> None:
        if rows:
            with self.conn.begin():
                self.conn.execute(self.q.insert_gens, rows)

    def set_attempts(self, rows: list[tuple[int, int, float | None]]) -> None:
        """(input_id, attempts, retry_at) after a failed attempt that will be retried."""
        if rows:
            with self.conn.begin():
                self.conn.execute(
                    self.q.set_attempts,
                    [{"b_id": i, "b_attempts": a, "b_retry": r} for i, a, r in rows],
                )

    def outputs_after(
        self, call_id: str, after: int, limit: int, with_gens: bool = True
    ) -> list[OutputRow]:
        params = {"call_id": call_id, "after": after, "limit": limit}
        with self.conn.begin():
            finals = self.conn.execute(self.q.finals_after, params).all()
            gens = self.conn.execute(self.q.gens_after, params).all() if with_gens else []
        out = [OutputRow(*r) for r in finals]
        if gens:
            out += [OutputRow(r[0], "success", r[1], r[2], None, None, r[3], r[4]) for r in gens]
            out.sort(key=lambda o: o.seq)
            out = out[:limit]
        return out

    def count_done(self, call_id: str) -> int:
        with self.conn.begin():
            return self.conn.execute(self.q.count_done, {"call_id": call_id}).scalar()

    def cancel_call(self, call_id: str) -> None:
        with self.conn.begin():
            self.conn.execute(
                update(t.calls).where(t.calls.c.call_id == call_id).values(cancelled=True)
            )

    def pending_inputs(self) -> list[PendingRow]:
        """Every input without a final output, oldest first (for recovery at start)."""
        i = t.inputs.c
        c = t.calls.c
        with self.conn.begin():
            rows = self.conn.execute(
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
            ).all()
        return [PendingRow(*r) for r in rows]

    def pending_ids_of_call(self, call_id: str) -> list[int]:
        with self.conn.begin():
            return [
                r[0]
                for r in self.conn.execute(
                    select(t.inputs.c.input_id).where(
                        and_(t.inputs.c.call_id == call_id, t.inputs.c.status == "pending")
                    )
                )
            ]

    def expire(self, now: float) -> int:
        """Delete calls (with their inputs and outputs) past their retention."""
        with self.conn.begin():
            ids = [
                r[0]
                for r in self.conn.execute(
                    select(t.calls.c.call_id).where(t.calls.c.expires_at < now).limit(5000)
                )
            ]
            if ids:
                self.conn.execute(delete(t.inputs).where(t.inputs.c.call_id.in_(ids)))
                self.conn.execute(delete(t.gen_items).where(t.gen_items.c.call_id.in_(ids)))
                self.conn.execute(delete(t.calls).where(t.calls.c.call_id.in_(ids)))
        return len(ids)

    # ------------------------------------------------------------------ nodes, containers, logs

    def upsert_node(self, node_id: str, name: str, provider: str, info: bytes, state: str) -> None:
        now = time.time()
        with self.conn.begin():
            exists = self.conn.execute(
                select(t.nodes.c.node_id).where(t.nodes.c.node_id == node_id)
            ).first()
            values = dict(name=name, provider=provider, info=info, state=state, last_heartbeat=now)
            if exists:
                self.conn.execute(
                    update(t.nodes).where(t.nodes.c.node_id == node_id).values(**values)
                )
            else:
                self.conn.execute(t.nodes.insert().values(node_id=node_id, **values))

    def set_node_state(self, node_id: str, state: str) -> None:
        with self.conn.begin():
            self.conn.execute(
                update(t.nodes).where(t.nodes.c.node_id == node_id).values(state=state)
            )

    def insert_container(self, row: dict) -> None:
        with self.conn.begin():
            self.conn.execute(t.containers.insert().values(**row))

    def set_container_state(
        self, container_id: str, state: str, exit_reason: str | None = None
    ) -> None:
        values: dict = {"state": state}
        if state in ("stopped", "failed"):
            values["stopped_at"] = time.time()
        if exit_reason is not None:
            values["exit_reason"] = exit_reason
        with self.conn.begin():
            self.conn.execute(
                update(t.containers)
                .where(t.containers.c.container_id == container_id)
                .values(**values)
            )

    def stop_live_containers(self, reason: str) -> list[str]:
        """Mark every container not yet stopped as stopped (at start: an earlier epoch's)."""
        with self.conn.begin():
            ids = [
                r[0]
                for r in self.conn.execute(
                    select(t.containers.c.container_id).where(
                        t.containers.c.state.notin_(["stopped", "failed"])
                    )
                )
            ]
            if ids:
                self.conn.execute(
                    update(t.containers)
                    .where(t.containers.c.container_id.in_(ids))
                    .values(state="stopped", stopped_at=time.time(), exit_reason=reason)
                )
        return ids

    def containers(self, app_id: str | None = None, live_only: bool = True) -> list[dict]:
        q = select(t.containers).order_by(t.containers.c.started_at)
        if app_id:
            q = q.where(t.containers.c.app_id == app_id)
        if live_only:
            q = q.where(t.containers.c.state.notin_(["stopped", "failed"]))
        with self.conn.begin():
            return [dict(r._mapping) for r in self.conn.execute(q)]

    def nodes(self) -> list[dict]:
        with self.conn.begin():
            return [dict(r._mapping) for r in self.conn.execute(select(t.nodes))]

    def add_logs(self, rows: list[dict]) -> None:
        if rows:
            with self.conn.begin():
                self.conn.execute(self.q.insert_logs, rows)

    def logs_after(self, app_id: str, after: int, limit: int = 1000) -> list[dict]:
        with self.conn.begin():
            return [
                dict(r._mapping)
                for r in self.conn.execute(
                    self.q.logs_after, {"app_id": app_id, "after": after, "limit": limit}
                )
            ]
