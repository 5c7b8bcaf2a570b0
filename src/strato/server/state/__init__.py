"""Dict and Queue in the control plane: their rows in the store (``store/tables_state.py``),
every change committed by the store's writer thread before the API answers, and blocked
``Queue.get``/``put`` calls woken by asyncio events (``signals.py``)."""

from .dicts import Dicts
from .queues import Queues

__all__ = ["Dicts", "Queues"]
