"""The store's intake journal: a call or inputs accepted through it survive a crash of
the control plane before the database has them, are written again once (never twice),
and a record cut short by the crash is ignored. On SQLite and PostgreSQL."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from strato.server.store import CallRow, FinalRow, InputRow, Store
from strato.server.store.journal import Journal


@pytest.fixture
def db(db_url, tmp_path):
    """(url, journal path): SQLite's journal is the default one beside its file."""
    sqlite = db_url.startswith("sqlite")
    return db_url, tmp_path / ("state.db.intake" if sqlite else "pg.intake")


def _open(url: str, journal: Path) -> Store:
    return Store(url) if url.startswith("sqlite") else Store(url, journal=journal)


def _call(call_id: str, n: int = 0) -> CallRow:
    return CallRow(call_id, "fu-1", "map", None, n, False, False, 1.0, time.time() + 600)


CRASH = """
import os, sys, threading
from pathlib import Path
from strato.server.store import CallRow, FinalRow, InputRow, Store
url, journal = sys.argv[1], Path(sys.argv[2])
store = Store(url) if url.startswith("sqlite") else Store(url, journal=journal)
store._write("hold", lambda _c: threading.Event().wait())  # the database gets nothing more
call = CallRow("fc-1", "fu-1", "map", None, 2, False, False, 1.0, 4e9)
first = [InputRow(1, "fc-1", 0, b"a", None), InputRow(2, "fc-1", 1, b"b", None)]
w = store.accept_call(call, first)
store.accept_inputs("fc-1", [InputRow(3, "fc-1", 2, b"c", None)], True, 3)
assert not w.done()
print("accepted", flush=True)
os._exit(0)  # a crash: nothing is flushed or closed
"""


def test_accepted_writes_survive_a_crash_before_the_database_has_them(db):
    url, journal = db
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(CRASH), url, str(journal)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.stdout.strip() == "accepted", out.stderr
    store = _open(url, journal)
    try:
        assert store.call_row("fc-1") == CallRow(
            "fc-1", "fu-1", "map", None, 3, True, False, 1.0, 4e9
        )
        assert [(p.input_id, p.args) for p in store.pending_inputs()] == [
            (1, b"a"),
            (2, b"b"),
            (3, b"c"),
        ]
        assert store.max_ids()[0] == 3
    finally:
        store.close()
    assert Journal.read(journal) == []  # all in the database: emptied
    again = _open(url, journal)  # nothing left to write again
    try:
        assert len(again.pending_inputs()) == 3
    finally:
        again.close()


def test_journal_entries_the_database_has_are_not_written_twice(db, caplog):
    url, journal = db
    store = _open(url, journal)
    store._writer.journal_done = None  # a crash comes before the journal hears it is applied
    assert store.accept_call(_call("fc-1", 1), [InputRow(1, "fc-1", 0, b"a", None)]).wait()
    assert store.accept_call(_call("fc-1"), []).wait() is False  # a retried request
    store.accept_inputs("fc-1", [InputRow(2, "fc-1", 1, b"b", None)], None, 2).wait()
    store.flush()
    # a crash now: the journal still holds all three, the database has them
    store._writer.close(30)
    store._journal.close()  # (as a crash would: the lock goes with the process)
    assert [e[1] for e in Journal.read(journal)] == ["create_call", "create_call", "add_inputs"]
    again = _open(url, journal)
    try:
        assert [p.input_id for p in again.pending_inputs()] == [1, 2]
        row = again.call_row("fc-1")
        assert row is not None and row.n_inputs == 2
        assert not [r for r in caplog.records if "again from the journal" in r.getMessage()]
    finally:
        again.close()
        store.close()


