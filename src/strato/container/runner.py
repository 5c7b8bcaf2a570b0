"""The in-container entrypoint: import the user's code, take inputs, return outputs.

This is on the cold-start path, so it imports only the stdlib, msgspec, cloudpickle and
``strato.protocol``. The control plane's channel is a Unix (or TCP) socket handed in by
the worker agent, so a container without network still gets its inputs. A reader thread
takes frames off the socket; inputs run one at a time on the main thread, or
``max_inputs`` at once (threads for sync code, asyncio tasks for async code), or in
batches (``@batched``); outputs are batched while more inputs are waiting.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import pickle
import signal
import sys
import threading
import time
from collections import deque

import cloudpickle

from strato import settings
from strato.client import channel_api
from strato.exceptions import DeserializationError, InputCancellation, SerializationError
from strato.protocol import frames
from strato.protocol import messages as m

from . import current
from .failure import describe_failure
from .spec_file import load_spec
from .target import Target

FLUSH_EVERY = 128
FLUSH_AFTER_S = 0.005


class ContainerRunner:
    def __init__(self, container_id: str, channel: str, token: str, spec: m.FunctionSpec) -> None:
        self.container_id = container_id
        self.spec = spec
        self._send_lock = threading.Lock()
        self.sock = frames.connect(channel)
        self._send(m.ContainerHello(container_id, token))
        # code in this container calls the control plane over this channel (nested calls)
        self.api = channel_api.ChannelApiClient(self._send_frames, current.input_index)
        channel_api.CURRENT = self.api
        self.queue: deque[m.TaskInput] = deque()
        self.cond = threading.Condition()
        self.stopping = False
        self.running: dict[int, int] = {}  # input id -> ident of the thread running it
        self.cancelled: set[int] = set()
        self._main_thread = threading.get_ident()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: dict[int, asyncio.Task] = {}  # async mode: input id -> task
        self._wake: asyncio.Event | None = None  # async mode: inputs arrived / stopping
        # outputs not sent yet; the flusher thread sends them once FLUSH_AFTER_S old, so
        # that a fast input's output never waits for the (maybe long) input after it
        self._out: list[m.TaskOutput] = []
        self._out_first = 0.0
        self._out_lock = threading.Lock()
        self._out_cond = threading.Condition(self._out_lock)
        self._flusher_idle = False  # waiting for outputs (not timing a batch)
        self._serving = True
        # the reader runs from the start: @enter hooks may call other functions
        threading.Thread(target=self._read, name="strato-channel", daemon=True).start()

    def _send(self, msg: object) -> None:
        # large values go ahead of their outputs in chunks: the control plane refuses
        # large frames
        self._send_frames(frames.split_outputs(msg) if isinstance(msg, m.TaskOutputs) else [msg])

    def _send_frames(self, msgs: list[object]) -> None:
        # the main thread, the flusher and code making API requests all write: each
        # message's frames go in order, with nothing of another sender between them
        with self._send_lock:
            for msg in msgs:
                self.sock.sendall(frames.encode(msg))

    # ------------------------------------------------------------------ reader thread

    def _read(self) -> None:
        reader = frames.SocketReader(self.sock)
        try:
            while (msg := reader.read()) is not None:
                if isinstance(msg, m.RunInputs):
                    with self.cond:
                        self.queue.extend(msg.inputs)
                        self.cond.notify_all()
                    self._wake_async()
                elif isinstance(msg, m.ApiResponse):
                    self.api.deliver(msg)
                elif isinstance(msg, m.CancelInputs):
                    self._cancel(set(msg.input_ids))
                elif isinstance(msg, m.StopContainer):
                    break
        except (OSError, frames.FrameError):
            pass
        self.api.close_channel("the container's channel to the control plane closed")
        self._request_stop(drop_queued=False)  # the control plane is gone or asked us to stop

    def _wake_async(self) -> None:
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            loop.call_soon_threadsafe(wake.set)

    def _cancel(self, ids: set[int]) -> None:
        with self.cond:
            self.queue = deque(i for i in self.queue if i.input_id not in ids)
            for input_id in ids & set(self.running):
                self.cancelled.add(input_id)
                task = self._tasks.get(input_id)
                thread = self.running[input_id]
                if task is not None:
                    task.get_loop().call_soon_threadsafe(task.cancel)
                elif thread == self._main_thread:
                    signal.pthread_kill(self._main_thread, signal.SIGUSR1)
                else:  # a worker thread: raise InputCancellation in it
                    ctypes.pythonapi.PyThreadState_SetAsyncExc(
                        ctypes.c_ulong(thread), ctypes.py_object(InputCancellation)
                    )

    def _on_sigusr1(self, _signum, _frame) -> None:
        for input_id, thread in list(self.running.items()):
            if thread == self._main_thread and input_id in self.cancelled:
                raise InputCancellation(f"input {input_id} was cancelled")

    # ------------------------------------------------------------------ main thread

    def serve(self, target: Target) -> None:
        signal.signal(signal.SIGUSR1, self._on_sigusr1)
        signal.signal(signal.SIGTERM, lambda *_: self._request_stop())
        threading.Thread(target=self._flush_loop, name="strato-flush", daemon=True).start()
        self._send(m.ContainerReady())
        spec = self.spec
        try:
            if spec.batch_max_size:
                self._serve_batched(target)
            elif spec.max_inputs > 1 and self._all_async(target):
                self._serve_async(target)
            elif spec.max_inputs > 1:
                self._serve_threads(target, spec.max_inputs)
            else:
                self._serve_one_at_a_time(target)
        finally:
            with self._out_cond:
                self._serving = False
                self._out_cond.notify()
            self._flush()
            target.close()  # @exit hooks, after the last input

    def _all_async(self, target: Target) -> bool:
        spec = self.spec
        if spec.is_class:
            return bool(spec.async_methods) and set(spec.async_methods) >= set(target._methods)
        return spec.is_async

    def _next(self) -> m.TaskInput | None:
        with self.cond:
            while not self.queue and not self.stopping:
                self.cond.wait()
            return self.queue.popleft() if self.queue else None

    def _serve_one_at_a_time(self, target: Target) -> None:
        while (item := self._next()) is not None:
            self._output(self._run(target, item))

    def _serve_threads(self, target: Target, n: int) -> None:
        def work() -> None:
            while (item := self._next()) is not None:
                self._output(self._run(target, item))

        threads = [
            threading.Thread(target=work, name=f"strato-input-{i}", daemon=True) for i in range(n)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def _serve_batched(self, target: Target) -> None:
        size = self.spec.batch_max_size
        wait_s = self.spec.batch_wait_ms / 1000
        while True:
            with self.cond:
                while not self.queue and not self.stopping:
                    self.cond.wait()
                if not self.queue:
                    return
                deadline = time.monotonic() + wait_s
                while len(self.queue) < size and not self.stopping:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self.cond.wait(remaining)
                batch = [self.queue.popleft() for _ in range(min(size, len(self.queue)))]
            for out in self._run_batch(target, batch):
                self._output(out)

    def _serve_async(self, target: Target) -> None:
        loop = self._event_loop()
        limit = self.spec.max_inputs

        async def serve_tasks() -> None:
            self._wake = asyncio.Event()
            while True:
                with self.cond:
                    while self.queue and len(self._tasks) < limit:
                        item = self.queue.popleft()
                        task = loop.create_task(self._run_async(target, item))
                        self._tasks[item.input_id] = task
                        task.add_done_callback(self._task_done)
                    if self.stopping and not self.queue and not self._tasks:
                        return
                await self._wake.wait()
                self._wake.clear()

        loop.run_until_complete(serve_tasks())

    def _task_done(self, task: asyncio.Task) -> None:
        out = task.result()
        self._tasks.pop(out.input_id, None)
        self._output(out)
        if self._wake is not None:
            self._wake.set()

    def _output(self, out: m.TaskOutput) -> None:
        """Queue an output; send the batch now when it is full, old, or nothing else waits."""
        now = time.monotonic()
        with self._out_lock:
            self._out.append(out)
            if len(self._out) == 1:
                self._out_first = now
            if not (
                len(self._out) >= FLUSH_EVERY
                or self._out_bytes() >= frames.CHUNK
                or not self.queue
                or now - self._out_first > FLUSH_AFTER_S
            ):
                if self._flusher_idle:
                    self._out_cond.notify()  # the flusher sends it if the next input is long
                return
            batch, self._out = self._out, []
        self._send(m.TaskOutputs(batch))

    def _out_bytes(self) -> int:
        return sum(
            len(o.data or b"") + len(o.error or "") + len(o.traceback or "") for o in self._out
        )

    def _flush(self) -> None:
        with self._out_cond:
            batch, self._out = self._out, []
        if batch:
            self._send(m.TaskOutputs(batch))

    def _flush_loop(self) -> None:
        try:
            while True:
                with self._out_cond:
                    while not self._out and self._serving:
                        self._flusher_idle = True
                        self._out_cond.wait()
                    self._flusher_idle = False
                    if not self._serving:
                        return
                    wait = self._out_first + FLUSH_AFTER_S - time.monotonic()
                    if wait > 0:
                        self._out_cond.wait(wait)
                        continue
                    batch, self._out = self._out, []
                self._send(m.TaskOutputs(batch))
        except OSError:  # the channel is gone: the main thread finds out too
            pass

    def _request_stop(self, drop_queued: bool = True) -> None:
        with self.cond:
            self.stopping = True
            if drop_queued:
                self.queue.clear()
            self.cond.notify_all()
        self._wake_async()

    def _args(self, item: m.TaskInput):
        try:
            return pickle.loads(item.args)
        except Exception as e:
            raise DeserializationError(
                f"cannot unpickle the arguments in the container ({type(e).__name__}: {e}); "
                f"the caller runs Python {self.spec.python_version or '?'}, this container "
                f"{sys.version_info.major}.{sys.version_info.minor}"
            ) from None

    def _success(self, item: m.TaskInput, result, t0: float) -> m.TaskOutput:
        return m.TaskOutput(
            item.input_id,
            item.attempt,
            "success",
            self._dumps(result),
            duration=time.perf_counter() - t0,
        )

    def _failure(self, item: m.TaskInput, e: BaseException, t0: float) -> m.TaskOutput:
        failure = describe_failure(e)
        return failure.task_output(item.input_id, item.attempt, time.perf_counter() - t0)

    def _run(self, target: Target, item: m.TaskInput) -> m.TaskOutput:
        self.running[item.input_id] = threading.get_ident()
        t0 = time.perf_counter()
        token = current.INPUT_ID.set(current.input_id(self.container_id, item.input_id))
        call_token = current.CALL_ID.set(item.call_id)
        try:
            try:
                fn, is_gen, is_async = target.resolve(item.method)
                args, kwargs = self._args(item)
                if is_gen:
                    self._run_generator(fn, item, args, kwargs)
                    result = None
                elif is_async:
                    result = self._event_loop().run_until_complete(fn(*args, **kwargs))
                else:
                    result = fn(*args, **kwargs)
            finally:
                self.running.pop(item.input_id, None)
            return self._success(item, result, t0)
        except BaseException as e:  # noqa: BLE001 - the caller gets it
            if isinstance(e, KeyboardInterrupt):
                raise
            return self._failure(item, e, t0)
        finally:
            current.INPUT_ID.reset(token)
            current.CALL_ID.reset(call_token)

    async def _run_async(self, target: Target, item: m.TaskInput) -> m.TaskOutput:
        self.running[item.input_id] = self._main_thread
        t0 = time.perf_counter()
        # each input is its own task, with its own copy of the context
        current.INPUT_ID.set(current.input_id(self.container_id, item.input_id))
        current.CALL_ID.set(item.call_id)
        try:
            try:
                fn, is_gen, _ = target.resolve(item.method)
                args, kwargs = self._args(item)
                if is_gen:
                    i = 0
                    async for value in fn(*args, **kwargs):
                        self._send_gen_item(item, i, value)
                        i += 1
                    result = None
                else:
                    result = await fn(*args, **kwargs)
            finally:
                self.running.pop(item.input_id, None)
            return self._success(item, result, t0)
        except asyncio.CancelledError:
            cancelled = InputCancellation(f"input {item.input_id} was cancelled")
            return self._failure(item, cancelled, t0)
        except Exception as e:  # noqa: BLE001 - the caller gets it
            return self._failure(item, e, t0)

    def _run_batch(self, target: Target, batch: list[m.TaskInput]) -> list[m.TaskOutput]:
        """Call the function once with lists (one per argument); each caller gets its own
        element of the returned list, or the exception."""
        t0 = time.perf_counter()
        good: list[m.TaskInput] = []
        outs: dict[int, m.TaskOutput] = {}
        columns: list[list] = []
        kwcolumns: dict[str, list] = {}
        for item in batch:
            try:
                args, kwargs = self._args(item)
            except Exception as e:  # noqa: BLE001
                outs[item.input_id] = self._failure(item, e, t0)
                continue
            if good and (len(args) != len(columns) or set(kwargs) != set(kwcolumns)):
                mismatch = TypeError(
                    "every call of a @batched function must pass the same arguments"
                )
                outs[item.input_id] = self._failure(item, mismatch, t0)
                continue
            if not good:
                columns = [[] for _ in args]
                kwcolumns = {k: [] for k in kwargs}
            for col, a in zip(columns, args, strict=True):
                col.append(a)
            for k, v in kwargs.items():
                kwcolumns[k].append(v)
            good.append(item)
        if good:
            outs.update(self._call_batch(target, good, columns, kwcolumns, t0))
        return [outs[item.input_id] for item in batch]

    def _call_batch(self, target, good, columns, kwcolumns, t0) -> dict[int, m.TaskOutput]:
        outs: dict[int, m.TaskOutput] = {}
        for item in good:
            self.running[item.input_id] = threading.get_ident()
        try:
            fn, _, is_async = target.resolve(good[0].method)
            results = fn(*columns, **kwcolumns)
            if is_async:
                results = self._event_loop().run_until_complete(results)
            results = list(results)
            if len(results) != len(good):
                raise TypeError(
                    f"{self.spec.name} is @batched: it got {len(good)} inputs and must return "
                    f"a list of {len(good)}, not {len(results)}"
                )
            for item, r in zip(good, results, strict=True):
                if isinstance(r, BaseException):
                    outs[item.input_id] = self._failure(item, r, t0)
                else:
                    outs[item.input_id] = self._success(item, r, t0)
        except BaseException as e:  # noqa: BLE001 - every caller of the batch gets it
            if isinstance(e, KeyboardInterrupt):
                raise
            for item in good:
                outs[item.input_id] = self._failure(item, e, t0)
        finally:
            for item in good:
                self.running.pop(item.input_id, None)
        return outs

    def _run_generator(self, fn, item: m.TaskInput, args, kwargs) -> None:
        gen = fn(*args, **kwargs)
        if hasattr(gen, "__anext__"):
            loop = self._event_loop()
            i = 0
            while True:
                try:
                    value = loop.run_until_complete(gen.__anext__())
                except StopAsyncIteration:
                    return
                self._send_gen_item(item, i, value)
                i += 1
        for i, value in enumerate(gen):
            self._send_gen_item(item, i, value)

    def _send_gen_item(self, item: m.TaskInput, i: int, value) -> None:
        self._send(
            m.TaskOutputs(
                [
                    m.TaskOutput(
                        item.input_id, item.attempt, "success", self._dumps(value), gen_index=i
                    )
                ]
            )
        )

    def _dumps(self, value) -> bytes:
        try:
            return cloudpickle.dumps(value)
        except Exception as e:
            raise SerializationError(
                f"cannot pickle the value returned by {self.spec.name}: "
                f"{type(value).__qualname__} object ({e})"
            ) from None

    def _event_loop(self):
        if self._loop is None:
            import asyncio

            self._loop = asyncio.new_event_loop()
        return self._loop


def main() -> None:
    spec = load_spec()
    sys.path[:0] = settings.MOUNT_PATHS.get()
    os.environ[settings.IN_CONTAINER.name] = "1"
    if spec.sandbox is not None:  # --- sandboxes: the agent runs the driver's processes
        from .sandbox_agent import main as sandbox_main
        from .sandbox_wire import SandboxSpec

        sb = spec.sandbox
        sandbox_main(SandboxSpec(dict(spec.env), list(sb.entrypoint), sb.workdir))
        return
    if spec.web is not None:  # a web endpoint serves HTTP, not inputs
        from .web import serve_web

        serve_web(spec, Target)
        return
    runner = ContainerRunner(
        settings.CONTAINER_ID.required(),
        settings.CHANNEL.required(),
        settings.CONTAINER_TOKEN.required(),
        spec,
    )
    # cold starts: a container forked from a memory snapshot has its target loaded already
    # (imports + @enter(snap=True) ran in the template); see strato.container.snapshot
    from .snapshot import target_for

    target, loaded = target_for(spec)
    try:
        if not loaded:
            target.load()
        target.enter()
    except BaseException as e:  # noqa: BLE001 - reported, then the container exits
        failure = describe_failure(e)
        print(failure.traceback, file=sys.stderr, end="")
        # a pickled exception too large for a frame is left out: the type and message go
        runner._send(failure.init_failed(max_data=frames.CHUNK))
        sys.exit(1)
    runner.serve(target)
