"""Modal's module path ``modal.sandbox``: ``from strato.sandbox import Sandbox``."""

from strato.sdk.sandbox import Sandbox

__all__ = ["Sandbox"]