def test_a_record_cut_short_by_a_crash_is_ignored(db):
    url, journal = db
    store = _open(url, journal)
    store._write("hold", lambda _c: __import__("threading").Event().wait(0.5))
    store.accept_call(_call("fc-1", 1), [InputRow(1, "fc-1", 0, b"a", None)])
    end = store._journal.written
    store._journal.close()  # a crash (the lock goes with the process) in an append:
    with open(journal, "r+b") as f:  # a length of 64, and 7 bytes of the body
        f.seek(end)
        f.write(b"\x40\x00\x00\x00partial")
    again = _open(url, journal)
    try:
        assert [p.input_id for p in again.pending_inputs()] == [1]
        again.accept_call(_call("fc-2", 1), [InputRow(2, "fc-2", 0, b"b", None)]).wait()
        assert [p.input_id for p in again.pending_inputs()] == [1, 2]
    finally:
        again.close()
        store.close()


def test_without_a_journal_accepting_waits_for_the_database(db):
    url, _ = db
    store = Store(url, journal=None)
    try:
        w = store.accept_call(_call("fc-1", 1), [InputRow(1, "fc-1", 0, b"a", None)])
        assert w.done() and w.result() is True
        v = store.accept_inputs("fc-1", [InputRow(2, "fc-1", 1, b"b", None)], True, 2)
        assert v.done()
    finally:
        store.close()


def test_records_written_after_a_cut_short_one_are_read_back(tmp_path):
    path = tmp_path / "j.intake"
    j = Journal(path)
    j.append("create_call", [{"call_id": "fc-1"}, []])
    end = j.written
    j.close()
    with open(path, "r+b") as f:  # an append cut short: a length of 64, 7 bytes of body
        f.seek(end)
        f.write(b"\x40\x00\x00\x00partial")
    j = Journal(path)
    assert [e[0] for e in j.entries()] == [1]
    assert j.append("add_inputs", ["fc-1", [], True, 0]) == 2
    j.close()
    assert [(e[0], e[1]) for e in Journal(path).entries()] == [
        (1, "create_call"),
        (2, "add_inputs"),
    ]


CRASH_OUTPUTS = """
import os, sys, threading
from pathlib import Path
from strato.server.store import CallRow, FinalRow, GenItemRow, InputRow, Store
url, journal = sys.argv[1], Path(sys.argv[2])
store = Store(url) if url.startswith("sqlite") else Store(url, journal=journal)
call = CallRow("fc-1", "fu-1", "map", None, 2, True, False, 1.0, 4e9)
store.accept_call(call, [InputRow(1, "fc-1", 0, b"a", None), InputRow(2, "fc-1", 1, b"b", None)])
store._write("hold", lambda _c: threading.Event().wait())  # the database gets nothing more
w = store.accept_outputs(
    [FinalRow(1, "success", b"out", None, None, None, 8, 2.0, None)],
    [GenItemRow(7, "fc-1", 0, 0, b"item", None)],
)
assert not w.done()
print("accepted", flush=True)
os._exit(0)  # a crash: nothing is flushed or closed
"""


def test_accepted_outputs_survive_a_crash_and_their_inputs_are_not_pending(db):
    """An output accepted through the journal is in the database after a crash, under
    its sequence number, before anything reads what is pending: its input never reruns
    (and so never gets a second output under a new number)."""
    url, journal = db
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(CRASH_OUTPUTS), url, str(journal)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.stdout.strip() == "accepted", out.stderr
    store = _open(url, journal)
    try:
        assert [p.input_id for p in store.pending_inputs()] == [2]  # input 1 is done
        found = store.outputs_after("fc-1", 0, 10)
        assert [(o.seq, o.idx, o.status, o.data, o.gen_index) for o in found] == [
            (7, 0, "success", b"item", 0),
            (8, 0, "success", b"out", None),
        ]
        assert store.max_ids()[1] == 8  # new outputs are numbered after these
        assert store.count_done("fc-1") == 1
    finally:
        store.close()


def test_without_a_journal_accepted_outputs_are_only_queued(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'state.db'}", journal=None)
    try:
        assert not store.journaled
        call = CallRow("fc-1", "fu-1", "map", None, 1, True, False, 1.0, 4e9)
        store.accept_call(call, [InputRow(1, "fc-1", 0, b"a", None)])
        w = store.accept_outputs([FinalRow(1, "success", b"o", None, None, None, 3, 2.0)], [])
        w.wait()
        assert store.pending_inputs() == []
    finally:
        store.close()


