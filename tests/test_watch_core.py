"""The watcher's decisions, in-process with a stub runner (no models, no images): readiness,
retries, duplicates, renames, changed and deleted files, report flushing.

The subprocess tests with real signals, the fake backend and real images are in test_watch.py.
"""

import errno
import io
import json
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from wbc_batch.config import RunConfig
from wbc_batch.ledger import DONE, DUPLICATE, ERROR, PENDING, Ledger
from wbc_batch.results import MAX_LISTED_ERRORS, CellResult, ImageResult
from wbc_batch import watch as watch_module
from wbc_batch.resume import open_ledger
from wbc_batch.watch import Watcher, WatchError, WatchOptions, watch

from conftest import fail_decoding, opened_only_by_read_bytes, refuse_reading, route_reads

FAST = WatchOptions(settle=0.15, poll=0.05, retry_base=0.05, retry_cap=0.2, max_attempts=3,
                    report_interval=0.0)


class StubRunner:
    """No models: an image's cell count is the red value of its first pixel (see `put`)."""

    def __init__(self, inbox):
        self.inbox = Path(inbox)
        self.calls = []
        self.reports = []

    def process_array(self, rgb, rel):
        self.calls.append(rel)
        n = int(rgb[0, 0, 0])
        if n == 255:
            raise RuntimeError("analysis blew up")
        cells = tuple(CellResult(i + 1, "neutrophil", 0.9, (0.9, 0.025, 0.025, 0.025, 0.025),
                                 i, i, 5, 5, 20, 10, False) for i in range(n))
        h, w = rgb.shape[:2]
        return ImageResult(image=rel, status="ok", width=w, height=h, cells=cells), None

    def save_outputs(self, rel, rgb, analysis):
        path = Path(self.inbox.parent / "out" / "overlays" / f"{rel}.png")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"overlay")
        return [path]

    def write_reports(self, results, **facts):
        self.reports.append(list(results))
        self.facts = facts
        return []


def png(n_cells: int, tag: int = 0) -> bytes:
    """A 32x32 PNG (the smallest analysed) whose first pixel says how many cells the stub finds;
    `tag` varies the bytes."""
    img = np.full((32, 32, 3), 200, np.uint8)
    img[0, 0] = (n_cells, tag, 0)  # RGB
    ok, buf = cv2.imencode(".png", img[:, :, ::-1])
    return buf.tobytes()


def put(path: Path, n_cells: int, tag: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png(n_cells, tag))
    return path


@pytest.fixture
def env(tmp_path):
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    config = RunConfig(input_dir=inbox, output_dir=out, quiet=True)
    runner = StubRunner(inbox)
    return inbox, out, config, runner


def run_once(config, runner, options=FAST):
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open_ledger(config, runner) as led:
        code = Watcher(config, runner, led, replace_opts(options, once=True)).run()
        return code, {r.image: r for r in led.results()}, led.counts()


def replace_opts(options, **kw):
    from dataclasses import replace
    return replace(options, **kw)


class Background:
    """A watcher running in a thread (signals are tested in the subprocess tests)."""

    def __init__(self, config, runner, options=FAST, **kw):
        Path(config.output_dir).mkdir(parents=True, exist_ok=True)
        self.ledger = open_ledger(config, runner)
        self.watcher = Watcher(config, runner, self.ledger, options, **kw)
        self.code = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        self.code = self.watcher.run()

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.watcher.stop()
        self.thread.join(10)
        assert not self.thread.is_alive()
        self.ledger.close()

    def until(self, predicate, timeout=10.0):
        end = time.time() + timeout
        while time.time() < end:
            if predicate():
                return
            time.sleep(0.02)
        raise AssertionError("condition not reached; counts " + repr(self.counts()))

    def counts(self):
        with Ledger(self.ledger.path) as led:  # a second connection: WAL lets it read freely
            return led.counts()

    def results(self):
        with Ledger(self.ledger.path) as led:
            return {r.image: r for r in led.results()}


def test_once_processes_backlog_and_reports(env):
    inbox, out, config, runner = env
    put(inbox / "a.png", 2)
    put(inbox / "s1" / "b.png", 3)
    (inbox / "notes.txt").write_text("not an image")
    code, results, counts = run_once(config, runner)
    assert code == 0
    assert sorted(runner.calls) == ["a.png", "s1/b.png"]
    assert {k: len(v.cells) for k, v in results.items()} == {"a.png": 2, "s1/b.png": 3}
    assert [r.image for r in runner.reports[-1]] == ["a.png", "s1/b.png"]
    assert (out / "overlays" / "s1" / "b.png.png").is_file()

    # a second pass does nothing new, but rebuilds the reports from the ledger
    runner.calls.clear()
    code, results2, _ = run_once(config, runner)
    assert runner.calls == [] and results2 == results


def test_same_bytes_again_is_not_reprocessed_changed_bytes_are(env):
    inbox, out, config, runner = env
    a = put(inbox / "a.png", 2)
    run_once(config, runner)
    put(a, 2)          # dropped again: identical bytes, new mtime
    runner.calls.clear()
    _, results, _ = run_once(config, runner)
    assert runner.calls == [] and len(results["a.png"].cells) == 2

    put(a, 4)          # changed under the same name: analysed again, replaces the old result
    _, results, counts = run_once(config, runner)
    assert runner.calls == ["a.png"] and len(results["a.png"].cells) == 4
    assert counts[DONE] == 1


