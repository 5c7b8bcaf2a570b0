"""Control-plane state: SQLAlchemy Core over SQLite (default) or PostgreSQL, written by
one writer thread (group commit) and read with read-your-writes."""

from .rows import CallRow, FinalRow, FunctionRow, GenItemRow, InputRow, OutputRow, PendingRow
from .store import Store
from .writer import StoreClosed, StoreTimeout, Write, WriteFailed

__all__ = [
    "CallRow",
    "FinalRow",
    "FunctionRow",
    "GenItemRow",
    "InputRow",
    "OutputRow",
    "PendingRow",
    "Store",
    "StoreClosed",
    "StoreTimeout",
    "Write",
    "WriteFailed",
]
