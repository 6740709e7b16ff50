"""The watch ledger on a real SQLite file: states, duplicates, renames, and crash consistency."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from wbc_batch.ledger import DONE, DUPLICATE, ERROR, LEDGER_NAME, PENDING, Ledger, LedgerError
from wbc_batch.results import CellResult, ImageResult, duplicate_note

REPO = Path(__file__).resolve().parents[1]


def result(rel, n_cells=2):
    cells = tuple(
        CellResult(cell_id=i + 1, cls="lymphocyte", confidence=0.9,
                   probs=(0.025, 0.9, 0.025, 0.025, 0.025), x=10 * i, y=5, width=30, height=31,
                   area_px=700, nucleus_area_px=400, needs_review=False)
        for i in range(n_cells))
    return ImageResult(image=rel, status="ok", width=640, height=480, seconds=0.1,
                       diameter_px=32.0, cells=cells)


@pytest.fixture
def ledger(tmp_path):
    with Ledger.in_dir(tmp_path) as led:
        yield led


def test_file_is_sqlite_in_wal_mode(tmp_path, ledger):
    path = tmp_path / LEDGER_NAME
    assert ledger.path == path and path.is_file()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == "3"
    db.close()


def test_pending_then_done_round_trips_the_result(tmp_path, ledger):
    ledger.observe([("s1/a.jpg", 100, 1), ("b.png", 50, 2)])
    ledger.observe([("s1/a.jpg", 999, 9)])  # already known: left alone
    assert ledger.get("s1/a.jpg").size == 100
    assert ledger.counts() == {PENDING: 2, DONE: 0, ERROR: 0, DUPLICATE: 0}
    assert ledger.results() == []  # pending files are not in the reports

    ledger.set_pending("s1/a.jpg", 100, 1, "h1")
    ledger.record_done("s1/a.jpg", result("s1/a.jpg"))
    entry = ledger.get("s1/a.jpg")
    assert (entry.status, entry.attempts, entry.sha256) == (DONE, 1, "h1")
    assert entry.result == result("s1/a.jpg")
    assert ledger.results() == [result("s1/a.jpg")]

    with pytest.raises(ValueError):
        ledger.record_done("b.png", result("other.png"))

    ledger.close()
    with Ledger.in_dir(tmp_path) as again:  # persisted
        assert again.results() == [result("s1/a.jpg")]
        assert again.get("b.png").status == PENDING


def test_failures_back_off_then_become_an_error(ledger):
    ledger.set_pending("bad.jpg", 10, 1, "hb")
    e = ledger.record_failure("bad.jpg", "cannot decode: truncated JPEG", 3, retry_at=123.0)
    assert (e.status, e.attempts, e.next_retry) == (PENDING, 1, 123.0)
    assert ledger.results() == []
    e = ledger.record_failure("bad.jpg", "cannot decode: truncated JPEG", 3, retry_at=456.0)
    assert (e.status, e.attempts) == (PENDING, 2)
    e = ledger.record_failure("bad.jpg", "cannot decode: truncated JPEG", 3, retry_at=789.0)
    assert (e.status, e.attempts, e.error) == (ERROR, 3, "cannot decode: truncated JPEG")
    [row] = ledger.results()
    assert (row.image, row.status) == ("bad.jpg", "error")
    assert row.error == "cannot decode: truncated JPEG"

    # the file changes (re-sent): a new version starts from attempt one
    ledger.set_pending("bad.jpg", 20, 2, "hb2")
    e = ledger.get("bad.jpg")
    assert (e.status, e.attempts, e.error, e.result) == (PENDING, 0, "", None)


def test_changed_file_drops_its_old_result_until_analysed_again(ledger):
    ledger.set_pending("a.jpg", 10, 1, "h1")
    ledger.record_done("a.jpg", result("a.jpg", 2))
    ledger.set_pending("a.jpg", 11, 2, "h2")
    assert ledger.results() == []
    ledger.record_done("a.jpg", result("a.jpg", 5))
    [r] = ledger.results()
    assert len(r.cells) == 5


def test_touch_keeps_status_and_result(ledger):
    ledger.set_pending("a.jpg", 10, 1, "h1")
    ledger.record_done("a.jpg", result("a.jpg"))
    ledger.touch("a.jpg", 10, 5)
    e = ledger.get("a.jpg")
    assert (e.status, e.mtime_ns, e.result) == (DONE, 5, result("a.jpg"))


def test_duplicates_are_listed_not_counted_and_released_with_their_original(ledger):
    ledger.set_pending("a.jpg", 10, 1, "h1")
    assert ledger.owner_of("h1", exclude="copy.jpg") is None  # pending is not an owner yet
    ledger.record_done("a.jpg", result("a.jpg"))
    assert ledger.owner_of("h1", exclude="copy.jpg").rel == "a.jpg"
    assert ledger.owner_of("h1", exclude="a.jpg") is None
    ledger.mark_duplicate("copy.jpg", 10, 3, "h1", "a.jpg")
    rows = {r.image: r for r in ledger.results()}
    assert rows["a.jpg"].ok and len(rows["a.jpg"].cells) == 2
    assert rows["copy.jpg"].status == "duplicate" and rows["copy.jpg"].cells == ()
    assert rows["copy.jpg"].error == duplicate_note("a.jpg")
    assert [d.rel for d in ledger.duplicates_of("a.jpg")] == ["copy.jpg"]

    # the original changes: its copy must now be analysed itself, in the same transaction
    ledger.set_pending("a.jpg", 12, 4, "h2")
    e = ledger.get("copy.jpg")
    assert (e.status, e.duplicate_of, e.sha256) == (PENDING, None, "h1")


def test_forget_releases_duplicates(ledger):
    ledger.set_pending("bad.jpg", 10, 1, "hb")
    ledger.record_failure("bad.jpg", "broken", 1, retry_at=0)
    ledger.mark_duplicate("bad2.jpg", 10, 2, "hb", "bad.jpg")
    ledger.forget("bad.jpg")
    assert ledger.get("bad.jpg") is None
    assert ledger.get("bad2.jpg").status == PENDING


def test_rename_moves_result_and_duplicates(ledger):
    ledger.set_pending("old/a.jpg", 10, 1, "h1")
    ledger.record_done("old/a.jpg", result("old/a.jpg"))
    ledger.mark_duplicate("dup.jpg", 10, 2, "h1", "old/a.jpg")
    ledger.observe([("new/a.jpg", 10, 3)])
    moved = ledger.rename("old/a.jpg", "new/a.jpg", 10, 3)
    assert moved.rel == "new/a.jpg" and moved.status == DONE and moved.mtime_ns == 3
    assert moved.result.image == "new/a.jpg" and len(moved.result.cells) == 2
    assert ledger.get("old/a.jpg") is None
    assert ledger.get("dup.jpg").duplicate_of == "new/a.jpg"
    assert [r.image for r in ledger.results()] == ["dup.jpg", "new/a.jpg"]
    assert ledger.rename("nothing.jpg", "x.jpg", 1, 1) is None


def test_rename_onto_a_file_with_duplicates_releases_them(ledger):
    # b.jpg (content X, copied as c.jpg) is replaced by a.jpg moved onto it: X needs c.jpg now
    for rel, sha in (("b.jpg", "hX"), ("a.jpg", "hY")):
        ledger.set_pending(rel, 10, 1, sha)
        ledger.record_done(rel, result(rel))
    ledger.mark_duplicate("c.jpg", 10, 2, "hX", "b.jpg")
    released = []
    ledger.rename("a.jpg", "b.jpg", 10, 3, released)
    assert released == ["c.jpg"]
    assert ledger.get("c.jpg").status == PENDING and ledger.get("c.jpg").duplicate_of is None
    assert ledger.get("b.jpg").sha256 == "hY"


def test_other_schema_is_refused(tmp_path):
    with Ledger.in_dir(tmp_path) as led:
        led.set_meta("schema_version", "99")
    with pytest.raises(LedgerError, match="schema 99"):
        Ledger.in_dir(tmp_path)


SCHEMA_1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE files (
    rel TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, sha256 TEXT,
    status TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, error TEXT NOT NULL DEFAULT '',
    next_retry REAL NOT NULL DEFAULT 0, duplicate_of TEXT, result TEXT,
    first_seen REAL NOT NULL, updated REAL NOT NULL);
INSERT INTO meta VALUES ('schema_version', '1'), ('inbox', '/scans');
"""


