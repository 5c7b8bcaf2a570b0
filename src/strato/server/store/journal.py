"""The store's intake journal: accepted calls, inputs and outputs, on local disk before
the database has them.

The event loop must not wait for the database, an accepted input must never be lost, and
an output a client has seen must never be produced again. So `Store.accept_call`,
`Store.accept_inputs` and `Store.accept_outputs` append the write to this journal (one
``write`` to a file opened for appending: it survives a crash of the control plane, as a
SQLite commit with ``synchronous=NORMAL`` does) and queue it for the writer, which records
the journal sequence number it reached in the same transaction as the rows
(``journal_applied``). When the store opens, entries past that number are written again;
the file is emptied once the database has every entry in it.

Records: a 4-byte little-endian length, then msgpack ``[seq, kind, payload]``. A record
cut short by a crash is ignored (it was never acknowledged).
"""

from __future__ import annotations

import os
import struct
import threading
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
            return self.seq

    def applied(self, seq: int) -> None:
        """The database has every entry up to ``seq``: empty the file when it holds
        nothing else and has grown."""
        with self._lock:
            if seq >= self.seq and self._size >= TRUNCATE_BYTES:
                os.ftruncate(self._fd, 0)
                self._size = 0

    def clear(self) -> None:
        with self._lock:
            os.ftruncate(self._fd, 0)
            self._size = 0
            self._entries = []

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
