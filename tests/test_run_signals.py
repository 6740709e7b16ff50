"""`wbc-batch run` stopped by a signal: SIGTERM as Ctrl-C, and reports never cut in half.

In-process tests send real signals to this process (pytest runs tests in its main thread); the
end-to-end test stops a real `wbc-batch run` subprocess with SIGTERM.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pandas as pd
import pytest

from wbc_batch import interrupts

from conftest import draw_field, write_image
from test_watch import CLI, cli_env, fake_site  # noqa: F401 - fixtures

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGTERM") or os.name != "posix",
                                reason="POSIX signals")


def test_sigterm_is_an_interrupt_inside_the_block_and_kills_as_before_outside():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        with interrupts.terminate_as_interrupt() as received:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # interrupted by the handler long before this ends
    assert received == [signal.SIGTERM]
    assert signal.getsignal(signal.SIGTERM) == before


def test_a_signal_during_deferred_work_is_delivered_when_it_ends(capfd):
    steps = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts.deferred():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            steps.append("finished")  # the work is not cut short
    assert steps == ["finished"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    # said at once (before: a first signal while a slow writer ran seemed to do nothing)
    assert capfd.readouterr().err == ("\nwbc-batch: SIGINT received while the reports are written: "
                                      "that is finished first; Ctrl-C (or SIGTERM) stops at "
                                      "once\n")
    with pytest.raises(KeyboardInterrupt), interrupts.terminate_as_interrupt():
        with interrupts.deferred():  # SIGHUP, held, then delivered as run turns it into a stop
            os.kill(os.getpid(), getattr(signal, "SIGHUP", signal.SIGINT))
            time.sleep(0.05)
            os.kill(os.getpid(), getattr(signal, "SIGHUP", signal.SIGINT))  # held, said once
            time.sleep(0.05)
    if hasattr(signal, "SIGHUP"):  # a SIGTERM after SIGHUPs alone does not stop at once
        assert capfd.readouterr().err == ("\nwbc-batch: SIGHUP received while the reports are "
                                          "written: that is finished first; Ctrl-C stops at once\n")


def test_a_second_signal_run_inside_the_first_ones_handler_stops_at_once(monkeypatch):
    # Python may run a handler inside another's: here the SIGTERM comes while the SIGINT's line
    # is written. Before: that SIGTERM, not yet seeing the SIGINT recorded, was held as a first
    # signal, so a hung writer held both for good (a CI run timed out on it)
    said = []

    def say(signum, doing):
        said.append(signum)
        if len(said) == 1:  # as Python runs it, inside the first handler
            signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)

    monkeypatch.setattr(interrupts, "_say_held", say)
    stopped = None
    with interrupts.terminate_as_interrupt():  # a held SIGTERM is delivered as an interrupt
        try:
            with interrupts.deferred():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.5)  # cut short by the stop
        except KeyboardInterrupt as exc:
            stopped = exc
    assert isinstance(stopped, interrupts.StopNow) and stopped.signum == signal.SIGTERM
    assert said == [signal.SIGINT]


class _NestedRecord(list):
    """`interrupts._received`, whose first append runs `then()`: a second signal's handler, as
    Python runs it inside the first one's, after the first recorded its signal."""

    def __init__(self, then):
        super().__init__()
        self.then = then

    def append(self, signum):
        super().append(signum)
        if len(self) == 1:
            self.then()


@pytest.mark.parametrize("second", ["SIGTERM", "SIGHUP"])
def test_a_signal_inside_the_first_ones_handler_while_a_run_is_analysed(monkeypatch, second):
    # a SIGTERM inside a SIGINT's handler stops at once; a SIGHUP there lets the first stop the
    # run (a first form of the fix lost the first signal's interrupt: no KeyboardInterrupt)
    if not hasattr(signal, second):
        pytest.skip(f"no {second}")
    signum = getattr(signal, second)
    monkeypatch.setattr(interrupts, "_received", _NestedRecord(
        lambda: signal.getsignal(signum)(signum, None)))
    stopped = None
    with interrupts.terminate_as_interrupt() as received:
        try:
            signal.getsignal(signal.SIGINT)(signal.SIGINT, None)
        except KeyboardInterrupt as exc:
            stopped = exc
        assert received == [signal.SIGINT, signum]
    if second == "SIGTERM":
        assert isinstance(stopped, interrupts.StopNow) and stopped.signum == signal.SIGTERM
    else:
        assert type(stopped) is KeyboardInterrupt


