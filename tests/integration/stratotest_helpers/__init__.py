"""A local helper package imported by a test app: strato must ship it to the container
without being told (it lives outside the app's own package)."""

from .text import shout

__all__ = ["shout"]