def test_a_same_size_replacement_that_kept_the_old_mtime_is_seen(env):
    # `cp -p` or `rsync -t` of a rescan over the old file: same size, same mtime; only the
    # ctime, which no copying tool can set back, tells it changed
    inbox, out, config, runner = env
    a = put(inbox / "a.png", 2, tag=3)
    run_once(config, runner)
    st = a.stat()
    time.sleep(0.01)
    put(a, 4, tag=0)  # other bytes, the same size
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (a.stat().st_size, a.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    runner.calls.clear()
    _, results, counts = run_once(config, runner)
    assert runner.calls == ["a.png"] and len(results["a.png"].cells) == 4
    assert counts[DONE] == 1


def test_a_new_ctime_with_the_same_bytes_is_read_once_not_analysed(env):
    inbox, out, config, runner = env
    a = put(inbox / "a.png", 2)
    run_once(config, runner)
    ctime = a.stat().st_ctime_ns
    time.sleep(0.01)
    os.chmod(a, 0o600)  # a new ctime, nothing else
    assert a.stat().st_ctime_ns != ctime
    runner.calls.clear()
    with open_ledger(config, runner) as led:
        watcher = Watcher(config, runner, led, replace_opts(FAST, once=True))
        assert watcher.run() == 0
        assert runner.calls == [] and watcher.counters.unchanged == 1
        assert led.get("a.png").ctime_ns == a.stat().st_ctime_ns
        watcher = Watcher(config, runner, led, replace_opts(FAST, once=True))
        assert watcher.run() == 0 and watcher.counters.unchanged == 0  # settled: not read again


def test_a_done_file_that_changes_and_cannot_be_read_keeps_its_result(env, monkeypatch):
    # chmod 000 on an analysed scan changes its ctime: its result must not turn into an error

    inbox, out, config, runner = env
    a = put(inbox / "a.png", 2)
    run_once(config, runner)
    tries = refuse_reading(monkeypatch, "a.png")
    time.sleep(0.01)
    os.chmod(a, 0o600)
    runner.calls.clear()
    code, results, counts = run_once_in_time(config, runner)
    assert code == 0 and runner.calls == [] and len(tries) == FAST.max_attempts
    assert results["a.png"].ok and len(results["a.png"].cells) == 2 and counts[DONE] == 1
    tries.clear()
    run_once_in_time(config, runner)
    assert tries == []  # the new stat was taken as the same version: not read again

    tries.allow()
    time.sleep(0.01)
    put(a, 3)  # readable again, and changed: analysed
    _, results, _ = run_once(config, runner)
    assert runner.calls == ["a.png"] and len(results["a.png"].cells) == 3


def test_a_duplicate_that_changes_and_cannot_be_read_stays_a_duplicate(env, monkeypatch):

    inbox, out, config, runner = env
    put(inbox / "a.png", 2)
    b = put(inbox / "b.png", 2)  # the same bytes
    run_once(config, runner)
    refuse_reading(monkeypatch, "b.png")
    time.sleep(0.01)
    os.chmod(b, 0o600)
    code, results, counts = run_once_in_time(config, runner)
    assert code == 0 and counts[DUPLICATE] == 1 and "duplicate of a.png" in results["b.png"].error


def test_a_duplicate_of_another_samples_file_says_so_as_it_is_found(env):
    # a field filed under two patients: continuous watch has no closing line to say it in
    import io

    inbox, out, config, runner = env
    put(inbox / "p1" / "a.png", 2)
    put(inbox / "p2" / "a.png", 2)
    put(inbox / "p1" / "b.png", 2, tag=1)
    put(inbox / "p1" / "c.png", 2, tag=1)
    out.mkdir()
    stream = io.StringIO()
    with open_ledger(config, runner) as led:
        Watcher(config, runner, led, replace_opts(FAST, once=True), stream=stream,
                quiet=False).run()
    said = stream.getvalue()
    assert ("p2/a.png: duplicate of p1/a.png, not counted again (a file of another sample, so "
            "not counted in sample p2: check that each sample's folder holds its own images)"
            in said)
    assert "p1/c.png: duplicate of p1/b.png, not counted again\n" in said


def _two_fields_and_a_copy_elsewhere(env, sample: str, other: str) -> None:
    """`sample`/f1.png and f2.png analysed, then f2.png copied into `other` (a duplicate)."""
    inbox, out, config, runner = env
    put(inbox / sample / "f1.png", 1)
    put(inbox / sample / "f2.png", 2)
    run_once(config, runner)
    (inbox / other).mkdir()
    shutil.copy(inbox / sample / "f2.png", inbox / other / "f2.png")
    code, results, _ = run_once(config, runner)
    assert results[f"{other}/f2.png"].status == "duplicate"


def test_a_copy_left_when_its_original_is_deleted_is_counted_in_its_own_sample(env):
    # a misfiled field mended by a copy and a delete: the copy stayed a duplicate for good and
    # the field counted in the sample it had left, where `run` counts it in its new one
    inbox, out, config, runner = env
    _two_fields_and_a_copy_elsewhere(env, "A", "B")
    (inbox / "A" / "f2.png").unlink()
    runner.calls.clear()
    code, results, counts = run_once(config, runner)
    assert code == 0 and runner.calls == []  # its result moves with it, not analysed again
    assert "A/f2.png" not in results and results["B/f2.png"].ok
    assert len(results["B/f2.png"].cells) == 2 and counts[DUPLICATE] == 0
    assert (out / "overlays" / "B" / "f2.png.png").is_file()
    assert not (out / "overlays" / "A" / "f2.png.png").exists()
    # an analysed file archived without a copy keeps its row, as before
    (inbox / "A" / "f1.png").unlink()
    code, results, _ = run_once(config, runner)
    assert results["A/f1.png"].ok


def test_a_renamed_sample_keeps_its_counts_when_another_sample_holds_copies(env):
    # the gone originals' rows were handed to the copies in the other sample at once, before
    # the renamed files settled: the renamed sample's fields then counted as duplicates there
    inbox, out, config, runner = env
    _two_fields_and_a_copy_elsewhere(env, "D", "G")
    os.rename(inbox / "D", inbox / "D_renamed")
    runner.calls.clear()
    code, results, counts = run_once(config, runner)
    assert code == 0 and runner.calls == []  # renamed: results kept, nothing analysed again
    assert results["D_renamed/f2.png"].ok and len(results["D_renamed/f2.png"].cells) == 2
    assert results["D_renamed/f1.png"].ok and results["G/f2.png"].status == "duplicate"
    assert "D/f2.png" not in results and counts[DUPLICATE] == 1
    # moved by a plain copy (new mtimes) and a delete: the same
    shutil.copytree(inbox / "D_renamed", inbox / "D2", copy_function=shutil.copy)
    shutil.rmtree(inbox / "D_renamed")
    code, results, counts = run_once(config, runner)
    assert code == 0 and runner.calls == []
    assert results["D2/f2.png"].ok and results["G/f2.png"].status == "duplicate"
    assert "D_renamed/f2.png" not in results and counts[DUPLICATE] == 1


def test_an_archived_file_whose_copy_was_rewritten_keeps_its_result(env):
    # the copy's new content is analysed as such: it took the archived file's row, and its
    # analysis then replaced that file's cells
    inbox, out, config, runner = env
    put(inbox / "A" / "f.png", 2)
    put(inbox / "B" / "f.png", 2)
    run_once(config, runner)
    (inbox / "A" / "f.png").unlink()
    time.sleep(0.01)
    put(inbox / "B" / "f.png", 3)
    code, results, counts = run_once(config, runner)
    assert len(results["A/f.png"].cells) == 2 and len(results["B/f.png"].cells) == 3
    assert counts[DONE] == 2


def test_a_file_changed_during_its_analysis_leaves_no_drawing_when_the_session_ends(env):
    # --once ends before the new version settles: the overlay showed the old one's cells
    inbox, out, config, runner = env
    a = put(inbox / "a.png", 2)
    real = runner.process_array

    def rewritten_meanwhile(rgb, rel):
        put(a, 3)  # the scanner writes again while this version is analysed
        return real(rgb, rel)

    runner.process_array = rewritten_meanwhile
    code, results, counts = run_once(config, runner,
                                     replace_opts(FAST, settle=0.05, max_attempts=1))
    assert counts[PENDING] == 1 and "a.png" not in results
    assert not (out / "overlays" / "a.png.png").exists()


def test_once_whose_inbox_goes_away_says_so_and_exits_1(env):
    # it had said "Done" and exited 0, its files gone from the queue with the share
    import io

    inbox, out, config, runner = env
    for i in range(3):
        put(inbox / f"{i}.png", 1, tag=i)
    real = runner.process_array

    def share_drops(rgb, rel):
        if rel == "0.png":
            inbox.rename(inbox.with_name("away"))
        return real(rgb, rel)

    runner.process_array = share_drops
    out.mkdir()
    stream = io.StringIO()
    with open_ledger(config, runner) as led:
        code = Watcher(config, runner, led, replace_opts(FAST, once=True), stream=stream,
                       quiet=True).run()
    assert code == 1
    assert (f"Stopped: the inbox {inbox} cannot be reached, so the backlog was not seen to its "
            "end") in stream.getvalue()


def test_a_scan_warning_is_given_once_not_at_every_scan(env):
    import io

    inbox, out, config, runner = env
    put(inbox / "a" / "x.png", 1)
    (inbox / "b").symlink_to(inbox / "a", target_is_directory=True)
    out.mkdir()
    stream = io.StringIO()
    with open_ledger(config, runner) as led:
        watcher = Watcher(config, runner, led, FAST, stream=stream, quiet=False)
        for _ in range(3):
            watcher._scan(time.time())
    assert stream.getvalue().count("already searched") == 1


def test_copy_under_another_name_is_listed_once_not_counted(env):
    inbox, out, config, runner = env
    put(inbox / "s1" / "a.png", 3)
    run_once(config, runner)
    (inbox / "s2").mkdir()
    (inbox / "s2" / "a copy.png").write_bytes((inbox / "s1" / "a.png").read_bytes())
    runner.calls.clear()
    _, results, counts = run_once(config, runner)
    assert runner.calls == []
    dup = results["s2/a copy.png"]
    assert dup.status == "duplicate" and "duplicate of s1/a.png" in dup.error and dup.cells == ()
    assert counts[DUPLICATE] == 1
    assert sum(len(r.cells) for r in results.values()) == 3
    # named as `run` names it: the copy is counted in the other sample
    assert runner.facts["duplicates_across_samples"] == [{"image": "s2/a copy.png",
                                                          "copy_of": "s1/a.png"}]

    # the original changes: the copy is now the only holder of that content and is analysed
    put(inbox / "s1" / "a.png", 1)
    _, results, counts = run_once(config, runner)
    assert sorted(runner.calls) == ["s1/a.png", "s2/a copy.png"]
    assert len(results["s2/a copy.png"].cells) == 3 and len(results["s1/a.png"].cells) == 1
    assert counts[DUPLICATE] == 0


def test_two_copies_arriving_together_count_once(env):
    inbox, out, config, runner = env
    put(inbox / "x1.png", 2, tag=7)
    put(inbox / "x2.png", 2, tag=7)
    _, results, counts = run_once(config, runner)
    assert runner.calls == ["x1.png"]
    assert results["x1.png"].ok and "duplicate of x1.png" in results["x2.png"].error


def test_rename_keeps_result_and_overlay_without_reanalysis(env):
    inbox, out, config, runner = env
    put(inbox / "s1" / "a.png", 2)
    run_once(config, runner)
    assert (out / "overlays" / "s1" / "a.png.png").is_file()
    (inbox / "s2").mkdir()
    os.rename(inbox / "s1" / "a.png", inbox / "s2" / "renamed.png")
    runner.calls.clear()
    _, results, _ = run_once(config, runner)
    assert runner.calls == []
    assert list(results) == ["s2/renamed.png"] and len(results["s2/renamed.png"].cells) == 2
    assert (out / "overlays" / "s2" / "renamed.png.png").read_bytes() == b"overlay"
    assert not (out / "overlays" / "s1" / "a.png.png").exists()


def test_two_files_that_swap_names_keep_both_results(env):
    # a.png and b.png swapped: a.png, holding b's content, was called a duplicate of b.png (which
    # no longer held it), and b.png, analysed again, left b's content counted nowhere
    inbox, out, config, runner = env
    put(inbox / "a.png", 2)
    put(inbox / "b.png", 3)
    run_once(config, runner)
    os.rename(inbox / "a.png", inbox / "t.png")
    os.rename(inbox / "b.png", inbox / "a.png")
    os.rename(inbox / "t.png", inbox / "b.png")
    runner.calls.clear()
    _, results, counts = run_once(config, runner)
    assert {rel: len(r.cells) for rel, r in results.items()} == {"a.png": 3, "b.png": 2}
    assert all(r.ok for r in results.values()) and counts[DUPLICATE] == 0
    assert len(runner.calls) <= 1  # the first seen takes the other's result; at most one again
    assert sorted(p.name for p in (out / "overlays").iterdir()) == ["a.png.png", "b.png.png"]


def test_a_copy_of_a_touched_file_is_its_duplicate(env):
    # the owner's stat changed (touched) but not its bytes: its hash says it still holds them
    inbox, out, config, runner = env
    put(inbox / "b.png", 2)
    run_once(config, runner)
    time.sleep(0.01)
    os.utime(inbox / "b.png")
    shutil.copy(inbox / "b.png", inbox / "a.png")  # sorts first: settled before its owner
    runner.calls.clear()
    _, results, counts = run_once(config, runner)
    assert runner.calls == [] and "duplicate of b.png" in results["a.png"].error
    assert results["b.png"].ok and counts[DUPLICATE] == 1


@pytest.mark.parametrize("becomes", ["file", "link loop"])
def test_a_copy_whose_owners_folder_became_a_file_takes_its_result(env, becomes):
    # the owner's path leads nowhere (a file where its folder was, a link to itself): it is
    # gone, as if deleted
    inbox, out, config, runner = env
    data = put(inbox / "s1" / "a.png", 2).read_bytes()
    run_once(config, runner)
    shutil.rmtree(inbox / "s1")
    if becomes == "file":
        (inbox / "s1").write_bytes(b"not a folder")
    else:
        os.symlink("s1", inbox / "s1")
    (inbox / "b.png").write_bytes(data)
    runner.calls.clear()
    _, results, counts = run_once(config, runner)
    assert runner.calls == [] and list(results) == ["b.png"] and results["b.png"].ok
    assert counts[DUPLICATE] == 0


def test_a_rename_cut_short_after_its_files_moved_keeps_the_overlay(env):
    # a kill after the overlay moved to the new name but before the ledger said so: the move,
    # repeated at the restart, found no source and removed the overlay it had moved
    inbox, out, config, runner = env
    put(inbox / "x.png", 2)
    run_once(config, runner)
    os.rename(inbox / "x.png", inbox / "y.png")
    os.rename(out / "overlays" / "x.png.png", out / "overlays" / "y.png.png")  # then the kill
    runner.calls.clear()
    _, results, _ = run_once(config, runner)
    assert runner.calls == [] and list(results) == ["y.png"]
    assert (out / "overlays" / "y.png.png").read_bytes() == b"overlay"


def test_a_change_cut_short_before_the_old_overlay_went_leaves_no_ok_row_without_one(env,
                                                                                      monkeypatch):
    # the old overlay was removed before the ledger took the new content: a kill in between,
    # then the file deleted, left an ok row (the old content's) with no overlay, for good
    inbox, out, config, runner = env
    put(inbox / "x.png", 2)
    run_once(config, runner)
    put(inbox / "x.png", 3)

    class Killed(BaseException):
        pass

    def killed(self, rel):
        raise Killed

    monkeypatch.setattr(Watcher, "_drop_artifacts", killed)
    with pytest.raises(Killed):
        run_once(config, runner)
    monkeypatch.undo()
    (inbox / "x.png").unlink()
    _, results, _ = run_once(config, runner)
    assert list(results) == [] and not (out / "overlays" / "x.png.png").exists()


def test_a_rename_onto_a_name_with_an_overlay_of_other_cells_removes_it(env):
    # a.png analysed without overlays, b.png with; a.png then renamed over b.png: the overlay
    # of b.png showed the old b's cells beside a row holding a.png's
    inbox, out, config, runner = env
    put(inbox / "b.png", 5)
    run_once(config, runner)
    assert (out / "overlays" / "b.png.png").is_file()
    put(inbox / "a.png", 2)
    runner.save_outputs = lambda rel, rgb, analysis: []  # --no-overlays
    run_once(config, runner)
    os.replace(inbox / "a.png", inbox / "b.png")
    _, results, _ = run_once(config, runner)
    assert list(results) == ["b.png"] and len(results["b.png"].cells) == 2
    assert not (out / "overlays" / "b.png.png").exists()


def test_deleted_done_files_stay_reported_failed_ones_go(env):
    inbox, out, config, runner = env
    put(inbox / "a.png", 2)
    (inbox / "bad.png").write_bytes(b"garbage")
    code, results, counts = run_once(config, runner)
    assert code == 1  # --once: some file is an error, as with `run`
    assert results["bad.png"].status == "error" and counts[ERROR] == 1
    with Ledger.in_dir(out) as led:
        assert led.get("bad.png").attempts == FAST.max_attempts  # retried, then given up
    (inbox / "a.png").unlink()
    (inbox / "bad.png").unlink()
    code, results, counts = run_once(config, runner)
    assert code == 0
    assert list(results) == ["a.png"] and counts[ERROR] == 0


def test_analysis_failure_is_final_at_once(env):
    inbox, out, config, runner = env
    put(inbox / "boom.png", 255)  # decodes, but the stub's analysis raises
    code, results, counts = run_once(config, runner)
    assert code == 1 and runner.calls == ["boom.png"]
    assert "analysis failed: RuntimeError: analysis blew up" in results["boom.png"].error
    assert results["boom.png"].width == 32


def test_a_backend_calling_sys_exit_fails_the_image_not_the_watcher(env):
    # before: SystemExit went past `except Exception` and ended the watcher
    inbox, out, config, runner = env

    class Quitter(StubRunner):
        def process_array(self, rgb, rel):
            if rel == "quit.png":
                sys.exit(7)
            return super().process_array(rgb, rel)

    runner = Quitter(inbox)
    put(inbox / "a.png", 2)
    put(inbox / "quit.png", 1)
    code, results, counts = run_once(config, runner)
    assert code == 1 and results["a.png"].status == "ok"
    assert results["quit.png"].error == "analysis failed: SystemExit: 7"


def test_a_label_mask_or_a_thumbnail_fails_once_not_retried(env):
    inbox, out, config, runner = env
    mask = np.zeros((40, 40), np.uint8)
    mask[10:30, 10:30] = 255
    cv2.imwrite(str(inbox / "mask.png"), mask)
    cv2.imwrite(str(inbox / "thumb.png"), np.full((8, 8, 3), 200, np.uint8))
    code, results, counts = run_once(config, runner)
    assert code == 1 and runner.calls == []
    assert "label mask" in results["mask.png"].error
    assert "too small to hold a WBC" in results["thumb.png"].error
    with Ledger.in_dir(out) as led:  # a truncated file would be retried
        assert led.get("mask.png").attempts == 1 and led.get("thumb.png").attempts == 1


def test_failed_file_is_retried_when_it_changes(env):
    inbox, out, config, runner = env
    late = inbox / "late.png"
    late.write_bytes(png(3)[:-20])  # truncated
    run_once(config, runner)
    with Ledger.in_dir(out) as led:
        assert led.get("late.png").status == ERROR
        assert "truncated" in led.get("late.png").error
    put(late, 3)
    _, results, counts = run_once(config, runner)
    assert runner.calls == ["late.png"] and results["late.png"].ok and counts[ERROR] == 0


def test_slow_writer_is_waited_for_not_failed(env):
    """A file written in chunks, slower than the settle interval, is retried and then counted."""
    inbox, out, config, runner = env
    put(inbox / "first.png", 1)
    with Background(config, runner) as bg:
        bg.until(lambda: bg.counts()[DONE] == 1)
        path = inbox / "s9" / "slow.png"
        path.parent.mkdir()
        data = png(7, tag=1)
        with open(path, "wb") as f:
            for k in range(0, len(data), len(data) // 4 + 1):
                f.write(data[k:k + len(data) // 4 + 1])
                f.flush()
                time.sleep(0.3)  # longer than the settle interval: it is tried half-written
        bg.until(lambda: bg.counts()[DONE] == 2)
        res = bg.results()
        assert res["s9/slow.png"].ok and len(res["s9/slow.png"].cells) == 7
        assert bg.counts()[ERROR] == 0
        assert {r.image for r in runner.reports[-1]} == {"first.png", "s9/slow.png"}
    assert bg.watcher.counters.retried >= 1  # it was tried while half-written
    assert bg.code == 0


def test_watchdog_events_pick_up_new_files(env):
    inbox, out, config, runner = env
    options = replace_opts(FAST, poll=None)  # filesystem events; the safety rescan is 30 s away
    with Background(config, runner, options) as bg:
        time.sleep(0.3)
        put(inbox / "new" / "a.png", 2)
        bg.until(lambda: bg.counts()[DONE] == 1, timeout=5)
    assert bg.watcher._observer is None  # stopped


def test_the_heaps_free_memory_goes_back_each_time_the_queue_empties_after_analyses(env,
                                                                                 monkeypatch):
    inbox, out, config, runner = env
    trims = []
    monkeypatch.setattr(watch_module.heap, "release_free_memory", lambda: trims.append(
        len(runner.calls)))
    put(inbox / "a.png", 2)
    put(inbox / "b.png", 3)
    with Background(config, runner) as bg:
        bg.until(lambda: trims == [2])  # once the queue is empty, not after each image
        time.sleep(0.5)  # idle: polls without analyses give nothing back again
        assert trims == [2]
        put(inbox / "c.png", 1)
        bg.until(lambda: trims == [2, 3])


class SlowRunner(StubRunner):
    """A StubRunner whose analysis takes longer than the least gap between two scans."""

    def process_array(self, rgb, rel):
        time.sleep(0.6)
        return super().process_array(rgb, rel)


def test_reports_are_rebuilt_during_a_backlog_while_scans_are_due_after_every_image(env):
    # a scan due after each image broke out before the rebuild: a backlog's reports were
    # written only once it was done, old and marked complete until then
    inbox, out, config, _ = env
    runner = SlowRunner(inbox)
    for k in range(3):
        put(inbox / "s" / f"{k}.png", 1, tag=k)
    with Background(config, runner, FAST) as bg:
        bg.until(lambda: bg.counts()[DONE] == 3, timeout=20)
    done = [sum(r.status == "ok" for r in report) for report in runner.reports]
    assert {1, 2} <= set(done), done


def test_the_watchers_own_reading_of_images_asks_for_no_scan(env, monkeypatch):
    # inotify's open and close-without-write of each image read were taken for changes
    inbox, out, config, runner = env
    for k in range(2):
        put(inbox / "s" / f"{k}.png", 1, tag=k)
    asked = []
    monkeypatch.setattr(Watcher, "request_scan", lambda self: asked.append(time.time()))
    with Background(config, runner, replace_opts(FAST, poll=None)) as bg:
        bg.until(lambda: bg.counts()[DONE] == 2, timeout=10)
        time.sleep(0.3)  # events arrive from the observer's thread
    assert asked == []
    assert watch_module.READ_EVENTS == {"opened", "closed_no_write"}


def test_second_watcher_on_same_out_is_refused(env):
    inbox, out, config, runner = env
    from wbc_batch.watch import _lock
    held = _lock(out)
    try:
        with pytest.raises(WatchError, match="another wbc-batch run, watch or training is writing to"):
            watch(config, replace_opts(FAST, once=True), runner=runner)
    finally:
        held.close()


@pytest.mark.parametrize("taken", [True, False, "read-only"],
                         ids=["taken by another", "left free", "read-only"])
def test_a_lock_file_deleted_under_a_watcher_is_taken_again_or_nothing_more_is_written(
        env, taken, monkeypatch):
    # OUT's lock file deleted while a watcher runs (OUT removed by a cleanup script): a second
    # run or watcher could then lock a new one and write the same OUT
    from wbc_batch.output_folder import OUTPUT_LOCK, lock_output
    from wbc_batch.watch import _lock

    inbox, out, config, runner = env
    put(inbox / "a.png", 1)
    lock = _lock(out)
    stream = io.StringIO()
    other = None
    try:
        with open_ledger(config, runner) as led:
            w = Watcher(config, runner, led, replace_opts(FAST, once=True), stream=stream,
                        quiet=False, lock=lock)
            (out / OUTPUT_LOCK).unlink()
            if taken == "read-only":  # not another process: said as what it is
                import wbc_batch.output_folder as output_folder
                from wbc_batch.errors import PipelineError

                def refused(folder):
                    raise PipelineError(f"cannot open the lock file {folder}/x: Read-only file system")
                monkeypatch.setattr(output_folder, "lock_output", refused)
            elif taken:
                other = lock_output(out)
            w._last_out_check = 0.0  # checked at once
            code = w.run()
        text = " ".join(stream.getvalue().split())
        if taken == "read-only":
            assert code == 1, text
            assert (f"and OUT cannot be locked again (cannot open the lock file {out}/x: "
                    "Read-only file system); the ledger there holds this watcher's results (0 "
                    "processed). Start the watcher again once that is mended") in text
        elif taken:  # the ledger is the same file: the other may be using it, and keeps it
            assert code == 1, text
            assert (f"Stopped: its lock file {out / OUTPUT_LOCK} was deleted or replaced while "
                    f"the watcher ran, and another run or watcher has locked {out} since; the "
                    "ledger there, which it may be using, holds this watcher's results (0 "
                    "processed). Start the watcher again once the other is done") in text
            assert "--overwrite" not in text and w._lock is lock
        else:  # a cleanup of old files: the lock is taken again and the watcher goes on
            assert code == 0, text
            assert (f"{out / OUTPUT_LOCK} was deleted or replaced while the watcher ran (a "
                    "cleanup of old files?); it took OUT's lock again and goes on") in text
            assert f"{out} holds 1 processed, 0 errors." in text  # the backlog, done
            assert w._lock is not lock and not w._lock.closed  # OUT's new lock file, held
            with pytest.raises(Exception, match="another wbc-batch run, watch or training"):
                lock_output(out)
            w._lock.close()
    finally:
        lock.close()
        if other is not None:
            other.close()


def test_once_stopped_by_its_ledger_deleted_still_names_the_files_that_failed(env):
    # --once's closing lines list the session's failed files for a cron job's mail; a stop
    # because OUT's ledger went had left them out
    from wbc_batch.hookspecs import hookimpl
    from wbc_batch.plugins import get_plugin_manager

    inbox, out, config, runner = env
    put(inbox / "a_boom.png", 255)  # decodes, but the stub's analysis raises
    put(inbox / "b.png", 1)

    class DeleteTheLedger:
        @hookimpl
        def wbc_image_done(self, result, index, total):
            if result.image == "a_boom.png":
                (out / "ledger.sqlite").unlink()

    pm = get_plugin_manager(autoload=False)
    pm.register(DeleteTheLedger())
    out.mkdir(parents=True, exist_ok=True)
    stream = io.StringIO()
    with open_ledger(config, runner) as led:
        code = Watcher(config, runner, led, replace_opts(FAST, once=True), pm=pm, stream=stream,
                       quiet=False).run()
    text = stream.getvalue()
    assert code == 1 and "the ledger was written back" in text, text
    assert "  failed: a_boom.png: analysis failed: RuntimeError: analysis blew up" in text
    with Ledger(out / "ledger.sqlite") as led:  # written back, the failure with it
        assert led.counts()[ERROR] == 1


def test_a_refused_model_leaves_no_output_folder_behind(env, tmp_path):
    # before: exit 2, and a new OUT holding only the lock file (run makes nothing then)
    from wbc_batch.pipeline import PipelineError

    inbox, out, config, runner = env
    nested = tmp_path / "new" / "out"
    for where in (out, nested):
        bad = replace_opts(config, output_dir=where, model_dir=tmp_path / "no-such-bundle")
        with pytest.raises(PipelineError):
            watch(bad, replace_opts(FAST, once=True))
        assert not where.exists()
    assert not (tmp_path / "new").exists()  # made for OUT too
    dotted = tmp_path / "gone" / ".." / "dotted"  # `-o gone/../dotted`: mkdir makes gone/ too
    with pytest.raises(PipelineError):
        watch(replace_opts(config, output_dir=dotted, model_dir=tmp_path / "no-such-bundle"),
              replace_opts(FAST, once=True))
    assert not (tmp_path / "dotted").exists() and not (tmp_path / "gone").exists()
    out.mkdir()
    (out / "lab-notes.txt").write_text("ours")
    with pytest.raises(PipelineError):  # a folder that was there stays, as it was
        watch(replace_opts(config, model_dir=tmp_path / "no-such-bundle"), replace_opts(FAST, once=True))
    assert sorted(p.name for p in out.iterdir()) == [".wbc-batch.lock", "lab-notes.txt"]


def test_ledger_of_another_inbox_is_refused(env, tmp_path):
    inbox, out, config, runner = env
    run_once(config, runner)
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(WatchError, match="another inbox"):
        open_ledger(RunConfig(input_dir=other, output_dir=out), runner)
    open_ledger(RunConfig(input_dir=other, output_dir=out, overwrite=True), runner).close()


def run_once_in_time(config, runner, options=FAST, seconds=20.0):
    """run_once in a thread: a watcher stuck in a loop fails the test instead of hanging it."""
    box = {}
    thread = threading.Thread(target=lambda: box.update(r=run_once(config, runner, options)),
                              daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "--once did not finish"
    return box["r"]


def test_a_schema_1_ledger_of_another_inbox_is_refused_and_left_as_it_was(env):
    import sqlite3

    from test_ledger import SCHEMA_1  # inbox /scans

    inbox, out, config, runner = env
    out.mkdir()
    db = sqlite3.connect(out / "ledger.sqlite")
    db.executescript(SCHEMA_1)
    db.close()
    with pytest.raises(WatchError, match="ledger of another inbox"):
        open_ledger(config, runner)
    db = sqlite3.connect(out / "ledger.sqlite")
    assert db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone() == ("1",)
    db.close()


def test_a_file_listed_but_not_readable_is_retried_with_backoff_then_an_error(env, monkeypatch):
    # mode 000, or a scanner holding it open on a share: before, --once spun at full CPU forever

    inbox, out, config, runner = env
    put(inbox / "a.png", 2)
    put(inbox / "locked.png", 1)
    tries = refuse_reading(monkeypatch, "locked.png")
    code, results, counts = run_once_in_time(config, runner)
    assert code == 1 and runner.calls == ["a.png"]
    assert results["locked.png"].error == "cannot read file: Permission denied"
    assert len(tries) == FAST.max_attempts  # one try per attempt, none in between
    with Ledger.in_dir(out) as led:
        assert led.get("locked.png").status == ERROR


def test_a_file_too_large_to_hold_is_an_unreadable_file_not_the_end_of_the_watcher(env,
                                                                                  monkeypatch):
    # read whole to be hashed and decoded at once: a MemoryError must not leave the loop, and
    # is worded as `run` words it
    inbox, out, config, runner = env
    put(inbox / "a.png", 2)
    put(inbox / "huge.png", 1)
    refuse_reading(monkeypatch, "huge.png", MemoryError())
    code, results, counts = run_once_in_time(config, runner)
    assert code == 1 and runner.calls == ["a.png"]
    assert results["huge.png"].error == "out of memory while reading the image"
    with Ledger.in_dir(out) as led:
        assert led.get("huge.png").attempts == FAST.max_attempts


def test_an_analysed_file_replaced_by_one_too_large_to_read_loses_its_result(env, monkeypatch):
    # hashed in chunks, it is seen to have changed: its earlier cells must not stand for it
    inbox, out, config, runner = env
    a = put(inbox / "a.png", 2)
    run_once(config, runner)
    time.sleep(0.01)
    put(a, 3)
    refuse_reading(monkeypatch, "a.png", MemoryError())
    code, results, counts = run_once_in_time(config, runner)
    assert code == 1 and results["a.png"].status == "error"
    assert results["a.png"].error == "out of memory while reading the image"


def test_a_read_failure_nobody_foresaw_is_worded_as_in_run(env, monkeypatch):
    import wbc_batch.watch as watch_module

    inbox, out, config, runner = env
    a = put(inbox / "a.png", 2)
    put(inbox / "b.png", 1)
    fail_decoding(monkeypatch, watch_module, a, RuntimeError("decoder bug\nsecond line"))
    code, results, _ = run_once_in_time(config, runner)
    assert code == 1 and runner.calls == ["b.png"]
    # the same words as `run` (test_bad_input), retried first as a share hiccup may be
    assert results["a.png"].error == "cannot read the image: RuntimeError: decoder bug"
    with Ledger.in_dir(out) as led:
        assert led.get("a.png").attempts == FAST.max_attempts


def test_a_name_that_is_not_utf8_gets_an_error_row_and_the_others_go_on(env):
    inbox, out, config, runner = env
    put(inbox / "a.png", 2)
    put(Path(os.fsdecode(os.fsencode(inbox) + b"/caf\xe9.png")), 1)
    code, results, counts = run_once_in_time(config, runner)
    assert code == 1 and runner.calls == ["a.png"]
    assert "not valid UTF-8" in results["caf\\xe9.png"].error
    code, results, counts = run_once_in_time(config, runner)  # a restart: the same one row
    assert code == 1 and sorted(results) == ["a.png", "caf\\xe9.png"] and counts[ERROR] == 1


def test_reports_that_cannot_be_written_stop_nothing_and_are_written_later(env):
    inbox, out, config, runner = env
    put(inbox / "a.png", 2)
    real, failures = runner.write_reports, []

    def write_reports(results, **facts):
        if not failures:
            failures.append(1)
            raise OSError(28, "No space left on device")
        return real(results, **facts)

    runner.write_reports = write_reports
    with Background(config, runner) as bg:
        bg.until(lambda: bg.counts()[DONE] == 1)
        put(inbox / "b.png", 1)
        bg.until(lambda: bg.counts()[DONE] == 2)
    assert failures and [r.image for r in runner.reports[-1]] == ["a.png", "b.png"]


def test_a_file_moved_onto_one_with_a_copy_leaves_that_copy_counted(env):
    inbox, out, config, runner = env
    put(inbox / "b.png", 3)
    put(inbox / "c.png", 3)  # the same bytes as b.png: a duplicate
    put(inbox / "a.png", 5)
    run_once(config, runner)
    os.replace(inbox / "a.png", inbox / "b.png")
    code, results, counts = run_once(config, runner)
    assert code == 0 and counts[DUPLICATE] == 0
    assert {k: len(v.cells) for k, v in results.items()} == {"b.png": 5, "c.png": 3}


def test_each_file_is_read_and_decoded_once_the_next_while_this_one_is_analysed(env,
                                                                                 monkeypatch):
    # hashed and decoded from one read: a share was read twice per image
    import wbc_batch.watch as watch_module

    inbox, out, config, runner = env
    names = {put(inbox / f"{i}.png", 1, tag=i).read_bytes(): f"{i}.png" for i in range(5)}
    real_decode, decoded, reads = watch_module.decode_smear, [], []

    def decode_smear(data, *args, **kwargs):
        decoded.append((names[data], threading.current_thread().name))
        return real_decode(data, *args, **kwargs)

    def read_file(path):
        if Path(path).parent == inbox:
            reads.append(Path(path).name)
        return real_read(path)

    monkeypatch.setattr(watch_module, "decode_smear", decode_smear)
    real_read = route_reads(monkeypatch, read_file)
    opened_only_by_read_bytes(monkeypatch, inbox)  # no other way in
    code, results, _ = run_once(config, runner)
    assert code == 0 and len(results) == 5
    assert sorted(reads) == sorted(name for name, _ in decoded) == [f"{i}.png" for i in range(5)]
    # all but the first, read ahead
    assert sum(thread.startswith("wbc-watch-read") for _, thread in decoded) == 4


def test_the_progress_bar_is_blocked_while_watching_and_given_back_after(env):
    # the status line replaces the bar; the caller's plugin manager had stayed without it
    from wbc_batch.plugins import get_plugin_manager

    inbox, out, config, runner = env
    put(inbox / "a.png", 1)
    pm = get_plugin_manager(autoload=False)
    seen = []
    real = runner.process_array

    def analysing(rgb, rel):
        seen.append(pm.has_plugin("progress"))
        return real(rgb, rel)

    runner.process_array = analysing
    assert watch(config, replace_opts(FAST, once=True), runner=runner, pm=pm) == 0
    assert seen == [False] and pm.has_plugin("progress")


def test_a_start_removes_temporary_files_a_kill_left(env):
    inbox, out, config, runner = env
    put(inbox / "a.png", 1)
    assert watch(config, replace_opts(FAST, once=True), runner=runner) == 0
    leftovers = [out / ".cells.csv.k3j9ab12.tmp.csv", out / "overlays" / "s" / ".a.png.png.x1y2z3w4.tmp.png"]
    for path in leftovers:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half")
    keep = out / ".notes"
    keep.write_text("a user's hidden file")
    assert watch(config, replace_opts(FAST, once=True), runner=runner) == 0
    assert not any(p.exists() for p in leftovers) and keep.exists()


def test_a_broken_link_gets_an_error_row_and_is_analysed_once_its_target_is_back(env, tmp_path):
    inbox, out, config, runner = env
    put(inbox / "a.png", 2)
    share = tmp_path / "share"
    (inbox / "b.png").symlink_to(share / "b.png")  # the share is not mounted
    code, results, counts = run_once(config, runner)
    assert code == 1 and runner.calls == ["a.png"]
    assert results["b.png"].error == f"broken link: its target {share / 'b.png'} is missing"
    put(share / "b.png", 3)
    code, results, counts = run_once(config, runner)
    assert code == 0 and runner.calls == ["a.png", "b.png"] and len(results["b.png"].cells) == 3


def test_a_link_loop_is_named_as_run_names_it(env):
    # before: "broken link: its target loop_b.png is missing", though loop_b.png is there
    inbox, out, config, runner = env
    put(inbox / "a.png", 2)
    (inbox / "loop_a.png").symlink_to("loop_b.png")
    (inbox / "loop_b.png").symlink_to("loop_a.png")
    code, results, counts = run_once(config, runner)
    assert code == 1 and runner.calls == ["a.png"]
    for name in ("loop_a.png", "loop_b.png"):
        assert results[name].error == "a link loop: the link leads back to itself, never to a file"
    # a target through a file: an error row, as the scan gave before (a review found it skipped)
    (inbox / "notes.txt").write_text("x")
    (inbox / "through_file.png").symlink_to("notes.txt/x.png")
    code, results, counts = run_once(config, runner)
    assert code == 1 and results["through_file.png"].error == (
        "a link that cannot be followed to its target notes.txt/x.png: Not a directory")


def test_each_image_has_its_own_index_in_the_hooks(env):
    # the next image is analysed while the previous one's overlay is written: both had index 0
    from wbc_batch.hookspecs import hookimpl
    from wbc_batch.plugins import get_plugin_manager

    inbox, out, config, runner = env
    for name in ("a.png", "b.png", "c.png"):
        put(inbox / name, 1, tag=ord(name[0]))
    calls = []

    class Recorder:
        @hookimpl
        def wbc_image_start(self, image, index, total):
            calls.append(("start", image, index))

        @hookimpl
        def wbc_image_done(self, result, index, total):
            calls.append(("done", result.image, index))

    pm = get_plugin_manager(autoload=False)
    pm.register(Recorder())
    out.mkdir()
    with open_ledger(config, runner) as led:
        assert Watcher(config, runner, led, replace_opts(FAST, once=True), pm=pm).run() == 0
    starts = {image: index for kind, image, index in calls if kind == "start"}
    dones = {image: index for kind, image, index in calls if kind == "done"}
    assert starts == dones == {"a.png": 0, "b.png": 1, "c.png": 2}


def test_a_plugin_that_failed_in_a_hook_is_called_again_later_in_a_session(env, monkeypatch):
    # before: left out of the hooks for the rest of the session, which may last days
    from wbc_batch.hookspecs import hookimpl
    from wbc_batch.plugins import get_plugin_manager

    inbox, out, config, runner = env
    for name in ("a.png", "b.png", "c.png"):
        put(inbox / name, 1, tag=ord(name[0]))
    monkeypatch.setattr(watch_module, "PLUGIN_RETRY_S", 0.0)  # every call is "later" here
    seen = []

    class Flaky:
        @hookimpl
        def wbc_image_done(self, result, index, total):
            seen.append(result.image)
            if result.image == "a.png":
                raise OSError("share not mounted")

    pm = get_plugin_manager(autoload=False)
    pm.register(Flaky())
    out.mkdir()
    with open_ledger(config, runner) as led:
        assert Watcher(config, runner, led, replace_opts(FAST, once=True), pm=pm).run() == 0
    assert seen == ["a.png", "b.png", "c.png"]


def test_an_upgrade_that_only_rewrites_the_onnx_record_lets_a_watch_folder_resume(env, monkeypatch):
    # the first fingerprint hashed every bundle file, bundle.json included: adding the exports'
    # hashes to the shipped bundle.json made every existing watch folder refuse to resume.
    # Such ledgers are of analysis revision 1: resumed by a version that analyses as they did
    import hashlib
    import json
    from dataclasses import asdict
    from types import SimpleNamespace

    from wbc_batch import analysis

    monkeypatch.setattr(analysis, "REVISION", 1)
    inbox, out, config, runner = env
    weights = {"segmenter": {"file": "segmenter.safetensors", "sha256": "s1"},
               "classifier": {"file": "classifier.safetensors", "sha256": "c1"}}
    then = {"classifier": {"temperature": 0.67}, "segmenter": {"diameter": 112},
            "onnx_exported_from": {"classifier": "c1", "segmenter": "s1"}}
    now = json.loads(json.dumps(then))
    now["onnx_exported_from"].update(classifier_onnx="o1", segmenter_onnx="o2")
    runner.bundle = SimpleNamespace(meta=now)
    runner.model_hashes = lambda: {**weights, "meta": {"file": "bundle.json", "sha256": "new"}}

    def old_fingerprint(meta):
        text = json.dumps(meta, indent=2, sort_keys=True) + "\n"  # as write_meta writes it
        models = {**weights, "meta": {"file": "bundle.json",
                                      "sha256": hashlib.sha256(text.encode()).hexdigest()}}
        return json.dumps({"models": models, "analysis": asdict(config.analysis)},
                          sort_keys=True, default=str)

    out.mkdir()
    with Ledger.in_dir(out) as led:
        led.set_meta("inbox", str(inbox.resolve()))
        led.set_meta("fingerprint", old_fingerprint(then))
    open_ledger(config, runner).close()  # resumed, and the fingerprint rewritten
    with Ledger.in_dir(out) as led:
        assert "weights" in json.loads(led.get_meta("fingerprint"))
        # a bundle.json written before there was any ONNX record: the same settings
        led.set_meta("fingerprint", old_fingerprint({k: v for k, v in then.items()
                                                     if k != "onnx_exported_from"}))
    open_ledger(config, runner).close()
    with Ledger.in_dir(out) as led:
        changed = json.loads(json.dumps(then))
        changed["classifier"]["temperature"] = 3.0  # a setting that changes results: refused
        led.set_meta("fingerprint", old_fingerprint(changed))
    with pytest.raises(WatchError, match="other models"):
        open_ledger(config, runner)
    with Ledger.in_dir(out) as led:
        led.set_meta("fingerprint", old_fingerprint(then))
    monkeypatch.setattr(analysis, "REVISION", 2)  # this version: it analyses differently
    # ... and says that alone: the weights and bundle.json of the first format are the same
    # (a review: it named both as different too)
    with pytest.raises(WatchError, match=r"\): how images are analysed \(wbc-batch's analysis "
                                         r"revision 1 then, 2 now\); use"):
        open_ledger(config, runner)


def run_once_counting_done(config, runner, options=FAST) -> list:
    """run_once (in time), returning the images `wbc_image_done` was called for."""
    from wbc_batch.hookspecs import hookimpl
    from wbc_batch.plugins import get_plugin_manager

    done = []

    class Recorder:
        @hookimpl
        def wbc_image_done(self, result, index, total):
            done.append(result.image)

    pm = get_plugin_manager(autoload=False)
    pm.register(Recorder())
    box = {}

    def work():
        Path(config.output_dir).mkdir(parents=True, exist_ok=True)
        with open_ledger(config, runner) as led:
            box["code"] = Watcher(config, runner, led, replace_opts(options, once=True),
                                  pm=pm).run()

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    thread.join(20)
    assert not thread.is_alive(), "--once did not finish"
    return done


def test_an_unreadable_file_first_seen_half_written_is_given_up_on_once(env, monkeypatch):
    # its row holds the stat of its first sighting; the failures were never tied to the version
    # tried, so every later scan saw a "change", tried once more and gave up again, firing
    # wbc_image_done each time
    inbox, out, config, runner = env
    put(inbox / "locked.png", 1)
    out.mkdir()
    with open_ledger(config, runner) as led:
        led.observe([("locked.png", 3, 1, 1)])  # seen while the scanner had written 3 bytes
    tries = refuse_reading(monkeypatch, "locked.png")
    assert run_once_counting_done(config, runner) == ["locked.png"]
    assert len(tries) == FAST.max_attempts
    tries.clear()
    assert run_once_counting_done(config, runner) == [] and tries == []  # settled
    with Ledger.in_dir(out) as led:
        row = led.get("locked.png")
        assert (row.status, row.attempts) == (ERROR, FAST.max_attempts)
        st = (inbox / "locked.png").stat()
        assert row.version == (st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def test_an_error_file_chmod_ed_unreadable_is_tried_again_then_settled(env, monkeypatch):
    inbox, out, config, runner = env
    cv2.imwrite(str(inbox / "thumb.png"), np.full((16, 16, 3), 200, np.uint8))
    assert run_once_counting_done(config, runner) == ["thumb.png"]  # too small: an error
    time.sleep(0.01)
    os.chmod(inbox / "thumb.png", 0o600)  # a new version, which cannot be read
    tries = refuse_reading(monkeypatch, "thumb.png")
    assert run_once_counting_done(config, runner) == ["thumb.png"]
    assert len(tries) == FAST.max_attempts  # from attempt one: a new version
    tries.clear()
    assert run_once_counting_done(config, runner) == [] and tries == []
    with Ledger.in_dir(out) as led:
        assert led.get("thumb.png").error == "cannot read file: Permission denied"


def test_an_error_file_touched_is_tried_again(env, monkeypatch):
    # given up on for a passing reason (a share hiccup on every try): touching the image retries
    # it (the same bytes used to count as "unchanged", so the error stood for good)

    inbox, out, config, runner = env
    a = put(inbox / "a.png", 2)
    tries = refuse_reading(monkeypatch, "a.png", OSError(5, "Input/output error"))
    code, results, counts = run_once_in_time(config, runner)
    assert code == 1 and counts[ERROR] == 1 and runner.calls == []
    tries.allow()
    code, results, counts = run_once_in_time(config, runner)
    assert code == 1 and runner.calls == []  # unchanged: the error stands
    time.sleep(0.01)
    os.utime(a)  # touch
    code, results, counts = run_once_in_time(config, runner)
    assert code == 0 and runner.calls == ["a.png"] and len(results["a.png"].cells) == 2


def test_an_inbox_inside_out_gets_its_filesystem_events(tmp_path, monkeypatch):
    # every path under OUT was taken for the watcher's own writes, so with the inbox inside OUT
    # no event counted and new scans waited for the safety rescan (made endless here)
    import wbc_batch.watch as watch_module

    out = tmp_path / "out"
    inbox = out / "inbox"
    inbox.mkdir(parents=True)
    config = RunConfig(input_dir=inbox, output_dir=out, quiet=True)
    runner = StubRunner(inbox)
    monkeypatch.setattr(watch_module, "SAFETY_RESCAN", 1e6)
    with Background(config, runner, replace_opts(FAST, poll=None)) as bg:
        bg.until(lambda: bg.watcher._observer is not None and not bg.watcher._scan_requested)
        put(inbox / "s1" / "a.png", 2)
        bg.until(lambda: bg.counts()[DONE] == 1, timeout=30)


def test_a_copy_of_a_file_in_error_fails_on_its_own_in_its_own_sample(env):
    # as a duplicate of a failure it was counted nowhere: its sample showed neither the image
    # nor a failure (empty files from a scanner, in two patients' folders)
    inbox, out, config, runner = env
    thumb = np.full((16, 16, 3), 200, np.uint8)
    for name in ("p1/a.png", "p2/b.png"):
        (inbox / name).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(inbox / name), thumb)  # the same bytes
    put(inbox / "p2" / "c.png", 2)
    code, results, counts = run_once(config, runner)
    assert code == 1 and counts[ERROR] == 2 and counts[DUPLICATE] == 0
    assert "too small to hold a WBC" in results["p1/a.png"].error
    assert "too small to hold a WBC" in results["p2/b.png"].error
    assert results["p2/b.png"].status == "error"  # so counted as failed in p2
    # an analysed file is still the owner of its copies
    put(inbox / "p2" / "d.png", 2)
    code, results, counts = run_once(config, runner)
    assert results["p2/d.png"].status == "duplicate" and counts[DUPLICATE] == 1


def test_a_setting_added_later_keeps_old_watch_folders_resumable_while_it_is_off(env):
    # a new AnalysisParams field changed every fingerprint, so an upgrade refused every ledger
    import json
    from dataclasses import asdict, replace

    inbox, out, config, runner = env
    out.mkdir()
    open_ledger(config, runner).close()
    with Ledger.in_dir(out) as led:
        stored = json.loads(led.get_meta("fingerprint"))
    later = ("fill_margins", "min_nucleus_over_field", "border_arc", "fill_white_stop",
             "red_cell_bar", "grey_unusual", "blend_unusual")
    then = {k: v for k, v in asdict(config.analysis).items() if k not in later}
    assert stored["analysis"] == then  # what a version without the settings wrote
    for changed, said in (({"fill_margins": True}, "fill_margins False then, True now"),
                          ({"min_nucleus_over_field": 1.5},
                           "min_nucleus_over_field 0.0 then, 1.5 now"),
                          ({"border_arc": True}, "border_arc False then, True now"),
                          ({"fill_white_stop": True}, "fill_white_stop False then, True now"),
                          ({"red_cell_bar": True}, "red_cell_bar False then, True now"),
                          ({"grey_unusual": True}, "grey_unusual False then, True now"),
                          ({"blend_unusual": True}, "blend_unusual False then, True now")):
        turned_on = replace(config, analysis=replace(config.analysis, **changed))
        # before: the refusal did not say which setting differs
        with pytest.raises(WatchError, match=rf"other models or analysis parameters .*: {said}; "):
            open_ledger(turned_on, runner)
    open_ledger(config, runner).close()  # off, as before: resumed
    stricter = replace(config, analysis=replace(config.analysis, review_threshold=0.9,
                                                 border_frac=0.5))
    with pytest.raises(WatchError, match=r": border_frac 0.3 then, 0.5 now; review_threshold "
                                         r"0.8 then, 0.9 now; use the same ones"):
        open_ledger(stricter, runner)


def test_every_setting_added_since_the_first_ledgers_is_left_out_of_fingerprints_while_off():
    # --grey-unusual was added without a LATER_SETTINGS entry, which the test above, listing the
    # settings by hand, could not see: every ledger written before it would have been refused
    from dataclasses import fields

    from wbc_batch.config import AnalysisParams
    from wbc_batch.resume import LATER_SETTINGS

    first = {"border_frac", "box_trim", "diameter_px", "max_side", "min_area_frac", "min_falloff",
             "min_grey_nucleus_contrast", "min_nucleus_contrast", "min_nucleus_frac", "outline_eps",
             "outline_refine", "review_threshold", "small_cell_frac", "small_cell_nucleus_frac",
             "stain_check", "stain_normalise", "tta_views"}  # what the first ledgers held
    defaults = {f.name: f.default for f in fields(AnalysisParams)}
    assert first <= set(defaults)
    assert {k: defaults[k] for k in set(defaults) - first} == LATER_SETTINGS


def test_a_ledger_of_a_version_that_analysed_images_differently_is_not_resumed(env, monkeypatch):
    # a version whose analysis gives other results at the same models and settings raises
    # analysis.REVISION: without it, a ledger of the results before was resumed and its old
    # results reported beside new ones, where the README says such an upgrade is refused
    import json

    from wbc_batch import analysis

    inbox, out, config, runner = env
    out.mkdir()
    now = analysis.REVISION
    assert now == 4  # 4: glass taken for glass (`analysis.field_cover`)
    monkeypatch.setattr(analysis, "REVISION", 1)  # a version before the number
    open_ledger(config, runner).close()
    with Ledger.in_dir(out) as led:  # revision 1: written as the versions before the number did
        stored = json.loads(led.get_meta("fingerprint"))
    assert "revision" not in stored
    monkeypatch.setattr(analysis, "REVISION", now)  # this version
    with pytest.raises(WatchError, match=r"differently\): how images are analysed \(wbc-batch's "
                                         rf"analysis revision 1 then, {now} now\); use"):
        open_ledger(config, runner)
    with Ledger.in_dir(out) as led:  # refused, and left as it was
        assert "revision" not in json.loads(led.get_meta("fingerprint"))
        stored["revision"] = now
        led.set_meta("fingerprint", json.dumps(stored, sort_keys=True))
    open_ledger(config, runner).close()  # the same revision: resumed
    monkeypatch.setattr(analysis, "REVISION", 1)  # and an older version refuses it
    with pytest.raises(WatchError, match=rf"analysis revision {now} then, 1 now"):
        open_ledger(config, runner)


@pytest.mark.parametrize("stored", ["[1, 2]", '"abc"', "3", "null",
                                    '{"revision": "2"}', '{"revision": 2.7}', '{"revision": null}',
                                    '{"revision": true}', '{"revision": [2]}'])
def test_a_fingerprint_no_version_writes_is_refused_without_a_traceback(stored):
    # a hand-edited or damaged ledger: refused as of other results (a review: a revision of
    # "2" or 2.7 read as 2 and resumed, and None or a JSON list stopped watch with a traceback)
    import json

    from wbc_batch.resume import same_results, what_differs

    current = json.dumps({"weights": {}, "settings": {}, "analysis": {"diameter_px": 150.0},
                          "revision": 2})
    if stored.startswith("{"):
        stored = json.dumps({**json.loads(current), **json.loads(stored)})
    assert same_results(stored, current, {}, "torch") is False
    assert isinstance(what_differs(stored, current), str)


def test_a_ledger_of_the_revision_before_is_resumed_where_the_wbc_size_is_given(env, monkeypatch):
    # a revision that changes the scale estimate alone gives the results of the one before
    # where --diameter makes no estimate: a lab's ledger is resumed (a review: it was refused)
    import json
    from dataclasses import replace

    from wbc_batch import analysis

    inbox, out, config, runner = env
    given = replace(config, analysis=replace(config.analysis, diameter_px=150.0))
    out.mkdir()
    now = analysis.REVISION
    open_ledger(given, runner).close()  # this version's revision
    monkeypatch.setattr(analysis, "REVISION", now + 1)
    with pytest.raises(WatchError, match=f"analysis revision {now} then, {now + 1} now"):
        open_ledger(given, runner)  # a change to more than the estimate: refused
    monkeypatch.setattr(analysis, "ESTIMATE_REVISIONS", frozenset({now + 1}))
    with pytest.raises(WatchError, match=f"analysis revision {now} then, {now + 1} now"):
        open_ledger(config, runner)  # the estimate's change, and an estimate is made: refused
    open_ledger(given, runner).close()  # resumed, and its fingerprint brought up to date
    with Ledger.in_dir(out) as led:
        stored = json.loads(led.get_meta("fingerprint"))
        assert stored["revision"] == now + 1
        stored["revision"] = now
        stored["analysis"]["diameter_px"] = 140.0  # another size: refused, for the size alone
        led.set_meta("fingerprint", json.dumps(stored, sort_keys=True))
    with pytest.raises(WatchError, match=r"\): diameter_px 140.0 then, 150.0 now; use"):
        open_ledger(given, runner)


def test_a_plugin_writers_report_of_the_last_session_is_removed_when_not_written_again(env):
    # a session with `--report csv --report counts-json`, then one without the plugin writer:
    # counts.json would have stood beside the new reports, never updated again
    inbox, out, config, runner = env

    def writer(names):
        def write_reports(results, **facts):
            runner.reports.append(list(results))
            for name in names:
                (out / name).write_text(f"{len(results)} images")
            (out / "run.json").write_text(json.dumps({"report_files": sorted(names)}))
            return [out / name for name in (*names, "run.json")]
        return write_reports

    put(inbox / "a.png", 1)
    runner.write_reports = writer(["images.csv", "counts.json"])
    assert run_once(config, runner)[0] == 0 and (out / "counts.json").is_file()
    (out / "notes.txt").write_text("a lab's own file")
    put(inbox / "b.png", 2)
    runner.write_reports = writer(["images.csv"])
    code, results, _ = run_once(config, runner)
    assert code == 0 and results["b.png"].ok
    assert not (out / "counts.json").exists() and (out / "images.csv").read_text() == "2 images"
    assert (out / "notes.txt").is_file()  # not a report any run.json listed


@pytest.mark.parametrize("removable", [True, False])
def test_a_watcher_removes_the_reports_an_overwrite_cut_short_noted_and_the_note(env, monkeypatch,
                                                                                 removable):
    # a `run --overwrite` killed after run.json went: the plugin's counts.json is known only by
    # the note it left, which a watcher then taking OUT left behind for good
    from wbc_batch.output_folder import REPORTS_LIST

    inbox, out, config, runner = env
    out.mkdir()
    (out / "counts.json").write_text("an earlier run's")
    (out / REPORTS_LIST).write_text(json.dumps(["counts.json"]))

    def write_reports(results, **facts):
        (out / "images.csv").write_text(f"{len(results)} images")
        return [out / "images.csv"]

    runner.write_reports = write_reports
    if not removable:  # the note stays while what it names does
        def refused(path, out_dir):
            raise PermissionError(13, "Permission denied", str(path))

        monkeypatch.setattr(watch_module, "remove_report", refused)
    put(inbox / "a.png", 1)
    assert run_once(config, runner)[0] == 0
    assert (out / "counts.json").exists() is not removable
    assert (out / REPORTS_LIST).exists() is not removable


# --- what the watcher says, signals, the inbox folder, drawn images ------------------------------

def run_once_saying(config, runner, options=FAST, stream=None):
    """`run_once` with the watcher's lines (quiet off) -> (code, text, results)."""
    stream = stream if stream is not None else io.StringIO()
    Path(config.output_dir).mkdir(parents=True, exist_ok=True)
    with open_ledger(config, runner) as led:
        code = Watcher(config, runner, led, replace_opts(options, once=True), stream=stream,
                       quiet=False).run()
        results = {r.image: r for r in led.results()}
    return code, (stream.getvalue() if isinstance(stream, io.StringIO) else ""), results


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGHUP here")
def test_sighup_asks_the_watcher_to_stop_as_sigterm_does_unless_nohup_ignores_it():
    # A closed terminal or a dropped SSH session must not kill the watcher with its reports
    # behind the ledger; `run` treats SIGHUP as Ctrl-C too (interrupts.SIGNALS).
    from wbc_batch.interrupts import StopNow, stop_requests

    class Stoppable:
        def __init__(self):
            self.asked = []

        def stop(self, signum=None):
            self.asked.append(signum)

    before = signal.getsignal(signal.SIGHUP)
    try:
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        watcher = Stoppable()
        with stop_requests() as stopper:
            stopper.attach(watcher)
            handler = signal.getsignal(signal.SIGHUP)
            assert callable(handler), "SIGHUP would end the watcher at once"
            handler(signal.SIGHUP, None)
            handler(signal.SIGHUP, None)  # a closing terminal may send two: never "at once"
            with pytest.raises(StopNow):  # a second Ctrl-C still stops at once
                signal.getsignal(signal.SIGINT)(signal.SIGINT, None)
        assert watcher.asked == [signal.SIGHUP]
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_DFL  # given back
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # nohup
        with stop_requests():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, before)


def test_a_sigint_ignored_at_start_stays_ignored_by_the_watcher():
    # `cmd &` in a shell without job control ignores SIGINT; the watcher had taken it over
    # (its own handler, where `run` leaves it ignored)
    from wbc_batch.interrupts import stop_requests

    before = signal.getsignal(signal.SIGINT)
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        with stop_requests():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            assert callable(signal.getsignal(signal.SIGTERM))
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)


def test_a_closed_terminal_does_not_stop_the_watcher(env):
    # after a SIGHUP the terminal is gone: writing the status line fails with EIO
    inbox, out, config, runner = env
    put(inbox / "a.png", 2)

    class ClosedTerminal:
        def write(self, text):
            raise OSError(errno.EIO, "Input/output error")

        def flush(self):
            pass

        def isatty(self):
            return True

    code, _, results = run_once_saying(config, runner, stream=ClosedTerminal())
    assert code == 0 and list(results) == ["a.png"]
    assert [r.image for r in runner.reports[-1]] == ["a.png"]


class StoppingRunner(StubRunner):
    """Sends the watcher `signum` (as `interrupts.stop_requests` does) while analysing the first
    image."""

    def __init__(self, inbox, signum):
        super().__init__(inbox)
        self.signum = signum
        self.watcher = None

    def process_array(self, rgb, rel):
        if not self.calls:
            self.watcher.stop(self.signum)
        return super().process_array(rgb, rel)


def test_once_stopped_by_a_signal_exits_128_plus_it_and_says_what_is_left(env):
    inbox, out, config, runner = env
    for name in ("a.png", "b.png", "c.png"):
        put(inbox / name, 2, tag=ord(name[0]))
    runner = StoppingRunner(inbox, signal.SIGTERM)
    stream = io.StringIO()
    out.mkdir()
    with open_ledger(config, runner) as led:
        runner.watcher = Watcher(config, runner, led, replace_opts(FAST, once=True),
                                 stream=stream, quiet=False)
        code = runner.watcher.run()
        assert led.counts()[DONE] == 1  # the current image was finished
    assert code == 128 + signal.SIGTERM  # as `run` interrupted: cron must not take it for done
    text = stream.getvalue()
    assert "Stopped by SIGTERM before the end of the backlog" in text
    assert "2 files left pending for the next run" in text
    # the reports say which samples are partial, as a stopped `run`'s do
    assert runner.facts["samples_not_finished"] == {".": [1, 3]}

    # the next --once finishes the backlog: exit 0
    runner = StubRunner(inbox)
    code, text, results = run_once_saying(config, runner)
    assert code == 0 and sorted(runner.calls) == ["b.png", "c.png"] and len(results) == 3
    assert "samples_not_finished" not in runner.facts
    assert "Done: this session analysed 2, 0 errors; 0 files left pending" in text


def test_a_watcher_stopped_by_a_signal_exits_0(env):
    inbox, out, config, runner = env
    put(inbox / "a.png", 2)
    with Background(config, runner) as bg:
        bg.until(lambda: bg.counts()[DONE] == 1)
        bg.watcher.stop(signal.SIGTERM)
        bg.thread.join(10)
    assert bg.code == 0


def test_once_ends_with_a_summary_of_the_session(env):
    inbox, out, config, runner = env
    put(inbox / "a.png", 2)
    put(inbox / "c.png", 1)
    for k in range(12):
        put(inbox / f"e{k:02d}.png", 255, tag=k)  # decode, but the analysis fails: final at once

    class Rewriting(StubRunner):
        """A scanner still writing c.png while a.png is analysed: --once leaves it pending."""

        def process_array(self, rgb, rel):
            if rel == "a.png":
                put(inbox / "c.png", 3, tag=7)
            return super().process_array(rgb, rel)

    code, text, results = run_once_saying(config, Rewriting(inbox))
    assert code == 1
    lines = text.splitlines()
    done = [line for line in lines if line.startswith("Done: ")]
    assert done == [f"Done: this session analysed 1, 12 errors; 1 file left pending for the next "
                    f"run (being written, or awaiting a retry). {out} holds 1 processed, "
                    f"12 errors."]
    failed = [line for line in lines if line.startswith("  failed: ")]
    assert failed[0] == "  failed: e00.png: analysis failed: RuntimeError: analysis blew up"
    assert len(failed) == MAX_LISTED_ERRORS
    assert lines[-1] == "  ... and 2 more (see images.csv)"

    # quiet: no summary, as `run -q`
    stream = io.StringIO()
    with open_ledger(config, runner) as led:
        Watcher(config, runner, led, replace_opts(FAST, once=True), stream=stream).run()
    assert stream.getvalue() == ""


def test_a_log_is_not_given_the_last_status_line_twice(env):
    # a log ended "watch: 3 processed, 0 queued, 1 error" twice: the final line repeated it
    inbox, out, config, runner = env
    Path(out).mkdir(parents=True, exist_ok=True)
    stream = io.StringIO()
    with open_ledger(config, runner) as led:
        watcher = Watcher(config, runner, led, replace_opts(FAST, once=True), stream=stream,
                          quiet=False)
        watcher._status()
        watcher._status(final=True)
    assert stream.getvalue() == "watch: 0 processed, 0 queued, 0 errors\n"


def test_the_status_line_counts_in_the_singular_and_says_a_file_changed(env):
    inbox, out, config, runner = env
    put(inbox / "a.png", 2)
    put(inbox / "b.png", 255)
    shutil.copy(inbox / "a.png", inbox / "copy.png")
    _, text, _ = run_once_saying(config, runner)
    assert "watch: 1 processed, 0 queued, 1 error, 1 duplicate" in text.splitlines()
    status = [line for line in text.splitlines() if line.startswith("watch: ")]
    assert len(status) == len(set(status))  # the final line repeated the last one in a log
    assert "1 errors" not in text and "duplicates" not in text
    (inbox / "bad.png").write_bytes(b"not an image")
    _, text, _ = run_once_saying(config, runner, replace_opts(FAST, max_attempts=1))
    assert "bad.png: not an image file" in text and "(gave up after 1 attempt)" in text
    (inbox / "bad.png").unlink()

    put(inbox / "a.png", 4)  # new content: said, as renames and duplicates are
    _, text, results = run_once_saying(config, runner)
    assert ("a.png: changed on disk; analysed again, its result replacing the earlier one's (a "
            "new file under an archived file's name does too)") in text.splitlines()
    assert len(results["a.png"].cells) == 4
    assert "changed on disk" not in run_once_saying(config, runner)[1]  # once, not at every run


def test_an_unreachable_inbox_is_said_once_and_its_return_too(env, tmp_path):
    inbox, out, config, runner = env
    put(inbox / "a.png", 2)
    stream = io.StringIO()
    with Background(config, runner, stream=stream, quiet=False) as bg:
        bg.until(lambda: bg.counts()[DONE] == 1)
        os.rename(inbox, tmp_path / "away")  # a share that dropped out
        bg.until(lambda: "cannot scan the inbox" in stream.getvalue())
        scans = bg.watcher._last_scan
        bg.until(lambda: bg.watcher._last_scan > scans + 1.0)  # several failed scans later
        os.rename(tmp_path / "away", inbox)
        bg.until(lambda: "inbox reachable again" in stream.getvalue())
        put(inbox / "b.png", 3)
        bg.until(lambda: bg.counts()[DONE] == 2)
    text = stream.getvalue()
    assert text.count("cannot scan the inbox") == 1 and text.count("inbox reachable again") == 1
    assert bg.results()["a.png"].ok  # kept while the inbox was away


def test_an_inbox_removed_and_made_again_gets_its_filesystem_events_back(env, monkeypatch):
    # ext4 gives the new folder the old one's inode number at once; its watch has ended anyway
    pytest.importorskip("watchdog")
    inbox, out, config, runner = env
    monkeypatch.setattr(watch_module, "SAFETY_RESCAN", 600.0)
    monkeypatch.setattr(watch_module, "INBOX_CHECK", 0.2)
    put(inbox / "a.png", 2)
    stream = io.StringIO()
    with Background(config, runner, replace_opts(FAST, poll=None), stream=stream,
                    quiet=False) as bg:
        bg.until(lambda: bg.counts()[DONE] == 1)
        shutil.rmtree(inbox)
        time.sleep(0.3)
        inbox.mkdir()
        put(inbox / "b.png", 3)
        bg.until(lambda: "b.png" in bg.results(), timeout=10)
        monkeypatch.setattr(watch_module, "INBOX_CHECK", 600.0)  # from here on, events only
        put(inbox / "c.png", 4)
        bg.until(lambda: "c.png" in bg.results(), timeout=10)
    assert stream.getvalue().count("was removed or replaced") == 1


def test_an_inbox_moved_away_and_made_again_is_watched_anew(env, monkeypatch, tmp_path):
    pytest.importorskip("watchdog")
    inbox, out, config, runner = env
    monkeypatch.setattr(watch_module, "SAFETY_RESCAN", 600.0)
    monkeypatch.setattr(watch_module, "INBOX_CHECK", 0.2)
    with Background(config, runner, replace_opts(FAST, poll=None)) as bg:
        time.sleep(0.3)
        os.rename(inbox, tmp_path / "old")  # the watch follows the old folder
        inbox.mkdir()
        time.sleep(0.5)
        monkeypatch.setattr(watch_module, "INBOX_CHECK", 600.0)
        put(inbox / "b.png", 3)
        bg.until(lambda: "b.png" in bg.results(), timeout=10)


def test_a_result_s_overlay_goes_when_the_file_stops_holding_that_result(env):
    # changed into a copy of another file, or into an error, or left pending and deleted: the
    # old overlay (and mask) would show cells no report counts. A renamed result keeps its own.
    inbox, out, config, runner = env
    names = ("a.png", "b.png", "c.png", "d.png", "e.png")
    for k, name in enumerate(names):
        put(inbox / name, 2 + k)
    run_once(config, runner)
    drawn = {name: (out / "overlays" / f"{name}.png", out / "masks" / f"{name}.png")
             for name in names}
    for overlay, mask in drawn.values():
        assert overlay.is_file()
        mask.parent.mkdir(exist_ok=True)
        mask.write_bytes(b"mask")  # as --save-masks writes
    shutil.copy(inbox / "a.png", inbox / "b.png")     # b: now a duplicate of a
    (inbox / "c.png").write_bytes(b"not an image")     # c: now an error
    with Ledger.in_dir(out) as led:                    # d: new content seen, then deleted
        led.set_pending("d.png", 1, 1, "f" * 64)
    (inbox / "d.png").unlink()
    os.rename(inbox / "e.png", inbox / "f.png")        # e: renamed, its result kept
    code, results, _ = run_once(config, runner)
    assert results["b.png"].status == "duplicate" and results["c.png"].status == "error"
    assert "d.png" not in results and results["f.png"].ok
    for name in ("b.png", "c.png", "d.png", "e.png"):
        assert not any(p.exists() for p in drawn[name]), name
    assert all(p.exists() for p in drawn["a.png"])  # the original of b's copy
    assert (out / "overlays" / "f.png.png").read_bytes() == b"overlay"
    assert (out / "masks" / "f.png.png").read_bytes() == b"mask"


def test_a_ledger_on_a_full_disk_stops_the_watcher_in_one_line(env, monkeypatch):
    # a watcher whose OUT filled up died with sqlite3's traceback out of the ledger's COMMIT
    import sqlite3

    inbox, out, config, runner = env
    put(inbox / "a.png", 1)
    assert run_once(config, runner)[0] == 0
    put(inbox / "b.png", 2)

    def full(*args, **kwargs):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(Ledger, "record_done", full)
    stream = io.StringIO()
    with open_ledger(config, runner) as led:
        code = Watcher(config, runner, led, replace_opts(FAST, once=True), stream=stream,
                       quiet=False).run()
        counts = led.counts()
    text = stream.getvalue()
    assert code == 1 and "cannot be written (database or disk is full)" in text
    assert "Traceback" not in text and counts[DONE] == 1 and counts[PENDING] == 1
    assert [r.image for r in runner.reports[-1]] == ["a.png"]  # flushed from what it holds


def test_a_ledger_another_program_holds_stops_the_watcher_naming_that(env, monkeypatch):
    # a database browser holding a write on the ledger stopped the watcher with "free space"
    import sqlite3

    from wbc_batch import ledger as ledger_module
    from wbc_batch import watch as watch_module

    inbox, out, config, runner = env
    put(inbox / "a.png", 1)
    assert run_once(config, runner)[0] == 0
    put(inbox / "b.png", 2)
    monkeypatch.setattr(ledger_module, "LEDGER_WAIT_S", 0.2)
    monkeypatch.setattr(watch_module, "LEDGER_WAIT_S", 0.2)
    browser = sqlite3.connect(str(out / "ledger.sqlite"), isolation_level=None)
    try:
        stream = io.StringIO()
        with open_ledger(config, runner) as led:
            browser.execute("BEGIN IMMEDIATE")  # another program's open write
            code = Watcher(config, runner, led, replace_opts(FAST, once=True), stream=stream,
                           quiet=False).run()
            browser.execute("ROLLBACK")
            counts = led.counts()
    finally:
        browser.close()
    text = stream.getvalue()
    assert code == 1 and "cannot be written (database is locked)" in text
    assert (f"another program has held {out / 'ledger.sqlite'} for more than 0.2 s: close it (a "
            "database browser with unsaved changes, say) and start it again") in text
    assert "free space" not in text and "Traceback" not in text
    assert counts[DONE] == 1


def test_the_watchers_lines_escape_what_a_file_name_would_do_to_the_terminal(env):
    # a name with ESC [ (colours, cursor moves) or a carriage return acted on the terminal
    inbox, out, config, runner = env
    put(inbox / "a.png", 1)
    (inbox / "b\x1b[31mred\r.png").write_bytes((inbox / "a.png").read_bytes())   # a duplicate
    code, said, _ = run_once_saying(config, runner)
    assert "b\\x1b[31mred\\x0d.png: duplicate of a.png" in said
    assert "\x1b[31m" not in said and "red\r" not in said


class SpreadRunner(StubRunner):
    """Reports the WBC sizes as spreading widely when the results number one of `wide_at`
    (the facts `Runner.write_reports` keeps)."""

    def __init__(self, inbox, wide_at: set, sizes=None):
        super().__init__(inbox)
        self.wide_at, self.sizes = wide_at, sizes or {}
        self.last_run_info = {}

    def write_reports(self, results, **facts):
        size = self.sizes.get(len(results))  # the size to try, at that many results
        self.last_run_info = {"scale_spread": {"images": len(results), "p5_px": 40.0,
                                               "p95_px": 200.0, "ratio": 5.0,
                                               "wide": len(results) in self.wide_at,
                                               "suggested_px": size}}
        return super().write_reports(results, **facts)


def test_a_continuous_watch_says_a_wide_spread_once_until_it_narrows(env):
    # before: only run and watch --once said it; a watcher left on a scanner's folder wrote it
    # into report.xlsx but never on its terminal
    inbox, out, config, _ = env
    runner = SpreadRunner(inbox, wide_at={3, 4, 6})
    stream = io.StringIO()
    said = lambda: stream.getvalue().count("spread widely")  # noqa: E731
    # said when it first spreads (3 results), not again while it stays wide (4), and again
    # after narrowing (5) when it spreads once more (6)
    batches = (("a", 0), ("b c", 1), ("d", 1), ("e", 1), ("f", 2))
    total = 0
    with Background(config, runner, stream=stream, quiet=False) as bg:
        for names, times_said in batches:
            for name in names.split():
                put(inbox / f"{name}.png", 1, tag=ord(name))
                total += 1
            bg.until(lambda: runner.reports and len(runner.reports[-1]) == total)
            bg.until(lambda: said() == times_said)
    assert said() == 2 and "--diameter" in stream.getvalue()


def test_a_continuous_watch_says_the_spread_again_when_a_size_to_try_comes_or_moves(env):
    # the first wide reports may rest on too few images with a cell not flagged to suggest a
    # size; the terminal said the warning once, and never the size that came later
    inbox, out, config, _ = env
    runner = SpreadRunner(inbox, wide_at={1, 2, 3, 4, 5, 7, 8},
                          sizes={2: 180.0, 4: 190.0, 5: 200.0, 7: 200.0})
    stream = io.StringIO()
    said = lambda: stream.getvalue().count("spread widely")  # noqa: E731
    tried = lambda: stream.getvalue().count("try --diameter")  # noqa: E731
    # wide without a size (1), then with one (2): said again; not when the size goes while it
    # stays wide (3), nor when it comes back 5.6 % off the size said (4); again at 11.1 % (5);
    # again after narrowing (6) when it spreads (7); not when the size goes (8)
    batches = (("a", 1, 0), ("b", 2, 1), ("c", 2, 1), ("d", 2, 1), ("e", 3, 2), ("f", 3, 2),
               ("g", 4, 3), ("h", 4, 3))
    total = 0
    with Background(config, runner, stream=stream, quiet=False) as bg:
        for name, times_said, times_tried in batches:
            put(inbox / f"{name}.png", 1, tag=ord(name))
            total += 1
            bg.until(lambda: runner.reports and len(runner.reports[-1]) == total)
            bg.until(lambda: said() == times_said and tried() == times_tried)
    assert said() == 4 and tried() == 3 and stream.getvalue().count("try --diameter 200") == 2


class SlowReportsRunner(StubRunner):
    """A StubRunner whose every report rebuild takes 0.1 s (a large folder's, scaled down)."""

    def write_reports(self, results, **facts):
        time.sleep(0.1)
        self.rebuilt_at = getattr(self, "rebuilt_at", []) + [time.time()]
        return super().write_reports(results, **facts)


def test_images_arriving_one_at_a_time_do_not_rebuild_the_reports_after_each(env):
    # a scanner adding an image every few seconds had a large folder rebuild its reports after
    # every image, whatever they cost: most of the CPU's time went on rebuilding
    inbox, out, config, _ = env
    runner = SlowReportsRunner(inbox)
    put(inbox / "s" / "0.png", 1, tag=0)
    with Background(config, runner, FAST) as bg:
        bg.until(lambda: len(runner.reports) >= 1 and bg.counts()[DONE] == 1)
        start = time.time()
        for k in range(1, 7):  # one image every 0.25 s, each analysed before the next comes
            put(inbox / "s" / f"{k}.png", 1, tag=k)
            bg.until(lambda: bg.counts()[DONE] == k + 1)
            time.sleep(0.25)
        # each rebuild took 0.1 s: at most one per 20 x 0.1 = 2 s while they trickle in
        during = [t for t in runner.rebuilt_at if t >= start]
        assert len(during) <= 2, [round(t - start, 2) for t in during]
        # and the last image's reports come when due, not at the next scan or event
        bg.until(lambda: len(runner.reports[-1]) == 7, timeout=5)


def test_a_step_of_the_system_clock_moves_the_watchers_own_marks_with_it(env):
    # NTP setting the clock back an hour: the next scan, each file's settling and the sleep's
    # deadline lay an hour ahead, so the watcher slept for that hour, new files unseen
    inbox, out, config, runner = env
    out.mkdir()
    with open_ledger(config, runner) as led:
        w = Watcher(config, runner, led, replace_opts(FAST, poll=2.0))
        now = time.time()
        w._last_scan = now - 1.0
        w._seen["a.png"] = watch_module._Seen(key=(1, 2, 3), since=now - 1.0, not_before=now + 5)
        w._clock = (now + 3600.0, time.monotonic())  # the wall clock has since gone back 3600 s
        w._follow_clock()
        assert w._last_scan == pytest.approx(now - 3601.0, abs=0.5)
        assert w._seen["a.png"].since == pytest.approx(now - 3601.0, abs=0.5)
        assert w._seen["a.png"].not_before == pytest.approx(now - 3595.0, abs=0.5)
        assert w._scan_due(time.time())  # the 2 s poll is long past, as it would be
        w._clock = (time.time() - 30.0, time.monotonic() - 30.0)  # 30 s of work: no step
        w._follow_clock()
        assert w._last_scan == pytest.approx(now - 3601.0, abs=0.5)


def test_a_file_on_a_share_whose_clock_lags_is_watched_for_the_settle_time(env):
    # a NAS 15 s behind this machine: a BMP still being written looked 15 s old, so it counted
    # as settled at first sight despite --settle 10, and half of it was analysed
    inbox, out, config, runner = env
    out.mkdir()
    f = put(inbox / "a.png", 1)
    with open_ledger(config, runner) as led:
        w = Watcher(config, runner, led, replace_opts(FAST, settle=10.0))
        now = time.time() + 15.0  # this machine's clock, ahead of the file's
        seen = w._observe("a.png", f.stat(), now)
        assert seen.since == now and w._ready(now) == [] and w._ready(now + 10.0) == ["a.png"]
        del w._seen["a.png"]
        later = time.time() + watch_module.SHARE_CLOCK_SKEW + 5.0  # a backlog file: at once
        assert w._observe("a.png", f.stat(), later).since == later - 10.0
        assert w._ready(later) == ["a.png"]