def test_a_sighup_after_a_stop_at_once_changes_nothing():
    # the record is kept after a stop at once: a SIGHUP then (a terminal closed after Ctrl-C
    # twice) must not stop the stopping again, as it did not before
    hup = getattr(signal, "SIGHUP", None)
    if hup is None:
        pytest.skip("no SIGHUP")
    with interrupts.terminate_as_interrupt():
        handler = signal.getsignal(signal.SIGINT)
        with pytest.raises(KeyboardInterrupt) as first:
            handler(signal.SIGINT, None)
        assert type(first.value) is KeyboardInterrupt
        with pytest.raises(interrupts.StopNow):
            handler(signal.SIGTERM, None)
        _does_nothing(handler, hup)
    stops = []
    with interrupts.stop_requests() as requests:
        requests.attach(SimpleTarget(stops))
        requests._handle(signal.SIGINT, None)
        with pytest.raises(interrupts.StopNow):
            requests._handle(signal.SIGTERM, None)
        _does_nothing(requests._handle, hup)
    assert stops == [signal.SIGINT]


def _does_nothing(handler, signum):
    """Call a signal handler that must neither stop nor interrupt (failing the test, where a
    KeyboardInterrupt would end the whole pytest session)."""
    try:
        handler(signum, None)
    except KeyboardInterrupt as exc:
        pytest.fail(f"{signal.Signals(signum).name} raised {type(exc).__name__}")


def test_a_signal_inside_the_first_ones_handler_while_watching(monkeypatch):
    stops = []
    monkeypatch.setattr(interrupts, "_received", _NestedRecord(
        lambda: requests._handle(signal.SIGTERM, None)))
    with interrupts.stop_requests() as requests:
        requests.attach(SimpleTarget(stops))
        with pytest.raises(interrupts.StopNow) as stop:
            requests._handle(signal.SIGINT, None)
    assert stop.value.signum == signal.SIGTERM


class SimpleTarget:
    def __init__(self, stops):
        self.stops = stops

    def stop(self, signum):
        self.stops.append(signum)


def test_a_signal_recorded_first_stops_at_once_when_another_comes_inside_its_handler():
    # the other order: the SIGTERM's handler ran first, inside the SIGINT's before it recorded
    # anything; the SIGINT then finds the SIGTERM recorded and asks twice
    assert interrupts._asks_twice([signal.SIGTERM, signal.SIGINT])
    assert not interrupts._asks_twice([signal.SIGTERM])
    # the run already stopped by a SIGINT (`deferred(stopping=True)`): a first one held asks too
    assert interrupts._asks_twice([signal.SIGTERM], [signal.SIGINT], stopping=True)
    assert not interrupts._asks_twice([signal.SIGTERM], [signal.SIGINT])
    hup = getattr(signal, "SIGHUP", None)
    if hup is not None:  # systemd's pair, and a closing terminal's, never do
        assert not interrupts._asks_twice([hup, signal.SIGTERM])
        assert not interrupts._asks_twice([hup, hup], [hup], stopping=True)
        assert interrupts._asks_twice([hup, signal.SIGTERM, signal.SIGTERM])


SLOW_PLUGIN = """\
import sys, time
from wbc_batch.hookspecs import hookimpl


@hookimpl
def wbc_image_start(image, index, total):
    if index == 1:  # the first image is done; hold the second until a signal comes
        print("READY", file=sys.stderr, flush=True)
        for _ in range(1200):  # in slices: a signal the kernel hands to another thread (the
            time.sleep(0.1)    # readers') wakes no sleep; its handler runs after the slice
"""


