"""Apps end to end: ``app.run()``, ``app.deploy()`` + ``Function.from_name`` from another
process, a script run as ``__main__``, output streaming, durable calls across processes and
across a restart of the control plane."""

from __future__ import annotations

import re
import sqlite3
import subprocess
import sys
import textwrap

import pytest
from apps import basic, deployed
from conftest import INTEGRATION_DIR, wait_until

import strato
from strato import exceptions as exc

SUBPROCESS_TIMEOUT_S = 120


def run_python(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run python in a new process with this process's strato environment."""
    proc = subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
        cwd=str(INTEGRATION_DIR),
    )
    if check:
        assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def run_code(code: str, check: bool = True) -> subprocess.CompletedProcess:
    return run_python("-c", textwrap.dedent(code), check=check)


def test_script_run_as_main_streams_tagged_output(server):
    proc = run_python(str(INTEGRATION_DIR / "scripts" / "main_script.py"), "world")
    assert "RESULT hello world" in proc.stdout
    assert "MAP hello a,hello b,hello c" in proc.stdout
    # the container's prints reach the client, tagged with the container's id
    tagged = re.findall(
        r"^\[(ct-[0-9a-f]+)\] greeting (\w+) from the container$", proc.stdout, re.M
    )
    assert {name for _, name in tagged} == {"world", "a", "b", "c"}
    assert len(tagged) == 4


def test_stdout_and_stderr_of_a_function_reach_the_client(server):
    proc = run_code(
        """
        from apps import basic
        with basic.app.run():
            print("RESULT", basic.printer.remote("marker-123"), flush=True)
        """
    )
    assert "RESULT marker-123" in proc.stdout
    assert re.search(r"^\[ct-[0-9a-f]+\] stdout says marker-123$", proc.stdout, re.M)
    assert re.search(r"^\[ct-[0-9a-f]+\] stderr says marker-123$", proc.stderr, re.M)


def test_quiet_run_prints_nothing_of_the_container(server):
    proc = run_code(
        """
        from apps import basic
        with basic.app.run(quiet=True):
            print("RESULT", basic.printer.remote("hush"), flush=True)
        """
    )
    assert "RESULT hush" in proc.stdout
    assert "says hush" not in proc.stdout + proc.stderr


def test_function_outside_a_running_app_says_how_to_run_it(server):
    with pytest.raises(exc.ExecutionError, match="app.run"):
        deployed.triple.remote(1)


def test_deploy_and_call_by_name_from_another_process(server):
    deployed.app.deploy()
    try:
        proc = run_code(
            """
            import strato
            f = strato.Function.from_name("strato-test-deployed", "triple")
            print("RESULT", f.remote(14), list(f.map([1, 2])), flush=True)
            """
        )
        assert "RESULT 42 [3, 6]" in proc.stdout
        # and from this process, by name too
        assert strato.Function.from_name("strato-test-deployed", "triple").remote(2) == 6
        with pytest.raises(exc.NotFoundError):
            strato.Function.from_name("strato-test-deployed", "no_such_fn").remote(1)
        with pytest.raises(exc.NotFoundError):
            strato.Function.from_name("no-such-app", "triple").remote(1)
    finally:
        deployed.app.stop()
    with pytest.raises(exc.AppStoppedError):
        deployed.triple.remote(1)
    with pytest.raises(exc.NotFoundError):
        strato.Function.from_name("strato-test-deployed", "triple").remote(1)


def test_spawned_output_is_fetchable_from_another_process(server):
    with basic.app.run(quiet=True):
        call = basic.square.spawn(11)
        assert call.get(timeout=60) == 121
    proc = run_code(
        f"""
        import strato
        print("RESULT", strato.FunctionCall.from_id({call.object_id!r}).get(timeout=30))
        """
    )
    assert "RESULT 121" in proc.stdout


def test_call_spawned_by_another_process_is_fetchable_here(server):
    deployed.app.deploy()
    try:
        proc = run_code(
            """
            import strato
            f = strato.Function.from_name("strato-test-deployed", "slow_triple")
            print("CALL", f.spawn(5, 0.5).object_id, flush=True)
            """
        )
        found = re.search(r"CALL (fc-\w+)", proc.stdout)
        assert found, proc.stdout
        call_id = found.group(1)
        # the spawning process has exited; its call goes on and its output is kept
        assert strato.FunctionCall.from_id(call_id).get(timeout=60) == 15
    finally:
        deployed.app.stop()


def _input_status(server, call_id: str) -> list[tuple[str]]:
    db = sqlite3.connect(f"file:{server.home / 'state.db'}?mode=ro", uri=True)
    try:
        return db.execute("SELECT status FROM inputs WHERE call_id = ?", (call_id,)).fetchall()
    finally:
        db.close()


def test_an_acknowledged_input_survives_a_crash_before_the_database_has_it(
    server, tmp_path, monkeypatch
):
    """spawn() is answered once the input is durable (the store's journal), not once the
    database has it. With every database statement 150 ms away, a control plane killed
    (SIGKILL) right after the acknowledgement has not committed the call yet; the
    restarted one (its store writes the journal into the database when it opens) has the
    input, runs it and answers. Were the answer given before the input was durable, the
    input would be lost here."""
    deployed.app.deploy()
    try:
        monkeypatch.setenv("STRATO_FAULT_DB_LATENCY_MS", "150")
        server.restart()  # a control plane whose database is slow
        monkeypatch.delenv("STRATO_FAULT_DB_LATENCY_MS")
        path = tmp_path / "runs"
        call = deployed.logged_triple.spawn(7, 0.5, str(path))
        server.restart()  # SIGKILL at once, then a control plane without the latency
        assert len(_input_status(server, call.object_id)) == 1
        assert call.get(timeout=90) == 21
        assert "started" in path.read_text()
        assert deployed.triple.remote(2) == 6  # the restarted control plane serves calls
    finally:
        deployed.app.stop()


def test_input_running_when_the_control_plane_dies_is_run_again(server, tmp_path):
    deployed.app.deploy()
    try:
        path = tmp_path / "runs"
        call = deployed.logged_triple.spawn(8, 3.0, str(path))
        wait_until(path.exists, 60, "the input to start")
        server.restart()
        assert call.get(timeout=90) == 24
        # its first run's output was lost with the control plane: it ran again
        assert path.read_text().split() == ["started", "started"]
    finally:
        deployed.app.stop()