def test_a_schema_1_ledger_is_upgraded_in_place_and_keeps_its_results(tmp_path):
    # the ledger of an older wbc-batch, which had no ctime: a watch restarted after an upgrade
    # must keep every result (and must not be refused, or the lab loses its running count)
    db = sqlite3.connect(tmp_path / LEDGER_NAME)
    db.executescript(SCHEMA_1)
    db.execute("INSERT INTO files (rel, size, mtime_ns, sha256, status, attempts, result, "
               "first_seen, updated) VALUES ('a.jpg', 10, 5, 'h1', 'done', 1, ?, 1, 1)",
               (json.dumps(result("a.jpg").to_dict()),))
    db.commit()
    db.close()
    with Ledger.in_dir(tmp_path) as led:
        assert led.get_meta("schema_version") == "3" and led.get_meta("inbox") == "/scans"
        entry = led.get("a.jpg")
        assert (entry.status, entry.result, entry.version) == (DONE, result("a.jpg"), (10, 5, None))
        # ctime unknown: the watcher's next scan re-reads the file once, then stores it
        assert led.versions() == {"a.jpg": ((10, 5, None), DONE, 0.0)}
        led.touch("a.jpg", 10, 5, 77)
        assert led.get("a.jpg").version == (10, 5, 77) and led.get("a.jpg").result == result("a.jpg")
    with Ledger.in_dir(tmp_path) as led:  # opened again: already upgraded, nothing to do
        assert led.get_meta("schema_version") == "3" and led.get("a.jpg").ctime_ns == 77


def test_not_a_database_is_refused(tmp_path):
    (tmp_path / LEDGER_NAME).write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(LedgerError, match="cannot open"):
        Ledger.in_dir(tmp_path)


