"""Control-plane state: SQLAlchemy Core over SQLite (default) or PostgreSQL."""

from .store import OutputRow, PendingRow, Store

__all__ = ["OutputRow", "PendingRow", "Store"]
