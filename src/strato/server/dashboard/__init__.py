"""The control plane's dashboard (``/ui``) and Prometheus metrics (``/metrics``).

Imported only by the control plane's process (``server/main.py``): never by the SDK or
a container's start path (``tests/unit/test_walls.py``)."""

from .app import Ops, with_ops

__all__ = ["Ops", "with_ops"]
