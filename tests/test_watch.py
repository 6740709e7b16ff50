"""`wbc-batch watch` in a subprocess with real signals, the fake backend and code-made images.

The subprocess gets the conftest's fake backend the way a third-party plugin is installed: a
tiny distribution (dist-info with a `wbc_batch` entry point, and the plugin module) in a temp
folder put on PYTHONPATH, selected with `--backend fake`.

The main test drops files while the watcher runs (one written slowly in chunks, a copy under
another name, the same bytes again under the same name, a changed file, a corrupt file, one in a
new sample subfolder), kills it with SIGKILL at random moments several times during a run of more
than 50 images, restarts it, stops it with SIGTERM, and compares the reports with a plain `run`
over the same folder. The seed of the random kill moments is printed, and can be fixed with
WBC_WATCH_TEST_SEED to replay a failure.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from wbc_batch.atomic import is_leftover

from conftest import draw_field, encode, write_image

TESTS = Path(__file__).resolve().parent
CLI = [sys.executable, "-c", "from wbc_batch.cli import main; main()"]
#: settle / poll / retries short enough for tests; the defaults are for scanners
WATCH_ARGS = ["--poll", "0.2", "--settle", "0.3", "--max-attempts", "3"]

PLUGIN_MODULE = """\
'''The conftest fake backend as an installed third-party plugin (tests only).'''
import sys
sys.path.insert(0, {tests!r})
from conftest import FakeBackend
from wbc_batch.hookspecs import hookimpl


@hookimpl
def wbc_register_backends():
    return [FakeBackend()]
