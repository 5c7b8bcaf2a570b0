"""Failures: a failed attempt is retried per the function's ``RetryPolicy`` or ends its
input; a lease also ends with its container's death, a timeout or a cancellation."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable

from strato.protocol import messages as m

from .. import metrics
from ..store import FinalRow, Store
from .dispatch import Dispatcher, slots
from .outputs import Outputs
from .state import ContainerRef, FunctionQueue, Lease, Ledger, Pending, Status, Where

log = logging.getLogger("strato.calls")


class Failures:
    def __init__(
        self,
        store: Store,
        ledger: Ledger,
        outputs: Outputs,
        dispatcher: Dispatcher,
        kill_container: Callable[[str, str], None],
    ) -> None:
        self.store = store
        self.ledger = ledger
        self.outputs = outputs
        self.dispatcher = dispatcher
        self._kill_container = kill_container
        self.on_cancel: Callable[[str], None] = lambda call_id: None  # a call was cancelled
        # inputs were cancelled (their ids, terminate_containers): the calls they made are
        # cancelled too (``graph.CallTree``)
        self.on_inputs_cancelled: Callable[[list[int], bool], None] = lambda ids, terminate: None

    # ------------------------------------------------------------------ attempts

    def attempt_failed(
        self,
        fn: FunctionQueue,
        p: Pending,
        status: Status,
        data: bytes | None,
        error: str | None,
        tb: str | None,
        blob: str | None = None,
        error_type: str | None = None,
    ) -> FinalRow | None:
        """Retry per policy (returns None) or end the input (returns its final row)."""
        p.attempts += 1
        policy = fn.spec.retries
        if p.attempts <= policy.max_retries and not fn.spec.is_generator:
            delay = policy.delay(p.attempts)
            metrics.input_retry(fn.function_id)
            self.store.set_attempts([(p.input_id, p.attempts, time.time() + delay)])
            p.where, p.session = Where.RETRY, None
            log.info(
                "input %s of %s failed (%s); retry %d in %.1fs",
                p.idx,
                fn.name,
                f"{error_type}: {error}" if error_type else error,
                p.attempts,
                delay,
            )
            asyncio.get_running_loop().call_later(delay, self.retry_due, p)
            return None
        return self.outputs.final(p, status, data, error, tb, blob, error_type)

    def retry_due(self, p: Pending) -> None:
        if p.where != Where.RETRY:
            return
        fn = self.ledger.functions.get(p.function_id)
        if fn is not None:
            self.dispatcher.enqueue(fn, [p])

    # ------------------------------------------------------------------ containers ending

    def release_leases(
        self,
        session: ContainerRef,
        running: int,
        status: Status,
        error: str,
        *,
        error_type: str | None = None,
        known: bool = True,
    ) -> None:
        """A container is gone (or being killed): its first ``running`` leases count as
        failed attempts with ``status``; the rest never started and go back to the queue.

        ``known=False`` (the container died) says that which lease was running is not
        known: a container holds many inputs of a fast function, and outputs of finished
        ones may have died with it. Unless it held just one, none is blamed: each goes back
        to run alone, so that an input that kills its container fails on its own.
        ``error`` is the failure's message, ``error_type`` its exception type."""
        fn = self.ledger.functions.get(session.function_id)
        leases = list(session.inflight.values())
        session.inflight.clear()
        if fn is None or not leases:
            return
        finals: list[FinalRow] = []
        requeue: list[Pending] = []
        held = [
            lease
            for lease in leases
            if lease.pending.where == Where.LEASED and lease.pending.session is session
        ]
        if running and not known and len(held) > 1:
            for lease in held:
                lease.pending.solo = True
            running = 0
        for i, lease in enumerate(leases):
            p = lease.pending
            if p.where != Where.LEASED or p.session is not session:
                continue
            if i < running:
                row = self.attempt_failed(fn, p, status, None, error, None, None, error_type)
                if row:
                    finals.append(row)
            else:
                requeue.append(p)
        self.outputs.flush(finals, {lease.pending.call_id for lease in leases})
        if requeue:
            self.dispatcher.enqueue(fn, requeue, front=True)

    def fail_queued(
        self,
        function_id: str,
        error: str,
        data: bytes | None = None,
        tb: str | None = None,
        count_attempt: bool = True,
        error_type: str | None = None,
        init_failure: bool = False,
    ) -> None:
        """Fail (or retry) every queued input of a function: its containers cannot start
        (``init_failure``: a container's start-up code failed)."""
        fn = self.ledger.functions.get(function_id)
        if fn is None or not fn.queue:
            return
        queued = [p for p in fn.queue if p.where == Where.QUEUED]
        fn.queue.clear()
        finals = []
        for p in queued:
            row: FinalRow | None
            if count_attempt:
                row = self.attempt_failed(fn, p, "failure", data, error, tb, None, error_type)
            else:
                row = self.outputs.final(p, "failure", data, error, tb, None, error_type)
            if row:
                finals.append(row)
                if init_failure:
                    self.ledger.init_failed.put(row.input_id, None)
        self.outputs.flush(finals, {p.call_id for p in queued})

    # ------------------------------------------------------------------ timeouts

    def check_timeouts(self, now: float) -> None:
        for fn in list(self.ledger.functions.values()):
            try:
                self._check_timeouts(fn, now)
            except Exception:  # one function's bug must not stop the others' timeouts
                log.exception("checking the timeouts of %s failed", fn.name)

    def _check_timeouts(self, fn: FunctionQueue, now: float) -> None:
        spec = fn.spec
        parallel = spec.max_inputs > 1 or spec.batch_max_size > 0
        limit = spec.timeout + spec.batch_wait_ms / 1000
        for s in list(self.ledger.containers.of_function(fn.function_id)):
            if not s.inflight or s.state not in ("ready", "stopping"):
                continue
            if parallel:  # inputs start when they arrive, up to the container's slots
                running = list(s.inflight.values())[: slots(fn)]
                late = [lease for lease in running if now - lease.dispatched_at > limit]
            else:  # one at a time: the first lease runs since the last output
                first = next(iter(s.inflight.values()))
                started = max(first.dispatched_at, s.last_progress)
                late = [first] if now - started > limit else []
            if late:
                self._time_out(fn, s, late)

    def _time_out(self, fn: FunctionQueue, s: ContainerRef, late: list[Lease]) -> None:
        kind, error = (
            "FunctionTimeoutError",
            f"the input ran past the function's timeout of {fn.spec.timeout:g}s",
        )
        log.info("%d input(s) of %s timed out; killing %s", len(late), fn.name, s.container_id)
        self.ledger.containers.mark_killing(s)
        finals = []
        for lease in late:
            s.inflight.pop(lease.pending.input_id, None)
            row = self.attempt_failed(fn, lease.pending, "timeout", None, error, None, None, kind)
            if row:
                finals.append(row)
        self.outputs.flush(finals, {lease.pending.call_id for lease in late})
        self.release_leases(s, 0, "timeout", error, error_type=kind)  # none else ran too long
        self._kill_container(s.container_id, "an input ran past its timeout")

    # ------------------------------------------------------------------ cancellation

    def cancel_calls(self, call_ids: list[str], terminate: bool, error: str) -> None:
        """Mark calls that exist cancelled and cancel their inputs not ended (not the
        calls those made: see ``graph.CallTree.cancel_call``)."""
        if len(call_ids) == 1:
            self.store.cancel_call(call_ids[0])
        else:
            self.store.cancel_calls(call_ids)
        pendings: list[Pending] = []
        for call_id in call_ids:
            self.on_cancel(call_id)
            pendings += self.ledger.live.get(call_id, {}).values()
        self.cancel_inputs(pendings, terminate, error, "InputCancellation", cascade=False)

    def withdraw(self, pendings: list[Pending]) -> None:
        """Forget inputs that were never stored: out of the queue, their leases ended
        (their containers are told to cancel them), no output; the calls they made are
        cancelled."""
        by_session = self._take_off_containers(pendings)
        for p in pendings:
            p.where, p.session = Where.DONE, None
            self.ledger.untrack(p)
        for s, ids in by_session.items():
            s.send(m.CancelInputs(ids))
        self._drop_from_queues(pendings, [])
        if pendings:
            self.on_inputs_cancelled([p.input_id for p in pendings], False)

    def _take_off_containers(self, pendings: list[Pending]) -> dict[ContainerRef, list[int]]:
        """End the leases of those of ``pendings`` that a container holds: the ids each
        container must be told about."""
        by_session: dict[ContainerRef, list[int]] = {}
        for p in pendings:
            if p.where == Where.LEASED and p.session is not None:
                s = p.session
                s.inflight.pop(p.input_id, None)
                if not s.inflight:
                    s.idle_since = time.monotonic()
                by_session.setdefault(s, []).append(p.input_id)
        return by_session

    def _drop_from_queues(self, pendings: list[Pending], finals: list) -> None:
        """Out of their functions' queues (they are no longer queued), then the outputs."""
        for fn_id in {p.function_id for p in pendings}:
            fn = self.ledger.functions.get(fn_id)
            if fn is not None:
                fn.queue = deque(p for p in fn.queue if p.where == Where.QUEUED)
        self.outputs.flush(finals, {p.call_id for p in pendings})

    def cancel_inputs(
        self,
        pendings: list[Pending],
        terminate: bool,
        error: str,
        error_type: str,
        cascade: bool = True,
    ) -> None:
        """End inputs as cancelled; with ``cascade``, the calls they made are cancelled
        too (``on_inputs_cancelled``)."""
        by_session = self._take_off_containers(pendings)
        finals = [
            self.outputs.final(p, "cancelled", None, error, error_type=error_type)
            for p in pendings
            if p.where != Where.DONE
        ]
        for s, ids in by_session.items():
            if terminate:
                self.ledger.containers.mark_killing(s)
                self.release_leases(s, 0, "cancelled", error, error_type=error_type)
                self._kill_container(s.container_id, "its input was cancelled")
            else:
                s.send(m.CancelInputs(ids))
        self._drop_from_queues(pendings, finals)
        if cascade and pendings:
            self.on_inputs_cancelled([p.input_id for p in pendings], terminate)
