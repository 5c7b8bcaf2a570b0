"""Logs and files: ``strato run`` shows every line its app printed (it drains the app's
logs until its containers are gone); a container printing past the log quota leaves the
database bounded and the user sees how much was dropped; every file under a fresh
STRATO_HOME is private to its user (0600 files, 0700 folders)."""

from __future__ import annotations

import os
import re
import sqlite3
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import dedicated_server

sys.path.insert(0, str(Path(__file__).resolve().parent))
import supervision_apps as apps  # noqa: E402

LINES = 102_400
QUOTA = 65_536  # bytes per container per minute, for the quota tests' control plane
FLOOD_LINES, FLOOD_WIDTH = 8_192, 1_024  # 8.5 MB printed: 129 times the quota

CHATTY = """
import strato

app = strato.App("strato-test-chatty")


@app.function()
def chatty(n: int) -> int:
    for i in range(n):
        print(f"line {i:06d}")
    return n


@app.local_entrypoint()
def main():
    print("RESULT", chatty.remote(LINES))
"""


def strato_cli() -> list[str]:
    script = Path(sys.executable).with_name("strato")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from strato.cli.main import main; main()"]


@pytest.mark.slow
def test_strato_run_shows_every_line(server, tmp_path):
    path = tmp_path / "chatty.py"
    path.write_text(textwrap.dedent(CHATTY).replace("LINES", str(LINES)))
    proc = subprocess.run(
        [*strato_cli(), "run", str(path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=str(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"RESULT {LINES}" in proc.stdout
    seen = [int(x) for x in re.findall(r"^\[ct-[0-9a-f]+\] line (\d{6})$", proc.stdout, re.M)]
    assert len(seen) == LINES, f"{len(seen)} of {LINES} lines shown"
    assert sorted(seen) == list(range(LINES))  # each once
    assert seen == sorted(seen)  # in the order printed


@pytest.fixture(scope="module")
def quota_server():
    with dedicated_server({"STRATO_RUNTIME": "process", "STRATO_LOG_QUOTA": str(QUOTA)}) as h:
        yield h


def test_log_quota_bounds_the_database(quota_server, capfd):
    with apps.app.run():
        assert apps.flood.remote(FLOOD_LINES, FLOOD_WIDTH) == FLOOD_LINES
        app_id = apps.app.app_id
    shown = capfd.readouterr()
    db = sqlite3.connect(f"file:{quota_server.home / 'state.db'}?mode=ro", uri=True)
    try:
        kept_lines, kept_bytes = db.execute(
            "SELECT COUNT(*), COALESCE(SUM(LENGTH(text) + 1), 0) FROM logs "
            "WHERE app_id = ? AND stream IN ('stdout', 'stderr')",
            (app_id,),
        ).fetchone()
        notices = [
            r[0]
            for r in db.execute(
                "SELECT text FROM logs WHERE app_id = ? AND stream = 'system'", (app_id,)
            )
        ]
    finally:
        db.close()
    line_bytes = 8 + 1 + FLOOD_WIDTH + 1  # "%08d x...x\n"
    # the flood takes well under a minute: one quota window (two if it straddles one)
    assert 0 < kept_bytes <= 2 * QUOTA, kept_bytes
    dropped = [
        tuple(int(x) for x in m.groups())
        for t in notices
        if (m := re.match(r"(\d+) bytes of logs dropped \((\d+) lines\): over the quota", t))
    ]
    assert dropped, notices
    quota_said = f"over the quota of {QUOTA} bytes per minute"
    assert all(quota_said in t for t in notices if "dropped (" in t)
    # every printed line is either stored or counted as dropped
    assert kept_lines + sum(n for _, n in dropped) == FLOOD_LINES
    assert kept_bytes + sum(b for b, _ in dropped) == FLOOD_LINES * line_bytes
    # the user running the app sees it
    assert re.search(r"\d+ bytes of logs dropped \(\d+ lines\): over the quota of 65536", shown.err)
    assert "over the log quota of 65536 bytes per minute" in shown.err
    assert shown.out.count(" x") == kept_lines


# Under STRATO_HOME, only these may be readable by others, each for a reason:
EXCEPTIONS = {
    # the node's cache: the app's code, function specs, zygote sockets; containers read them
    # as their own unprivileged uid. The folder itself is 0700, so no other user of the host
    # reaches them (binds and overlays are set up by root, and never traverse it after).
    "worker": "contents read by containers; the folder is 0700",
    # image layers (overlay lower dirs keep their own modes for the container's user); the
    # folder itself is 0700 (overlayfs looks the lower dirs up with the mounter's rights).
    "images": "image layers; the folder is 0700",
    # the channel: containers of isolating runtimes run as another uid and must connect to
    # it (bound in; run/ itself stays 0700); each authenticates with its own token
    "run/channel.sock": "a socket containers connect to; run/ is 0700",
}


def private_home_violations(home: Path) -> tuple[int, list[str]]:
    """(paths checked, those open to group or others outside ``EXCEPTIONS``)."""
    checked, open_to_others = 0, []
    for dirpath, dirnames, filenames in os.walk(home):
        rel = Path(dirpath).relative_to(home)
        if rel.parts and rel.parts[0] in EXCEPTIONS:
            continue  # their contents: see EXCEPTIONS (the folders themselves are checked)
        for name in [*dirnames, *filenames]:
            path = Path(dirpath, name)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                continue
            checked += 1
            where = str(path.relative_to(home))
            if where in EXCEPTIONS and stat.S_ISSOCK(st.st_mode):
                continue
            if stat.S_IMODE(st.st_mode) & 0o077:
                open_to_others.append(f"{where} {stat.S_IMODE(st.st_mode):o}")
    return checked, open_to_others


def check_private_home(home: Path) -> None:
    checked, open_to_others = private_home_violations(home)
    assert stat.S_IMODE(os.stat(home).st_mode) == 0o700
    assert not open_to_others, open_to_others
    for must in ("state.db", "token", "server.json", "logs/server.log", "logs/worker.log"):
        assert stat.S_IMODE(os.stat(home / must).st_mode) == 0o600, must
    folders = ["blobs", "logs", "run", "worker"]
    if not os.environ.get("STRATO_IMAGE_CACHE"):  # else the image cache is elsewhere
        folders.append("images")
    for folder in folders:
        assert stat.S_IMODE(os.stat(home / folder).st_mode) == 0o700, folder
    blobs = [p for p in (home / "blobs").rglob("*") if p.is_file()]
    assert blobs and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in blobs)
    assert checked >= 10


def test_home_is_private(quota_server):
    with apps.app.run(quiet=True):
        assert apps.double.remote(4) == 8  # a function ran: blobs, logs, containers exist
    check_private_home(quota_server.home)


def test_home_is_private_under_bwrap():
    """The default runtime: containers run as an unprivileged uid and still read their
    code and the channel (the function runs), while the home stays private."""
    with dedicated_server({"STRATO_RUNTIME": "bwrap"}) as handle:
        with apps.app.run(quiet=True):
            assert apps.double.remote(4) == 8
        check_private_home(handle.home)


def test_an_older_home_is_made_private_at_start(tmp_path):
    """A home made before this rule (world-readable state) is fixed when the control plane
    starts (``secure_home``); worker/ and images/ keep their contents' modes."""
    from strato.server.main import secure_home

    home = tmp_path / "home"
    for d in ("blobs/ab", "logs", "run", "worker/mounts", "images/layers"):
        (home / d).mkdir(parents=True)
    files = ["state.db", "state.db-wal", "token", "server.json", "blobs/ab/abcd", "logs/x.log"]
    for f in files:
        (home / f).write_text("secret")
    (home / "worker/mounts/code.py").write_text("print()")
    for p in [home, *home.rglob("*")]:
        p.chmod(0o777 if p.is_dir() else 0o644)
    old_umask = os.umask(0o022)
    try:
        secure_home(home)
    finally:
        os.umask(old_umask)
    for f in files:
        assert stat.S_IMODE((home / f).stat().st_mode) == 0o600, f
    for d in ("", "blobs", "blobs/ab", "logs", "run", "worker", "images"):
        assert stat.S_IMODE((home / d).stat().st_mode) == 0o700, d
    # what containers read keeps its mode: only its folder is closed
    assert stat.S_IMODE((home / "worker/mounts/code.py").stat().st_mode) == 0o644


def test_log_quota_windows():
    """The worker's quota, by itself: per container, per window; the summary of what was
    dropped comes when the window ends (or the container does)."""
    from strato.worker.agent import LogQuota

    q = LogQuota(100, window_s=60.0)
    assert q.admit("a", "x" * 49, 0.0) == (True, [])  # 50 bytes with its newline
    assert q.admit("a", "x" * 49, 1.0) == (True, [])
    keep, notices = q.admit("a", "y", 2.0)
    assert not keep and len(notices) == 1 and "over the log quota of 100" in notices[0]
    assert q.admit("a", "y", 3.0) == (False, [])  # told once per window
    assert q.admit("b", "z" * 10, 3.0) == (True, [])  # another container: its own quota
    keep, notices = q.admit("a", "w", 61.0)  # a new minute
    assert keep and notices == [
        "4 bytes of logs dropped (2 lines): over the quota of 100 bytes per minute"
    ]
    q.admit("a", "v" * 200, 62.0)
    assert q.close("a", forget=True) == (
        "201 bytes of logs dropped (1 lines): over the quota of 100 bytes per minute"
    )
    assert q.close("a", forget=True) is None
    assert LogQuota(0).admit("a", "x" * 10**6, 0.0) == (True, [])  # 0: no limit