"""


@pytest.fixture(scope="session")
def fake_site(tmp_path_factory) -> Path:
    site = tmp_path_factory.mktemp("fake_site")
    dist = site / "wbc_batch_test_fake-0.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: wbc-batch-test-fake\n"
                                   "Version: 0.0\n")
    (dist / "entry_points.txt").write_text("[wbc_batch]\nfake = wbc_test_fake_backend\n")
    (site / "wbc_test_fake_backend.py").write_text(PLUGIN_MODULE.format(tests=str(TESTS)))
    return site


@pytest.fixture
def cli_env(fake_site) -> dict:
    env = dict(os.environ)
    env.pop("WBC_BATCH_DISABLE_PLUGIN_AUTOLOAD", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(fake_site), env.get("PYTHONPATH")) if p)
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


# --- images --------------------------------------------------------------------------------------

def field(i: int) -> np.ndarray:
    """A distinct 320x240 field (1 to 3 cells) for every i: marker pixels make the bytes
    unique."""
    n = 1 + i % 3
    cells = [(55 + 105 * k, 60 + (i * 17 + 40 * k) % 120, 17 + (i + k) % 6) for k in range(n)]
    rgb = draw_field(320, 240, cells)
    rgb[239, i % 320] = (236, 236, 236)
    rgb[238, (i // 320) % 320] = (236, 236, 236)
    return rgb


def make_backlog(inbox: Path, ids, samples=("s1", "s2", "s3", "s4")) -> list:
    paths = []
    for i in ids:
        path = inbox / samples[i % len(samples)] / f"img{i:03d}.png"
        write_image(path, field(i))
        paths.append(path)
    old = time.time() - 600
    for p in paths:
        os.utime(p, (old, old))
    return paths


def write_slowly(path: Path, data: bytes, chunks: int, pause: float) -> threading.Thread:
    """Write `data` in `chunks` pieces, `pause` seconds apart (a slow scanner)."""
    path.parent.mkdir(parents=True, exist_ok=True)

    def work():
        step = len(data) // chunks + 1
        with open(path, "wb") as f:
            for k in range(0, len(data), step):
                f.write(data[k:k + step])
                f.flush()
                time.sleep(pause)

    t = threading.Thread(target=work, daemon=True)
    t.start()
    return t


# --- processes -----------------------------------------------------------------------------------

#: the watcher processes of the current test; `no_watcher_left` kills those still running
_STARTED: list = []


@pytest.fixture(autouse=True)
def no_watcher_left():
    """A test that fails while a watcher runs (a wait that timed out) leaves no watcher polling
    its inbox after pytest is gone."""
    yield
    while _STARTED:
        watcher = _STARTED.pop()
        if watcher.alive():
            watcher.proc.kill()
            watcher.proc.wait(10)
        watcher.log.close()


class Watcher:
    """One `wbc-batch watch` subprocess; its stderr goes to a log file."""

    def __init__(self, inbox, out, extra, env, log: Path, preexec=None):
        self.log_path = log
        self.starts = self.text().count("watching ") if log.exists() else 0
        self.log = open(log, "ab")
        self.proc = subprocess.Popen([*CLI, "watch", str(inbox), "-o", str(out), *WATCH_ARGS,
                                      *extra], stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                     preexec_fn=preexec)
        _STARTED.append(self)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.log.close()

    def ready(self) -> bool:
        """It has printed its start line (signal handlers are in place)."""
        return self.text().count("watching ") > self.starts

    def stop(self, sig=signal.SIGTERM, timeout=60) -> int:
        wait_for(self.ready, self, 60, "the start line")
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        self.log.close()
        return code

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")


def ledger_rows(out: Path, versions: bool = False) -> dict:
    """rel -> status (or (status, size, mtime_ns)), read the way any other process would
    (WAL: a reader never blocks the watcher)."""
    path = out / "ledger.sqlite"
    if not path.exists():
        return {}
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        try:
            rows = db.execute("SELECT rel, status, size, mtime_ns FROM files").fetchall()
        finally:
            db.close()
    except sqlite3.Error:
        return {}
    return {r[0]: (r[1:] if versions else r[1]) for r in rows}


def wait_for(predicate, watcher: Watcher, timeout: float, what: str) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return
        if watcher is not None and not watcher.alive():
            raise AssertionError(f"watcher exited ({watcher.proc.returncode}) waiting for {what}:\n"
                                 + watcher.text()[-3000:])
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}"
                         + (":\n" + watcher.text()[-3000:] if watcher is not None else ""))


def n_done(out: Path) -> int:
    return sum(1 for s in ledger_rows(out).values() if s == "done")


def inbox_files(inbox: Path) -> set:
    return {p.relative_to(inbox).as_posix() for p in inbox.rglob("*")
            if p.is_file() and not p.name.startswith(".")}


def settled(out: Path, inbox: Path) -> bool:
    """Every file of the inbox is in the ledger, decided (not pending), at its current version."""
    rows = ledger_rows(out, versions=True)
    for rel in inbox_files(inbox):
        if rel not in rows or rows[rel][0] == "pending":
            return False
        st = (inbox / rel).stat()
        if (st.st_size, st.st_mtime_ns) != tuple(rows[rel][1:]):
            return False
    return True


def plain_run(inbox: Path, out: Path, fake_args, env) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, "run", str(inbox), "-o", str(out), *fake_args],
                          capture_output=True, text=True, env=env, timeout=300)


def read_reports(out: Path):
    images = pd.read_csv(out / "images.csv", keep_default_na=False)
    cells = pd.read_csv(out / "cells.csv", keep_default_na=False)
    summary = pd.read_csv(out / "summary.csv", keep_default_na=False)
    return images, cells, summary


def check_xlsx(path: Path, n_images: int) -> None:
    import openpyxl

    wb = openpyxl.load_workbook(path, read_only=True)
    assert {"Summary", "Images", "Cells", "Errors"} <= set(wb.sheetnames)
    assert wb["Images"].max_row == n_images + 1
    wb.close()


# --- tests ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP],
                         ids=["SIGTERM", "SIGINT", "SIGHUP"])
def test_signal_finishes_current_image_flushes_and_exits_0(tmp_path, cli_env, fake_cli_args, sig):
    # SIGHUP: a closed terminal or a dropped SSH session, which `run` treats as Ctrl-C too
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    make_backlog(inbox, range(12))
    w = Watcher(inbox, out, fake_cli_args, cli_env, tmp_path / "watch.log")
    wait_for(lambda: n_done(out) >= 2, w, 60, "two images done")
    code = w.stop(sig)
    assert code == 0, w.text()
    rows = ledger_rows(out)
    done = sorted(r for r, s in rows.items() if s == "done")
    assert len(done) >= 2
    images, cells, _ = read_reports(out)
    # reports flushed at exit: exactly what the ledger holds as done, each once
    assert sorted(images["image"]) == done
    assert set(cells["image"]) <= set(done)
    log = w.text()
    assert "processed" in log and "queued" in log and "errors" in log
    # a service's log shows it stopped on purpose, and that the reports are written
    assert re.search(rf"Stopped by {sig.name}: this session analysed \d+; .* holds {len(done)} "
                     r"processed, 0 errors, \d+ files? pending; the reports are written\.",
                     " ".join(log.split())), log
    assert not any(p.name.endswith(".tmp") for p in out.iterdir())

    # restarted with --once, it finishes the rest without repeating any
    result = subprocess.run([*CLI, "watch", str(inbox), "-o", str(out), *WATCH_ARGS, "--once",
                             *fake_cli_args], capture_output=True, text=True, env=cli_env,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    images, _, _ = read_reports(out)
    assert sorted(images["image"]) == sorted(inbox_files(inbox))


def test_a_watcher_started_with_sigint_ignored_keeps_it_ignored_and_stops_on_sigterm(
        tmp_path, cli_env, fake_cli_args):
    """`watch ... &` from a script (a shell without job control) starts with SIGINT ignored, as
    the shell sets it: a Ctrl-C meant for the script does not stop it, and SIGTERM does, as the
    README says."""
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    make_backlog(inbox, range(2))
    w = Watcher(inbox, out, fake_cli_args, cli_env, tmp_path / "watch.log",
                preexec=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    wait_for(lambda: n_done(out) >= 2, w, 60, "the backlog done")
    wait_for(w.ready, w, 60, "the start line")
    w.proc.send_signal(signal.SIGINT)
    try:
        w.proc.wait(3)
    except subprocess.TimeoutExpired:
        pass
    else:
        raise AssertionError(f"exited {w.proc.returncode}:\n{w.text()[-3000:]}")
    assert w.stop(signal.SIGTERM) == 0, w.text()
    assert "Stopped by SIGTERM" in " ".join(w.text().split())
    assert "SIGINT" not in w.text()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGHUP], ids=["SIGINT", "SIGHUP"])
def test_once_stopped_before_the_end_of_the_backlog_exits_128_plus_the_signal(
        tmp_path, cli_env, fake_cli_args, sig):
    # as `run` interrupted (130 for Ctrl-C): cron or a script must not take the backlog for done
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    make_backlog(inbox, range(40))
    w = Watcher(inbox, out, ["--once", *fake_cli_args], cli_env, tmp_path / "watch.log")
    wait_for(lambda: n_done(out) >= 1, w, 60, "an image done")
    code = w.stop(sig)
    assert code == 128 + sig, w.text()
    done = sorted(r for r, s in ledger_rows(out).items() if s == "done")
    images, _, _ = read_reports(out)
    assert sorted(images["image"]) == done and len(done) < 40  # flushed first
    assert f"Stopped by {signal.Signals(sig).name} before the end of the backlog" in w.text()


def test_kill_9_and_restart_exactly_once(tmp_path, cli_env, fake_cli_args):
    seed = int(os.environ.get("WBC_WATCH_TEST_SEED", random.randrange(1 << 30)))
    print(f"kill moments: WBC_WATCH_TEST_SEED={seed}")
    rng = random.Random(seed)
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    logs = tmp_path / "watch.log"
    first = make_backlog(inbox, range(44))
    kills = 0

    def start():
        return Watcher(inbox, out, fake_cli_args, cli_env, logs)

    def kill_after(w, at_least):
        """SIGKILL once `at_least` images are done (or, on a fast machine, all are: a kill
        while idle is one of the moments too), plus a random delay."""
        nonlocal kills
        wait_for(lambda: n_done(out) >= at_least or settled(out, inbox), w, 90,
                 f"{at_least} images done")
        time.sleep(rng.uniform(0, 0.4))
        w.kill9()
        kills += 1

    # 1: the backlog; killed a quarter of the way through
    w = start()
    kill_after(w, 8 + rng.randrange(4))

    # 2: restarted; files arrive while it works
    w = start()
    slow = write_slowly(inbox / "s2" / "slow scan.jpg", encode(field(100), ".jpg"), chunks=6,
                        pause=0.25)
    write_image(inbox / "s9 new sample" / "first.png", field(101))
    (inbox / "s2" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 8
                                               + b"\xff\xd9")
    shutil.copyfile(first[0], inbox / "s3" / "copy of img000.png")    # same bytes, other name
    first[1].write_bytes(first[1].read_bytes())                         # same bytes, same name
    write_image(first[2], field(102))                                  # changed content
    kill_after(w, n_done(out) + 6 + rng.randrange(6))

    # 3: restarted; more images arrive; killed twice more at random moments
    w = start()
    make_backlog(inbox, range(44, 52))
    kill_after(w, n_done(out) + 4 + rng.randrange(8))
    slow.join()
    w = start()
    time.sleep(rng.uniform(0.5, 2.5))  # anywhere: starting up, analysing, writing reports, idle
    w.kill9()
    kills += 1

    # 4: restarted; runs until every file is settled, then SIGTERM
    w = start()
    wait_for(lambda: settled(out, inbox), w, 120, "every file settled")
    assert w.stop(signal.SIGTERM) == 0, w.text()
    assert kills >= 4

    files = inbox_files(inbox)
    assert len(files) >= 56
    images, cells, summary = read_reports(out)

    # every file exactly once in images.csv; every cell once in cells.csv
    assert sorted(images["image"]) == sorted(files)
    assert not cells.duplicated(["image", "cell_id"]).any()
    by_image = images.set_index("image")
    assert by_image.loc["s2/corrupt.jpg", "status"] == "error"
    copy = "s3/copy of img000.png"
    assert by_image.loc[copy, "status"] == "duplicate"
    assert "duplicate of s1/img000.png" in by_image.loc[copy, "error"]
    assert by_image.loc["s2/slow scan.jpg", "status"] == "ok"
    assert by_image.loc["s9 new sample/first.png", "status"] == "ok"
    assert (summary["sample"] == "s9 new sample").any()
    ok = images[images["status"] == "ok"]
    assert len(ok) == len(files) - 2
    assert int(ok["wbc_count"].astype(int).sum()) == len(cells)

    # the same counts as a plain run over the same folder (the copy aside, which run counts)
    result = plain_run(inbox, tmp_path / "run", fake_cli_args, cli_env)
    assert result.returncode == 1, result.stderr  # the corrupt file
    r_images, r_cells, _ = read_reports(tmp_path / "run")
    r_images = r_images[r_images["image"] != copy]
    r_cells = r_cells[r_cells["image"] != copy]
    cols = ["image", "status", "wbc_count", "neutrophil", "lymphocyte", "monocyte", "eosinophil",
            "basophil", "needs_review_count", "width", "height"]
    w_images = images[images["image"] != copy]
    pd.testing.assert_frame_equal(w_images[cols].reset_index(drop=True).astype(str),
                                  r_images[cols].reset_index(drop=True).astype(str))
    pd.testing.assert_frame_equal(cells.reset_index(drop=True).astype(str),
                                  r_cells.reset_index(drop=True).astype(str))
    check_xlsx(out / "report.xlsx", len(files))
    # a kill between a write and its rename leaves a temporary file; the next start removes it
    assert not [p for p in out.rglob(".*") if is_leftover(p.name)]


def test_bad_usage_exits_2(tmp_path, cli_env, fake_cli_args):
    missing = subprocess.run([*CLI, "watch", str(tmp_path / "nope"), "-o", str(tmp_path / "o"),
                              "--once", *fake_cli_args], capture_output=True, text=True,
                             env=cli_env, timeout=60)
    assert missing.returncode == 2 and "not found" in missing.stderr

    inbox = tmp_path / "inbox"
    make_backlog(inbox, range(2))
    ran = plain_run(inbox, tmp_path / "out", fake_cli_args, cli_env)
    assert ran.returncode == 0, ran.stderr
    refused = subprocess.run([*CLI, "watch", str(inbox), "-o", str(tmp_path / "out"), "--once",
                              *fake_cli_args], capture_output=True, text=True, env=cli_env,
                             timeout=60)
    assert refused.returncode == 2 and "already holds results" in refused.stderr


@pytest.mark.slow
def test_soak_many_kills(tmp_path, cli_env, fake_cli_args):
    """200 images arriving in bursts, killed 12 times at random moments; every image once."""
    seed = int(os.environ.get("WBC_WATCH_TEST_SEED", random.randrange(1 << 30)))
    print(f"kill moments: WBC_WATCH_TEST_SEED={seed}")
    rng = random.Random(seed)
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    make_backlog(inbox, range(60))
    next_id = 60
    for round_ in range(12):
        w = Watcher(inbox, out, fake_cli_args, cli_env, tmp_path / "watch.log")
        burst = rng.randrange(5, 15)
        make_backlog(inbox, range(next_id, next_id + burst), samples=("s1", "s2", "s3", "s4", "s5"))
        next_id += burst
        time.sleep(rng.uniform(0.3, 4.0))
        w.kill9()
    w = Watcher(inbox, out, fake_cli_args, cli_env, tmp_path / "watch.log")
    wait_for(lambda: settled(out, inbox), w, 600, "every file settled")
    assert w.stop() == 0
    images, cells, _ = read_reports(out)
    assert sorted(images["image"]) == sorted(inbox_files(inbox))
    assert not cells.duplicated(["image", "cell_id"]).any()
    result = plain_run(inbox, tmp_path / "run", fake_cli_args, cli_env)
    assert result.returncode == 0, result.stderr
    r_images, r_cells, _ = read_reports(tmp_path / "run")
    assert len(r_cells) == len(cells)
    assert list(r_images["wbc_count"]) == list(images["wbc_count"])


def remove_tree(path: Path, seconds: float = 10.0) -> None:
    """`rm -rf path` while a watcher may still write into it: shutil.rmtree fails with
    "Directory not empty" when a file (a report rebuilt, its temporary twin) appears between its
    listing and its rmdir, or with FileNotFoundError when one it listed is renamed away; tried
    again until the folder is gone."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            shutil.rmtree(path)
            return
        except OSError:
            if not path.exists():
                return
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


