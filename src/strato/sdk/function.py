"""``Function`` and ``FunctionCall``: calling functions that run in strato's containers."""

from __future__ import annotations

import hashlib
import itertools
import json
import queue
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

import msgspec

from strato import exceptions as exc
from strato import settings
from strato.client import serialization as ser
from strato.client import session
from strato.client.http import ApiBase
from strato.protocol import messages as m

from .aio import with_aio

if TYPE_CHECKING:
    from .call_graph import InputInfo
    from .image import Image

REMOTE_WAIT_S = 50.0  # one long-poll of a .remote() call
MAP_BATCH = 1000  # inputs per request
MAP_BATCH_BYTES = 4 << 20


def _new_call_id() -> str:
    return "fc-" + uuid.uuid4().hex


class _Hydration:
    """Where a Function lives on the control plane, once its app runs or is looked up."""

    def __init__(self) -> None:
        self.function_id: str | None = None
        self.app_id: str | None = None
        self.app_name: str | None = None
        self.name: str | None = None
        self.blob_threshold: int = 1 << 20
        self.max_payload: int = 256 << 20


class Function:
    """A function that runs remotely. Made by ``@app.function(...)`` or
    ``Function.from_name(app_name, name)``."""

    _image: Image | None = None  # the strato.Image it runs on (None: the worker's own Python)
    _parent: Function | None = None  # the function a with_options() variant derives from
    _overrides: dict = {}  # noqa: RUF012 - never mutated; the variant's spec changes

    def __init__(self, raw_f: Callable | None, spec: m.FunctionSpec | None, app=None) -> None:
        self._raw_f = raw_f
        self._spec = spec
        self._app = app
        self._hyd = _Hydration()
        self._method: str | None = None  # set on a class method's handle
        self._obj = None  # the class instance handle (strato.sdk.cls.Obj) of a method
        self._is_gen = spec.is_generator if spec is not None else False
        if raw_f is not None:
            self.__name__ = raw_f.__name__
            self.__qualname__ = raw_f.__qualname__
            self.__doc__ = raw_f.__doc__
            self.__module__ = raw_f.__module__

    def __repr__(self) -> str:
        return f"<strato.Function {self.tag}>"

    @property
    def tag(self) -> str:
        return self._spec.name if self._spec is not None else (self._hyd.name or "?")

    def get_raw_f(self) -> Callable:
        if self._raw_f is None:
            raise exc.InvalidError(f"{self!r} was looked up by name; it has no local code")
        return self._raw_f

    # ------------------------------------------------------------------ hydration

    @classmethod
    def from_name(cls, app_name: str, name: str) -> Function:
        """A deployed function, looked up on first use."""
        f = cls(None, None)
        f._hyd.app_name = app_name
        f._hyd.name = name
        return f

    @classmethod
    def for_method(cls, obj, name: str, raw: Callable | None, is_generator: bool) -> Function:
        """The handle of method ``name`` of a class instance handle ``obj``."""
        f = cls(None, None)
        f._raw_f = raw
        f._method = name
        f._obj = obj
        f._is_gen = is_generator
        f._hyd.name = f"{obj._cls!r}.{name}"
        return f

    def _hydrate(self, function_id: str, app_id: str | None) -> None:
        self._hyd.function_id = function_id
        self._hyd.app_id = app_id

    def _ensure(self) -> tuple[ApiBase, str]:
        client = session.api()
        if self._obj is not None:
            return client, self._obj._bind()
        if self._parent is not None and self._hyd.function_id is None:  # with_options variant
            _, parent_id = self._parent._ensure()
            req = m.BindFunction(overrides=msgspec.msgpack.encode(self._overrides))
            ref = client.call("POST", f"/functions/{parent_id}/bind", req, m.FunctionRef)
            self._hyd.function_id = ref.function_id
        if self._hyd.function_id is None:
            if self._hyd.app_name is None and settings.IN_CONTAINER.get():
                # code in a container calls a function of its own app: by name in that app
                self._hyd.app_id = settings.APP_ID.required()
                ref = client.call(
                    "GET", f"/apps/{self._hyd.app_id}/functions/{self.tag}", None, m.FunctionRef
                )
                self._hyd.function_id = ref.function_id
                return client, ref.function_id
            if self._hyd.app_name is None:
                raise exc.ExecutionError(
                    f"{self.tag} is not running: call it inside `with app.run():`, from a "
                    "@app.local_entrypoint() run by `strato run`, or deploy the app and use "
                    "strato.Function.from_name(app, name)"
                )
            ref = client.call(
                "GET", f"/apps/{self._hyd.app_name}/functions/{self._hyd.name}", None, m.FunctionRef
            )
            self._hyd.function_id = ref.function_id
        return client, self._hyd.function_id

    @property
    def object_id(self) -> str | None:
        return self._hyd.function_id

    # ------------------------------------------------------------------ helpers

    def _input(self, client: ApiBase, idx: int, args: tuple, kwargs: dict) -> m.InputItem:
        data = ser.serialize_args(self.tag, args, kwargs)
        health = _limits(client)
        if len(data) > health["max_payload_bytes"]:
            raise exc.RequestSizeError(
                f"the arguments of {self.tag} pickle to {len(data)} bytes, over the control "
                f"plane's limit of {health['max_payload_bytes']} bytes (STRATO_MAX_PAYLOAD)"
            )
        if len(data) > health["blob_threshold_bytes"]:
            key = hashlib.sha256(data).hexdigest()
            client.put_blob(key, data)
            return m.InputItem(idx, None, key)
        return m.InputItem(idx, data)

    # ------------------------------------------------------------------ calling

    def local(self, *args, **kwargs):
        """Run the function here, in this process."""
        if self._obj is not None:
            return self.get_raw_f()(self._obj._local_instance(), *args, **kwargs)
        return self.get_raw_f()(*args, **kwargs)

    def __call__(self, *args, **kwargs):
        raise exc.InvalidError(
            f"{self.tag} is a strato Function: call it with .remote(...) to run it in a "
            "container or .local(...) to run it here"
        )

    @with_aio
    def remote(self, *args, **kwargs):
        """Run the function in a container and return its result."""
        if self._is_gen:
            raise exc.InvalidError(f"{self.tag} is a generator: use .remote_gen(...)")
        client, fid = self._ensure()
        call_id = _new_call_id()
        req = m.CreateCall(
            call_id,
            fid,
            [self._input(client, 0, args, kwargs)],
            wait=REMOTE_WAIT_S,
            method=self._method,
        )
        out = client.call("POST", "/calls", req, m.Outputs, timeout=REMOTE_WAIT_S + 30)
        while not out.outputs:
            out = _poll(client, call_id, 0, REMOTE_WAIT_S)
        return _value(client, out.outputs[0])

    @with_aio
    def remote_gen(self, *args, **kwargs):
        """Run a generator function in a container, yielding its items as they come."""
        client, fid = self._ensure()
        call_id = _new_call_id()
        req = m.CreateCall(
            call_id, fid, [self._input(client, 0, args, kwargs)], kind="gen", method=self._method
        )
        client.call("POST", "/calls", req, m.Outputs)
        after = 0
        pending: dict[int, m.OutputItem] = {}
        next_index = 0
        final: m.OutputItem | None = None
        while True:
            out = _poll(client, call_id, after, REMOTE_WAIT_S)
            after = out.last_seq
            for o in out.outputs:
                if o.gen_index is None:
                    final = o
                elif o.gen_index >= next_index:
                    # (an input run again, after a control-plane restart, yields its items
                    # again: those already yielded are skipped)
                    pending[o.gen_index] = o
            while next_index in pending:
                yield _value(client, pending.pop(next_index))
                next_index += 1
            if final is not None and not pending:
                if final.status != "success":
                    _value(client, final)  # raises
                return

    @with_aio
    def spawn(self, *args, **kwargs) -> FunctionCall:
        """Start the function in a container; returns a handle to its result."""
        client, fid = self._ensure()
        call_id = _new_call_id()
        req = m.CreateCall(
            call_id, fid, [self._input(client, 0, args, kwargs)], kind="spawn", method=self._method
        )
        client.call("POST", "/calls", req, m.Outputs)
        return FunctionCall(call_id)

    @with_aio(iterates=True)
    def map(
        self,
        *iterables: Iterable,
        kwargs: dict | None = None,
        order_outputs: bool = True,
        return_exceptions: bool = False,
        wrap_returned_exceptions: bool = True,
    ) -> Iterator:
        """Run the function on every element (zipped across ``iterables``), in parallel;
        ``kwargs`` go to every call. Returned exceptions are the original ones (as in Modal
        since 1.4: ``wrap_returned_exceptions`` is accepted and changes nothing)."""
        return self._map(zip(*iterables, strict=False), kwargs, order_outputs, return_exceptions)

    @with_aio(iterates=True)
    def starmap(
        self,
        iterable: Iterable[tuple],
        *,
        kwargs: dict | None = None,
        order_outputs: bool = True,
        return_exceptions: bool = False,
        wrap_returned_exceptions: bool = True,
    ) -> Iterator:
        """Like ``map``, each element of ``iterable`` being the arguments of one call."""
        return self._map((tuple(a) for a in iterable), kwargs, order_outputs, return_exceptions)

    @with_aio
    def for_each(
        self, *iterables: Iterable, kwargs: dict | None = None, ignore_exceptions: bool = False
    ) -> None:
        """Like ``map``, discarding results."""
        for _ in self._map(zip(*iterables, strict=False), kwargs, False, ignore_exceptions):
            pass

    @with_aio
    def spawn_map(self, *iterables: Iterable, kwargs: dict | None = None) -> FunctionCall:
        """Submit every input and return at once; results stay fetchable by call id."""
        client, fid = self._ensure()
        call_id = _new_call_id()
        args_iter = zip(*iterables, strict=False)
        _MapSender(self, client, fid, call_id, args_iter, "spawn_map", _kwargs(kwargs)).run()
        return FunctionCall(call_id)

    def _map(
        self,
        args_iter: Iterable[tuple],
        kwargs: dict | None,
        order_outputs: bool,
        return_exceptions: bool,
    ) -> Iterator:
        client, fid = self._ensure()
        call_id = _new_call_id()
        sender = _MapSender(self, client, fid, call_id, args_iter, "map", _kwargs(kwargs))
        return _map_results(client, sender, order_outputs, return_exceptions)

    # ------------------------------------------------------------------ variants

    def with_options(self, **opts) -> Function:
        """A variant with other resources, limits or runtime (cpu, memory, gpu, timeout,
        retries, env, min/max/buffer_containers, scaledown_window, runtime); its containers
        are their own pool (Modal's ``Function.with_options``)."""
        from . import options

        ov = options.overrides(self._spec, self._overrides, **opts)
        variant = Function(self._raw_f, self._spec, self._app)
        variant._image = self._image
        variant._overrides = ov
        variant._parent = self
        return variant

    # ------------------------------------------------------------------ deployed functions

    def update_autoscaler(
        self,
        *,
        min_containers: int | None = None,
        max_containers: int | None = None,
        buffer_containers: int | None = None,
        scaledown_window: float | None = None,
    ) -> None:
        client, fid = self._ensure()
        client.call(
            "POST",
            f"/functions/{fid}/autoscaler",
            m.UpdateAutoscaler(min_containers, max_containers, buffer_containers, scaledown_window),
        )

    def get_current_stats(self) -> m.FunctionStats:
        client, fid = self._ensure()
        return client.call("GET", f"/functions/{fid}/stats", None, m.FunctionStats)

    def get_web_url(self) -> str | None:
        """The URL of a web endpoint on the gateway (stable across deploys: by app and
        label); None when the function is not a web endpoint."""
        if self._spec is not None and self._spec.web is None:
            return None
        client, fid = self._ensure()
        app_ref = self._hyd.app_id or self._hyd.app_name
        if app_ref is None:
            return None
        info = client.call("GET", f"/apps/{app_ref}", None, m.AppInfo)
        return next((f.web_url for f in info.functions if f.function_id == fid), None)


