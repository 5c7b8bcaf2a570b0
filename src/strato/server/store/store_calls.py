"""The call tables' methods of `Store`: calls, their inputs, outputs and generator
items, cancellation, the call graph, recovery and expiry, with the typed forms of the rows
(`rows.py`) and their bind parameters. :class:`StoreCalls` is a base of
:class:`~strato.server.store.store.Store`; its state is declared in `store_tables.py`.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import Connection, and_, delete, select, update
from sqlalchemy.exc import IntegrityError

from . import schema as t
from .hot import with_defaults
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
from .store_tables import StoreTables, run_statement
from .writer import Write

T = TypeVar("T")


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


# (a Hot statement on SQLite raises the driver's own error)
INTEGRITY = (IntegrityError, sqlite3.IntegrityError)
CALL_DEFAULTS = with_defaults(t.calls)
INPUT_DEFAULTS = with_defaults(t.inputs)


class StoreCalls(StoreTables):
    """The call tables' methods (a base of ``Store``)."""

    if TYPE_CHECKING:  # Store's own

        def function(self, function_id: str) -> dict | None: ...

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

        call = {**CALL_DEFAULTS, **row}
        inputs = [{**INPUT_DEFAULTS, **r} for r in input_rows]

        def run(c: Connection) -> bool:
            q.insert_call(c, call)
            if inputs:
                q.insert_inputs(c, inputs)
            return True

        def recover(c: Connection, e: BaseException) -> bool:
            if isinstance(e, INTEGRITY) and c.execute(q.call, row).first() is not None:
                return False
            raise e

        return self._write("create_call", run, recover, journal_seq, linger=journal_seq > 0)

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
        inputs = [{**INPUT_DEFAULTS, **r} for r in rows]

        def run(c: Connection) -> None:
            if inputs:
                q.insert_inputs(c, inputs)
            if values:
                c.execute(update(t.calls).where(t.calls.c.call_id == call_id).values(**values))

        return self._write("add_inputs", run, None, journal_seq, linger=journal_seq > 0)

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
        return self._write("cancel_call", run_statement(stmt))

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