@pytest.mark.parametrize("removed", ["ledger", "out", "wal", "ledger, then SIGTERM"])
def test_a_ledger_deleted_under_a_running_watcher_is_written_back_and_the_watcher_stops(
        tmp_path, cli_env, fake_cli_args, removed):
    # a review: with OUT (or its ledger) deleted, the watcher went on recording into a file no
    # longer on disk, said at SIGTERM that its reports were written, and the next start was
    # refused (reports without a ledger): every result since the deletion was lost
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    make_backlog(inbox, range(3))
    w = Watcher(inbox, out, fake_cli_args, cli_env, tmp_path / "watch.log")
    wait_for(lambda: n_done(out) == 3, w, 60, "three images done")
    wait_for(w.ready, w, 60, "the start line")
    if removed == "out":
        remove_tree(out)
    else:  # the write-ahead log alone: a later kill had left a ledger without its rows
        for p in out.glob("ledger.sqlite-*" if removed == "wal" else "ledger.sqlite*"):
            p.unlink()
    if removed.endswith("SIGTERM"):  # stopped at once: the stop, too, must notice it
        w.proc.send_signal(signal.SIGTERM)
    else:
        make_backlog(inbox, [3])
    code = w.proc.wait(60)
    w.log.close()
    log = " ".join(w.text().split())
    assert code == 1, log
    lost = {"wal": f"its ledger's write-ahead log {out / 'ledger.sqlite-wal'} was deleted or "
                   "replaced",
            "out": f"its output folder {out} was removed or moved"}.get(
        removed, f"its ledger {out / 'ledger.sqlite'} was deleted or replaced")
    assert (f"Stopped: {lost} while the watcher ran; the ledger was written back from the "
            "watcher's open copy") in log
    assert ("drawings that went with the old folder are not made again" in log) == (removed == "out")
    assert sum(s == "done" for s in ledger_rows(out).values()) >= 3  # every result recorded
    # the next start resumes from it: each image once, none analysed again
    result = run_watch_once(inbox, out, fake_cli_args, cli_env)
    assert result.returncode == 0, result.stderr
    images, _, _ = read_reports(out)
    assert sorted(images["image"]) == sorted(inbox_files(inbox))
    assert re.search(r"this session analysed [01],", result.stderr), result.stderr