def _kwargs(kwargs: dict | None) -> dict:
    if kwargs is None:
        return {}
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise exc.InvalidError(f"kwargs={kwargs!r}: use a dict of keyword arguments")
    return kwargs


def _limits(client: ApiBase) -> dict:
    """The control plane's payload limits (from /health, once per client)."""
    if client.health is None:
        client.health = json.loads(client.request_raw("GET", "/health"))
    return client.health


def _poll(client: ApiBase, call_id: str, after: int, timeout: float) -> m.Outputs:
    return client.call(
        "GET",
        f"/calls/{call_id}/outputs",
        None,
        m.Outputs,
        params={"after": after, "timeout": timeout},
        timeout=timeout + 30,
    )


def _value(client: ApiBase, out: m.OutputItem):
    data = out.data
    if data is None and out.blob is not None:
        data = client.get_blob(out.blob)
    if out.status == "success":
        if data is None:
            raise exc.DeserializationError("the control plane sent a result without its value")
        return ser.deserialize(data, "the function's result")
    raise ser.error_from_output(out, data)


class _MapSender:
    """Submits a map's inputs in batches from a background thread."""

    def __init__(
        self,
        fn: Function,
        client: ApiBase,
        function_id: str,
        call_id: str,
        args_iter: Iterable[tuple],
        kind: m.CallKind,
        kwargs: dict | None = None,
    ) -> None:
        self.fn = fn
        self.kwargs = kwargs or {}
        self.client = client
        self.function_id = function_id
        self.call_id = call_id
        self.args_iter = args_iter
        self.kind = kind
        self.total: int | None = None
        self.created = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            idx = 0
            created = False
            it = iter(self.args_iter)
            while True:
                batch: list[m.InputItem] = []
                size = 0
                for args in itertools.islice(it, MAP_BATCH):
                    item = self.fn._input(self.client, idx, tuple(args), self.kwargs)
                    batch.append(item)
                    idx += 1
                    size += len(item.args or b"")
                    if size > MAP_BATCH_BYTES:
                        break
                last = len(batch) == 0 or (len(batch) < MAP_BATCH and size <= MAP_BATCH_BYTES)
                if not created:
                    self.client.call(
                        "POST",
                        "/calls",
                        m.CreateCall(
                            self.call_id,
                            self.function_id,
                            batch,
                            kind=self.kind,
                            closed=last,
                            method=self.fn._method,
                        ),
                        m.Outputs,
                    )
                    created = True
                    self.created.set()
                elif batch or last:
                    self.client.call(
                        "POST",
                        f"/calls/{self.call_id}/inputs",
                        m.AddInputs(batch, closed=last, total=idx if last else None),
                    )
                if last:
                    self.total = idx
                    return
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            self.error = e
        finally:
            self.created.set()

    def start(self) -> threading.Thread:
        t = threading.Thread(target=self.run, name="strato-map-send", daemon=True)
        t.start()
        return t


