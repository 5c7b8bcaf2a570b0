"""The journaled Dict and Queue entry points of `Store`: `accept_dict_put`,
`accept_queue_put` and `accept_queue_take` append to the intake journal and queue a merged
write (consecutive ones share their statements: `DictEntries.put_run`,
`QueueEntries.apply_run`). :class:`JournaledEntries` is a base of
:class:`~strato.server.store.store.Store`, which sets up the state declared here.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import Connection

from .journal import Journal

W = TypeVar("W")


class JournaledEntries:
    """The Dict and Queue writes durable through the journal, and `_journaled`, the
    append-then-queue every ``accept_*`` of ``Store`` goes through (a base of ``Store``)."""

    # set up by Store.__init__
    _journal: Journal | None
    _accept_lock: threading.Lock
    _dict_run: Callable[[Connection, list[Any]], list[Any]]
    _queue_run: Callable[[Connection, list[Any]], list[Any]]

    if TYPE_CHECKING:  # Store's writer plumbing

        def _merged(
            self,
            name: str,
            merge: Callable[[Connection, list[Any]], list[Any]],
            args: Any,
            seq: int,
        ) -> None: ...

    def _journaled(self, kind: str, payload: Any, queue: Callable[[int], W]) -> W:
        """Append ``payload`` to the intake journal as a ``kind`` entry and queue its write
        (``queue(the entry's seq)``) under one lock, so that journal order is queue order;
        returns what ``queue`` returns."""
        assert self._journal is not None, f"a journaled {kind} needs the journal"
        with self._accept_lock:
            return queue(self._journal.append(kind, payload))

    def accept_dict_put(self, dict_id: str, rows: list[list], now: float) -> None:
        """Dict entries (``[key_hash, key, value, blob]`` each; a later one of a key wins)
        durable when it returns: journaled as `accept_call` is (only when `journaled`),
        then stored by the writer behind it, in queue order, unless the Dict is gone by
        then (nobody waits for that: a failure is logged and raised by the next
        ``flush``)."""
        self._journaled(
            "dict_put", [dict_id, rows, now], lambda seq: self._dict_put(dict_id, rows, now, seq)
        )

    def _dict_put(self, dict_id: str, rows: list[list], now: float, journal_seq: int) -> None:
        # (stored unless the Dict was deleted after the put was accepted; consecutive
        # puts share their statements: `DictEntries.put_run`)
        self._merged("dict_put", self._dict_run, (dict_id, rows, now), journal_seq)

    def accept_queue_put(
        self,
        qid: str,
        partition: str,
        items: list[bytes],
        now: float,
        expires_at: float,
        request_id: str,
    ) -> None:
        """Queue items put at ``now``, durable when it returns (journaled as
        `accept_dict_put` is), appended by the writer behind it unless the Queue is gone or
        the request id was used already (`QueueEntries.apply_put`)."""
        self._journaled(
            "queue_put",
            [qid, partition, items, now, expires_at, request_id],
            lambda seq: self._queue_put(
                qid, partition, items, now, expires_at, request_id, journal_seq=seq
            ),
        )

    def _queue_put(
        self,
        qid: str,
        partition: str,
        items: list[bytes],
        now: float,
        expires_at: float,
        request_id: str,
        *,
        journal_seq: int,
    ) -> None:
        key = {"q": qid, "p": partition}
        args = ("put", key, items, now, expires_at, request_id)
        self._merged("queue_put", self._queue_run, args, journal_seq)

    def accept_queue_take(self, qid: str, partition: str, n: int, request_id: str) -> None:
        """A get that handed out the first ``n`` items of a partition, durable when it
        returns; the writer deletes them behind it (`QueueEntries.apply_take`)."""
        self._journaled(
            "queue_take",
            [qid, partition, n, request_id],
            lambda seq: self._queue_take(qid, partition, n, request_id, journal_seq=seq),
        )

    def _queue_take(
        self, qid: str, partition: str, n: int, request_id: str, *, journal_seq: int
    ) -> None:
        key = {"q": qid, "p": partition}
        args = ("take", key, n, request_id)
        self._merged("queue_take", self._queue_run, args, journal_seq)
