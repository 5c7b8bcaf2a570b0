"""A container's exception on its way to the caller: its type and message travel apart,
and the caller rebuilds the exception, its strato class, or a RemoteError."""

from __future__ import annotations

import msgspec
import pytest

from strato import exceptions as exc
from strato.client.serialization import error_from_output, error_type_and_message
from strato.container import failure as failure_mod
from strato.container.failure import describe_failure, type_name
from strato.protocol import frames
from strato.protocol import messages as m


class Unpicklable(Exception):
    def __reduce__(self):
        raise TypeError("no pickling")


def _raise(e: BaseException) -> BaseException:
    try:
        raise e
    except BaseException as caught:  # noqa: BLE001
        return caught


def _through_the_wire(out: m.TaskOutput) -> m.OutputItem:
    """What the control plane hands on: a channel frame decoded, then an HTTP item."""
    sent = frames.decode(frames.encode(m.TaskOutputs([out]))[4:])  # after the length
    assert isinstance(sent, m.TaskOutputs)
    o = sent.outputs[0]
    item = m.OutputItem(0, o.status, o.data, None, o.error, o.traceback, error_type=o.error_type)
    return msgspec.msgpack.decode(msgspec.msgpack.encode(item), type=m.OutputItem)


def test_type_names():
    assert type_name(ValueError) == "ValueError"
    assert type_name(exc.FunctionTimeoutError) == "FunctionTimeoutError"
    assert type_name(Unpicklable) == f"{__name__}.Unpicklable"


def test_type_and_message_travel_apart():
    f = describe_failure(_raise(ValueError("bad: value 3")))
    assert (f.type, f.message) == ("ValueError", "bad: value 3")
    item = _through_the_wire(f.task_output(1, 1, 0.5))
    assert (item.error_type, item.error) == ("ValueError", "bad: value 3")  # no "Type: " in it
    e = error_from_output(item, item.data)
    assert type(e) is ValueError and str(e) == "bad: value 3"
    assert "Remote traceback" in "\n".join(e.__notes__)


def test_an_unpicklable_exception_becomes_a_remote_error():
    f = describe_failure(_raise(Unpicklable("you cannot: import me")))
    assert f.data is None
    e = error_from_output(_through_the_wire(f.task_output(1, 1, 0.1)), None)
    assert isinstance(e, exc.RemoteError)
    assert e.type_name == f"{__name__}.Unpicklable"
    assert e.remote_message == "you cannot: import me"


def test_a_strato_error_without_its_pickle_keeps_its_class():
    item = m.OutputItem(0, "failure", error="no node fits", error_type="ResourceUnavailableError")
    e = error_from_output(item, None)
    assert type(e) is exc.ResourceUnavailableError and str(e) == "no node fits"
    qualified = m.OutputItem(0, "failure", error="x", error_type="strato.exceptions.InvalidError")
    assert type(error_from_output(qualified, None)) is exc.InvalidError


def test_a_message_that_starts_like_a_type_is_kept_whole():
    item = m.OutputItem(0, "failure", error="KeyError: 'x' was missing", error_type="LookupFailed")
    assert error_type_and_message(item) == ("LookupFailed", "KeyError: 'x' was missing")


def test_an_output_without_error_type_is_read_as_type_and_message():
    # what a control plane that predates error_type sends
    item = m.OutputItem(0, "timeout", error="FunctionTimeoutError: ran past 5 s")
    assert error_type_and_message(item) == ("FunctionTimeoutError", "ran past 5 s")
    e = error_from_output(item, None)
    assert type(e) is exc.FunctionTimeoutError and str(e) == "ran past 5 s"


def test_an_init_failure_leaves_out_a_pickle_too_large_for_a_frame():
    f = describe_failure(_raise(ValueError("x" * 10)))
    assert f.init_failed(max_data=1).exc is None
    assert f.init_failed().exc == f.data
    assert f.init_failed().error_type == "ValueError"


def test_long_texts_are_cut():
    f = describe_failure(_raise(ValueError("y" * (failure_mod.MAX_ERROR_CHARS * 2))))
    assert len(f.message) < failure_mod.MAX_ERROR_CHARS + 100
    assert "characters cut" in f.message


def test_unknown_status_is_refused_on_decode():
    raw = msgspec.msgpack.encode({"t": "outputs", "outputs": [[1, 1, "exploded"]]})
    with pytest.raises(frames.FrameError):
        frames.decode(raw)
