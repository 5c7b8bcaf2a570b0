"""Durable input queues, leases, retries, timeouts, cancellation and outputs.

An input is written to the store before the API answers (``intake``). In memory, each
function has a queue of inputs ready to run; a ready container takes inputs under a
lease, a dispatch token (``dispatch``). A lease ends with an output (``outputs``), or
with the container's death, a timeout or a cancellation; a failed attempt is retried per
the function's ``RetryPolicy`` (``failures``). Each input gets exactly one final output in
the store (``finish_inputs`` only updates pending rows), which clients read by a
per-output sequence number, so a client that reconnects after a restart neither misses
nor repeats outputs.

:class:`CallManager` wires those parts and takes a container's outputs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import msgspec

from strato.exceptions import InvalidError
from strato.protocol import messages as m

from .. import metrics
from ..store import FinalRow, GenItemRow, Store
from ..store.blobs import BlobStore
from .dispatch import Dispatcher, slots, target_inputs
from .failures import Failures
from .graph import CallTree, Owners
from .intake import Intake
from .outputs import Outputs
from .state import AppState, ContainerDirectory, ContainerRef, FunctionQueue, Ledger, Pending

log = logging.getLogger("strato.calls")

__all__ = ["CallManager", "FunctionQueue", "Pending"]


class CallManager:
    def __init__(
        self,
        store: Store,
        blobs: BlobStore,
        *,
        containers: ContainerDirectory,
        blob_threshold: int,
        max_payload: int,
        retention_s: float,
        kill_container: Callable[[str, str], None],
        wake_scaler: Callable[[], None],
        on_arrival: Callable[[str, float], None] = lambda function_id, now: None,
    ) -> None:
        self.store = store
        self.max_payload = max_payload
        self.ledger = Ledger(store, containers, on_arrival)
        self.outputs = Outputs(store, blobs, self.ledger, blob_threshold=blob_threshold)
        self.dispatcher = Dispatcher(self.ledger, blobs, wake_scaler)
        self.failures = Failures(store, self.ledger, self.outputs, self.dispatcher, kill_container)
        owners = Owners()
        self.intake = Intake(
            store,
            blobs,
            self.ledger,
            self.dispatcher,
            self.failures,
            self.outputs,
            blob_threshold=blob_threshold,
            max_payload=max_payload,
            retention_s=retention_s,
            owners=owners,
        )
        self.failures.on_cancel = self.intake.forget_call
        self.tree = CallTree(store, self.ledger, self.failures, owners)
        self.functions = self.ledger.functions
        self.live = self.ledger.live
        # the public operations, each where its concern lives
        self.create_call = self.intake.create_call
        self.add_inputs = self.intake.add_inputs
        self.recover = self.intake.recover
        self.release_leases = self.failures.release_leases
        self.fail_queued = self.failures.fail_queued
        self.check_timeouts = self.failures.check_timeouts
        self.cancel_call = self.tree.cancel_call
        self.wait_outputs = self.outputs.wait
        self.call_owner = self.tree.call_owner
        self.call_graph = self.tree.graph

    # ------------------------------------------------------------------ functions

    def function(self, function_id: str) -> FunctionQueue:
        """The function (loaded from the store on first use); NotFoundError if none."""
        return self.ledger.function(function_id)

    def replace_spec(self, function_id: str, spec: m.FunctionSpec) -> None:
        self.function(function_id).spec = spec

    def inflight(self, fn: FunctionQueue) -> int:
        """Inputs of ``fn`` its containers hold now."""
        return self.ledger.inflight(fn)

    def note_arrival(self, function_id: str, now: float | None = None) -> None:
        """Work for the function arrived other than as an input (a web request): an
        arrival for the autoscaler (the first since its last tick counts)."""
        self.ledger.on_arrival(function_id, time.monotonic() if now is None else now)

    slots = staticmethod(slots)
    target_inputs = staticmethod(target_inputs)

    def on_ready(self, function_id: str) -> None:
        """A container of the function became ready: hand it inputs."""
        fn = self.functions.get(function_id)
        if fn is not None:
            self.dispatcher.pump(fn)

    def stop_app(self, app_id: str) -> None:
        """The app stopped: its functions take no more calls; every input of theirs not
        ended is cancelled and their containers killed."""
        fns = [fn for fn in self.functions.values() if fn.app_id == app_id]
        ids = {fn.function_id for fn in fns}
        for fn in fns:
            fn.app_state = AppState.STOPPED
        pendings = [p for live in self.live.values() for p in live.values() if p.function_id in ids]
        if pendings:
            self.failures.cancel_inputs(pendings, True, "the app was stopped", "AppStoppedError")

    # ------------------------------------------------------------------ a container's outputs

    def on_outputs(
        self,
        session: ContainerRef,
        outputs: list[m.TaskOutput],
        sizes: dict[int, int] | None = None,
    ) -> None:
        """Outputs from a container. ``sizes``: for each output (by position) whose value
        came in chunks (``TaskOutput.blob``, already in the blob store unless over
        ``max_payload``), its size."""
        fn = self.functions.get(session.function_id)
        if fn is None:
            return
        now = time.monotonic()
        finals: list[FinalRow] = []
        gens: list[GenItemRow] = []
        touched: set[str] = set()
        bad = [o.status for o in outputs if o.status not in ("success", "failure")]
        if bad:  # the fleet drops the container: it speaks no protocol we know
            raise InvalidError(f"output status {bad[0][:40]!r} is not success or failure")
        foreign = 0
        for i, o in enumerate(outputs):
            nbytes = len(o.data) if o.data is not None else 0
            if o.blob is not None:
                nbytes = (sizes or {}).get(i, 0)
                if nbytes > self.max_payload and o.status != "success":
                    o = msgspec.structs.replace(o, blob=None)  # the exception was too big
            lease = session.inflight.get(o.input_id)
            if lease is None or lease.token != o.attempt:
                # stale (re-leased elsewhere, cancelled, already ended), or an input this
                # container never held: either way it is not this container's to answer
                foreign += 1
                continue
            p = lease.pending
            touched.add(p.call_id)
            if o.status == "success" and nbytes > self.max_payload:
                # a result over the limit ends its input (a generator's too) with an error
                del session.inflight[o.input_id]
                too_big = self._too_big(fn, o, nbytes)
                finals.append(
                    self.outputs.final(p, "failure", None, too_big, error_type="RequestSizeError")
                )
                continue
            if o.gen_index is not None:
                gens.append(self.outputs.yielded(p, o.gen_index, o.data, o.blob))
                continue
            del session.inflight[o.input_id]
            d = o.duration
            metrics.input_duration(fn.function_id, d)
            fn.ewma_duration = d if fn.ewma_duration is None else 0.8 * fn.ewma_duration + 0.2 * d
            if o.status == "success":
                finals.append(self.outputs.final(p, "success", o.data, blob=o.blob))
            else:
                row = self.failures.attempt_failed(
                    fn, p, "failure", o.data, o.error, o.traceback, o.blob, o.error_type
                )
                if row:
                    finals.append(row)
        if foreign:
            log.info(
                "ignored %d output(s) from container %s for inputs it does not hold",
                foreign,
                session.container_id,
            )
        session.last_progress = now
        if not session.inflight:
            session.idle_since = now
        fn.last_activity = now
        self.outputs.flush(finals, touched, gens)
        self.dispatcher.pump(fn)

    def _too_big(self, fn: FunctionQueue, o: m.TaskOutput, nbytes: int) -> str:
        what = "a value yielded" if o.gen_index is not None else "the value returned"
        return (
            f"{what} by {fn.name} pickles to {nbytes} bytes, over the "
            f"limit of {self.max_payload} bytes (STRATO_MAX_PAYLOAD); return large data "
            "through a Volume instead"
        )
