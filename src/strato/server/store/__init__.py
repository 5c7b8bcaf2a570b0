"""Control-plane state: SQLAlchemy Core over SQLite (default) or PostgreSQL, written by
one writer thread (group commit) and read with read-your-writes."""

from .store import OutputRow, PendingRow, Store
from .writer import StoreClosed, StoreTimeout, Write, WriteFailed

__all__ = [
    "OutputRow",
    "PendingRow",
    "Store",
    "StoreClosed",
    "StoreTimeout",
    "Write",
    "WriteFailed",
]
