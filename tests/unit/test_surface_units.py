"""Unit tests of the Modal surface: exception classes ported ``except`` clauses catch,
``@batched`` / ``@concurrent`` methods, the container output splitter (progress bars),
the client's drawing of redraws, and the refusal to start a control plane in a container."""

from __future__ import annotations

import io
import pickle

import pytest

import strato
from strato import exceptions as exc
from strato.client import config, console, session
from strato.protocol import messages as m
from strato.sdk.cls import class_methods
from strato.worker.lines import LineSplitter


def test_exception_module_is_the_same_objects():
    import strato.exception as exception

    for name in exception.__all__:
        assert getattr(exception, name) is getattr(exc, name)
    assert strato.exception is exception


MODAL_EXCEPTIONS = [
    "Error", "AlreadyExistsError", "RemoteError", "TimeoutError", "ConnectionError",
    "InvalidError", "VersionError", "NotFoundError", "ExecutionError", "DeserializationError",
    "SerializationError", "RequestSizeError", "DeprecationError", "PendingDeprecationError",
    "ServerWarning", "InternalError", "InternalFailure", "FunctionTimeoutError",
    "MountUploadTimeoutError", "VolumeUploadTimeoutError", "InteractiveTimeoutError",
    "OutputExpiredError", "SandboxTimeoutError", "SandboxTerminatedError", "InputCancellation",
    "ModuleNotMountable", "ClientClosed", "FilesystemExecutionError",
]  # fmt: skip


@pytest.mark.parametrize("name", MODAL_EXCEPTIONS)
def test_modal_exception_names_exist(name):
    import strato.exception as exception

    assert getattr(exception, name) is getattr(exc, name)


def test_modal_exception_hierarchy():
    assert issubclass(exc.SandboxTimeoutError, exc.TimeoutError)
    assert issubclass(exc.InputCancellation, BaseException)
    assert not issubclass(exc.InputCancellation, Exception)
    assert issubclass(exc.DeprecationError, UserWarning)


@pytest.mark.parametrize(
    "cls", [exc.TimeoutError, exc.FunctionTimeoutError, exc.OutputExpiredError]
)
def test_timeouts_are_builtin_timeouts(cls):
    e = cls("ran past 5 s")
    assert isinstance(e, TimeoutError) and isinstance(e, exc.Error)
    assert str(e) == "ran past 5 s"
    back = pickle.loads(pickle.dumps(e))
    assert type(back) is cls and str(back) == "ran past 5 s"


def test_batched_and_concurrent_methods_are_methods():
    class Model:
        @strato.batched(max_batch_size=4, wait_ms=10)
        def embed(self, xs):
            return xs

        @strato.concurrent(max_inputs=2)
        def predict(self, x):
            return x

        @strato.method()
        def other(self, x):
            return x

        def helper(self):
            return None

    assert set(class_methods(Model)) == {"embed", "predict", "other"}


def test_batched_function_is_not_marked_a_method():
    @strato.batched(max_batch_size=4, wait_ms=10)
    def f(xs):
        return xs

    assert not hasattr(f, "__strato_method__")


def test_concurrent_web_method_stays_a_web_endpoint_only():
    class Svc:
        @strato.concurrent(max_inputs=2)
        @strato.fastapi_endpoint()
        def hello(self):
            return "hi"

    assert class_methods(Svc) == {}


def test_lines_split_on_newlines_and_carriage_returns():
    s = LineSplitter(100)
    assert s.feed(b"one\ntw") == ["one"]
    assert s.feed(b"o\r\nthree\n") == ["two", "three"]  # \r\n is one end of line
    # tqdm: each redraw starts with "\r"; a redraw ships when the next one starts
    assert s.feed(b"\r 10%|#") == []
    assert s.feed(b"\r 20%|##\r 30%|###") == [" 10%|#\r", " 20%|##\r"]
    assert s.feed(b"\n") == [" 30%|###"]
    assert s.close() == []