def test_a_journal_that_never_catches_up_drops_what_the_database_has(tmp_path, monkeypatch):
    """Under a steady load the database never has every entry at once: the file is
    rewritten without the entries it has (once they are half of it), whole, and a journal
    opened on it reads back exactly the others."""
    from strato.server.store import journal as jmod

    monkeypatch.setattr(jmod, "COMPACT_BYTES", 4096)
    path = tmp_path / "j"
    j = jmod.Journal(path, capacity=4096)
    for i in range(100):
        j.append("add_inputs", ["fc-1", [{"idx": i, "args": b"x" * 64}], None, i])
    size = j.written
    assert size > 4096
    j.applied(30)  # under half of the file: kept as is
    assert j.written == size
    j.applied(80)
    assert j.written < size // 2
    j.append("add_inputs", ["fc-1", [], True, 100])  # appends go on in the new file
    j.close()
    again = jmod.Journal(path)
    try:
        assert [seq for seq, _, _ in again.entries()] == list(range(81, 102))
        assert again.entries()[-1][2] == ["fc-1", [], True, 100]
        assert again.seq == 101
    finally:
        again.close()
    assert not (tmp_path / "j.tmp").exists()


def test_once_all_is_applied_the_journal_starts_over_and_never_reads_older_records(tmp_path):
    """Writing starts again at the file's beginning when the database has every entry;
    the longer records written there before are never read back (nor past a crash)."""
    path = tmp_path / "j"
    j = Journal(path)
    for i in range(10):
        j.append("add_inputs", ["fc-1", [{"idx": i, "args": b"x" * 200}], None, i])
    j.applied(10)
    assert j.written == 0
    j.append("add_inputs", ["fc-2", [], True, 0])
    j.append("add_inputs", ["fc-3", [], True, 0])
    # a crash now (nothing written out first; the lock goes with the process)
    assert [(seq, p[0]) for seq, _, p in Journal.read(path)] == [(11, "fc-2"), (12, "fc-3")]
    j.close()


def test_a_record_whose_length_was_not_stored_yet_is_not_read(tmp_path):
    """A crash in the middle of an append leaves the body without its length (stored
    last): the journal ends before it, and the next record takes its place."""
    import msgspec

    path = tmp_path / "j"
    j = Journal(path)
    j.append("add_inputs", ["fc-1", [], True, 0])
    end = j.written
    j.close()
    with open(path, "r+b") as f:  # what the crash left: a body, the length still zero
        f.seek(end + 4)
        f.write(msgspec.msgpack.encode([2, "add_inputs", ["fc-2", [], True, 0]]))
    j = Journal(path)
    try:
        assert [seq for seq, _, _ in j.entries()] == [1]
        assert j.append("add_inputs", ["fc-3", [], True, 0]) == 2
    finally:
        j.close()
    again = Journal(path)
    try:
        assert [p[0] for _, _, p in again.entries()] == ["fc-1", "fc-3"]
    finally:
        again.close()


def test_the_journal_grows_past_its_capacity_and_shrinks_back_once_applied(tmp_path):
    path = tmp_path / "j"
    j = Journal(path, capacity=4096)
    for i in range(200):  # ~20 KB of records
        j.append("add_inputs", ["fc-1", [{"idx": i, "args": b"y" * 64}], None, i])
    assert path.stat().st_size >= j.written > 4 * 4096
    assert [seq for seq, _, _ in Journal.read(path)] == list(range(1, 201))
    j.applied(200)
    assert path.stat().st_size == 4096  # (grown over 4x its capacity: shrunk back)
    j.append("add_inputs", ["fc-2", [], True, 0])
    j.close()
    last = Journal(path)
    try:
        assert [seq for seq, _, _ in last.entries()] == [201]
    finally:
        last.close()