def run_watch_once(inbox: Path, out: Path, fake_args, env, *extra) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, "watch", str(inbox), "-o", str(out), *WATCH_ARGS, "--once",
                           *extra, *fake_args], capture_output=True, text=True, env=env,
                          timeout=120)


def test_an_image_whose_overlay_could_not_be_written_is_analysed_at_the_next_start(
        tmp_path, cli_env, fake_cli_args):
    # a folder where the overlay goes stands for OUT's disk full; once it is fixed, the next
    # start (cron's next --once) analyses the image again, without anyone touching it
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    make_backlog(inbox, range(1))
    assert run_watch_once(inbox, out, fake_cli_args, cli_env).returncode == 0
    blocker = out / "overlays" / "s2" / "img001.png.png"
    blocker.mkdir(parents=True)
    make_backlog(inbox, range(1, 2))
    first = run_watch_once(inbox, out, fake_cli_args, cli_env)
    assert first.returncode == 1, first.stderr
    assert "s2/img001.png: cannot write the overlay or mask" in first.stderr
    assert ledger_rows(out) == {"s1/img000.png": "done", "s2/img001.png": "error"}
    blocker.rmdir()
    second = run_watch_once(inbox, out, fake_cli_args, cli_env)
    assert second.returncode == 0, second.stderr
    assert ledger_rows(out) == {"s1/img000.png": "done", "s2/img001.png": "done"}
    images, _, _ = read_reports(out)
    assert list(images["status"]) == ["ok", "ok"] and blocker.is_file()


