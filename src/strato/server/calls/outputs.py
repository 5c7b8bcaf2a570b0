"""Outputs: each input's one final output and a generator's yielded values, written to the
store under a per-output sequence number, and the long-polls that read them.

A client reads a call's outputs after the last sequence number it has seen, so that one
that reconnects after a restart neither misses nor repeats outputs. Outputs are accepted
through the store's journal (`Store.accept_outputs`: durable on return, the database gets
them behind it) before any long-poll sees them, so an output a client has read is never
produced again after a crash. The long-polls of the calls this process created are
answered from a per-call buffer in memory (bounded in bytes); the store is read only when
the buffer does not reach back to what the client has seen (an old call, a restart, a
buffer dropped for room). A long-poll skips the store while it has seen everything
already (the last sequence number of each call with inputs in memory is kept here).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import cast

from strato.exceptions import NotFoundError
from strato.protocol import messages as m

from .. import metrics
from ..store import FinalRow, GenItemRow, OutputRow, Store
from ..store.blobs import BlobStore
from .state import Ledger, Pending, Status, Where

UNKNOWN_SEQ = 1 << 62  # outputs of a recovered call may exist: read the store
# outputs kept in memory for the long-polls of the calls this process created (their
# values over the blob threshold are blob keys here): past this, the oldest calls' are
# dropped, and their long-polls read the store
BUFFER_BYTES = 64 << 20
BUFFER_CALLS = 10_000


@dataclass(eq=False)
class _Buffer:
    """A call's outputs after ``floor`` (every one of them: the call was created here)."""

    floor: int = 0
    rows: list[OutputRow] = field(default_factory=list)
    nbytes: int = 0


def _size(r: OutputRow) -> int:
    return 64 + len(r.data or b"") + len(r.error or "") + len(r.traceback or "")


