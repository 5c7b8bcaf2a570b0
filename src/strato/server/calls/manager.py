"""Durable input queues, leases, retries, timeouts, cancellation and outputs.

An input is written to the store before the API answers. In memory, each function has a
queue of inputs ready to run; a ready container takes inputs under a lease (a dispatch
token). A lease ends with an output, or with the container's death, a timeout or a
cancellation; a failed attempt is retried per the function's ``RetryPolicy``. Each input
gets exactly one final output in the store (``finish_inputs`` only updates pending rows),
which clients read by a per-output sequence number, so a client that reconnects after a
restart neither misses nor repeats outputs.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import msgspec

from strato.exceptions import (
    AlreadyExistsError,
    AppStoppedError,
    InvalidError,
    NotFoundError,
    RequestSizeError,
)
from strato.protocol import messages as m

from ..store import Store
from ..store.blobs import BlobStore

log = logging.getLogger("strato.calls")

MAX_PREFETCH = 256  # inputs in flight to one sequential container when the function is fast
FAST_FUNCTION_S = 0.005
UNKNOWN_SEQ = 1 << 62
SCALE_DRAIN_S = 0.5  # a container is "full" when its share of the backlog takes this long


@dataclass(eq=False)
class Pending:
    input_id: int
    call_id: str
    idx: int
    function_id: str
    args: bytes | None
    args_blob: str | None
    method: str | None
    attempts: int = 0  # failed attempts so far
    where: str = "queued"  # queued | leased | retry | done
    session: ContainerRef | None = None
    solo: bool = False  # run it alone in its container (it may be what crashed one)


@dataclass(eq=False)
class Lease:
    pending: Pending
    token: int
    dispatched_at: float


class ContainerRef:
    """What the call manager needs of a live container (implemented by the fleet)."""

    container_id: str
    function_id: str
    state: str
    inflight: dict[int, Lease]
    last_progress: float
    idle_since: float | None

    def send(self, msg: object) -> None:  # pragma: no cover - interface
        raise NotImplementedError


@dataclass(eq=False)
class FunctionState:
    function_id: str
    app_id: str
    name: str
    spec: m.FunctionSpec
    app_state: str
    queue: deque[Pending] = field(default_factory=deque)
    sessions: dict[str, ContainerRef] = field(default_factory=dict)
    ewma_duration: float | None = None
    # for the autoscaler's adaptive keep-alive (see ControlPlane.scale_once)
    policy: object = None  # autoscaler PolicyState
    recheck_at: float | None = None
    arrival_at: float | None = None  # first input accepted since the last scaling tick
    last_activity: float = field(default_factory=time.monotonic)

    @property
    def inflight(self) -> int:
        return sum(len(s.inflight) for s in self.sessions.values())


_spec_decoder = msgspec.msgpack.Decoder(m.FunctionSpec)


class CallManager:
    def __init__(
        self,
        store: Store,
        blobs: BlobStore,
        *,
        blob_threshold: int,
        max_payload: int,
        retention_s: float,
        kill_container: Callable[[str, str], None],
        wake_scaler: Callable[[], None],
    ) -> None:
        self.store = store
        self.blobs = blobs
        self.blob_threshold = blob_threshold
        self.max_payload = max_payload
        self.retention_s = retention_s
        self._kill_container = kill_container
        self._wake_scaler = wake_scaler
        self.functions: dict[str, FunctionState] = {}
        self.live: dict[str, dict[int, Pending]] = {}  # call_id -> input_id -> Pending
        self._events: dict[str, asyncio.Event] = {}
        # last output sequence number of each call with inputs in memory: lets a long-poll
        # skip the store when it has seen everything already
        self._last_seq: dict[str, int] = {}
        next_input, next_seq, _ = store.max_ids()
        self._next_input = next_input + 1
        self._next_seq = next_seq + 1
        self._next_token = 1

    # ------------------------------------------------------------------ functions

    def function(self, function_id: str) -> FunctionState:
        fn = self.functions.get(function_id)
        if fn is None:
            row = self.store.function(function_id)
            if row is None:
                raise NotFoundError(f"function {function_id} does not exist")
            fn = FunctionState(
                function_id=function_id,
                app_id=row["app_id"],
                name=row["name"],
                spec=_spec_decoder.decode(row["spec"]),
                app_state=row["app_state"],
            )
            self.functions[function_id] = fn
        return fn

    def replace_spec(self, function_id: str, spec: m.FunctionSpec) -> None:
        self.function(function_id).spec = spec

    # ------------------------------------------------------------------ accepting inputs

    def _input_rows(self, fn: FunctionState, call_id: str, items: Iterable[m.InputItem]):
        rows: list[dict] = []
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
            p = Pending(self._next_input, call_id, it.idx, fn.function_id, args, blob, None)
            self._next_input += 1
            rows.append(
                {
                    "input_id": p.input_id,
                    "call_id": call_id,
                    "idx": it.idx,
                    "args": args,
                    "args_blob": blob,
                    "status": "pending",
                    "attempts": 0,
                }
            )
            pendings.append(p)
        return rows, pendings

    def _check_callable(self, fn: FunctionState) -> None:
        if fn.app_state == "stopped":
            raise AppStoppedError(
                f"function {fn.name!r} belongs to an app that has been stopped; "
                "run or deploy the app again to call it"
            )

    def create_call(self, req: m.CreateCall) -> None:
        fn = self.function(req.function_id)
        self._check_callable(fn)
        rows, pendings = self._input_rows(fn, req.call_id, req.inputs)
        for p in pendings:
            p.method = req.method
        now = time.time()
        created = self.store.create_call(
            {
                "call_id": req.call_id,
                "function_id": fn.function_id,
                "kind": req.kind,
                "method": req.method,
                "n_inputs": len(rows),
                "closed": req.closed,
                "cancelled": False,
                "created_at": now,
                "expires_at": now + self.retention_s,
            },
            rows,
        )
        if not created:  # a retried request: add only what is missing
            self._next_input -= len(rows)
            call = self.store.call(req.call_id)
            if call is not None and (
                call["function_id"] != req.function_id or call["method"] != req.method
            ):
                raise AlreadyExistsError(
                    f"call id {req.call_id} is taken by a call of another function"
                    f"{' or method' if call['function_id'] == req.function_id else ''}; "
                    "choose a new call id for a new call"
                )
            self.add_inputs(req.call_id, m.AddInputs(req.inputs, closed=req.closed))
            return
        self._accepted(fn, pendings)

    def add_inputs(self, call_id: str, req: m.AddInputs) -> None:
        call = self.store.call(call_id)
        if call is None:
            raise NotFoundError(f"call {call_id} does not exist (or has expired)")
        fn = self.function(call["function_id"])
        self._check_callable(fn)
        if call["cancelled"]:
            raise InvalidError(f"call {call_id} was cancelled; it takes no more inputs")
        items = req.inputs
        if items:
            have = self.store.existing_idx(
                call_id, min(i.idx for i in items), max(i.idx for i in items)
            )
            items = [i for i in items if i.idx not in have]
        rows, pendings = self._input_rows(fn, call_id, items)
        for p in pendings:
            p.method = call["method"]
        n_inputs = call["n_inputs"] + len(rows)
        if req.total is not None:
            n_inputs = max(n_inputs, req.total)
        self.store.add_inputs(call_id, rows, req.closed or None, n_inputs)
        self._accepted(fn, pendings)

    def _accepted(self, fn: FunctionState, pendings: list[Pending]) -> None:
        """New inputs (not retries): noted for the autoscaler, then queued."""
        if pendings and fn.arrival_at is None:
            fn.arrival_at = time.monotonic()
        self._enqueue(fn, pendings)

    def _enqueue(self, fn: FunctionState, pendings: list[Pending], front: bool = False) -> None:
        for p in pendings:
            self.live.setdefault(p.call_id, {})[p.input_id] = p
            p.where = "queued"
            p.session = None
        if front:
            fn.queue.extendleft(reversed(pendings))
        else:
            fn.queue.extend(pendings)
        fn.last_activity = time.monotonic()
        self._pump(fn)
        if fn.queue:
            self._wake_scaler()

    # ------------------------------------------------------------------ dispatch

    @staticmethod
    def slots(fn: FunctionState) -> int:
        """Inputs one container runs at once: ``@concurrent``'s max_inputs, a
        ``@batched`` function's batch size, else one."""
        return max(fn.spec.max_inputs, fn.spec.batch_max_size or 1)

    def _capacity(self, fn: FunctionState, n_ready: int) -> int:
        slots = self.slots(fn)
        if fn.ewma_duration is None or fn.ewma_duration > FAST_FUNCTION_S:
            return slots
        share = math.ceil((len(fn.queue) + fn.inflight) / max(1, n_ready))
        return max(slots, min(MAX_PREFETCH, share))

    def target_inputs(self, fn: FunctionState) -> int:
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

    def _args_of(self, p: Pending) -> bytes:
        if p.args is not None:
            return p.args
        return self.blobs.get(p.args_blob)

    def _pump(self, fn: FunctionState) -> None:
        if not fn.queue:
            return
        ready = [s for s in fn.sessions.values() if s.state == "ready"]
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
                if p.where != "queued":
                    fn.queue.popleft()
                    continue
                if p.solo:
                    if s.inflight or batch:
                        break  # it waits for a container with nothing else to run
                    room = 1
                fn.queue.popleft()
                token = self._next_token
                self._next_token += 1
                p.where, p.session = "leased", s
                if not s.inflight:
                    s.last_progress = now
                s.inflight[p.input_id] = Lease(p, token, now)
                s.idle_since = None
                batch.append(m.TaskInput(p.input_id, token, self._args_of(p), p.method))
                room -= 1
            if batch:
                s.send(m.RunInputs(batch))
            if not fn.queue:
                break

    def on_ready(self, fn_id: str) -> None:
        fn = self.functions.get(fn_id)
        if fn is not None:
            self._pump(fn)

    # ------------------------------------------------------------------ outputs

    def _seq(self) -> int:
        s = self._next_seq
        self._next_seq += 1
        return s

    def _final_row(
        self,
        p: Pending,
        status: str,
        data: bytes | None = None,
        error: str | None = None,
        tb: str | None = None,
        blob: str | None = None,
    ) -> dict:
        if data is not None and len(data) > self.blob_threshold:
            blob, data = self.blobs.put(data), None
        p.where = "done"
        live = self.live.get(p.call_id)
        if live is not None:
            live.pop(p.input_id, None)
            if not live:
                del self.live[p.call_id]
        seq = self._seq()
        self._last_seq[p.call_id] = seq
        return {
            "b_id": p.input_id,
            "b_status": status,
            "b_output": data,
            "b_blob": blob,
            "b_error": error,
            "b_tb": tb,
            "b_seq": seq,
            "b_at": time.time(),
        }

    def _flush(self, rows: list[dict], calls: Iterable[str]) -> None:
        self.store.finish_inputs(rows)
        for call_id in calls:
            self._notify(call_id)
            if call_id not in self.live:
                self._last_seq.pop(call_id, None)

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
        finals: list[dict] = []
        gens: list[dict] = []
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
                finals.append(self._final_row(p, "failure", None, self._too_big(fn, o, nbytes)))
                continue
            if o.gen_index is not None:
                data, blob = o.data, o.blob
                if data is not None and len(data) > self.blob_threshold:
                    blob, data = self.blobs.put(data), None
                seq = self._seq()
                self._last_seq[p.call_id] = seq
                gens.append(
                    {
                        "seq": seq,
                        "call_id": p.call_id,
                        "idx": p.idx,
                        "gen_index": o.gen_index,
                        "data": data,
                        "blob": blob,
                    }
                )
                continue
            del session.inflight[o.input_id]
            d = o.duration
            fn.ewma_duration = d if fn.ewma_duration is None else 0.8 * fn.ewma_duration + 0.2 * d
            if o.status == "success":
                finals.append(self._final_row(p, "success", o.data, blob=o.blob))
            else:
                row = self._attempt_failed(
                    fn, p, "failure", o.data, o.error, o.traceback, blob=o.blob
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
        if gens:
            self.store.add_gen_items(gens)
        self._flush(finals, touched)
        self._pump(fn)

    def _too_big(self, fn: FunctionState, o: m.TaskOutput, nbytes: int) -> str:
        what = "a value yielded" if o.gen_index is not None else "the value returned"
        return (
            f"RequestSizeError: {what} by {fn.name} pickles to {nbytes} bytes, over the "
            f"limit of {self.max_payload} bytes (STRATO_MAX_PAYLOAD); return large data "
            "through a Volume instead"
        )

    def _attempt_failed(
        self,
        fn: FunctionState,
        p: Pending,
        status: str,
        data: bytes | None,
        error: str | None,
        tb: str | None,
        blob: str | None = None,
    ) -> dict | None:
        """Retry per policy (returns None) or end the input (returns its final row)."""
        p.attempts += 1
        policy = fn.spec.retries
        if p.attempts <= policy.max_retries and not fn.spec.is_generator:
            delay = policy.delay(p.attempts)
            self.store.set_attempts([(p.input_id, p.attempts, time.time() + delay)])
            p.where, p.session = "retry", None
            log.info(
                "input %s of %s failed (%s); retry %d in %.1fs",
                p.idx,
                fn.name,
                error,
                p.attempts,
                delay,
            )
            asyncio.get_running_loop().call_later(delay, self._retry_due, p)
            return None
        return self._final_row(p, status, data, error, tb, blob)

    def _retry_due(self, p: Pending) -> None:
        if p.where != "retry":
            return
        fn = self.functions.get(p.function_id)
        if fn is not None:
            self._enqueue(fn, [p])

    # ------------------------------------------------------------------ containers ending

    def release_leases(
        self,
        session: ContainerRef,
        running: int,
        status: str,
        error: str,
        *,
        known: bool = True,
    ) -> None:
        """A container is gone (or being killed): its first ``running`` leases count as
        failed attempts with ``status``; the rest never started and go back to the queue.

        ``known=False`` (the container died) says that which lease was running is not
        known: a container holds many inputs of a fast function, and outputs of finished
        ones may have died with it. Unless it held just one, none is blamed: each goes back
        to run alone, so that an input that kills its container fails on its own."""
        fn = self.functions.get(session.function_id)
        leases = list(session.inflight.values())
        session.inflight.clear()
        if fn is None or not leases:
            return
        finals: list[dict] = []
        requeue: list[Pending] = []
        held = [
            lease
            for lease in leases
            if lease.pending.where == "leased" and lease.pending.session is session
        ]
        if running and not known and len(held) > 1:
            for lease in held:
                lease.pending.solo = True
            running = 0
        for i, lease in enumerate(leases):
            p = lease.pending
            if p.where != "leased" or p.session is not session:
                continue
            if i < running:
                row = self._attempt_failed(fn, p, status, None, error, None)
                if row:
                    finals.append(row)
            else:
                requeue.append(p)
        self._flush(finals, {lease.pending.call_id for lease in leases})
        if requeue:
            self._enqueue(fn, requeue, front=True)

    def fail_queued(
        self,
        function_id: str,
        error: str,
        data: bytes | None = None,
        tb: str | None = None,
        count_attempt: bool = True,
    ) -> None:
        """Fail (or retry) every queued input of a function: its containers cannot start."""
        fn = self.functions.get(function_id)
        if fn is None or not fn.queue:
            return
        queued = [p for p in fn.queue if p.where == "queued"]
        fn.queue.clear()
        finals = []
        for p in queued:
            if count_attempt:
                row = self._attempt_failed(fn, p, "failure", data, error, tb)
            else:
                row = self._final_row(p, "failure", data, error, tb)
            if row:
                finals.append(row)
        self._flush(finals, {p.call_id for p in queued})

    def check_timeouts(self, now: float) -> None:
        for fn in list(self.functions.values()):
            try:
                self._check_timeouts(fn, now)
            except Exception:  # one function's bug must not stop the others' timeouts
                log.exception("checking the timeouts of %s failed", fn.name)

    def _check_timeouts(self, fn: FunctionState, now: float) -> None:
        spec = fn.spec
        parallel = spec.max_inputs > 1 or spec.batch_max_size > 0
        limit = spec.timeout + spec.batch_wait_ms / 1000
        for s in list(fn.sessions.values()):
            if not s.inflight or s.state not in ("ready", "stopping"):
                continue
            if parallel:  # inputs start when they arrive, up to the container's slots
                running = list(s.inflight.values())[: self.slots(fn)]
                late = [lease for lease in running if now - lease.dispatched_at > limit]
            else:  # one at a time: the first lease runs since the last output
                first = next(iter(s.inflight.values()))
                started = max(first.dispatched_at, s.last_progress)
                late = [first] if now - started > limit else []
            if late:
                self._time_out(fn, s, late)

    def _time_out(self, fn: FunctionState, s: ContainerRef, late: list[Lease]) -> None:
        error = (
            "FunctionTimeoutError: the input ran past the function's timeout of "
            f"{fn.spec.timeout:g}s"
        )
        log.info("%d input(s) of %s timed out; killing %s", len(late), fn.name, s.container_id)
        s.state = "killing"
        finals = []
        for lease in late:
            s.inflight.pop(lease.pending.input_id, None)
            row = self._attempt_failed(fn, lease.pending, "timeout", None, error, None)
            if row:
                finals.append(row)
        self._flush(finals, {lease.pending.call_id for lease in late})
        self.release_leases(s, 0, "timeout", error)  # the others never ran too long
        self._kill_container(s.container_id, "an input ran past its timeout")

    # ------------------------------------------------------------------ cancellation, apps

    def cancel_call(self, call_id: str, terminate_containers: bool) -> None:
        call = self.store.call(call_id)
        if call is None:
            raise NotFoundError(f"call {call_id} does not exist (or has expired)")
        self.store.cancel_call(call_id)
        self._cancel_inputs(
            list(self.live.get(call_id, {}).values()),
            terminate_containers,
            "InputCancellation: the call was cancelled",
        )

    def _cancel_inputs(self, pendings: list[Pending], terminate: bool, error: str) -> None:
        finals = []
        by_session: dict[ContainerRef, list[int]] = {}
        for p in pendings:
            if p.where == "leased" and p.session is not None:
                s = p.session
                s.inflight.pop(p.input_id, None)
                if not s.inflight:
                    s.idle_since = time.monotonic()
                by_session.setdefault(s, []).append(p.input_id)
            if p.where != "done":
                finals.append(self._final_row(p, "cancelled", None, error))
        for s, ids in by_session.items():
            if terminate:
                s.state = "killing"
                self.release_leases(s, 0, "cancelled", error)
                self._kill_container(s.container_id, "its input was cancelled")
            else:
                s.send(m.CancelInputs(ids))
        for fn_id in {p.function_id for p in pendings}:
            fn = self.functions.get(fn_id)
            if fn is not None:
                fn.queue = deque(p for p in fn.queue if p.where == "queued")
        self._flush(finals, {p.call_id for p in pendings})

    def stop_app(self, app_id: str) -> None:
        fns = [fn for fn in self.functions.values() if fn.app_id == app_id]
        ids = {fn.function_id for fn in fns}
        for fn in fns:
            fn.app_state = "stopped"
        pendings = [p for live in self.live.values() for p in live.values() if p.function_id in ids]
        if pendings:
            self._cancel_inputs(pendings, True, "AppStoppedError: the app was stopped")

    # ------------------------------------------------------------------ reading outputs

    def _notify(self, call_id: str) -> None:
        ev = self._events.pop(call_id, None)
        if ev is not None:
            ev.set()

    async def wait_outputs(self, call_id: str, after: int, timeout: float, limit: int) -> m.Outputs:
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            ev = self._events.get(call_id)
            if ev is None:
                ev = self._events[call_id] = asyncio.Event()
            live = self.live.get(call_id)
            if not live or self._last_seq.get(call_id, 0) > after:
                gens = (
                    not live
                    or self.functions[next(iter(live.values())).function_id].spec.is_generator
                )
                rows = self.store.outputs_after(call_id, after, limit, with_gens=gens)
                if rows:
                    return self._outputs(rows)
            done = False
            if not live:  # nothing of it in memory: ask the store whether it is complete
                call = self.store.call(call_id)
                if call is None:
                    raise NotFoundError(f"call {call_id} does not exist (or its outputs expired)")
                done = call["closed"] and self.store.count_done(call_id) >= call["n_inputs"]
                if done:
                    return m.Outputs([], after, done=True, n_inputs=call["n_inputs"])
            if time.monotonic() >= deadline:
                return m.Outputs([], after)
            try:
                await asyncio.wait_for(ev.wait(), deadline - time.monotonic())
            except TimeoutError:
                pass

    def _outputs(self, rows) -> m.Outputs:
        items = [
            m.OutputItem(r.idx, r.status, r.data, r.blob, r.error, r.traceback, r.seq, r.gen_index)
            for r in rows
        ]
        return m.Outputs(items, items[-1].seq)

    # ------------------------------------------------------------------ recovery

    def recover(self) -> int:
        """Re-queue every input the store holds without a final output (after a restart)."""
        rows = self.store.pending_inputs()
        now = time.time()
        stopped_finals: list[dict] = []
        by_fn: dict[str, list[Pending]] = {}
        for r in rows:
            try:
                fn = self.function(r.function_id)
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
            self.live.setdefault(p.call_id, {})[p.input_id] = p
            self._last_seq[p.call_id] = UNKNOWN_SEQ  # outputs may exist: read the store
            if fn.app_state == "stopped":
                stopped_finals.append(
                    self._final_row(p, "cancelled", None, "AppStoppedError: the app was stopped")
                )
            elif r.retry_at and r.retry_at > now:
                p.where = "retry"
                asyncio.get_running_loop().call_later(r.retry_at - now, self._retry_due, p)
            else:
                by_fn.setdefault(r.function_id, []).append(p)
        self.store.finish_inputs(stopped_finals)
        for fid, ps in by_fn.items():
            self._enqueue(self.functions[fid], ps)
        return len(rows)
