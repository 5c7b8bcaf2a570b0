"""``@app.cls``: classes whose containers keep state between inputs.

``Model(variant="x")`` returns a handle; ``.predict.remote(...)`` runs the method in a
container that built one instance with those parameters and ran its ``@enter`` hooks.
Each distinct set of parameter values (and each ``with_options`` variant) is its own
function on the control plane, so its own pool of containers.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, cast

import cloudpickle
import msgspec

from strato import exceptions as exc
from strato.protocol import messages as m

from . import options
from .function import Function
from .partial import PARAMETER_TYPES, _Parameter


def class_parameters(user_cls: type) -> dict[str, _Parameter]:
    return {k: v for k, v in vars(user_cls).items() if isinstance(v, _Parameter)}


def class_methods(user_cls: type) -> dict[str, Callable]:
    """The remotely callable methods: ``@method()``, or ``@batched`` / ``@concurrent``
    alone (as in Modal); web endpoints are their own functions, not among them."""
    return {
        k: v
        for k, v in vars(user_cls).items()
        if callable(v)
        and hasattr(v, "__strato_method__")
        and getattr(v, "__strato_web__", None) is None
    }


def lifecycle_hooks(user_cls: type) -> tuple[list[Callable], list[Callable], list[Callable]]:
    """(enter hooks with snap=True, enter hooks with snap=False, exit hooks), in order."""
    snap: list[Callable] = []
    enter: list[Callable] = []
    exit_: list[Callable] = []
    for v in vars(user_cls).values():
        if not callable(v):
            continue
        mark = getattr(v, "__strato_enter__", None)
        if mark is not None:
            (snap if mark["snap"] else enter).append(v)
        if getattr(v, "__strato_exit__", False):
            exit_.append(v)
    return snap, enter, exit_


def instantiate(user_cls: type, params: dict[str, Any]):
    """An instance with its parameters set (the class's own ``__init__`` is not called,
    as in Modal), before any ``@enter`` hook."""
    obj = cast(Any, user_cls).__new__(user_cls)  # the class's own __new__, if it has one
    for name, p in class_parameters(user_cls).items():
        value = params.get(name, p.default)
        setattr(obj, name, value)
    return obj


def check_params(user_cls_name: str, declared: dict[str, _Parameter], given: dict) -> dict:
    unknown = sorted(set(given) - set(declared))
    if unknown:
        raise exc.InvalidError(
            f"{user_cls_name}() got unknown parameters {unknown}; declared: "
            + (", ".join(declared) or "none (use strato.parameter())")
        )
    out = {}
    for name, p in declared.items():
        if name in given:
            value = given[name]
            if not isinstance(value, PARAMETER_TYPES):
                raise exc.InvalidError(
                    f"{user_cls_name}({name}={value!r}): parameters must be int, str, bytes or bool"
                )
            out[name] = value
        elif p.required:
            raise exc.InvalidError(f"{user_cls_name}() is missing parameter {name!r}")
    return out


class Cls:
    """The handle ``@app.cls`` returns: call it with parameters to get an ``Obj``."""

    def __init__(
        self,
        user_cls: type | None,
        spec: m.FunctionSpec | None,
        app=None,
        service: Function | None = None,
        overrides: dict | None = None,
    ) -> None:
        self._user_cls = user_cls
        self._spec = spec
        self._app = app
        self._service = service or Function(None, spec, app)
        self._overrides = overrides or {}
        if user_cls is not None:
            self.__name__ = user_cls.__name__
            self.__qualname__ = user_cls.__qualname__
            self.__doc__ = user_cls.__doc__

    def __repr__(self) -> str:
        return f"<strato.Cls {self._spec.name if self._spec else self._service.tag}>"

    @classmethod
    def from_name(cls, app_name: str, name: str) -> Cls:
        return cls(None, None, service=Function.from_name(app_name, name))

    def __call__(self, **params) -> Obj:
        if self._user_cls is not None:
            params = check_params(self._user_cls.__name__, class_parameters(self._user_cls), params)
        return Obj(self, params)

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self(), name)  # a class without parameters: Model.predict.remote()

    def with_options(self, **opts) -> Cls:
        """A variant with other resources or scaling (the options of ``Function.with_options``:
        cpu, memory, gpu, timeout, retries, env, min/max/buffer_containers,
        scaledown_window, runtime); its containers form their own pool."""
        ov = options.overrides(self._spec, self._overrides, **opts)
        return Cls(self._user_cls, self._spec, self._app, self._service, ov)

    def with_concurrency(self, *, max_inputs: int, target_inputs: int | None = None) -> Cls:
        from .partial import concurrent

        cfg = concurrent(max_inputs=max_inputs, target_inputs=target_inputs)(lambda: None)
        c = cfg.__strato_concurrency__
        return Cls(
            self._user_cls,
            self._spec,
            self._app,
            self._service,
            {**self._overrides, "max_inputs": c.max_inputs, "target_inputs": c.target_inputs},
        )

    def with_batching(self, *, max_batch_size: int, wait_ms: int) -> Cls:
        from .partial import batched

        b = batched(max_batch_size=max_batch_size, wait_ms=wait_ms)(lambda: None).__strato_batch__
        return Cls(
            self._user_cls,
            self._spec,
            self._app,
            self._service,
            {**self._overrides, "batch_max_size": b.max_batch_size, "batch_wait_ms": b.wait_ms},
        )


class Obj:
    """An instance handle: its methods run remotely (``.remote``, ``.map``, ...) or here
    (``.local``, on a local instance whose ``@enter`` hooks ran once)."""

    def __init__(self, cls: Cls, params: dict) -> None:
        self._cls = cls
        self._params = params
        self._bound_id: str | None = None
        self._local = None
        self._methods: dict[str, Function] = {}

    def __repr__(self) -> str:
        return f"<strato.Obj {self._cls!r} {self._params}>"

    def _bind(self) -> str:
        """The function id of this parameter set (and options), created on first use."""
        if self._bound_id is None:
            service = self._cls._service
            client, fid = service._ensure()
            if not self._params and not self._cls._overrides:
                self._bound_id = fid
            else:
                req = m.BindFunction(
                    params=cloudpickle.dumps(self._params) if self._params else None,
                    overrides=msgspec.msgpack.encode(self._cls._overrides)
                    if self._cls._overrides
                    else None,
                )
                ref = client.call("POST", f"/functions/{fid}/bind", req, m.FunctionRef)
                self._bound_id = ref.function_id
        return self._bound_id

    def _local_instance(self):
        if self._local is None:
            user_cls = self._cls._user_cls
            if user_cls is None:
                raise exc.InvalidError("a class looked up by name has no local code")
            obj = instantiate(user_cls, self._params)
            snap, enter, _ = lifecycle_hooks(user_cls)
            for hook in [*snap, *enter]:
                hook(obj)
            self._local = obj
        return self._local

    def __getattr__(self, name: str) -> Function:
        if name.startswith("_"):
            raise AttributeError(name)
        fn = self._methods.get(name)
        if fn is None:
            user_cls = self._cls._user_cls
            if user_cls is not None:
                methods = class_methods(user_cls)
                if name not in methods:
                    raise AttributeError(
                        f"{user_cls.__name__} has no @strato.method() {name!r}; methods: "
                        + (", ".join(methods) or "none")
                    )
                raw = methods[name]
                is_gen = inspect.isgeneratorfunction(raw) or inspect.isasyncgenfunction(raw)
            else:
                raw, is_gen = None, False
            fn = Function.for_method(self, name, raw, is_gen)
            self._methods[name] = fn
        return fn