def plugin_env(tmp_path, cli_env, source: str) -> dict:
    """`cli_env` with a plugin installed (an entry point named slow) whose module is `source`."""
    site = tmp_path / "site"
    dist = site / "wbc_batch_test_slow-0.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: wbc-batch-test-slow\nVersion: 0.0\n")
    (dist / "entry_points.txt").write_text("[wbc_batch]\nslow = wbc_test_slow\n")
    (site / "wbc_test_slow.py").write_text(source)
    return dict(cli_env, PYTHONPATH=os.pathsep.join((str(site), cli_env["PYTHONPATH"])))


@pytest.mark.parametrize("signum", [signal.SIGTERM, getattr(signal, "SIGHUP", signal.SIGTERM)])
def test_a_run_stopped_by_sigterm_writes_the_reports_of_the_images_it_finished(tmp_path, cli_env,
                                                                              signum):
    # SIGHUP (a closed terminal, a dropped SSH session) ended the run at once, without reports
    env = plugin_env(tmp_path, cli_env, SLOW_PLUGIN)
    inbox, out = tmp_path / "in", tmp_path / "out"
    for i in range(3):
        write_image(inbox / f"f{i}.png", draw_field(160, 120, [(80, 60, 18 + i)]))
    (inbox / "f0.png").write_bytes(b"not an image")  # finished, as a failure
    proc = subprocess.Popen([*CLI, "run", str(inbox), "-o", str(out), "--backend", "fake"],
                            stderr=subprocess.PIPE, env=env)
    try:
        assert _said(proc, b"READY"), "the plugin never held an image"
        proc.send_signal(signum)
        rest = proc.communicate(timeout=60)[1].decode()  # a child that does not stop fails at
        code = proc.returncode                           # 60 s, not at its plugin's 120 s
    finally:
        proc.kill()
    assert code == 128 + signum, rest
    assert "Interrupted: 1 of 3 images finished; reports written for the images" in rest
    assert "For all of them, run again with --overwrite, which analyses every image again" in rest
    assert ("To be able to resume a long batch next time, run it as `wbc-batch watch INPUT -o "
            "NEW_OUT --once`") in " ".join(rest.split())
    # the closing lines of the images finished, as a whole run has them, but no "Done:"
    assert "  failed: f0.png: not an image file" in rest and "Done:" not in rest
    # before: the last line was a failed image's or the cells', as in a complete run
    assert rest.strip().splitlines()[-1] == (f"Stopped by {signal.Signals(signum).name}: 1 of 3 "
                                             f"images finished; exit code {128 + signum}.")
    info = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert info["interrupted"] is True and info["counts"]["images"] == 1
    assert list(pd.read_csv(out / "images.csv")["image"]) == ["f0.png"]
    assert (out / "report.xlsx").is_file()


STOP_THEN_AGAIN_AT_EXIT = """\
import atexit, os, signal, sys, time
from wbc_batch.hookspecs import hookimpl


def again():  # as Python shuts down: the same signal, then a shutdown that would take long
    os.kill(os.getpid(), signal.{name})
    time.sleep(60)
    print("SHUTDOWN WAITED", file=sys.stderr, flush=True)


@hookimpl
def wbc_image_start(image, index, total):
    if index == 1:  # stopped after the first image
        atexit.register(again)
        os.kill(os.getpid(), signal.{name})
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_again_after_a_stopped_run_exits_with_the_code_it_gave(tmp_path, cli_env, signum):
    # before: the handlers were back to the default ones as Python shut down, so a SIGTERM sent
    # again killed the process (-15, where the last line said "exit code 143") and a Ctrl-C
    # printed "Exception ignored in atexit callback ... KeyboardInterrupt"; asked twice, it
    # ends the process at once, not after the shutdown's wait
    env = plugin_env(tmp_path, cli_env, STOP_THEN_AGAIN_AT_EXIT.format(name=signal.Signals(signum).name))
    inbox, out = tmp_path / "in", tmp_path / "out"
    for i in range(3):
        write_image(inbox / f"f{i}.png", draw_field(160, 120, [(80, 60, 18 + i)]))
    proc = subprocess.run([sys.executable, "-m", "wbc_batch", "run", str(inbox), "-o", str(out),
                           "--backend", "fake"],  # the console script's entry point
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 128 + signum, proc.stderr
    assert f"exit code {128 + signum}." in proc.stderr
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr
    assert "SHUTDOWN WAITED" not in proc.stderr
    assert json.loads((out / "run.json").read_text(encoding="utf-8"))["interrupted"] is True


SLOW_WRITER = """\
import os, sys, time
from pathlib import Path
from wbc_batch.hookspecs import hookimpl


