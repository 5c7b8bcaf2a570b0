"""The in-container entrypoint: import the user's function, take inputs, return outputs.

This is on the cold-start path, so it imports only the stdlib, msgspec, cloudpickle and
``strato.protocol``. The control plane's channel is a Unix (or TCP) socket handed in by
the worker agent, so a container without network still gets its inputs. A reader thread
takes frames off the socket; the main thread runs inputs and writes outputs, batching
them while more inputs are already waiting.
"""

from __future__ import annotations

import importlib
import os
import pickle
import signal
import sys
import threading
import time
import traceback
from collections import deque

import cloudpickle
import msgspec

from strato.exceptions import InputCancellation, SerializationError
from strato.protocol import frames
from strato.protocol import messages as m

FLUSH_EVERY = 128
FLUSH_AFTER_S = 0.005


def describe_exception(e: BaseException) -> tuple[str, str, bytes | None]:
    """("module.Type: message", traceback without strato's frames, pickled exception)."""
    cls = type(e)
    name = (
        cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    )
    tb = e.__traceback__
    while tb is not None and tb.tb_frame.f_globals.get("__name__", "").startswith("strato."):
        tb = tb.tb_next
    text = "".join(traceback.format_exception(cls, e, tb))
    try:
        data = cloudpickle.dumps(e)
        pickle.loads(data)  # an exception that pickles but cannot be rebuilt is no use
    except Exception:  # noqa: BLE001 - the caller gets a RemoteError with the type name
        data = None
    return f"{name}: {e}", text, data


def load_function(spec: m.FunctionSpec):
    if spec.serialized is not None:
        obj = cloudpickle.loads(spec.serialized)
    else:
        obj = importlib.import_module(spec.module)
        for part in spec.qualname.split("."):
            obj = getattr(obj, part)
    raw = getattr(obj, "get_raw_f", None)
    return raw() if raw is not None else obj


class ContainerRunner:
    def __init__(self, container_id: str, channel: str, token: str, spec: m.FunctionSpec) -> None:
        self.container_id = container_id
        self.spec = spec
        self._send_lock = threading.Lock()
        self.sock = frames.connect(channel)
        self._send(m.ContainerHello(container_id, token))
        self.queue: deque[m.TaskInput] = deque()
        self.cond = threading.Condition()
        self.stopping = False
        self.current: int | None = None
        self.cancelled: set[int] = set()
        self._main_thread = threading.get_ident()
        self._loop = None
        # outputs not sent yet; the flusher thread sends them once FLUSH_AFTER_S old, so
        # that a fast input's output never waits for the (maybe long) input after it
        self._out: list[m.TaskOutput] = []
        self._out_first = 0.0
        self._out_lock = threading.Lock()
        self._out_cond = threading.Condition(self._out_lock)
        self._flusher_idle = False  # waiting for outputs (not timing a batch)
        self._serving = True

    def _send(self, msg: object) -> None:
        data = frames.encode(msg)
        with self._send_lock:  # the main thread and the flusher both write
            self.sock.sendall(data)

    # ------------------------------------------------------------------ reader thread

    def _read(self) -> None:
        reader = frames.SocketReader(self.sock)
        try:
            while (msg := reader.read()) is not None:
                if isinstance(msg, m.RunInputs):
                    with self.cond:
                        self.queue.extend(msg.inputs)
                        self.cond.notify()
                elif isinstance(msg, m.CancelInputs):
                    self._cancel(set(msg.input_ids))
                elif isinstance(msg, m.StopContainer):
                    break
        except (OSError, frames.FrameError):
            pass
        with self.cond:  # the control plane is gone or asked us to stop
            self.stopping = True
            self.cond.notify()

    def _cancel(self, ids: set[int]) -> None:
        with self.cond:
            self.queue = deque(i for i in self.queue if i.input_id not in ids)
            if self.current in ids:
                self.cancelled.add(self.current)
                signal.pthread_kill(self._main_thread, signal.SIGUSR1)

    def _on_sigusr1(self, _signum, _frame) -> None:
        if self.current is not None and self.current in self.cancelled:
            raise InputCancellation(f"input {self.current} was cancelled")

    # ------------------------------------------------------------------ main thread

    def serve(self, fn) -> None:
        signal.signal(signal.SIGUSR1, self._on_sigusr1)
        signal.signal(signal.SIGTERM, lambda *_: self._request_stop())
        threading.Thread(target=self._read, name="strato-channel", daemon=True).start()
        threading.Thread(target=self._flush_loop, name="strato-flush", daemon=True).start()
        self._send(m.ContainerReady())
        try:
            while True:
                with self.cond:
                    while not self.queue and not self.stopping:
                        self.cond.wait()
                    if not self.queue:
                        return  # stopping, nothing left
                    item = self.queue.popleft()
                self._output(self._run(fn, item))
        finally:
            with self._out_cond:
                self._serving = False
                self._out_cond.notify()
            self._flush()

    def _output(self, out: m.TaskOutput) -> None:
        """Queue an output; send the batch now when it is full, old, or nothing else waits."""
        now = time.monotonic()
        with self._out_lock:
            self._out.append(out)
            if len(self._out) == 1:
                self._out_first = now
            if not (
                len(self._out) >= FLUSH_EVERY
                or not self.queue
                or now - self._out_first > FLUSH_AFTER_S
            ):
                if self._flusher_idle:
                    self._out_cond.notify()  # the flusher sends it if the next input is long
                return
            batch, self._out = self._out, []
        self._send(m.TaskOutputs(batch))

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

    def _request_stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.queue.clear()
            self.cond.notify()

    def _run(self, fn, item: m.TaskInput) -> m.TaskOutput:
        self.current = item.input_id
        t0 = time.perf_counter()
        try:
            try:
                args, kwargs = pickle.loads(item.args)
                if self.spec.is_generator:
                    self._run_generator(fn, item, args, kwargs)
                    result = None
                elif self.spec.is_async:
                    result = self._event_loop().run_until_complete(fn(*args, **kwargs))
                else:
                    result = fn(*args, **kwargs)
            finally:
                self.current = None
            data = self._dumps(result)
            return m.TaskOutput(
                item.input_id, item.attempt, "success", data, duration=time.perf_counter() - t0
            )
        except BaseException as e:  # noqa: BLE001 - the caller gets it
            if isinstance(e, KeyboardInterrupt):
                raise
            error, tb, data = describe_exception(e)
            return m.TaskOutput(
                item.input_id,
                item.attempt,
                "failure",
                data,
                error,
                tb,
                duration=time.perf_counter() - t0,
            )

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
    env = os.environ
    with open(env["STRATO_CONTAINER_SPEC"], "rb") as f:
        spec = msgspec.msgpack.decode(f.read(), type=m.FunctionSpec)
    paths = [p for p in env.get("STRATO_MOUNT_PATHS", "").split(os.pathsep) if p]
    sys.path[:0] = paths
    os.environ["STRATO_IN_CONTAINER"] = "1"
    runner = ContainerRunner(
        env["STRATO_CONTAINER_ID"], env["STRATO_CHANNEL"], env["STRATO_CONTAINER_TOKEN"], spec
    )
    try:
        fn = load_function(spec)
    except BaseException as e:  # noqa: BLE001 - reported, then the container exits
        error, tb, data = describe_exception(e)
        print(tb, file=sys.stderr, end="")
        runner._send(m.ContainerInitFailed(error, tb, data))
        sys.exit(1)
    runner.serve(fn)
