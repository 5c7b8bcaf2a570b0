"""``.aio`` twins of blocking methods: ``await f.remote.aio(x)``, ``async for r in
f.map.aio(xs)``. The blocking call runs in a worker thread, so the event loop stays free."""

from __future__ import annotations

import asyncio
import functools
import inspect

_DONE = object()


def _wrapper_attrs(fn) -> dict:
    """What `functools.update_wrapper` would set on a wrapper of ``fn``, worked out once
    per method rather than on every access to it."""
    attrs = {a: getattr(fn, a) for a in functools.WRAPPER_ASSIGNMENTS if hasattr(fn, a)}
    return {**attrs, **getattr(fn, "__dict__", {}), "__wrapped__": fn}


class _Bound:
    def __init__(self, fn, instance, iterates: bool, attrs: dict) -> None:
        self._fn = fn
        self._instance = instance
        self._iterates = iterates
        self.__dict__.update(attrs)  # (as functools.update_wrapper does)

    def __call__(self, *args, **kwargs):
        return self._fn(self._instance, *args, **kwargs)

    def aio(self, *args, **kwargs):
        if self._iterates:
            return _agen(self._fn, self._instance, args, kwargs)
        return asyncio.to_thread(self._fn, self._instance, *args, **kwargs)


async def _agen(fn, instance, args, kwargs):
    # the call itself may do I/O (map looks its function up), so it runs in a thread too
    it = await asyncio.to_thread(lambda: iter(fn(instance, *args, **kwargs)))
    try:
        while True:
            item = await asyncio.to_thread(next, it, _DONE)
            if item is _DONE:
                return
            yield item
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            try:
                await asyncio.to_thread(close)
            except ValueError:  # still running in its thread (the task was cancelled)
                pass


class with_aio:  # noqa: N801 - used as a decorator
    """Method decorator: the method stays blocking and gains ``.aio``.

    ``.aio`` of a generator method, or of one marked ``iterates=True`` (a method that
    returns an iterator, like ``map``), is an async iterator; else it is a coroutine."""

    def __init__(self, fn=None, *, iterates: bool = False) -> None:
        self._fn = fn
        self._iterates = iterates
        if fn is not None:
            self._iterates = iterates or inspect.isgeneratorfunction(fn)
            functools.update_wrapper(self, fn)
            self._attrs = _wrapper_attrs(fn)

    def __call__(self, *args, **kwargs):
        if self._fn is None:  # as @with_aio(iterates=True)
            (fn,) = args
            return with_aio(fn, iterates=self._iterates)
        return self._fn(*args, **kwargs)  # called through the class: Function.map(f, xs)

    def __get__(self, instance, owner=None):
        if instance is None:
            return self
        return _Bound(self._fn, instance, self._iterates, self._attrs)
