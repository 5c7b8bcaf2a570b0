"""The store's intake journal: accepted calls, inputs and outputs, on local disk before
the database has them.

The event loop must not wait for the database, an accepted input must never be lost, and
an output a client has seen must never be produced again. So `Store.accept_call`,
`Store.accept_inputs` and `Store.accept_outputs` append the write to this journal (one
``write`` to a file opened for appending: it survives a crash of the control plane, as a
SQLite commit with ``synchronous=NORMAL`` does) and queue it for the writer, which records
the journal sequence number it reached in the same transaction as the rows
(``journal_applied``). When the store opens, entries past that number are written again.
The file is emptied once the database has every entry in it, and under a steady load
(when it never catches up completely) rewritten without the entries the database has, once
they are at least half of it.

Records: a 4-byte little-endian length, then msgpack ``[seq, kind, payload]``. A record
cut short by a crash is ignored (it was never acknowledged).
"""

from __future__ import annotations

import os
import struct
import threading
from collections import deque
from pathlib import Path
from typing import Any

import msgspec

_LEN = struct.Struct("<I")
TRUNCATE_BYTES = 1 << 20  # empty the file once it is this big and fully applied


class Journal:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        # (seq, end offset) of each record in the file, oldest first
        self._ends: deque[tuple[int, int]] = deque()
        self._entries, end = self._read()
        if end < os.fstat(self._fd).st_size:  # drop a record cut short, so that new ones
            os.ftruncate(self._fd, end)  # are not written behind it
        self._size = end
        self.seq = self._entries[-1][0] if self._entries else 0  # last sequence number

    def entries(self) -> list[tuple[int, str, Any]]:
        """The whole records the file held when opened, in order."""
        return self._entries

    def _read(self) -> tuple[list[tuple[int, str, Any]], int]:
        data = self.path.read_bytes()
        out: list[tuple[int, str, Any]] = []
        at = 0
        while at + _LEN.size <= len(data):
            (n,) = _LEN.unpack_from(data, at)
            end = at + _LEN.size + n
            if end > len(data):
                break  # cut short by a crash
            try:
                seq, kind, payload = msgspec.msgpack.decode(data[at + _LEN.size : end])
            except (msgspec.DecodeError, ValueError):
                break
            out.append((seq, kind, payload))
            self._ends.append((seq, end))
            at = end
        return out, at

    def append(self, kind: str, payload: Any) -> int:
        with self._lock:
            self.seq += 1
            body = msgspec.msgpack.encode([self.seq, kind, payload])
            record = _LEN.pack(len(body)) + body
            written = os.write(self._fd, record)
            if written != len(record):  # a full disk: refuse the write, do not ack it
                os.ftruncate(self._fd, self._size)
                self.seq -= 1
                raise OSError(f"the store's journal {self.path} is full")
            self._size += written
            self._ends.append((self.seq, self._size))
            return self.seq

    def applied(self, seq: int) -> None:
        """The database has every entry up to ``seq``: once the file has grown, empty it
        when it holds nothing else, or drop those entries when they are half of it."""
        with self._lock:
            if self._size < TRUNCATE_BYTES:
                return
            if seq >= self.seq:
                os.ftruncate(self._fd, 0)
                self._size = 0
                self._ends.clear()
                return
            cut = 0
            for s, end in self._ends:
                if s > seq:
                    break
                cut = end
            if cut * 2 >= self._size:
                self._compact(cut)

    def _compact(self, cut: int) -> None:
        """Rewrite the file from offset ``cut`` (a record boundary) on; the new file
        replaces the old one at once (a crash leaves one or the other, whole)."""
        with open(self.path, "rb") as f:
            f.seek(cut)
            tail = f.read(self._size - cut)
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
        try:
            if os.write(fd, tail) != len(tail):
                raise OSError(f"the store's journal {tmp} is full")
            os.replace(tmp, self.path)
        except OSError:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            return  # keep the old file: it is still whole
        os.close(self._fd)
        self._fd = fd
        self._size = len(tail)
        self._ends = deque((s, end - cut) for s, end in self._ends if end > cut)

    def clear(self) -> None:
        with self._lock:
            os.ftruncate(self._fd, 0)
            self._size = 0
            self._entries = []
            self._ends.clear()

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
