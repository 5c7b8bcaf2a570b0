"""Where the code runs and what it is running: ``is_local()``, ``current_input_id()``,
``current_function_call_id()``, and ``enable_output()`` (Modal's names)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from strato import settings

_output_lock = threading.Lock()
_output_depth = 0


def is_local() -> bool:
    """True here, False in a strato container."""
    return not settings.IN_CONTAINER.get()


def current_input_id() -> str | None:
    """The id of the input this thread (or asyncio task) is running in a container; None
    outside a container or between inputs."""
    if is_local():
        return None
    from strato.container import current

    return current.INPUT_ID.get()


def current_function_call_id() -> str | None:
    """The id of the call (``FunctionCall.object_id``) whose input this thread (or asyncio
    task) runs in a container; None outside a container or between inputs."""
    if is_local():
        return None
    from strato.container import current

    return current.CALL_ID.get()


@contextlib.contextmanager
def enable_output(show_progress: bool = True) -> Iterator[None]:
    """Show what ``strato run`` shows (progress, container start-up, image builds and the
    containers' output) for the ``app.run()`` blocks inside, also when the app was run
    with ``quiet=True``. strato shows it by default; this is for code ported from Modal,
    where output is off unless enabled."""
    global _output_depth
    with _output_lock:
        _output_depth += 1
    try:
        yield
    finally:
        with _output_lock:
            _output_depth -= 1


def output_enabled() -> bool:
    return _output_depth > 0
