"""``strato.dict``: Modal's module path of ``Dict`` (``from modal.dict import Dict``)."""

from strato.sdk.dict import Dict

__all__ = ["Dict"]