def test_lines_a_trailing_carriage_return_waits_for_the_next_byte():
    s = LineSplitter(100)
    assert s.feed(b"abc\r") == []  # maybe "\r\n"
    assert s.feed(b"\ndef\r") == ["abc"]
    assert s.feed(b"x") == ["def\r"]
    assert s.close() == ["x"]


def test_lines_partial_line_is_shown_once_then_completed():
    s = LineSplitter(100)
    assert s.feed(b"Downloading") == []
    assert s.partial() == "Downloading\r"
    assert s.partial() is None  # shown already: not again until more comes
    assert s.feed(b" done\n") == ["Downloading done"]
    assert s.partial() is None


def test_lines_long_and_multibyte():
    s = LineSplitter(4)
    assert s.feed(b"abcdefghij") == ["abcd", "efgh"]
    assert s.close() == ["ij"]
    s = LineSplitter(100)
    snow = "\u2603".encode()
    assert s.feed(snow[:1]) == []
    assert s.feed(snow[1:] + b"\n") == ["\u2603"]


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def fresh_console(monkeypatch):
    monkeypatch.setattr(console, "_redrawing", None)


@pytest.mark.usefixtures("fresh_console")
def test_redraws_are_drawn_in_place_on_a_terminal():
    out = _Tty()
    console.container_line(out, "[ct-1] ", " 10%\r")
    console.container_line(out, "[ct-1] ", " 20%\r")
    console.container_line(out, "[ct-1] ", "100%")  # the bar's last state, over it
    console.container_line(out, "[ct-1] ", "next")
    assert out.getvalue() == "[ct-1]  10%\r\x1b[K[ct-1]  20%\r\x1b[K[ct-1] 100%\n[ct-1] next\n"


@pytest.mark.usefixtures("fresh_console")
def test_other_lines_start_below_a_bar():
    out = _Tty()
    console.container_line(out, "[ct-1] ", " 10%\r")
    console.container_line(out, "[ct-2] ", "hello")  # another container: the bar stays
    lines = console.WholeLines(out)
    console.container_line(out, "[ct-1] ", " 20%\r")
    lines.write("local print\n")  # the entrypoint's own print: below the bar too
    assert out.getvalue() == "[ct-1]  10%\n[ct-2] hello\n[ct-1]  20%\nlocal print\n"


@pytest.mark.usefixtures("fresh_console")
def test_each_redraw_is_a_line_elsewhere():
    out = io.StringIO()
    console.container_line(out, "[ct-1] ", " 10%\r")
    console.container_line(out, "[ct-1] ", "done")
    assert out.getvalue() == "[ct-1]  10%\n[ct-1] done\n"


def _follower() -> session.LogFollower:
    return session.LogFollower(None, "ap-x", heartbeat=False)  # type: ignore[arg-type]


def test_follower_show_routes_lines(capsys):
    f = _follower()
    lines = [m.LogLine(0.0, "ct-1", "stdout", "hello"), m.LogLine(0.0, "ct-1", "stderr", "5%\r")]
    f._show(m.LogBatch(lines, 2))
    got = capsys.readouterr()
    assert got.out == "[ct-1] hello\n" and got.err == "[ct-1] 5%\n"


def test_no_control_plane_is_started_inside_a_container(monkeypatch, tmp_path):
    monkeypatch.setenv("STRATO_IN_CONTAINER", "1")
    monkeypatch.setenv("STRATO_HOME", str(tmp_path))
    started = []
    monkeypatch.setattr(config, "start_server", lambda *a, **k: started.append(a))
    with pytest.raises(exc.ExecutionError, match="never starts or dials a control plane"):
        config.ensure_server()
    assert started == [] and not (tmp_path / "server.lock").exists()


def test_enable_output_overrides_quiet():
    from strato.sdk.context import output_enabled

    assert not output_enabled()
    with strato.enable_output() as value:
        assert value is None  # Modal's yields nothing
        assert output_enabled()
    assert not output_enabled()


def test_outside_a_container(monkeypatch):
    monkeypatch.delenv("STRATO_IN_CONTAINER", raising=False)
    assert strato.is_local() is True
    assert strato.current_input_id() is None
    assert strato.current_function_call_id() is None