WRITER = textwrap.dedent("""
    import sys, time
    from wbc_batch.ledger import Ledger
    from wbc_batch.results import CellResult, ImageResult
    led = Ledger.in_dir(sys.argv[1])
    cell = CellResult(1, "monocyte", 0.8, (0.1, 0.05, 0.8, 0.025, 0.025), 1, 2, 3, 4, 5, 6, False)
    i = 0
    print("ready", flush=True)
    while True:
        rel = f"s{i % 7}/img{i:06d}.jpg"
        led.observe([(rel, i, i)])
        led.set_pending(rel, i, i, f"h{i}")
        led.record_done(rel, ImageResult(rel, "ok", cells=(cell,) * (1 + i % 4)))
        i += 1
""")


def test_kill_9_mid_write_leaves_every_row_whole(tmp_path):
    """A writer killed at random moments never leaves a done row without its result, nor a
    result on a row that is not done."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for round_ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)],
                                stdout=subprocess.PIPE, env=env)
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(0.2 + 0.15 * round_)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
    db = sqlite3.connect(tmp_path / LEDGER_NAME)
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    rows = db.execute("SELECT rel, status, result FROM files").fetchall()
    db.close()
    assert rows, "the writer wrote nothing"
    for rel, status, res in rows:
        if status == DONE:
            r = ImageResult.from_dict(json.loads(res))
            assert r.image == rel and 1 <= len(r.cells) <= 4
        else:
            assert status == PENDING and res is None
    with Ledger.in_dir(tmp_path) as led:
        assert len(led.results()) == led.counts()[DONE]


def test_a_failure_records_the_version_it_tried_and_another_version_starts_again(ledger):
    # first seen while the scanner was still writing it: the row holds that early version
    ledger.observe([("a.png", 5, 1, 1)])
    e = ledger.record_failure("a.png", "cannot read file", 2, retry_at=1.0, version=(10, 2, 2))
    assert (e.status, e.attempts, e.version) == (PENDING, 1, (10, 2, 2))
    e = ledger.record_failure("a.png", "cannot read file", 2, retry_at=1.0, version=(10, 2, 2))
    assert (e.status, e.attempts, e.version) == (ERROR, 2, (10, 2, 2))  # settled at that version
    # another version (a chmod, a rewrite) that fails too: from attempt one, not given up at once
    e = ledger.record_failure("a.png", "cannot read file", 2, retry_at=1.0, version=(10, 2, 3))
    assert (e.status, e.attempts, e.version) == (PENDING, 1, (10, 2, 3))


def test_the_retry_time_follows_the_attempt_the_ledger_counted(ledger):
    # watch had predicted the ledger's attempt number to compute its backoff: a rule in two places
    import time

    ledger.observe([("a.png", 5, 1, 1)])
    asked = []

    def backoff(attempt):
        asked.append(attempt)
        return 100.0 * attempt

    before = time.time()
    e = ledger.record_failure("a.png", "broken", 5, version=(5, 1, 1), retry_in=backoff)
    assert before + 100 <= e.next_retry <= time.time() + 100
    ledger.record_failure("a.png", "broken", 5, version=(5, 1, 1), retry_in=backoff)
    e = ledger.record_failure("a.png", "broken", 5, version=(6, 2, 2), retry_in=backoff)
    assert asked == [1, 2, 1] and e.next_retry >= before + 100


def test_retry_errors_requeues_the_errors_of_one_reason(ledger):
    for rel, error in (("a.png", "cannot write the overlay or mask: disk full"),
                       ("b.png", "the image is too small to hold a WBC")):
        ledger.set_pending(rel, 10, 1, "h" + rel)
        ledger.record_failure(rel, error, 1, retry_at=0.0)
    assert ledger.retry_errors("cannot write the overlay or mask") == 1
    a, b = ledger.get("a.png"), ledger.get("b.png")
    assert (a.status, a.attempts, a.error, a.result, a.sha256) == (PENDING, 0, "", None, "ha.png")
    assert (b.status, b.attempts) == (ERROR, 1)
    assert [r.image for r in ledger.results()] == ["b.png"]


def test_a_schema_2_ledger_is_upgraded_and_its_results_read_without_the_newer_fields(tmp_path):
    # schema 3 changes no table; its results may hold margins_left, which a version reading
    # schema 2 could not take (a TypeError): it now refuses the ledger by its schema instead
    with Ledger.in_dir(tmp_path) as led:
        led.set_pending("a.jpg", 10, 5, "h1")
        old = result("a.jpg").to_dict()
        old.pop("margins_left")
        led.record_done("a.jpg", result("a.jpg"))
        led.set_meta("schema_version", "2")
    db = sqlite3.connect(tmp_path / LEDGER_NAME)
    db.execute("UPDATE files SET result = ? WHERE rel = 'a.jpg'", (json.dumps(old),))
    db.commit()
    db.close()
    with Ledger.in_dir(tmp_path) as led:
        assert led.get_meta("schema_version") == "3"
        assert led.get("a.jpg").result == result("a.jpg") and not led.get("a.jpg").result.margins_left