def _map_results(
    client: ApiBase, sender: _MapSender, order_outputs: bool, return_exceptions: bool
) -> Iterator:
    thread = sender.start()
    sender.created.wait()
    if sender.error is not None:
        raise sender.error
    after = 0
    seen: set[int] = set()
    buffered: dict[int, m.OutputItem] = {}
    next_idx = 0
    received = 0
    while True:
        if sender.error is not None:
            raise sender.error
        if sender.total is not None and received >= sender.total:
            break
        out = _poll(client, sender.call_id, after, 5.0)
        after = out.last_seq
        for o in out.outputs:
            if o.gen_index is not None or o.idx in seen:
                continue
            seen.add(o.idx)
            received += 1
            if order_outputs:
                buffered[o.idx] = o
            else:
                yield _result_or_exception(client, o, return_exceptions)
        if order_outputs:
            while next_idx in buffered:
                yield _result_or_exception(client, buffered.pop(next_idx), return_exceptions)
                next_idx += 1
        if out.done and sender.total is None:
            thread.join(1.0)
    thread.join(5.0)


def _result_or_exception(client: ApiBase, o: m.OutputItem, return_exceptions: bool):
    try:
        return _value(client, o)
    except Exception as e:
        if return_exceptions:
            return e
        raise


class FunctionCall:
    """A handle to a spawned call: ``.get(timeout=)``, ``.cancel()``, ``from_id``."""

    def __init__(self, call_id: str) -> None:
        self.object_id = call_id

    def __repr__(self) -> str:
        return f"<strato.FunctionCall {self.object_id}>"

    @classmethod
    def from_id(cls, call_id: str) -> FunctionCall:
        return cls(call_id)

    @with_aio
    def get(self, timeout: float | None = None):
        """The call's result; raises ``strato.exceptions.TimeoutError`` after ``timeout`` s."""
        client = session.api()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = REMOTE_WAIT_S if deadline is None else max(0.0, deadline - time.monotonic())
            out = _poll(client, self.object_id, 0, min(wait, REMOTE_WAIT_S))
            finals = [o for o in out.outputs if o.gen_index is None]
            if finals:
                return _value(client, finals[0])
            if deadline is not None and time.monotonic() >= deadline:
                raise exc.TimeoutError(
                    f"call {self.object_id} has no result after {timeout}s; "
                    "call .get() again to keep waiting"
                )

    @with_aio
    def cancel(self, terminate_containers: bool = False) -> None:
        session.api().call(
            "POST", f"/calls/{self.object_id}/cancel", m.Cancel(terminate_containers)
        )

    @with_aio
    def get_call_graph(self) -> list[InputInfo]:
        """The call's inputs, each with the inputs of the calls its code made (from inside
        its container), recursively: Modal's ``InputInfo`` trees."""
        from .call_graph import from_wire

        graph = session.api().call("GET", f"/calls/{self.object_id}/graph", None, m.CallGraph)
        if graph.truncated:
            warnings.warn(
                f"the call graph of {self.object_id} is too large for one answer; "
                "deeper levels or later inputs are left out",
                stacklevel=2,
            )
        return from_wire(graph)

    @staticmethod
    def gather(*calls: FunctionCall) -> list:
        """Wait for every call; returns their results in order."""
        results: queue.Queue = queue.Queue()
        threads = []
        for i, c in enumerate(calls):

            def run(i=i, c=c):
                try:
                    results.put((i, True, c.get()))
                except BaseException as e:  # noqa: BLE001
                    results.put((i, False, e))

            t = threading.Thread(target=run, daemon=True)
            t.start()
            threads.append(t)
        out = [None] * len(calls)
        for _ in calls:
            i, ok, value = results.get()
            if not ok:
                raise value
            out[i] = value
        return out