class Slow:
    name = "slow"

    def write(self, out_dir, tables):
        (out_dir / "slow.txt").write_text("half a report")
        print("WRITING", file=sys.stderr, flush=True)
        go = Path(os.environ["WBC_TEST_GO"])
        while not go.exists():  # a hung writer, until the test says go
            time.sleep(0.02)
        return [out_dir / "slow.txt"]


@hookimpl
def wbc_register_report_writers():
    return [Slow()]
"""


def _said(proc, marker: bytes, seconds: float = 60) -> bool:
    """Whether `proc`'s stderr gives a line holding `marker` within `seconds` (read in a thread:
    a child that hangs without saying it fails the test, not hangs it)."""
    seen = threading.Event()

    def read():
        for line in proc.stderr:
            if marker in line:
                seen.set()
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(seconds)
    return seen.is_set()


def _while_writing(tmp_path, cli_env, args, *signals, go=False, together=False):
    """Start `wbc-batch ARGS` with the slow writer, send `signals` once it is writing, each after
    the first once it says the first is held (as a person presses Ctrl-C again after reading
    that line), or all at once with `together`, then let it go on, with `go`; returns (exit
    code, the rest of its stderr). Its stdout goes to tmp_path/stdout.txt."""
    env = dict(plugin_env(tmp_path, cli_env, SLOW_WRITER), WBC_TEST_GO=str(tmp_path / "go"))
    with open(tmp_path / "stdout.txt", "wb") as stdout:
        proc = subprocess.Popen([*CLI, *map(str, args)], stdout=stdout, stderr=subprocess.PIPE,
                                env=env)
    try:
        assert _said(proc, b"WRITING"), "the slow writer never started"
        for i, signum in enumerate(signals):
            proc.send_signal(signum)
            if i == 0 and len(signals) > 1 and not together:
                assert _said(proc, b"received while"), "the first signal was not said held"
        if go:
            (tmp_path / "go").touch()  # after the signals: they are delivered before it is seen
        code = proc.wait(60)  # without the fix: TimeoutExpired, not a hung test
        return code, proc.stderr.read().decode()
    finally:
        proc.kill()


def _images(folder, n=2):
    for i in range(n):
        write_image(folder / f"f{i}.png", draw_field(160, 120, [(80, 60, 18 + i)]))
    return folder


def _staged_left(out):
    from wbc_batch.output_folder import STAGE_PREFIX

    return [p.name for p in out.iterdir() if p.name.startswith(STAGE_PREFIX)]


@pytest.mark.parametrize("together", [False, True])
def test_a_second_signal_while_a_writer_hangs_stops_run_at_once_without_reports(tmp_path,
                                                                             cli_env, together):
    # before: every signal waited for the writers, so a hung writer could not be stopped; and
    # two sent together could each be taken for the first (a CI run timed out on it)
    inbox, out = _images(tmp_path / "in"), tmp_path / "out"
    code, err = _while_writing(tmp_path, cli_env, ["run", inbox, "-o", out, "--backend", "fake",
                                                   "--report", "csv", "--report", "slow"],
                               signal.SIGINT, signal.SIGTERM, together=together)
    # together, Python may run either handler first: the code is the second one's
    assert code in ((128 + signal.SIGINT, 128 + signal.SIGTERM) if together
                    else (128 + signal.SIGTERM,)), err
    assert "Stopped at once (second signal): this run's reports were not written" in err
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["overlays"]
    assert _staged_left(out) == []
    again = subprocess.run([*CLI, "run", str(inbox), "-o", str(out), "--backend", "fake",
                            "--overwrite"], capture_output=True, env=cli_env, timeout=120)
    assert again.returncode == 0, again.stderr
    assert json.loads((out / "run.json").read_text())["counts"]["images"] == 2


def test_a_signal_after_the_last_image_lets_the_reports_finish_and_says_so(tmp_path, cli_env):
    # before: "Interrupted ... (run.json: "interrupted": true)" beside a run.json saying false
    inbox, out = _images(tmp_path / "in"), tmp_path / "out"
    code, err = _while_writing(tmp_path, cli_env, ["run", inbox, "-o", out, "--backend", "fake",
                                                   "--report", "csv", "--report", "slow"],
                               signal.SIGTERM, go=True)
    assert code == 128 + signal.SIGTERM, err
    info = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert info["interrupted"] is False and info["counts"]["images"] == 2
    assert ('SIGTERM came after the last image: every image was analysed and the reports are '
            'written (run.json: "interrupted": false).') in err
    assert "Interrupted" not in err
    assert "Done: 2 image(s), 2 ok, 0 failed" in err  # a whole run: its whole closing lines
    assert (out / "slow.txt").is_file() and len(pd.read_csv(out / "images.csv")) == 2


def test_a_signal_after_the_last_image_of_an_evaluation_prints_its_accuracy(tmp_path, cli_env):
    inbox, out = _images(tmp_path / "in"), tmp_path / "out"
    truth = tmp_path / "truth.csv"
    truth.write_text("image,class\nf0.png,neutrophil\nf1.png,lymphocyte\n")
    code, err = _while_writing(tmp_path, cli_env, ["evaluate", inbox, "--truth", truth, "-o", out,
                                                   "--backend", "fake", "--report", "csv",
                                                   "--report", "slow"],
                               signal.SIGTERM, go=True)
    assert code == 128 + signal.SIGTERM, err
    assert "came after the last image" in err and "Done: 2 image(s)" in err
    # a whole split was scored: its accuracy is printed, as at the end of any evaluation
    assert "Accuracy on 2 image(s) with ground truth" in (tmp_path / "stdout.txt").read_text()


def test_reports_that_cannot_be_written_after_a_stop_are_said_so(pm, make_config, tmp_path,
                                                                 monkeypatch):
    # "Interrupted before any image was analysed" was said, above the failed images' lines
    from wbc_batch.cli import _interrupted
    from wbc_batch.pipeline import Runner

    inbox = _images(tmp_path / "in", 3)
    (inbox / "f0.png").write_bytes(b"not an image")
    runner = Runner(make_config(inbox, tmp_path / "out"), pm)
    try:
        runner.run()
        assert runner.last_run_info["counts"]["images"] == 3
        calls = []

        class Stop:
            @staticmethod
            def wbc_image_start(image, index, total):
                calls.append(index)
                if index == 2:
                    raise KeyboardInterrupt

        def no_room(*args, **kwargs):  # OUT's disk full: no staging folder for the reports
            raise OSError(28, "No space left on device")

        import wbc_batch.pipeline as pipeline
        from wbc_batch.hookspecs import hookimpl
        Stop.wbc_image_start = hookimpl(Stop.wbc_image_start)
        pm.register(Stop, name="stop")
        monkeypatch.setattr(pipeline.tempfile, "mkdtemp", no_room)
        with pytest.raises(KeyboardInterrupt):
            runner.run()
    finally:
        runner.close()
    # the second run's outcome, with none of the first run's facts
    assert runner.last_outcome.run_info["counts"]["images"] == 2
    assert not runner.reports_published
    assert [r.image for r in runner.last_outcome.results] == ["f0.png", "f1.png"]
    said = _interrupted(runner, "SIGINT")
    assert "Interrupted: 2 image(s) finished, but the reports could not be written" in said
    assert "before any image" not in said


def test_a_second_signal_while_a_writer_hangs_stops_watch_at_once(tmp_path, cli_env):
    # before: watch promised that a second Ctrl-C or SIGTERM stops at once, but held both
    inbox, out = _images(tmp_path / "in"), tmp_path / "out"
    code, err = _while_writing(tmp_path, cli_env,
                               ["watch", inbox, "-o", out, "--backend", "fake", "--once",
                                "--settle", "0", "--report", "csv", "--report", "slow"],
                               signal.SIGINT, signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, err  # the second signal's, as `run` exits (was 130)
    assert "Stopped at once (second signal)" in err
    assert not (out / "run.json").exists() and not (out / "cells.csv").exists()
    again = subprocess.run([*CLI, "watch", str(inbox), "-o", str(out), "--backend", "fake",
                            "--once"], capture_output=True, env=cli_env, timeout=120)
    assert again.returncode == 0, again.stderr
    assert len(pd.read_csv(out / "images.csv")) == 2 and _staged_left(out) == []


def test_a_signal_while_the_tables_are_built_still_leaves_every_report(
        invoke, image_folder, tmp_path, fake_cli_args, monkeypatch):
    # after --overwrite has removed the earlier reports, a SIGTERM while the tables of the last
    # image were built left OUT with overlays alone
    import wbc_batch.reports as reports

    out = tmp_path / "out"
    assert invoke("run", image_folder, "-o", out, *fake_cli_args).exit_code == 0
    real = reports.build_tables

    def build_tables(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(reports, "build_tables", build_tables)
    res = invoke("run", image_folder, "-o", out, "--overwrite", *fake_cli_args)
    assert res.exit_code == 128 + signal.SIGTERM
    for name in ("cells.csv", "images.csv", "summary.csv", "report.xlsx", "run.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "run.json").read_text())["counts"]["images"] == 4


def test_a_signal_the_parent_ignores_stays_ignored():
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)  # `cmd &` in a shell without job control
    try:
        with interrupts.terminate_as_interrupt() as received, interrupts.deferred():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
        assert received == [] and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, old)


def test_ctrl_c_while_the_models_load_exits_130_and_writes_nothing(invoke, image_folder, tmp_path,
                                                                  fake_cli_args, monkeypatch):
    import wbc_batch.pipeline as pipeline

    def loading(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline.Runner, "__init__", loading)
    res = invoke("run", image_folder, "-o", tmp_path / "out", *fake_cli_args)
    assert res.exit_code == 130 and "Interrupted before any image was analysed" in res.output
    assert not (tmp_path / "out").exists()


def test_a_closed_stderr_does_not_fail_a_run_whose_reports_are_written(monkeypatch):
    import click

    from wbc_batch.cli import echo_err

    def closed(*args, **kwargs):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(click, "echo", closed)
    echo_err("Done: 8 image(s)")  # `wbc-batch run ... 2>&1 | head` made this exit code 1


def test_a_second_signal_does_not_cut_the_first_ones_reports():
    # systemd or a closing terminal sends SIGTERM and SIGHUP together: the second one raised a
    # second KeyboardInterrupt while the first was unwinding to write the reports
    with interrupts.terminate_as_interrupt() as received:
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
        try:
            os.kill(os.getpid(), getattr(signal, "SIGHUP", signal.SIGTERM))  # recorded, not raised
            time.sleep(0.05)
        except KeyboardInterrupt:
            pytest.fail("the second signal raised again, cutting the first one's report writing")
    assert received[0] == signal.SIGTERM and len(received) == 2


def test_a_second_signal_during_deferred_work_stops_at_once_and_sighup_never_does():
    steps = []
    with pytest.raises(interrupts.StopNow) as stopped:
        with interrupts.deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            steps.append("held")
            os.kill(os.getpid(), getattr(signal, "SIGHUP", signal.SIGTERM))
            time.sleep(0.05)
            steps.append("a SIGHUP after it: held")
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # cut short
            steps.append("finished")
    assert steps == ["held", "a SIGHUP after it: held"] and stopped.value.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_sigterm_sent_again_while_the_reports_are_written_stops_at_once():
    # `deferred` sees only the signals held in it: the first SIGTERM, which stopped the
    # analysis, is known from `terminate_as_interrupt`'s record
    steps = []
    with interrupts.terminate_as_interrupt():
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
        with pytest.raises(interrupts.StopNow) as stopped:
            with interrupts.deferred(stopping=True):
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)  # a hung report writer: cut short
                steps.append("finished")
    assert steps == [] and stopped.value.signum == signal.SIGTERM


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGHUP here")
def test_a_sigterm_after_a_sighup_lets_the_reports_finish_and_ctrl_c_still_stops_at_once():
    # a dropped SSH session (SIGHUP), then logind's SIGTERM: before, the SIGTERM stopped the run
    # at once and OUT was left without any report of hours of work
    steps = []
    with interrupts.terminate_as_interrupt() as received:
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(1)
        with interrupts.deferred(stopping=True):  # the reports of the finished images
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            steps.append("reports written")
        with pytest.raises(interrupts.StopNow):
            with interrupts.deferred(stopping=True):
                os.kill(os.getpid(), signal.SIGINT)  # a person asking again: at once
                time.sleep(5)
                steps.append("finished")
    assert steps == ["reports written"] and received[:2] == [signal.SIGHUP, signal.SIGTERM]


def test_after_a_first_stop_the_next_signal_stops_deferred_work_at_once_but_not_publishing():
    steps = []
    with pytest.raises(interrupts.StopNow):
        with interrupts.deferred(stopping=True), interrupts.deferred():  # the outer one decides
            with interrupts.shielded():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)
                steps.append("published")  # the files being put in place are all put
            steps.append("after")
    assert steps == ["published"]


def test_a_watcher_in_another_thread_leaves_the_main_threads_signals_be():
    import threading

    with interrupts.terminate_as_interrupt():
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)

        def watcher():
            with interrupts.stop_requests():
                pass

        thread = threading.Thread(target=watcher)
        thread.start()
        thread.join()
        assert interrupts._received == [signal.SIGTERM]  # before: cleared by the thread's exit
    assert interrupts._received == []


LATE_SIGNALS = """\
import os, signal, sys
import wbc_batch.cli as cli

