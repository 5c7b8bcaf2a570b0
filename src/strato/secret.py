"""``modal.secret``'s module path, for ported imports (``from modal.secret import Secret``)."""

from strato.sdk.secret import Secret

__all__ = ["Secret"]
