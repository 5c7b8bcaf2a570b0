"""Intake: a call's inputs are accepted by the store (its journal: durable, the database
gets them behind it) before the API answers (an accepted input is never lost), then
queued; after a restart, every input without a final output is queued again."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, replace

import msgspec

from strato.exceptions import (
    AlreadyExistsError,
    AppStoppedError,
    InvalidError,
    NotFoundError,
    RequestSizeError,
)
from strato.protocol import messages as m

from .. import metrics
from ..store import CallRow, FinalRow, InputRow, Store, Write
from ..store.blobs import BlobStore
from .dispatch import Dispatcher
from .failures import Failures
from .graph import Owners
from .outputs import Outputs
from .state import AppState, FunctionQueue, Ledger, Pending, Where

log = logging.getLogger("strato.calls")

RECENT_CALLS = 100_000  # call ids remembered as this process's own
# calls of this process whose row (and input indices) are kept in memory, so that adding
# inputs to them reads nothing from the store; past these bounds, the store answers
KNOWN_CALLS = 10_000
KNOWN_IDX = 100_000


@dataclass(eq=False)
class _Known:
    call: CallRow  # as the store has it once every write queued so far is in
    idx: set[int]  # the indices of its inputs


class Intake:
    def __init__(
        self,
        store: Store,
        blobs: BlobStore,
        ledger: Ledger,
        dispatcher: Dispatcher,
        failures: Failures,
        outputs: Outputs,
        *,
        blob_threshold: int,
        max_payload: int,
        retention_s: float,
        owners: Owners | None = None,
    ) -> None:
        self.store = store
        self.blobs = blobs
        self.ledger = ledger
        self.dispatcher = dispatcher
        self.failures = failures
        self.outputs = outputs
        self.owners = owners if owners is not None else Owners()
        self.blob_threshold = blob_threshold
        self.max_payload = max_payload
        self.retention_s = retention_s
        next_input, _, _ = store.max_ids()
        self._next_input = next_input + 1
        # ids of the calls this process created (the newest): a request that names one
        # again is a retry, known without asking the store
        self._created: OrderedDict[str, None] = OrderedDict()
        self._known: OrderedDict[str, _Known] = OrderedDict()

    def _inputs(
        self, fn: FunctionQueue, call_id: str, method: str | None, items: Iterable[m.InputItem]
    ) -> tuple[list[InputRow], list[Pending]]:
        new: list[InputRow] = []
        pendings: list[Pending] = []
        seen: set[int] = set()
        for it in items:
            if it.idx in seen:
                raise InvalidError(
                    f"input index {it.idx} appears twice in one request for call {call_id}; "
                    "each input of a call needs its own index"
                )
            seen.add(it.idx)
            args, blob = it.args, it.blob
            if args is None and blob is None:
                raise InvalidError(f"input {it.idx} of call {call_id} carries no arguments")
            if args is not None and len(args) > self.max_payload:
                raise RequestSizeError(
                    f"input {it.idx} is {len(args)} bytes, over the limit of {self.max_payload} "
                    "bytes (STRATO_MAX_PAYLOAD); pass large data through a Volume or blob"
                )
            if args is not None and len(args) > self.blob_threshold:
                blob, args = self.blobs.put(args), None
            if blob is not None and not self.blobs.has(blob):
                raise InvalidError(f"input {it.idx} names blob {blob}, which was never uploaded")
            p = Pending(self._next_input, call_id, it.idx, fn.function_id, args, blob, method)
            self._next_input += 1
            new.append(InputRow(p.input_id, call_id, it.idx, args, blob))
            pendings.append(p)
        return new, pendings

    @staticmethod
    def _check_callable(fn: FunctionQueue) -> None:
        if fn.app_state == AppState.STOPPED:
            raise AppStoppedError(
                f"function {fn.name!r} belongs to an app that has been stopped; "
                "run or deploy the app again to call it"
            )

    async def create_call(
        self,
        req: m.CreateCall,
        *,
        parent_input_id: int | None = None,
        caller_app_id: str | None = None,
    ) -> None:
        """Accept a new call with its first inputs and queue them. The answer waits for
        the store's journal only (durable on return: see `Store.accept_call`); the
        inputs run while the database writes the call behind it.

        A call made from inside a container names the input that made it
        (``parent_input_id``: cancelling that input's call cancels this one) and that
        container's app (``caller_app_id``: it may read and cancel the call)."""
        fn = self.ledger.function(req.function_id)
        self._check_callable(fn)
        items = await self._offload(req.inputs)
        new, pendings = self._inputs(fn, req.call_id, req.method, items)
        now = time.time()
        call = CallRow(
            call_id=req.call_id,
            function_id=fn.function_id,
            kind=req.kind,
            method=req.method,
            n_inputs=len(new),
            closed=req.closed,
            cancelled=False,
            created_at=now,
            expires_at=now + self.retention_s,
            parent_input_id=parent_input_id,
            caller_app_id=caller_app_id,
        )
        if req.call_id in self._created:  # a retried request: add only what is missing
            self._next_input -= len(new)
            self._retried(req)
            return
        w = self.store.accept_call(call, new)
        self._known[req.call_id] = _Known(call, {r.idx for r in new})
        while len(self._known) > KNOWN_CALLS:
            self._known.popitem(last=False)
        self._created[req.call_id] = None
        while len(self._created) > RECENT_CALLS:
            self._created.popitem(last=False)
        self.owners.note(req.call_id, fn.app_id, caller_app_id, call.expires_at)
        if w.done() and w.exception() is None and not w.result():  # known at once
            self.forget_call(req.call_id)
            self.owners.drop(req.call_id)
            self._next_input -= len(new)
            self._retried(req)
            return
        self.outputs.open(req.call_id)
        self._accepted(fn, pendings)  # every later write of theirs is queued after it
        loop = asyncio.get_running_loop()

        def settled(_f: object) -> None:  # on the store's writer thread
            if w.exception() is not None or not w.result():
                loop.call_soon_threadsafe(self._settle, req, pendings, w)

        w.add_done_callback(settled)

    async def _offload(self, items: list[m.InputItem]) -> list[m.InputItem]:
        """Arguments over the blob threshold go to the blob store (hashed and written
        off the loop); the inputs then carry the key."""
        out = items
        for i, it in enumerate(items):
            args = it.args
            if args is not None and self.blob_threshold < len(args) <= self.max_payload:
                if out is items:
                    out = list(items)
                out[i] = msgspec.structs.replace(it, args=None, blob=await self.blobs.aput(args))
        return out

    def _settle(self, req: m.CreateCall, pendings: list[Pending], w: Write[bool]) -> None:
        """The database did not take the accepted call as new. A call of that id that
        existed before this process started (a client that retried across a restart)
        keeps what it has, and what this request queued is withdrawn (its rows were
        never written)."""
        e = w.exception()
        if e is not None:  # logged by the store; the journal has it for the next start
            log.error("call %s: the database did not take the call: %s", req.call_id, e)
            return
        self.failures.withdraw(pendings)
        self.outputs.forget(req.call_id)
        self.forget_call(req.call_id)
        self.owners.drop(req.call_id)
        try:
            self._retried(req)
        except Exception as e:
            log.warning("call %s: a retried request refused after its answer: %s", req.call_id, e)

    async def settled(self) -> None:
        """Wait until the database has settled every call accepted so far (tests): each
        call it did not take as new is handled by then."""
        await self.store.aflush()
        await asyncio.sleep(0)

    def _retried(self, req: m.CreateCall) -> None:
        """A call with this id exists: add the inputs it lacks (a client that retried
        after a lost answer), unless it is another function's."""
        known, _ = self._call(req.call_id)
        if known is not None and (
            known.function_id != req.function_id or known.method != req.method
        ):
            raise AlreadyExistsError(
                f"call id {req.call_id} is taken by a call of another function"
                f"{' or method' if known.function_id == req.function_id else ''}; "
                "choose a new call id for a new call"
            )
        self.add_inputs(req.call_id, m.AddInputs(req.inputs, closed=req.closed))

    def forget_call(self, call_id: str) -> None:
        """Read the call from the store from now on (it was cancelled, or not ours)."""
        self._known.pop(call_id, None)

    def _call(self, call_id: str) -> tuple[CallRow | None, _Known | None]:
        """The call's row: from memory for a call of this process, else from the store."""
        known = self._known.get(call_id)
        if known is not None:
            if known.call.expires_at > time.time():
                return known.call, known
            self.forget_call(call_id)
        return self.store.call_row(call_id), None

    def add_inputs(self, call_id: str, req: m.AddInputs) -> None:
        call, known = self._call(call_id)
        if call is None:
            raise NotFoundError(f"call {call_id} does not exist (or has expired)")
        fn = self.ledger.function(call.function_id)
        self._check_callable(fn)
        if call.cancelled:
            raise InvalidError(f"call {call_id} was cancelled; it takes no more inputs")
        items = req.inputs
        if items:
            have = (
                known.idx
                if known is not None
                else self.store.existing_idx(
                    call_id, min(i.idx for i in items), max(i.idx for i in items)
                )
            )
            items = [i for i in items if i.idx not in have]
        new, pendings = self._inputs(fn, call_id, call.method, items)
        n_inputs = call.n_inputs + len(new)
        if req.total is not None:
            n_inputs = max(n_inputs, req.total)
        self.store.accept_inputs(call_id, new, req.closed or None, n_inputs)  # durable
        if known is not None:
            known.call = replace(call, n_inputs=n_inputs, closed=call.closed or req.closed)
            known.idx.update(r.idx for r in new)
            if len(known.idx) > KNOWN_IDX:
                self.forget_call(call_id)
        self._accepted(fn, pendings)

    def _accepted(self, fn: FunctionQueue, pendings: list[Pending]) -> None:
        """New inputs (not retries): an arrival for the autoscaler, then queued."""
        if pendings:
            self.ledger.on_arrival(fn.function_id, time.monotonic())
            metrics.inputs_accepted(pendings)
        self.dispatcher.enqueue(fn, pendings)

    def recover(self) -> int:
        """Re-queue every input the store holds without a final output (after a restart)."""
        found = self.store.pending_inputs()
        now = time.time()
        stopped: list[FinalRow] = []
        by_fn: dict[str, list[Pending]] = {}
        for r in found:
            try:
                fn = self.ledger.function(r.function_id)
            except NotFoundError:
                continue
            p = Pending(
                r.input_id,
                r.call_id,
                r.idx,
                r.function_id,
                r.args,
                r.args_blob,
                r.method,
                attempts=r.attempts,
            )
            self.ledger.track(p)
            self.outputs.unknown(p.call_id)
            if fn.app_state == AppState.STOPPED:
                stopped.append(
                    self.outputs.final(
                        p, "cancelled", None, "the app was stopped", error_type="AppStoppedError"
                    )
                )
            elif r.retry_at and r.retry_at > now:
                p.where = Where.RETRY
                asyncio.get_running_loop().call_later(r.retry_at - now, self.failures.retry_due, p)
            else:
                by_fn.setdefault(r.function_id, []).append(p)
        self.outputs.flush(stopped, ())
        for fid, ps in by_fn.items():
            self.dispatcher.enqueue(self.ledger.functions[fid], ps)
        return len(found)
