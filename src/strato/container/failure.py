"""An exception raised in a container, as it goes to the caller: its type and its message
apart, the traceback without strato's frames, and the exception pickled where it can be
rebuilt. The caller raises the exception itself, else the class the type names, else a
``RemoteError`` carrying the name (:func:`strato.client.serialization.error_from_output`).

On the container's start path: the standard library, cloudpickle and the wire types only.
"""

from __future__ import annotations

import pickle
import traceback
from typing import NamedTuple

import cloudpickle

from strato.protocol import messages as m

MAX_ERROR_CHARS = 64 << 10  # an exception's message and traceback, each, as sent
# strato's own errors and builtins go by their bare names (the caller knows them)
_BARE_MODULES = ("builtins", "strato.exceptions")


class Failure(NamedTuple):
    type: m.ErrorType
    message: str
    traceback: str
    data: bytes | None  # the pickled exception; None where it does not survive pickling

    def task_output(self, input_id: int, attempt: int, duration: float) -> m.TaskOutput:
        return m.TaskOutput(
            input_id,
            attempt,
            "failure",
            self.data,
            self.message,
            self.traceback,
            duration=duration,
            error_type=self.type,
        )

    def init_failed(self, max_data: int | None = None) -> m.ContainerInitFailed:
        """The report of a container whose code failed to load or whose ``@enter`` failed;
        a pickled exception over ``max_data`` bytes is left out (the caller gets the type
        and the message)."""
        data = self.data
        if data is not None and max_data is not None and len(data) > max_data:
            data = None
        return m.ContainerInitFailed(self.message, self.traceback, data, error_type=self.type)


def type_name(cls: type) -> m.ErrorType:
    if cls.__module__ in _BARE_MODULES:
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


def describe_failure(e: BaseException) -> Failure:
    cls = type(e)
    tb = e.__traceback__
    while tb is not None and tb.tb_frame.f_globals.get("__name__", "").startswith("strato."):
        tb = tb.tb_next
    text = "".join(traceback.format_exception(cls, e, tb))
    data: bytes | None
    try:
        data = cloudpickle.dumps(e)
        pickle.loads(data)  # an exception that pickles but cannot be rebuilt is no use
    except Exception:  # noqa: BLE001 - the caller gets a RemoteError with the type name
        data = None
    try:
        message = str(e)
    except Exception as inner:  # noqa: BLE001 - a broken __str__ must not hide the failure
        message = f"<the exception's str() failed: {type(inner).__name__}>"
    # the channel takes small frames: long texts are cut, the middle elided
    return Failure(type_name(cls), _cut(message), _cut(text), data)


def _cut(text: str) -> str:
    if len(text) <= MAX_ERROR_CHARS:
        return text
    half = MAX_ERROR_CHARS // 2
    return f"{text[:half]}\n... ({len(text) - 2 * half} characters cut) ...\n{text[-half:]}"
