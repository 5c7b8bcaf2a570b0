"""``strato.queue``: Modal's module path of ``Queue`` (``from modal.queue import Queue``)."""

from strato.sdk.queue import Queue

__all__ = ["Queue"]
