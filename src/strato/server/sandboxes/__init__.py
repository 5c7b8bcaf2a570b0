"""Sandboxes: long-lived containers driven from outside (issue 9). See ``manager.py``."""

from .manager import Sandbox, Sandboxes

__all__ = ["Sandbox", "Sandboxes"]
