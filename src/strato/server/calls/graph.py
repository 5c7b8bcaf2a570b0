"""The call graph: a call made from inside a container records the input that made it
(``parent_input_id``) and that container's app (``caller_app_id``).

- Cancelling a call cancels the calls its inputs made, and theirs, recursively; so does
  cancelling inputs on their own (an app stopped, inputs withdrawn). The walk reads the
  store on its writer thread (`Store.aread`), never on the event loop.
- `CallTree.graph` is a call's tree: its inputs, the calls each made and their inputs,
  level by level, bounded in depth and size, with Modal's input statuses.
- `CallTree.call_owner` says which apps may reach a call, from memory for the calls this
  process made (`Owners`), else from the store.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Generator
from typing import TYPE_CHECKING

import msgspec

from strato.exceptions import NotFoundError
from strato.protocol import messages as m

from ..store import Store
from ..store.rows import CallGraphRows
from .state import Ledger, Recent

if TYPE_CHECKING:
    from .failures import Failures

log = logging.getLogger("strato.calls")

OWNERS_KEPT = 100_000  # calls whose owners are remembered (the rest are read from the store)
MAX_GRAPH_DEPTH = 32  # levels of calls in one graph
MAX_GRAPH_INPUTS = 10_000  # inputs in one graph
MAX_CASCADE_CALLS = 100_000  # calls one cancellation walks through
CASCADE_ROUNDS = 8  # walks after a cancellation, while each finds calls made meanwhile

_spec_decoder = msgspec.msgpack.Decoder(m.FunctionSpec)


class Owners:
    """Who may reach the calls made lately: call id -> (the app of its function, the app
    whose container made it or None, when it expires)."""

    def __init__(self, limit: int = OWNERS_KEPT) -> None:
        self._kept: Recent[str, tuple[str, str | None, float]] = Recent(limit)

    def note(self, call_id: str, app_id: str, caller_app_id: str | None, expires_at: float) -> None:
        self._kept.put(call_id, (app_id, caller_app_id, expires_at))

    def get(self, call_id: str) -> tuple[str, str | None] | None:
        found = self._kept.get(call_id)
        if found is None:
            return None
        if found[2] <= time.time():  # expired: the store says whether it is still there
            self._kept.pop(call_id)
            return None
        return found[0], found[1]

    def drop(self, call_id: str) -> None:
        self._kept.pop(call_id)


_STATUS: dict[str | None, m.InputStatusName] = {
    None: "PENDING",
    "success": "SUCCESS",
    "failure": "FAILURE",
    "died": "FAILURE",
    "timeout": "TIMEOUT",
    "cancelled": "TERMINATED",
}


class CallTree:
    def __init__(
        self,
        store: Store,
        ledger: Ledger,
        failures: Failures,
        owners: Owners,
    ) -> None:
        self.store = store
        self.ledger = ledger
        self.failures = failures
        self.owners = owners
        self._tasks: set[asyncio.Task[int]] = set()
        failures.on_inputs_cancelled = self._inputs_cancelled

    # ------------------------------------------------------------------ owners

    async def call_owner(self, call_id: str) -> tuple[str, str | None] | None:
        """(the app of the call's function, the app whose container made the call or
        None), or None when there is no such call. From memory for the calls this
        process made lately; else one read on the store's thread."""
        found = self.owners.get(call_id)
        if found is not None:
            return found
        row = await self.store.aread(self.store.call_owner, call_id)
        if row is None:
            return None
        app_id, caller_app_id, expires_at = row
        self.owners.note(call_id, app_id, caller_app_id, expires_at)
        return app_id, caller_app_id

    # ------------------------------------------------------------------ cancellation

    def cancel_call(self, call_id: str, terminate_containers: bool) -> Awaitable[int]:
        """Cancel the call (at once: its inputs not ended are cancelled on return), then
        every call made by its inputs, recursively, with the same
        ``terminate_containers``. Returns what ends when those are cancelled too (their
        number); awaiting it is optional (the walk runs on its own)."""
        if self.owners.get(call_id) is None and self.store.call_row(call_id) is None:
            raise NotFoundError(f"call {call_id} does not exist (or has expired)")
        self.failures.cancel_calls([call_id], terminate_containers, "the call was cancelled")
        return self._cascade([call_id], [], terminate_containers)

    def _inputs_cancelled(self, input_ids: list[int], terminate: bool) -> None:
        self._cascade([], input_ids, terminate)

    def _cascade(
        self, call_ids: list[str], input_ids: list[int], terminate: bool
    ) -> Awaitable[int]:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no event loop (a tool, a test): walk here
            n = self._walk(
                lambda: self.store.descendant_calls(call_ids, input_ids, MAX_CASCADE_CALLS),
                terminate,
            )
            return _Done(n)
        task = loop.create_task(self._walk_async(call_ids, input_ids, terminate))
        self._tasks.add(task)
        task.add_done_callback(self._walked)
        return task

    def _walked(self, task: asyncio.Task[int]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("cancelling the calls made by cancelled inputs failed: %s", task.exception())

    async def _walk_async(self, call_ids: list[str], input_ids: list[int], terminate: bool) -> int:
        total = 0
        for _ in range(CASCADE_ROUNDS):
            found, more = await self.store.aread(
                self.store.descendant_calls, call_ids, input_ids, MAX_CASCADE_CALLS
            )
            total += self._end(found, terminate, more)
            if not found:
                break
        return total

    def _walk(self, find: Callable[[], tuple[list[str], bool]], terminate: bool) -> int:
        total = 0
        for _ in range(CASCADE_ROUNDS):
            found, more = find()
            total += self._end(found, terminate, more)
            if not found:
                break
        return total

    def _end(self, found: list[str], terminate: bool, more: bool) -> int:
        if more:
            log.warning(
                "a cancelled call has more than %d calls below it; the rest are not cancelled",
                MAX_CASCADE_CALLS,
            )
        if found:
            self.failures.cancel_calls(found, terminate, "the call's parent was cancelled")
        return len(found)

    async def settled(self) -> None:
        """Wait until every cancellation walk started so far has ended (tests)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    # ------------------------------------------------------------------ the graph

    async def graph(self, call_id: str) -> m.CallGraph:
        """The call's inputs, each with the inputs of the calls it made, recursively (at
        most ``MAX_GRAPH_DEPTH`` levels and ``MAX_GRAPH_INPUTS`` inputs)."""
        rows = await self.store.aread(
            self.store.call_graph, call_id, MAX_GRAPH_DEPTH, MAX_GRAPH_INPUTS
        )
        if rows is None:
            raise NotFoundError(f"call {call_id} does not exist (or has expired)")
        return self._build(rows)

    def _names(self, rows: CallGraphRows) -> dict[str, tuple[str, str]]:
        """function_id -> (its name, its module)."""
        out: dict[str, tuple[str, str]] = {}
        for f in rows.functions:
            fn = self.ledger.functions.get(f.function_id)
            if fn is not None:
                out[f.function_id] = (fn.name, fn.spec.module)
                continue
            try:
                module = _spec_decoder.decode(f.spec).module
            except msgspec.DecodeError:
                module = ""
            out[f.function_id] = (f.name, module)
        return out

    def _build(self, rows: CallGraphRows) -> m.CallGraph:
        names = self._names(rows)
        calls = {c.call_id: c for c in rows.calls}
        by_call: dict[str, list[m.GraphInput]] = {}
        by_id: dict[int, m.GraphInput] = {}
        ledger = self.ledger
        for r in rows.inputs:
            call = calls[r.call_id]
            name, module = names.get(call.function_id, ("", ""))
            if call.method and not name.endswith(f".{call.method}"):
                name = f"{name}.{call.method}"
            status = _STATUS.get(r.out_status, "FAILURE")
            if status == "FAILURE" and r.input_id in ledger.init_failed:
                status = "INIT_FAILURE"
            task_id = ledger.ran_on.get(r.input_id) or ""
            if r.out_status is None:
                p = ledger.live.get(r.call_id, {}).get(r.input_id)
                task_id = p.session.container_id if p is not None and p.session else ""
            node = m.GraphInput(str(r.input_id), r.call_id, task_id, status, name, module, [])
            by_call.setdefault(r.call_id, []).append(node)
            by_id[r.input_id] = node
        for c in rows.calls[1:]:  # in the order they were made
            parent = by_id.get(c.parent_input_id) if c.parent_input_id is not None else None
            if parent is not None:
                parent.children.extend(by_call.get(c.call_id, ()))
        return m.CallGraph(by_call.get(rows.calls[0].call_id, []), rows.truncated)


class _Done:
    """An awaitable of a number known at once (made where no event loop runs)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __await__(self) -> Generator[None, None, int]:
        return _result(self.n).__await__()


async def _result(n: int) -> int:
    return n
