"""The store's intake journal: accepted calls, inputs and outputs, Dict and Queue changes,
on local disk before the database has them.

The event loop must not wait for the database, an accepted input must never be lost, and
an output a client has seen must never be produced again. So `Store.accept_call`,
`Store.accept_inputs`, `Store.accept_outputs` and the journaled Dict and Queue writes
append the write to this journal and queue it for the writer, which records the journal
sequence number it reached in the same transaction as the rows (``journal_applied``).
When the store opens, entries past that number are written again.

The file is mapped into memory (``MAP_SHARED``) and a record is copied into the map: no
system call per record. The kernel's page cache holds the file's pages whatever becomes
of the process, so a record survives a crash (a SIGKILL) of the control plane, as a
``write`` to the file would and as a SQLite commit with ``synchronous=NORMAL`` does; not a
power loss. The file is allocated ahead (``CAPACITY``, doubled when full); once the
database has every entry, writing starts again at its beginning, and under a steady load
(when it never catches up completely) the file is rewritten without the entries the
database has, once they are at least half of what is written.

Records: a 4-byte little-endian length, then msgpack ``[seq, kind, payload]``, each seq
one more than the one before. A record's length is stored last, after its body and after
a zero length behind it: a length of zero ends the journal, so a record cut short by a
crash (never acknowledged) and whatever an earlier use of the file left behind are never
read.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import struct
import threading
from collections import deque
from pathlib import Path
from typing import Any

import msgspec

_LEN = struct.Struct("<I")
CAPACITY = 1 << 20  # bytes the file is allocated with, and shrinks back to when emptied
COMPACT_BYTES = 1 << 20  # under a steady load, rewrite once this much is written


class JournalFull(OSError):
    """The journal's file could not grow (a full disk): the write is refused, not
    acknowledged."""


class JournalInUse(RuntimeError):
    """Another process holds the journal: two control planes on one store."""


class Journal:
    """The journal of one process: opening it takes an exclusive lock on the file (two
    writers would copy records over each other's), held until `close` or the process's
    end; `Journal.read` reads a file without it."""

    def __init__(self, path: Path, capacity: int = CAPACITY) -> None:
        self.path = path
        self.capacity = capacity
        self._lock = threading.Lock()
        self._fd = _locked(path, os.O_RDWR | os.O_CREAT)
        try:
            self._entries, ends = _parse(path.read_bytes())
            # (seq, end offset) of each record in the file, oldest first
            self._ends: deque[tuple[int, int]] = deque(ends)
            end = ends[-1][1] if ends else 0
            self._size = end  # where the next record goes
            held = max(os.fstat(self._fd).st_size, end + _LEN.size)
            try:
                self._map = self._mapped(max(held, capacity))
            except JournalFull:  # a full disk: what the file holds (an append grows it)
                self._map = self._mapped(held)
        except BaseException:
            os.close(self._fd)
            raise
        self._map[end : end + _LEN.size] = bytes(_LEN.size)  # (a record cut short ends here)
        self.seq = self._entries[-1][0] if self._entries else 0  # last sequence number

    @staticmethod
    def read(path: Path) -> list[tuple[int, str, Any]]:
        """The whole records of a journal's file, in order, without opening it for
        writing (it may be in use)."""
        return _parse(path.read_bytes())[0]

    @property
    def written(self) -> int:
        """Bytes of records in the file (where the next one goes)."""
        return self._size

    def entries(self) -> list[tuple[int, str, Any]]:
        """The whole records the file held when opened, in order."""
        return self._entries

    def _mapped(self, size: int) -> mmap.mmap:
        """The file, grown to ``size`` bytes when smaller, mapped whole."""
        if os.fstat(self._fd).st_size < size:
            _allocate(self._fd, size, self.path)
        return mmap.mmap(self._fd, size)

    def append(self, kind: str, payload: Any) -> int:
        with self._lock:
            if self._fd < 0:
                raise ValueError(f"the store's journal {self.path} is closed")
            seq = self.seq + 1
            body = msgspec.msgpack.encode([seq, kind, payload])
            at, n = self._size, len(body)
            end = at + _LEN.size + n
            if end + _LEN.size > len(self._map):
                self._grow(end + _LEN.size)
            m = self._map
            m[at + _LEN.size : end] = body
            m[end : end + _LEN.size] = bytes(_LEN.size)  # the end, until the next record
            _LEN.pack_into(m, at, n)  # last: the record is whole
            self.seq = seq
            self._size = end
            self._ends.append((seq, end))
            return seq

    def _grow(self, needed: int) -> None:
        size = len(self._map)
        while size < needed:
            size *= 2
        old = self._map
        self._map = self._mapped(size)  # (raises JournalFull: nothing was written)
        old.close()

    def applied(self, seq: int) -> None:
        """The database has every entry up to ``seq``: when that is all of them, start
        again at the beginning of the file; else, once the file has grown, drop those
        entries when they are half of what is written."""
        with self._lock:
            if self._fd < 0:
                return
            if seq >= self.seq:
                self._restart()
                return
            if self._size < COMPACT_BYTES:
                return
            cut = 0
            for s, end in self._ends:
                if s > seq:
                    break
                cut = end
            if cut * 2 >= self._size:
                self._compact(cut)

    def _restart(self) -> None:
        """Every entry is applied: the next record goes at the start (a zero length
        there ends the journal), and a file grown under a burst shrinks back."""
        self._map[0 : _LEN.size] = bytes(_LEN.size)
        self._size = 0
        self._ends.clear()
        if len(self._map) > 4 * self.capacity:
            self._map.close()
            os.ftruncate(self._fd, self.capacity)
            self._map = mmap.mmap(self._fd, self.capacity)

    def _compact(self, cut: int) -> None:
        """Rewrite the file from offset ``cut`` (a record boundary) on; the new file
        replaces the old one at once (a crash leaves one or the other, whole)."""
        tail = bytes(self._map[cut : self._size])
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            fd = _locked(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
        except (OSError, JournalInUse):
            return  # keep the old file
        try:
            if os.write(fd, tail + bytes(_LEN.size)) != len(tail) + _LEN.size:
                raise OSError(f"the store's journal {tmp} is full")
            _allocate(fd, max(len(self._map), len(tail) + _LEN.size), tmp)
            os.replace(tmp, self.path)
        except OSError:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            return  # keep the old file: it is still whole
        self._map.close()
        os.close(self._fd)
        self._fd = fd
        self._map = mmap.mmap(fd, os.fstat(fd).st_size)
        self._size = len(tail)
        self._ends = deque((s, end - cut) for s, end in self._ends if end > cut)

    def clear(self) -> None:
        with self._lock:
            if self._fd >= 0:
                self._restart()
            self._entries = []

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                self._map.close()
                os.close(self._fd)
                self._fd = -1


def _allocate(fd: int, size: int, path: Path) -> None:
    """Grow the file to ``size`` bytes with its disk space taken now: a store into a
    mapped page the disk has no room for would kill the process (SIGBUS), a failed
    allocation here only refuses the write. Where the file system cannot allocate ahead,
    the file only grows."""
    try:
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            os.ftruncate(fd, size)
    except OSError as e:
        raise JournalFull(f"the store's journal {path} cannot grow: {e}") from e


def _parse(data: bytes) -> tuple[list[tuple[int, str, Any]], list[tuple[int, int]]]:
    """The whole records in ``data`` and the (seq, end offset) of each."""
    out: list[tuple[int, str, Any]] = []
    ends: list[tuple[int, int]] = []
    at = 0
    while at + _LEN.size <= len(data):
        (n,) = _LEN.unpack_from(data, at)
        end = at + _LEN.size + n
        if n == 0 or end > len(data):
            break  # the end, or cut short by a crash
        try:
            seq, kind, payload = msgspec.msgpack.decode(data[at + _LEN.size : end])
        except (msgspec.DecodeError, ValueError, TypeError):
            break
        if out and seq != out[-1][0] + 1:
            break  # (left behind by an earlier use of the file)
        out.append((seq, kind, payload))
        ends.append((seq, end))
        at = end
    return out, ends


def _locked(path: Path, flags: int) -> int:
    """``path`` opened with ``flags``, under an exclusive lock (``flock``: released when
    the process ends, however it ends)."""
    fd = os.open(path, flags, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise JournalInUse(
            f"the store's journal {path} is in use by another process: another control "
            "plane runs on this STRATO_HOME (or this database); stop it first"
        ) from None
    except BaseException:
        os.close(fd)
        raise
    return fd
