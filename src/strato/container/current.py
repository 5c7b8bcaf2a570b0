"""What a container is running right now, per thread and per asyncio task.

Read by ``strato.current_input_id()`` and ``strato.current_function_call_id()``; set by the
container's runner around each input. Stdlib only: it is on the container's start path."""

from __future__ import annotations

import contextvars

# the id of the input being run: a context variable, so each thread (``@concurrent`` sync
# inputs) and each asyncio task (async ones) sees its own
INPUT_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "strato_input_id", default=None
)
# the id of the call that input belongs to (``FunctionCall.object_id``)
CALL_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("strato_call_id", default=None)


def input_id(container_id: str, index: int) -> str:
    """The input's id as ``current_input_id()`` gives it: unique among the app's inputs."""
    return f"in-{container_id}-{index}"


def input_index() -> int | None:
    """The control plane's id of the input the calling code runs (None outside inputs)."""
    value = INPUT_ID.get()
    return None if value is None else int(value.rsplit("-", 1)[1])