SIGKILLED = """
import os, signal, sys
from pathlib import Path
from strato.server.store.journal import Journal
j = Journal(Path(sys.argv[1]))
for i in range(500):
    j.append("queue_put", ["qu-1", "", [b"item-%d" % i], 0.0, 1.0, "rq-%d" % i])
print("appended", flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # nothing is closed, unmapped or synced
"""


def test_records_copied_into_the_mapped_file_survive_a_sigkill(tmp_path):
    path = tmp_path / "j"
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(SIGKILLED), str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == -9 and out.stdout.strip() == "appended", out.stderr
    j = Journal(path)
    try:
        entries = j.entries()
        assert [seq for seq, _, _ in entries] == list(range(1, 501))
        assert entries[-1][2][2] == [b"item-499"]
    finally:
        j.close()


@pytest.fixture
def small_disk(tmp_path):
    """A 64 KiB file system (tmpfs; the tests run as root)."""
    where = tmp_path / "small"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


def test_a_journal_that_cannot_grow_refuses_the_write_and_keeps_the_others(small_disk):
    from strato.server.store.journal import JournalFull

    path = small_disk / "j"
    j = Journal(path, capacity=16 << 10)
    appended = 0
    with pytest.raises(JournalFull, match="cannot grow"):
        for i in range(10_000):  # ~1 MB of records: past what the disk holds
            j.append("add_inputs", ["fc-1", [{"idx": i, "args": b"z" * 100}], None, i])
            appended += 1
    assert 0 < appended < 10_000
    assert j.seq == appended  # the refused record took no sequence number
    j.close()
    again = Journal(path)
    try:
        assert [seq for seq, _, _ in again.entries()] == list(range(1, appended + 1))
    finally:
        again.close()


def test_journaled_call_writes_linger_and_the_others_do_not(tmp_path, monkeypatch):
    """A call, inputs and outputs accepted through the journal are durable already and
    nobody waits for their commit: they are queued as lingering writes, so that a client's
    sequential calls share the writer's commits. Without a journal the caller waits for
    the commit, so the write is not held back."""
    queued = []
    for journal in (tmp_path / "j", None):
        store = Store(f"sqlite:///{tmp_path}/{'a' if journal else 'b'}.db", journal=journal)
        real = store._writer.enqueue

        def enqueue(op, real=real) -> None:
            queued.append(op)
            real(op)

        monkeypatch.setattr(store._writer, "enqueue", enqueue)
        try:
            store.accept_call(_call("fc-1", 1), [InputRow(1, "fc-1", 0, b"a", None)])
            store.accept_inputs("fc-1", [InputRow(2, "fc-1", 1, b"b", None)], True, 2)
            store.accept_outputs([FinalRow(1, "success", b"o", None, None, None, 3, 2.0)], [])
            store.flush()
            assert len(store.pending_inputs()) == 1  # all three applied
        finally:
            store.close()
        assert [(op.name, op.linger) for op in queued] == [
            ("create_call", journal is not None),
            ("add_inputs", journal is not None),
            ("outputs", journal is not None),
        ]
        queued.clear()


def test_a_journal_in_use_is_refused_with_a_clear_error(tmp_path):
    """Two writers would copy records over each other's: a second control plane on the
    same store is refused at start, and takes the journal once the first lets it go."""
    from strato.server.store.journal import JournalInUse

    path = tmp_path / "j"
    first = Journal(path)
    first.append("add_inputs", ["fc-1", [], True, 0])
    with pytest.raises(JournalInUse, match="another control plane"):
        Journal(path)
    code = "import sys; from pathlib import Path; from strato.server.store.journal import "
    code += "Journal; Journal(Path(sys.argv[1]))"
    out = subprocess.run(  # (a process of its own, as a second server is)
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode != 0 and "JournalInUse" in out.stderr, out.stderr[-2000:]
    assert Journal.read(path)[0][1] == "add_inputs"  # reading needs no lock
    first.close()
    second = Journal(path)
    try:
        assert [seq for seq, _, _ in second.entries()] == [1]
    finally:
        second.close()