closing = cli.summarise


def summarise(*args, **kwargs):  # the run is finished, its reports written: the user presses Ctrl-C
    for _ in range({presses}):
        os.kill(os.getpid(), signal.SIGINT)
    return closing(*args, **kwargs)


cli.summarise = summarise
from wbc_batch.__main__ import main  # the console script's entry point, as `wbc-batch` runs
main()
"""


@pytest.mark.parametrize("presses", [1, 2])
def test_a_ctrl_c_after_a_run_finished_changes_nothing_and_twice_ends_it_at_once(tmp_path, cli_env,
                                                                                 presses):
    # a Ctrl-C just after "Done" printed a traceback, or made a complete run exit 130
    inbox, out = tmp_path / "in", tmp_path / "out"
    write_image(inbox / "f0.png", draw_field(160, 120, [(80, 60, 18)]))
    proc = subprocess.run([__import__("sys").executable, "-c", LATE_SIGNALS.format(presses=presses),
                           "run", str(inbox), "-o", str(out), "--backend", "fake"],
                          capture_output=True, text=True, env=cli_env, timeout=120)
    assert "Traceback" not in proc.stderr and "KeyboardInterrupt" not in proc.stderr, proc.stderr
    info = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert info["interrupted"] is False and (out / "report.xlsx").is_file()
    if presses == 1:
        assert proc.returncode == 0 and "Done: 1 image(s), 1 ok" in proc.stderr
    else:  # asked twice: at once, without the closing lines
        assert proc.returncode == 130 and "Done:" not in proc.stderr


def test_calm_to_the_end_leaves_an_embedding_programs_handlers_alone():
    before = signal.getsignal(signal.SIGINT)
    assert interrupts.owns_process is False  # only the console script sets it
    interrupts.calm_to_the_end()
    assert signal.getsignal(signal.SIGINT) is before
