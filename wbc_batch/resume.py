"""Whether a watch ledger in OUT may be resumed, and opening it (`open_ledger`).

A ledger holds results: it is resumed only for the same inbox and for results the current models
and analysis parameters would give, so that a report never mixes results of two models or two
settings. What the results depend on is the ledger's fingerprint (`fingerprint`); ledgers
written by earlier versions, whose fingerprints hashed more or fewer things, are recognised
(`same_results`, `LATER_SETTINGS`), so an upgrade that does not change how images are analysed
never forces a lab to analyse its whole inbox again. One that does (new weights, a new
analysis setting whose default changes results, such as `small_cell_frac`, or a change to the
analysis itself, `analysis.REVISION`) is refused, saying so.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from .config import RunConfig
from .errors import WatchError
from .ledger import LEDGER_NAME, Ledger, LedgerError


def fingerprint(runner, config: RunConfig) -> str:
    """What the stored results depend on: the weights the backend runs (the .safetensors, and
    with `--backend onnx` the .onnx files too), bundle.json's settings, the analysis
    parameters and how this version analyses images (`analysis.REVISION`; a fingerprint
    without one is of revision 1). Not bundle.json's record of the ONNX exports: an upgrade
    that only adds to that record must not force a lab to analyse its whole inbox again; nor an
    analysis parameter added later, while it has the value that does what the versions before
    it did (`LATER_SETTINGS`)."""
    import json
    from dataclasses import asdict

    from .analysis import REVISION
    from .bundle import ONNX_SOURCE

    hashes = runner.model_hashes() if hasattr(runner, "model_hashes") else {}
    bundle = getattr(runner, "bundle", None)
    settings = {k: v for k, v in getattr(bundle, "meta", {}).items() if k != ONNX_SOURCE}
    held = {"weights": _weights(hashes, config.backend, config.analysis.red_cell_bar),
            "settings": settings,
            "analysis": _analysis(asdict(config.analysis))}
    if REVISION != 1:  # as the versions before the number wrote it
        held["revision"] = REVISION
    return json.dumps(held, sort_keys=True, default=str)


#: analysis parameters added after ledgers were first written -> the value that behaves as the
#: versions without them did; left out of the fingerprint at that value, so that an upgrade does
#: not refuse to resume a ledger
LATER_SETTINGS = {"fill_margins": False, "min_nucleus_over_field": 0.0, "border_arc": False,
                  "fill_white_stop": False, "red_cell_bar": False, "grey_unusual": False,
                  "blend_unusual": False}


def _analysis(params: dict) -> dict:
    """Analysis parameters as fingerprints hold them: without `LATER_SETTINGS` at their values."""
    return {k: v for k, v in params.items()
            if not (k in LATER_SETTINGS and v == LATER_SETTINGS[k])}


def _weights(hashes: dict, backend: str, red_cells: bool = False) -> dict:
    """The hashes of the weights the results depend on: the red-cell sizer's only where the
    bar that reads it is on, so that ledgers from before it resume."""
    names = ("segmenter", "classifier") + (
        ("segmenter_onnx", "classifier_onnx") if backend == "onnx" else ()) + (
        ("red_cells",) if red_cells else ())
    return {k: v.get("sha256") for k, v in hashes.items() if k in names}


def same_results(stored: str, current: str, meta: dict, backend: str,
                 meta_file_hash: str = "") -> bool:
    """Whether results stored under fingerprint `stored` are those `current` would give.

    A fingerprint of the first format hashed every bundle file, bundle.json included; it is
    taken for the same when the weights and analysis parameters are, and bundle.json is the one
    it hashed: the file as it is now (`meta_file_hash`), or `meta` (the bundle's bundle.json
    now) with its ONNX record cut back to what that version wrote, or without one. So a changed
    setting (temperature, diameter) is never resumed."""
    import hashlib
    import json

    from .bundle import ONNX_SOURCE, meta_text

    if stored == current:
        return True
    try:
        old, new = json.loads(stored), json.loads(current)
    except ValueError:
        return False
    if not same_analysis(old, new):
        return False
    if "models" not in old:  # this format: the same but for revisions that analyse alike
        return ({k: v for k, v in old.items() if k != "revision"}
                == {k: v for k, v in new.items() if k != "revision"})

    def written(m):
        return hashlib.sha256(meta_text(m).encode("utf-8")).hexdigest()

    without = {k: v for k, v in meta.items() if k != ONNX_SOURCE}
    cut = dict(without)
    if isinstance(meta.get(ONNX_SOURCE), dict):
        cut[ONNX_SOURCE] = {k: v for k, v in meta[ONNX_SOURCE].items()
                            if k in ("segmenter", "classifier")}
    then = {h for h in (meta_file_hash, written(cut), written(without)) if h}
    return (_weights(old["models"], backend) == new["weights"]
            and _analysis(old.get("analysis") or {}) == new["analysis"]
            and old["models"].get("meta", {}).get("sha256") in then)


def same_analysis(old: dict, new: dict) -> bool:
    """Whether two fingerprints' analysis revisions (`analysis.REVISION`, 1 where none is
    written) give the same results at their analysis parameters: the same revision, or
    revisions apart only by changes to the scale estimate (`analysis.ESTIMATE_REVISIONS`)
    where both give the WBC size (`--diameter`: no estimate is made)."""
    from .analysis import ESTIMATE_REVISIONS

    revisions = [_revision(f) for f in (old, new)]
    if None in revisions:  # no fingerprint of any version: not the same
        return False
    low, high = sorted(revisions)
    if low == high:
        return True
    given = all(isinstance(f.get("analysis"), dict) and f["analysis"].get("diameter_px")
                for f in (old, new))
    return given and all(r in ESTIMATE_REVISIONS for r in range(low + 1, high + 1))


def _revision(fp) -> Optional[int]:
    """A fingerprint's analysis revision: 1 where it has none; None where it is no fingerprint
    (no JSON object, or a revision that is no whole number, as no version writes)."""
    if not isinstance(fp, dict):
        return None
    rev = fp.get("revision", 1)
    return rev if isinstance(rev, int) and not isinstance(rev, bool) else None


def what_differs(stored: str, current: str, limit: int = 3) -> str:
    """What differs between two fingerprints (`fingerprint`), in words: the analysis settings
    with both values ("review_threshold 0.8 then, 0.9 now"), the weights, bundle.json's
    settings; "" where it cannot tell (a fingerprint of an older format)."""
    import json

    try:
        old, new = json.loads(stored), json.loads(current)
    except ValueError:
        return ""
    if not all(isinstance(f, dict) and "analysis" in f for f in (old, new)):
        return ""
    said = []
    if not same_analysis(old, new):
        said.append(f"how images are analysed (wbc-batch's analysis revision {old.get('revision', 1)}"
                    f" then, {new.get('revision', 1)} now)")
    before, now = old.get("analysis") or {}, new.get("analysis") or {}
    for key in sorted(set(before) | set(now)):
        then_, now_ = (side.get(key, LATER_SETTINGS.get(key)) for side in (before, now))
        if then_ != now_:
            said.append(f"{key} {then_!r} then, {now_!r} now")
    new_w = new.get("weights") or {}
    if "models" in old:  # the first format: every bundle file's hash, whatever the backend ran
        old_w = {k: (v or {}).get("sha256") for k, v in old["models"].items() if k in new_w}
    else:
        old_w = old.get("weights") or {}
    weights = sorted(k for k in set(old_w) | set(new_w) if old_w.get(k) != new_w.get(k))
    if weights:
        said.append("the model weights (" + ", ".join(weights) + ")")
    if "models" in old and not said:  # the first format hashed bundle.json: it is what is left
        said.append("the model bundle's settings (bundle.json)")
    elif "models" not in old and old.get("settings") != new.get("settings"):
        said.append("the model bundle's settings (bundle.json)")
    more = f" and {len(said) - limit} more" if len(said) > limit else ""
    return "; ".join(said[:limit]) + more


def open_ledger(config: RunConfig, runner=None) -> Ledger:
    """Open (or start) the ledger of OUT for this inbox.

    A ledger is resumed as it is. `config.overwrite` starts a new one (everything is analysed
    again). Raises WatchError when OUT holds results of a `run` (no ledger) without overwrite,
    or a ledger of another inbox, or results made with other models or analysis parameters
    (a report must not mix them).
    """
    out = Path(config.output_dir)
    path = out / LEDGER_NAME
    if config.overwrite:
        for suffix in ("", "-wal", "-shm"):
            try:
                os.unlink(f"{path}{suffix}")
            except FileNotFoundError:
                pass
    elif not path.exists():
        from .output_folder import holds_results

        existing = holds_results(out)
        if existing:
            raise WatchError(f"output folder {out} already holds results of a run "
                             f"({', '.join(existing[:4])}); choose another folder or pass "
                             "--overwrite to replace them")
    try:
        ledger = Ledger(path, upgrade=False)  # upgraded only once it is known to be ours
    except LedgerError as exc:
        raise WatchError(str(exc)) from None
    inbox = str(Path(config.input_dir).resolve())
    stored = ledger.get_meta("inbox")
    if stored is None:
        ledger.set_meta("inbox", inbox)
    elif stored != inbox:
        ledger.close()
        raise WatchError(f"{path} is the ledger of another inbox ({stored}); "
                         "choose another output folder, or --overwrite to start afresh")
    if runner is not None:
        fp = fingerprint(runner, config)
        stored = ledger.get_meta("fingerprint")
        meta = getattr(getattr(runner, "bundle", None), "meta", {})
        hashes = runner.model_hashes() if hasattr(runner, "model_hashes") else {}
        meta_hash = (hashes.get("meta") or {}).get("sha256") or ""
        if stored is None or (stored != fp and same_results(stored, fp, meta, config.backend,
                                                            meta_hash)):
            ledger.set_meta("fingerprint", fp)
        elif stored != fp:
            ledger.close()
            differs = what_differs(stored, fp)
            raise WatchError(f"the results in {out} were made with other models or analysis "
                             "parameters (or by a wbc-batch version that analysed images "
                             "differently)" + (f": {differs}" if differs else "") + "; use the "
                             "same ones, another output folder, or --overwrite to analyse "
                             "everything again")
    ledger.upgrade()
    return ledger
