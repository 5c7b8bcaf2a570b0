"""Dispatch: inputs ready to run wait in their function's queue; a ready container takes
them under a lease (a dispatch token), as many at once as its slots allow, and more for
a fast function (prefetch), so that a container is never idle between inputs."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from strato.protocol import messages as m

from ..store.blobs import BlobStore
from .state import FunctionQueue, Lease, Ledger, Pending, Where

MAX_PREFETCH = 256  # inputs in flight to one sequential container when the function is fast
FAST_FUNCTION_S = 0.005
SCALE_DRAIN_S = 0.5  # a container is "full" when its share of the backlog takes this long


def slots(fn: FunctionQueue) -> int:
    """Inputs one container runs at once: ``@concurrent``'s max_inputs, a ``@batched``
    function's batch size, else one."""
    return max(fn.spec.max_inputs, fn.spec.batch_max_size or 1)


def target_inputs(fn: FunctionQueue) -> int:
    """Inputs one container should carry, for the autoscaler: one for a function of
    unknown or long run time; for fast ones, as many as it runs in ``SCALE_DRAIN_S``
    (a no-op map needs a few containers, not one per input)."""
    spec = fn.spec
    if spec.max_inputs > 1:
        return spec.target_inputs or spec.max_inputs
    if spec.batch_max_size:
        return spec.batch_max_size
    if fn.ewma_duration is None:
        return 1
    return max(1, int(SCALE_DRAIN_S / max(fn.ewma_duration, 1e-4)))


class Dispatcher:
    def __init__(self, ledger: Ledger, blobs: BlobStore, wake_scaler: Callable[[], None]) -> None:
        self.ledger = ledger
        self.blobs = blobs
        self._wake_scaler = wake_scaler
        self._next_token = 1

    def enqueue(self, fn: FunctionQueue, pendings: list[Pending], front: bool = False) -> None:
        """Queue inputs (at the front: those that go back after their container ended)
        and hand what the function's ready containers can take to them."""
        for p in pendings:
            self.ledger.track(p)
            p.where = Where.QUEUED
            p.session = None
        if front:
            fn.queue.extendleft(reversed(pendings))
        else:
            fn.queue.extend(pendings)
        fn.last_activity = time.monotonic()
        self.pump(fn)
        if fn.queue:
            self._wake_scaler()

    def _capacity(self, fn: FunctionQueue, n_ready: int) -> int:
        n = slots(fn)
        if fn.ewma_duration is None or fn.ewma_duration > FAST_FUNCTION_S:
            return n
        share = math.ceil((len(fn.queue) + self.ledger.inflight(fn)) / max(1, n_ready))
        return max(n, min(MAX_PREFETCH, share))

    def _args_of(self, p: Pending) -> bytes:
        if p.args is not None:
            return p.args
        assert p.args_blob is not None  # an input carries one or the other
        return self.blobs.get(p.args_blob)

    def pump(self, fn: FunctionQueue) -> None:
        """Lease queued inputs to the function's ready containers, least loaded first."""
        if not fn.queue:
            return
        ready = self.ledger.containers.ready_of(fn.function_id)
        if not ready:
            return
        ready.sort(key=lambda s: len(s.inflight))
        cap = self._capacity(fn, len(ready))
        now = time.monotonic()
        for s in ready:
            room = cap - len(s.inflight)
            if room <= 0:
                continue
            batch: list[m.TaskInput] = []
            while room > 0 and fn.queue:
                p = fn.queue[0]
                if p.where != Where.QUEUED:
                    fn.queue.popleft()
                    continue
                if p.solo:
                    if s.inflight or batch:
                        break  # it waits for a container with nothing else to run
                    room = 1
                fn.queue.popleft()
                token = self._next_token
                self._next_token += 1
                p.where, p.session = Where.LEASED, s
                if not s.inflight:
                    s.last_progress = now
                s.inflight[p.input_id] = Lease(p, token, now)
                s.idle_since = None
                batch.append(m.TaskInput(p.input_id, token, self._args_of(p), p.method, p.call_id))
                room -= 1
            if batch:
                s.send(m.RunInputs(batch))
            if not fn.queue:
                break
