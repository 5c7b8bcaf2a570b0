"""The everyday surface that code ported from Modal relies on, end to end: module paths,
exceptions builtin ``except`` clauses catch, ``map(kwargs=)``, ``@batched`` /
``@concurrent`` methods, ``App.lookup``, ``enable_output``, live progress bars, logs and
history of stopped apps, where code runs, and a nested call."""

from __future__ import annotations

import time

import pytest
from apps import surface
from click.testing import CliRunner

import strato
from strato import exceptions as exc
from strato.cli.main import main as cli_main
from strato.client import session
from strato.protocol import messages as m

pytestmark = pytest.mark.usefixtures("running_surface")


@pytest.fixture(scope="module")
def running_surface(strato_server):
    strato_server.activate()
    with surface.app.run(quiet=True):
        yield surface.app


def test_ported_module_paths_and_builtin_timeout():
    import strato.exception
    import strato.functions

    assert strato.exception.NotFoundError is exc.NotFoundError
    assert strato.functions.FunctionCall is strato.FunctionCall
    assert strato.functions.Function is strato.Function
    call = surface.sleep_then.spawn(30.0, "late")
    try:
        call.get(timeout=0)
    except TimeoutError as e:  # the builtin, as a ported `except TimeoutError:` has it
        assert isinstance(e, strato.exception.TimeoutError)
    else:
        pytest.fail("get(timeout=0) of a running call returned")
    finally:
        call.cancel()


def test_map_kwargs_and_wrap_returned_exceptions():
    assert list(surface.scaled.map(range(4), kwargs={"factor": 3, "offset": 1})) == [1, 4, 7, 10]
    assert list(surface.pair.starmap([(1, 2), (3, 4)], kwargs={"sep": "+"})) == ["1+2", "3+4"]
    out = list(
        surface.maybe_fail.map(range(4), return_exceptions=True, wrap_returned_exceptions=False)
    )
    assert out[0] == 0 and out[2] == 2
    assert isinstance(out[1], ValueError) and "odd: 1" in str(out[1])
    assert isinstance(out[3], ValueError)
    surface.scaled.for_each(range(3), kwargs={"factor": 2})
    with pytest.raises(exc.InvalidError, match="kwargs"):
        list(surface.scaled.map(range(2), kwargs=[("factor", 2)]))  # type: ignore[arg-type]


def test_batched_method_without_method_decorator():
    calls = [surface.Batcher().double.spawn(i) for i in range(4)]
    results = [c.get() for c in calls]
    assert [r[0] for r in results] == [0, 2, 4, 6]
    assert max(r[1] for r in results) > 1  # gathered into one call of the function


def test_concurrent_method_without_method_decorator():
    out = list(surface.Together().meet.map(range(3)))
    assert [o["i"] for o in out] == [0, 1, 2]
    ids = [o["input_id"] for o in out]
    assert all(i and i.startswith("in-") for i in ids)
    assert len(set(ids)) == 3  # each thread sees its own input


def test_is_local_current_input_id_and_call_id():
    assert strato.is_local() is True
    assert strato.current_input_id() is None
    assert strato.current_function_call_id() is None
    call = surface.where.spawn()
    inside = call.get()
    assert inside["is_local"] is False
    assert inside["input_id"].startswith("in-ct-")
    assert inside["call_id"] == call.object_id


def test_a_nested_call_runs_over_the_containers_channel():
    # (tests/integration/test_nested_calls.py covers nested calls in depth)
    assert surface.nested.remote() == surface.scaled.remote(2)


def test_app_lookup():
    found = strato.App.lookup(surface.app.name, environment_name="main")
    assert found.app_id == surface.app.app_id
    assert strato.Function.from_name(found.name, "scaled").remote(5, factor=2) == 10
    with pytest.raises(exc.NotFoundError, match="create_if_missing"):
        strato.App.lookup("strato-test-surface-nothing")
    created = strato.App.lookup("strato-test-surface-empty", create_if_missing=True)
    try:
        assert created.app_id and created.app_id.startswith("ap-")
        again = strato.App.lookup("strato-test-surface-empty", create_if_missing=True)
        assert again.app_id == created.app_id
        info = session.api().call("GET", f"/apps/{created.app_id}", None, m.AppInfo)
        assert info.state == "deployed" and info.functions == []
    finally:
        created.stop()


def _log_texts(app_ref: str) -> list[str]:
    batch = session.api().call(
        "GET", f"/apps/{app_ref}/logs", None, m.LogBatch, params={"after": 0, "timeout": 0}
    )
    return [line.text for line in batch.lines]


def test_progress_bar_streams_live():
    call = surface.progress.spawn(3, 300.0)
    try:
        deadline = time.monotonic() + 60
        seen: list[str] = []
        while time.monotonic() < deadline:
            seen = [t for t in _log_texts(surface.app.app_id) if "surface-progress" in t]
            if any("3/3" in t for t in seen):
                break
            time.sleep(0.2)
        # the bar's redraws arrived while its line is still open (no newline for 300 s)
        assert any(t.rstrip("\r").endswith("surface-progress 3/3") for t in seen), seen
        with pytest.raises(TimeoutError):
            call.get(timeout=0)
    finally:
        call.cancel(terminate_containers=True)


def test_enable_output_logs_and_history_of_stopped_apps(capfd):
    name = surface.logs_app.name
    with strato.enable_output(), surface.logs_app.run(quiet=True):
        assert surface.say.remote("marker-7c1") == "marker-7c1"
    out = capfd.readouterr().out
    assert "said marker-7c1" in out and "[ct-" in out  # shown although quiet=True
    # the app is stopped now: its logs are still there by name
    result = CliRunner().invoke(cli_main, ["app", "logs", name])
    assert result.exit_code == 0, result.output
    assert "said marker-7c1" in result.output
    surface.logs_app.deploy()
    surface.logs_app.deploy()
    try:
        result = CliRunner().invoke(cli_main, ["app", "history", name])
        assert result.exit_code == 0, result.output
        rows = [r for r in result.output.splitlines() if r.startswith("v")]
        assert len(rows) >= 3, result.output
        assert "deployed" in rows[0] and "stopped" in rows[-1]
    finally:
        surface.logs_app.stop()
    result = CliRunner().invoke(cli_main, ["app", "history", "strato-test-never-was"])
    assert result.exit_code != 0
