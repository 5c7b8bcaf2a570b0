"""Memory snapshots, the container's side.

A function with ``enable_memory_snapshot=True`` gets a *template* on the worker: a process
in the function's own sandbox that imported its code and ran its ``@enter(snap=True)``
hooks (:func:`load_template`), and never dialled the control plane. Containers are forked
from it (:mod:`strato.container.zygote`), or from a CRIU restore of it, and so start with
the hooks' state already in memory. Their identity (container id, token, environment)
comes with the fork request, never from the template's frozen environment.

:func:`target_for` is what :func:`strato.container.runner.main` asks: the template's
loaded target when this process descends from a template of the same function, else a
fresh one to load. Standard library only (this is on the cold-start path).
"""

from __future__ import annotations

import importlib
import os
import sys

from strato import settings
from strato.protocol import messages as m

from .target import Target

_template: tuple[m.FunctionSpec, Target] | None = None
"""(spec, target) of the template this process is, or was forked from."""


def preimport(names: str) -> list[str]:
    """Import the comma- or space-separated modules ``names``; returns those that failed."""
    missing = []
    for name in names.replace(",", " ").split():
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - a declared import that fails is only slower
            missing.append(name)
    return missing


def load_template() -> None:
    """In a template: import the function and run its ``snap=True`` enter hooks."""
    global _template
    import msgspec

    with open(settings.CONTAINER_SPEC.required(), "rb") as f:
        spec = msgspec.msgpack.decode(f.read(), type=m.FunctionSpec)
    paths = settings.MOUNT_PATHS.get()
    sys.path[:0] = [p for p in paths if p not in sys.path]
    os.environ[settings.IN_CONTAINER.name] = "1"
    target = Target(spec)
    target.load()
    _template = (spec, target)


def target_for(spec: m.FunctionSpec) -> tuple[Target, bool]:
    """(target, already loaded): the template's, restored, when this container comes from a
    memory snapshot of this very function; else a new one that the caller loads."""
    if _template is not None and _template[0] == spec:
        return _template[1], True
    return Target(spec), False


def from_snapshot() -> bool:
    """Whether this process was restored (forked) from a memory snapshot."""
    return _template is not None
