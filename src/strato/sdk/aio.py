"""``.aio`` twins of blocking methods: ``await f.remote.aio(x)``, ``async for r in
f.map.aio(xs)``. The blocking call runs in a worker thread, so the event loop stays free."""

from __future__ import annotations

import asyncio
import functools
import inspect

_DONE = object()


class _Bound:
    def __init__(self, fn, instance) -> None:
        self._fn = fn
        self._instance = instance
        functools.update_wrapper(self, fn)

    def __call__(self, *args, **kwargs):
        return self._fn(self._instance, *args, **kwargs)

    def aio(self, *args, **kwargs):
        if inspect.isgeneratorfunction(self._fn):
            return _agen(self._fn(self._instance, *args, **kwargs))
        return asyncio.to_thread(self._fn, self._instance, *args, **kwargs)


async def _agen(gen):
    try:
        while True:
            item = await asyncio.to_thread(next, gen, _DONE)
            if item is _DONE:
                return
            yield item
    finally:
        await asyncio.to_thread(gen.close)


class with_aio:  # noqa: N801 - used as a decorator
    """Method decorator: the method stays blocking and gains ``.aio``."""

    def __init__(self, fn) -> None:
        self._fn = fn
        functools.update_wrapper(self, fn)

    def __get__(self, instance, owner=None):
        if instance is None:
            return self
        return _Bound(self._fn, instance)