def test_a_restart_with_fewer_report_writers_removes_their_stale_reports(
        tmp_path, cli_env, fake_cli_args):
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    make_backlog(inbox, range(1))
    assert run_watch_once(inbox, out, fake_cli_args, cli_env).returncode == 0
    assert (out / "report.xlsx").is_file() and (out / "images.csv").is_file()
    make_backlog(inbox, range(1, 2))
    again = run_watch_once(inbox, out, fake_cli_args, cli_env, "--report", "csv")
    assert again.returncode == 0, again.stderr
    images, _, _ = read_reports(out)
    assert len(images) == 2
    assert not (out / "report.xlsx").exists()  # it would have stayed at one image, for good
    notes = out / "notes.txt"
    notes.write_text("a lab's own file")
    assert run_watch_once(inbox, out, fake_cli_args, cli_env, "--report", "xlsx").returncode == 0
    assert not (out / "images.csv").exists() and check_xlsx(out / "report.xlsx", 2) is None
    assert notes.is_file() and (out / "ledger.sqlite").is_file()


def test_an_inbox_inside_out_keeps_a_scanner_s_upload_in_progress(tmp_path, cli_env, fake_cli_args):
    # the start removes the temporary files of its own writes a kill left in OUT, and only those:
    # a hidden .*.tmp in the inbox is a scanner's upload in progress
    out = tmp_path / "out"
    inbox = out / "inbox"
    make_backlog(inbox, range(1))
    assert run_watch_once(inbox, out, fake_cli_args, cli_env).returncode == 0
    ours = [out / ".cells.csv.k3j9ab12.tmp.csv", out / "overlays" / "s1" / ".img000.png.png.x1y2z3w4.tmp.png"]
    for path in ours:
        path.write_bytes(b"half")
    upload = inbox / "s2" / ".img007.png.Xa81.tmp"
    upload.parent.mkdir()
    upload.write_bytes(b"half a scan")
    assert run_watch_once(inbox, out, fake_cli_args, cli_env).returncode == 0
    assert upload.read_bytes() == b"half a scan" and not any(p.exists() for p in ours)


