"""Arguments and results across the wire: cloudpickle, with errors that name the value."""

from __future__ import annotations

import pickle

import cloudpickle

from strato import exceptions as exc
from strato.protocol.messages import OutputItem


def serialize_args(fn_name: str, args: tuple, kwargs: dict) -> bytes:
    try:
        return cloudpickle.dumps((args, kwargs))
    except Exception as e:  # noqa: BLE001 - find which argument is at fault
        for label, value in [
            *((f"argument {i}", a) for i, a in enumerate(args)),
            *((f"keyword argument {k!r}", v) for k, v in kwargs.items()),
        ]:
            try:
                cloudpickle.dumps(value)
            except Exception as inner:  # noqa: BLE001
                raise exc.SerializationError(
                    f"cannot send {label} of {fn_name}: {type(value).__qualname__} object "
                    f"{_short_repr(value)} cannot be pickled ({inner}); pass plain data instead"
                ) from None
        raise exc.SerializationError(f"cannot pickle the arguments of {fn_name}: {e}") from None


def _short_repr(value) -> str:
    try:
        r = repr(value)
    except Exception:  # noqa: BLE001
        return ""
    return r if len(r) <= 80 else r[:77] + "..."


def deserialize(data: bytes, what: str):
    try:
        return pickle.loads(data)
    except Exception as e:  # noqa: BLE001
        raise exc.DeserializationError(
            f"cannot unpickle {what} here: {type(e).__name__}: {e}. The value's type must be "
            "importable in this process (and the Python versions compatible)"
        ) from None


def error_type_and_message(out: OutputItem) -> tuple[str, str]:
    """The failure's exception type and message: the output's ``error_type`` and
    ``error``, or, from a control plane that sends no ``error_type``, the two halves of
    its ``"TypeName: message"``."""
    if out.error_type:
        return out.error_type, out.error or ""
    type_name, _, message = (out.error or "Error: the input failed").partition(": ")
    return type_name, message


def error_class(type_name: str) -> type[BaseException] | None:
    """The class of ``strato.exceptions`` that ``type_name`` names, if any."""
    return exc.ERRORS_BY_NAME.get(type_name.removeprefix("strato.exceptions."))


def error_from_output(out: OutputItem, data: bytes | None) -> BaseException:
    """The exception to raise in the caller for a failed output."""
    type_name, message = error_type_and_message(out)
    if out.status == "failure" and data is not None:
        try:
            e = pickle.loads(data)
        except Exception:  # noqa: BLE001 - the type does not exist here
            e = None
        if isinstance(e, BaseException):
            if out.traceback:
                e.add_note(
                    "\nRemote traceback (most recent call last, in the container):\n"
                    + out.traceback.rstrip()
                )
            return e
    cls = error_class(type_name)
    if cls is None and out.status == "timeout":
        cls = exc.FunctionTimeoutError
    if cls is None and out.status == "cancelled":
        cls = exc.InputCancellation
    e = exc.RemoteError(type_name, message) if cls is None else cls(message)
    if out.traceback:
        e.add_note(
            "\nRemote traceback (most recent call last, in the container):\n"
            + out.traceback.rstrip()
        )
    return e