class Outputs:
    def __init__(
        self, store: Store, blobs: BlobStore, ledger: Ledger, *, blob_threshold: int
    ) -> None:
        self.store = store
        self.blobs = blobs
        self.ledger = ledger
        self.blob_threshold = blob_threshold
        self._events: dict[str, asyncio.Event] = {}
        # last output sequence number of each call with inputs in memory: lets a long-poll
        # skip the store when it has seen everything already
        self._last_seq: dict[str, int] = {}
        _, next_seq, _ = store.max_ids()
        self._next_seq = next_seq + 1
        self._buffers: OrderedDict[str, _Buffer] = OrderedDict()  # oldest call first
        self._buffered = 0  # bytes in all buffers
        self.buffer_bytes = BUFFER_BYTES
        self.buffer_calls = BUFFER_CALLS
        # without a journal an output is durable only once the database has it: the
        # long-polls read the store then, and no buffer is kept
        self._buffering = store.journaled
        # final outputs made and not yet accepted: input_id -> (call_id, the row to serve)
        self._staged: dict[int, tuple[str, OutputRow]] = {}

    def open(self, call_id: str) -> None:
        """A new call of this process: its long-polls are answered from memory."""
        if self._buffering and call_id not in self._buffers:
            self._buffers[call_id] = _Buffer()
            while len(self._buffers) > self.buffer_calls:
                self.forget(next(iter(self._buffers)))

    def forget(self, call_id: str) -> None:
        """Answer the call's long-polls from the store."""
        buf = self._buffers.pop(call_id, None)
        if buf is not None:
            self._buffered -= buf.nbytes

    def _keep(self, call_id: str, row: OutputRow) -> None:
        """``row`` is accepted (durable): long-polls may see it."""
        buf = self._buffers.get(call_id)
        if buf is None:
            return
        n = _size(row)
        buf.rows.append(row)
        buf.nbytes += n
        self._buffered += n
        while self._buffered > self.buffer_bytes and self._buffers:
            self.forget(next(iter(self._buffers)))  # the oldest calls read the store

    def _seq(self, call_id: str) -> int:
        s = self._next_seq
        self._next_seq += 1
        self._last_seq[call_id] = s
        return s

    def unknown(self, call_id: str) -> None:
        """A call recovered after a restart: its outputs may be in the store already."""
        self._last_seq[call_id] = UNKNOWN_SEQ

    def _offload(self, data: bytes | None, blob: str | None) -> tuple[bytes | None, str | None]:
        if data is not None and len(data) > self.blob_threshold:
            return None, self.blobs.put(data)
        return data, blob

    def final(
        self,
        p: Pending,
        status: Status,
        data: bytes | None = None,
        error: str | None = None,
        tb: str | None = None,
        blob: str | None = None,
        error_type: str | None = None,
    ) -> FinalRow:
        """End ``p`` with its final output; the row is written by ``flush``. ``error``
        is the failure's message, ``error_type`` its exception type."""
        data, blob = self._offload(data, blob)
        metrics.input_final(p.function_id, status, p.input_id)
        p.where = Where.DONE
        self.ledger.untrack(p)
        if p.session is not None:  # for the call graph
            self.ledger.ran_on.put(p.input_id, p.session.container_id)
        seq = self._seq(p.call_id)
        self._staged[p.input_id] = (
            p.call_id,
            OutputRow(p.idx, status, data, blob, error, tb, seq, None, error_type),
        )
        return FinalRow(p.input_id, status, data, blob, error, tb, seq, time.time(), error_type)

    def yielded(
        self, p: Pending, gen_index: int, data: bytes | None, blob: str | None
    ) -> GenItemRow:
        """One value a generator yielded; accepted by ``flush``."""
        data, blob = self._offload(data, blob)
        return GenItemRow(self._seq(p.call_id), p.call_id, p.idx, gen_index, data, blob)

    def flush(
        self, finals: list[FinalRow], calls: Iterable[str], gens: Iterable[GenItemRow] = ()
    ) -> None:
        """Accept yielded values and final outputs (durable on return), then let the
        long-polls of ``calls`` see them."""
        gens = list(gens)
        if finals or gens:
            self.store.accept_outputs(finals, gens)
        staged = [self._staged.pop(f.input_id, None) for f in finals]
        if self._buffers:  # in sequence order: a long-poll answers a prefix of them
            kept = [cr for cr in staged if cr is not None and cr[0] in self._buffers]
            kept += [
                (
                    g.call_id,
                    OutputRow(g.idx, "success", g.data, g.blob, None, None, g.seq, g.gen_index),
                )
                for g in gens
                if g.call_id in self._buffers
            ]
            kept.sort(key=lambda cr: cr[1].seq)
            for call_id, row in kept:
                self._keep(call_id, row)
        for call_id in calls:
            self._notify(call_id)
            if call_id not in self.ledger.live:
                self._last_seq.pop(call_id, None)

    def _notify(self, call_id: str) -> None:
        ev = self._events.pop(call_id, None)
        if ev is not None:
            ev.set()

    async def wait(self, call_id: str, after: int, timeout: float, limit: int) -> m.Outputs:
        """Outputs of ``call_id`` after sequence number ``after``, waiting up to
        ``timeout`` seconds for one."""
        deadline = time.monotonic() + max(0.0, timeout)
        ledger = self.ledger
        while True:
            ev = self._events.get(call_id)
            if ev is None:
                ev = self._events[call_id] = asyncio.Event()
            live = ledger.live.get(call_id)
            buf = self._buffers.get(call_id)
            if buf is not None and after >= buf.floor:  # every output after it is here
                if buf.floor < after < self._next_seq:  # the client has those: forget them
                    kept = [r for r in buf.rows if r.seq > after]
                    gone = sum(_size(r) for r in buf.rows) - sum(_size(r) for r in kept)
                    buf.rows, buf.floor = kept, after
                    buf.nbytes -= gone
                    self._buffered -= gone
                rows = [r for r in buf.rows if r.seq > after] if after > buf.floor else buf.rows
                if rows:
                    return _outputs(rows[:limit])
                if not live:  # every output is read: is the call complete?
                    n_inputs = await self._complete(call_id)
                    if n_inputs is not None:
                        self.forget(call_id)
                        return m.Outputs([], after, done=True, n_inputs=n_inputs)
            elif not live or self._last_seq.get(call_id, 0) > after:
                gens = (
                    not live
                    or ledger.functions[next(iter(live.values())).function_id].spec.is_generator
                )
                # reads run on the store's thread (after the writes queued before them),
                # not on the loop; ``ev`` is armed first, so no output is missed meanwhile
                store = self.store
                found = await store.aread(store.outputs_after, call_id, after, limit, gens)
                if found:
                    return _outputs(found)
            if not live and buf is None:  # nothing of it in memory: is it complete?
                n_inputs = await self._complete(call_id)
                if n_inputs is not None:
                    return m.Outputs([], after, done=True, n_inputs=n_inputs)
            if time.monotonic() >= deadline:
                return m.Outputs([], after)
            try:
                await asyncio.wait_for(ev.wait(), deadline - time.monotonic())
            except TimeoutError:
                pass

    async def _complete(self, call_id: str) -> int | None:
        """The call's number of inputs when it is closed and each has its output in the
        store; None while it is not."""
        store = self.store
        call = await store.aread(store.call_row, call_id)
        if call is None:
            raise NotFoundError(f"call {call_id} does not exist (or its outputs expired)")
        if call.closed and await store.aread(store.count_done, call_id) >= call.n_inputs:
            return call.n_inputs
        return None


def _outputs(found: list[OutputRow]) -> m.Outputs:
    items = [
        m.OutputItem(
            r.idx,
            cast(Status, r.status),  # the store keeps what final() was given
            r.data,
            r.blob,
            r.error,
            r.traceback,
            r.seq,
            r.gen_index,
            error_type=r.error_type,
        )
        for r in found
    ]
    return m.Outputs(items, items[-1].seq)
