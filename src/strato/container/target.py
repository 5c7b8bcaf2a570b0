"""What a container serves: one function, or the methods of one class instance.

Loading a class builds the instance with its parameter values and runs its ``@enter``
hooks (``snap=True`` ones first); ``close()`` runs its ``@exit`` hooks.
"""

from __future__ import annotations

import importlib
import inspect
import pickle
from collections.abc import Callable

import cloudpickle

from strato.exceptions import InvalidError
from strato.protocol import messages as m


class Target:
    def __init__(self, spec: m.FunctionSpec) -> None:
        self.spec = spec
        self.instance = None
        self._fn: Callable | None = None
        self._exit_hooks: list[Callable] = []
        self._methods: dict[str, Callable] = {}

    def load(self) -> None:
        """Import the user's code (and, for a class, build the instance and run the
        ``snap=True`` enter hooks)."""
        spec = self.spec
        if spec.serialized is not None:
            obj = cloudpickle.loads(spec.serialized)
        else:
            obj = importlib.import_module(spec.module)
            for part in spec.qualname.split("."):
                obj = getattr(obj, part)
        if not spec.is_class:
            raw = getattr(obj, "get_raw_f", None)
            self._fn = raw() if raw is not None else obj
            return
        user_cls = getattr(obj, "_user_cls", obj)  # the strato.Cls handle or the class
        params = pickle.loads(spec.params) if spec.params else {}
        self.instance = user_cls.__new__(user_cls)
        snap: list[Callable] = []
        enter: list[Callable] = []
        exit_: list[Callable] = []
        for name, value in vars(user_cls).items():
            if type(value).__name__ == "_Parameter":  # strato.parameter(); the SDK checked
                setattr(self.instance, name, params.get(name, value.default))
                continue
            if not callable(value):
                continue
            mark = getattr(value, "__strato_enter__", None)
            if mark is not None:
                (snap if mark["snap"] else enter).append(value)
            if getattr(value, "__strato_exit__", False):
                exit_.append(value)
            if hasattr(value, "__strato_method__"):
                self._methods[name] = getattr(self.instance, name)
        self._enter_after_snapshot = enter
        self._exit_hooks = exit_
        for hook in snap:
            self._call_hook(hook)

    def enter(self) -> None:
        """The ``@enter`` hooks that run after a snapshot would be taken."""
        for hook in getattr(self, "_enter_after_snapshot", []):
            self._call_hook(hook)

    def _call_hook(self, hook: Callable) -> None:
        result = hook(self.instance)
        if inspect.iscoroutine(result):
            import asyncio

            asyncio.run(result)

    def close(self) -> None:
        for hook in self._exit_hooks:
            self._call_hook(hook)

    def resolve(self, method: str | None) -> tuple[Callable, bool, bool]:
        """(callable, is_generator, is_async) for an input."""
        spec = self.spec
        if not spec.is_class:
            if self._fn is None:
                raise InvalidError(f"{spec.name} is not loaded: load() comes first")
            return self._fn, spec.is_generator, spec.is_async and not spec.is_generator
        fn = self._methods.get(method or "")
        if fn is None:
            raise InvalidError(
                f"{spec.name} has no @strato.method() {method!r}; methods: "
                + ", ".join(self._methods)
            )
        return (
            fn,
            method in spec.generator_methods,
            method in spec.async_methods and method not in spec.generator_methods,
        )
