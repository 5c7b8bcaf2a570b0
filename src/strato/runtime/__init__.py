"""Runtimes start container process trees: ``bwrap`` (namespaces, the default where
bubblewrap is installed), ``gvisor`` (a gVisor sandbox per container, for untrusted code) and
``process`` (a plain subprocess: the fallback, which warns that it isolates nothing).

Only the standard library (and ``strato.exceptions``) may be imported here.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable

from strato import settings
from strato.exceptions import InvalidError
from strato.runtime.base import (
    CHANNEL_ENV,
    CHANNEL_PATH,
    Bind,
    Capabilities,
    ContainerLaunch,
    ExitStatus,
    RunningContainer,
    Runtime,
)

FALLBACK_RUNTIME = "process"
ENV_VAR = "STRATO_RUNTIME"


def default_runtime() -> str:
    """``bwrap`` where bubblewrap is installed, else ``process``."""
    return "bwrap" if shutil.which("bwrap") else FALLBACK_RUNTIME


def _process() -> Runtime:
    from strato.runtime.process import ProcessRuntime

    return ProcessRuntime()


def _bwrap() -> Runtime:
    from strato.runtime.bwrap import BwrapRuntime

    return BwrapRuntime()


def _gvisor() -> Runtime:
    from strato.runtime.gvisor import GvisorRuntime

    return GvisorRuntime()


_REGISTRY: dict[str, Callable[[], Runtime]] = {
    "bwrap": _bwrap,
    "gvisor": _gvisor,
    "process": _process,
}


def register_runtime(name: str, factory: Callable[[], Runtime]) -> None:
    """Make ``get_runtime(name)`` build a runtime with ``factory`` (imports lazily)."""
    _REGISTRY[name] = factory


def available_runtimes() -> list[str]:
    return sorted(_REGISTRY)


def get_runtime(name: str | None = None) -> Runtime:
    """The runtime called ``name``, else ``$STRATO_RUNTIME``, else :func:`default_runtime`."""
    chosen = name or settings.RUNTIME.get() or default_runtime()
    factory = _REGISTRY.get(chosen)
    if factory is None:
        source = "" if name else f" (from ${ENV_VAR})"
        raise InvalidError(
            f"Unknown runtime {chosen!r}{source}; available: {', '.join(available_runtimes())}."
        )
    return factory()


__all__ = [
    "CHANNEL_ENV",
    "CHANNEL_PATH",
    "Bind",
    "Capabilities",
    "ContainerLaunch",
    "ExitStatus",
    "RunningContainer",
    "Runtime",
    "available_runtimes",
    "default_runtime",
    "get_runtime",
    "register_runtime",
]
