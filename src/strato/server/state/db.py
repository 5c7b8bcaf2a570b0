"""Dict and Queue operations on the store's writer thread.

Each operation is one function of a connection, run by the store's single writer thread
inside a group-commit transaction, so operations never interleave: a ``Queue.get`` that
reads and deletes the first items of a partition is atomic however many consumers ask at
once. ``run`` resolves once the transaction has committed (the control plane answers
only then, so an answer survives a SIGKILL); it never blocks the event loop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy import Connection

from strato.server.store import Store, Write
from strato.server.store.writer import _Op

T = TypeVar("T")


class StateDb:
    """The writer-thread side of the state objects."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def submit(self, name: str, run: Callable[[Connection], T]) -> Write[T]:
        """Queue ``run`` for the writer: it runs in a transaction (retried alone if its
        batch failed), and the returned `Write` resolves after the commit."""
        return self.store._write(name, run)

    async def run(self, name: str, run: Callable[[Connection], T]) -> T:
        """``submit`` and wait for the commit, without blocking the loop."""
        return await self.submit(name, run)

    async def read(self, name: str, run: Callable[[Connection], T]) -> T:
        """A read on the writer thread, after every write queued before it."""
        w: Write[T] = Write(name, self.store.wait_s)
        return await self.store._writer.submit(
            _Op(name, lambda c: _in_tx(c, run), w, read=True)
        ).wait_async()

    def run_now(self, name: str, run: Callable[[Connection], T]) -> T:
        """Blocking form, for tests and tools outside the event loop."""
        return self.submit(name, run).wait()


def _in_tx(conn: Connection, run: Callable[[Connection], Any]) -> Any:
    with conn.begin():
        return run(conn)
