"""Runtimes start container process trees: ``process`` now; ``bwrap`` and ``gvisor`` later.

Only the standard library (and ``strato.exceptions``) may be imported here.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from strato.exceptions import InvalidError
from strato.runtime.base import (
    Capabilities,
    ContainerLaunch,
    ExitStatus,
    RunningContainer,
    Runtime,
)

DEFAULT_RUNTIME = "process"
ENV_VAR = "STRATO_RUNTIME"


def _process() -> Runtime:
    from strato.runtime.process import ProcessRuntime

    return ProcessRuntime()


_REGISTRY: dict[str, Callable[[], Runtime]] = {"process": _process}


def register_runtime(name: str, factory: Callable[[], Runtime]) -> None:
    """Make ``get_runtime(name)`` build a runtime with ``factory`` (imports lazily)."""
    _REGISTRY[name] = factory


def available_runtimes() -> list[str]:
    return sorted(_REGISTRY)


def get_runtime(name: str | None = None) -> Runtime:
    """The runtime called ``name``, else ``$STRATO_RUNTIME``, else ``process``."""
    chosen = name or os.environ.get(ENV_VAR) or DEFAULT_RUNTIME
    factory = _REGISTRY.get(chosen)
    if factory is None:
        source = "" if name else f" (from ${ENV_VAR})"
        raise InvalidError(
            f"Unknown runtime {chosen!r}{source}; available: {', '.join(available_runtimes())}."
        )
    return factory()


__all__ = [
    "Capabilities",
    "ContainerLaunch",
    "ExitStatus",
    "RunningContainer",
    "Runtime",
    "available_runtimes",
    "get_runtime",
    "register_runtime",
]
