"""Dict and Queue operations on the store's writer thread.

Each operation is one function of a connection, run by the store's single writer thread
inside a group-commit transaction, so operations never interleave: a ``Queue.get`` that
reads and deletes the first items of a partition is atomic however many consumers ask at
once. ``run`` resolves once the transaction has committed (the control plane answers
only then, so an answer survives a SIGKILL); it never blocks the event loop.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Generator, Sequence
from typing import Any, Generic, TypeVar

from sqlalchemy import Connection

from strato import exceptions as exc
from strato.server.store import Store, Write
from strato.server.store.writer import _Op

T = TypeVar("T")
RESPONSE_BYTES = 8 << 20  # what one answer carries at most (at least one item or entry)


def fitting(sizes: Sequence[Any], cap: int = RESPONSE_BYTES) -> int:
    """How many of the rows ``(seq, size)`` fit in ``cap`` bytes (at least one)."""
    total = 0
    for i, row in enumerate(sizes):
        total += row[1] or 0
        if total > cap and i > 0:
            return i
    return len(sizes)


class _Refused:
    """A request refused inside an operation (no such object, a limit): handed back as a
    value, so that the writer commits what the operation did before it (nothing, or
    dropping an expired partition) and never counts the refusal as a failed write."""

    __slots__ = ("error",)

    def __init__(self, error: exc.Error) -> None:
        self.error = error


def _guarded(run: Callable[[Connection], T]) -> Callable[[Connection], T | _Refused]:
    def op(c: Connection) -> T | _Refused:
        try:
            return run(c)
        except exc.Error as e:
            return _Refused(e)

    return op


def _result(value: T | _Refused) -> T:
    if isinstance(value, _Refused):
        raise value.error
    return value


class StateDb:
    """The writer-thread side of the state objects. An operation raises a
    ``strato.exceptions.Error`` before it writes anything of its own (checks come first);
    the error reaches the caller, and the store's writer sees a result."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def submit(self, name: str, run: Callable[[Connection], T]) -> Awaitable[T]:
        """Queue ``run`` for the writer: it runs in a transaction (retried alone if its
        batch failed); the returned awaitable resolves after the commit."""
        return _Pending(self.store._write(name, _guarded(run)))

    async def run(self, name: str, run: Callable[[Connection], T]) -> T:
        """``submit`` and wait for the commit, without blocking the loop."""
        return await self.submit(name, run)

    async def read(self, name: str, run: Callable[[Connection], T]) -> T:
        """A read on the writer thread, after every write queued before it."""
        w: Write = Write(name, self.store.wait_s)
        op = _Op(name, lambda c: _in_tx(c, _guarded(run)), w, read=True)
        return _result(await self.store._writer.submit(op).wait_async())

    def run_now(self, name: str, run: Callable[[Connection], T]) -> T:
        """Blocking form, for tests and tools outside the event loop."""
        return _result(self.store._write(name, _guarded(run)).wait())


class _Pending(Generic[T]):
    """An operation's `Write`, awaited: its result, or the error it was refused with."""

    __slots__ = ("write",)

    def __init__(self, write: Write) -> None:
        self.write = write

    def __await__(self) -> Generator[Any, None, T]:
        return self._wait().__await__()

    async def _wait(self) -> T:
        return _result(await self.write)


def _in_tx(conn: Connection, run: Callable[[Connection], Any]) -> Any:
    with conn.begin():
        return run(conn)
