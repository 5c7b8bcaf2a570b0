"""Outputs: each input's one final output and a generator's yielded values, written to the
store under a per-output sequence number, and the long-polls that read them.

A client reads a call's outputs after the last sequence number it has seen, so that one
that reconnects after a restart neither misses nor repeats outputs. A long-poll skips the
store while it has seen everything already (the last sequence number of each call with
inputs in memory is kept here).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from typing import cast

from strato.exceptions import NotFoundError
from strato.protocol import messages as m

from ..store import FinalRow, GenItemRow, OutputRow, Store
from ..store.blobs import BlobStore
from .state import Ledger, Pending, Status, Where

UNKNOWN_SEQ = 1 << 62  # outputs of a recovered call may exist: read the store


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
        p.where = Where.DONE
        self.ledger.untrack(p)
        seq = self._seq(p.call_id)
        return FinalRow(p.input_id, status, data, blob, error, tb, seq, time.time(), error_type)

    def yielded(
        self, p: Pending, gen_index: int, data: bytes | None, blob: str | None
    ) -> GenItemRow:
        """One value a generator yielded; written by ``add_gen_items``."""
        data, blob = self._offload(data, blob)
        return GenItemRow(self._seq(p.call_id), p.call_id, p.idx, gen_index, data, blob)

    def add_gen_items(self, items: list[GenItemRow]) -> None:
        self.store.add_gen_item_rows(items)

    def flush(self, finals: list[FinalRow], calls: Iterable[str]) -> None:
        """Write final outputs and wake the long-polls of ``calls``."""
        self.store.finish_input_rows(finals)
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
            if not live or self._last_seq.get(call_id, 0) > after:
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
            if not live:  # nothing of it in memory: ask the store whether it is complete
                call = await self.store.aread(self.store.call_row, call_id)
                if call is None:
                    raise NotFoundError(f"call {call_id} does not exist (or its outputs expired)")
                done = (
                    call.closed
                    and await self.store.aread(self.store.count_done, call_id) >= call.n_inputs
                )
                if done:
                    return m.Outputs([], after, done=True, n_inputs=call.n_inputs)
            if time.monotonic() >= deadline:
                return m.Outputs([], after)
            try:
                await asyncio.wait_for(ev.wait(), deadline - time.monotonic())
            except TimeoutError:
                pass


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