def test_an_inbox_among_out_s_drawn_images_is_refused(tmp_path, cli_env, fake_cli_args):
    # overlays written into the inbox would be analysed, their overlays too, and so on
    out = tmp_path / "out"
    make_backlog(out / "overlays", range(1))
    refused = run_watch_once(out / "overlays", out, fake_cli_args, cli_env, "--overwrite")
    assert refused.returncode == 2, refused.stderr
    assert "the input folder lies in the output folder's overlays/" in refused.stderr
    assert not (out / "ledger.sqlite").exists()


@pytest.mark.parametrize("option", ["--settle", "--poll"])
def test_a_wait_longer_than_a_day_is_a_usage_error(tmp_path, cli_env, fake_cli_args, option):
    # it crashed in Event.wait with OverflowError
    inbox = tmp_path / "inbox"
    make_backlog(inbox, range(1))
    result = run_watch_once(inbox, tmp_path / "out", fake_cli_args, cli_env, option, "1e300")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "86400" in result.stderr


RAISING_WRITER = """\
from wbc_batch.hookspecs import hookimpl


class Broken:
    name = "broken"

    def write(self, out_dir, tables):
        raise RuntimeError("no LIS licence")


@hookimpl
def wbc_register_report_writers():
    return [Broken()]
"""


def test_once_with_a_failing_report_writer_exits_1_and_says_the_next_start_writes_them(
        tmp_path, cli_env, fake_cli_args):
    # before: "the reports are written again later", but --once has no later
    site = tmp_path / "site"
    dist = site / "wbc_batch_test_broken-0.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: wbc-batch-test-broken\n"
                                   "Version: 0.0\n")
    (dist / "entry_points.txt").write_text("[wbc_batch]\nbroken = wbc_test_broken\n")
    (site / "wbc_test_broken.py").write_text(RAISING_WRITER)
    env = dict(cli_env, PYTHONPATH=os.pathsep.join((str(site), cli_env["PYTHONPATH"])))
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    make_backlog(inbox, range(1))
    res = run_watch_once(inbox, out, fake_cli_args, env, "--report", "csv", "--report", "broken")
    assert res.returncode == 1, res.stderr
    assert ("report writer 'broken' failed: RuntimeError: no LIS licence; every result is kept "
            "in the ledger, and the next start writes the reports again (exit code 1)") in res.stderr
    said = [line for line in res.stderr.splitlines() if "'broken' failed" in line]
    assert said[-1].endswith("the next start writes the reports again (exit code 1)")  # the last
    assert json.loads((out / "run.json").read_text())["report_errors"] == [
        "report writer 'broken' failed: RuntimeError: no LIS licence"]
