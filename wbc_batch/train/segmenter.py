"""Train the U-Net segmenter (background / cytoplasm / nucleus) on real smears.

Two kinds of supervision are mixed in every batch:
- pixel masks (WBC Image Dataset, or a lab's images+masks): cross-entropy on the three classes
  plus a Dice term on the whole-WBC foreground (a lab's whole-cell masks, which do not tell
  nucleus from cytoplasm, are supervised as "any WBC", like the boxes' ellipses below);
- boxes (BCCD, TXL-PBC): pixels well outside every WBC box must be background (this teaches the
  net to ignore red cells, platelets and debris in crowded fields from several microscopes), and
  the central ellipse of each box must be WBC (cytoplasm or nucleus, either); the ring between
  is not supervised.

Patches are cut at the canonical scale (a WBC `diameter` pixels across) with scale jitter, most
within +-25 % and some from 0.45x to 2.2x so the first, coarse pass at run time still finds cells.
The checkpoint kept is the best on the val splits; test rows are never read.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from . import datasets as ds
from .augment import GRAY_P, HUE, SAT, affine, colour_settings, photometric
from ..bundle import WEIGHTS_SHA256
from ..metrics import inverted_share
from .device import autocast, seeded_start, state_on_cpu
from .folders import releases_out

IGNORE, FG_ANY = 255, 3
#: default unlabelled ring around a box annotation, as a fraction of the box's sides
BOX_RING = 0.12


@dataclass(frozen=True)
class SegTrainConfig:
    data: Path                       # the shared data folder (…/shared/data)
    out: Path                        # bundle folder: writes segmenter.safetensors + bundle.json
    lab_masks: tuple = ()            # extra folders in the lab mask layout (datasets.read_mask_folder)
    use_public: bool = True
    use_boxes: bool = True
    steps: int = 1500
    batch: int = 12
    patch: int = 192
    diameter: float = 112.0
    lr: float = 3e-3
    seed: int = 0
    threads: int = 2
    eval_every: int = 150
    eval_from: int = 0               # no validation before this step (the last step is always validated)
    init: Path | None = None         # fine-tune from this bundle's segmenter
    log_every: int = 25              # a progress line every this many steps, after the first,
    log_seconds: float = 60.0        # and at least this often (a slow machine, a lab's fine-tune)
    box_frac: float = 0.45           # share of patches cut from box-labelled fields
    wide_frac: float = 0.3           # share of patches at a wide scale jitter (0.45x .. 2.2x)
    box_ring: float = BOX_RING       # unlabelled ring around each WBC box, as a fraction of its side
    select_on_txl: bool = False      # also choose the checkpoint on TXL-PBC's select half (txl_val_halves)
    splits: Path | None = None       # split files read in place of <data>/splits (datasets.split_file)
    # colour augmentation (train.augment.photometric): chance of a grey patch, hue and saturation range
    gray_p: float = GRAY_P
    hue: int = HUE
    sat: float = SAT
    od_p: float = 0.0                # chance of restaining a patch (augment.od_stain)
    device: str = "cpu"              # "cpu", "auto", "cuda" or "cuda:N" (train.device)
    precision: str = "auto"          # "auto", "bf16" or "fp32" (train.device.resolve_precision)


# --- data ----------------------------------------------------------------------------------------

def _read_rgb(path: Path) -> np.ndarray:
    """An image as `run` reads it (`imageio.read_image`: 16-bit scaled, alpha over white, EXIF
    orientation), so that training sees what the pipeline will see, and only where `run` would
    analyse it (`imageio.check_smear`): a label mask among a lab's images, or an icon, had been
    trained on as a smear.

    :raises ValueError: it cannot be read or is no smear, with the reason.
    """
    from ..imageio import ImageReadError, NotASmearError, read_smear

    try:
        return read_smear(path)
    except NotASmearError as exc:
        raise ValueError(f"not a smear: {exc}") from None
    except ImageReadError as exc:
        raise ValueError(f"cannot read image {path}: {exc}") from None


def _mask_labels(path: Path) -> np.ndarray:
    """A training mask -> labels 0 background, 1 cytoplasm, 2 nucleus, or FG_ANY for a whole-cell
    mask that does not tell them apart (`metrics.standard_mask`)."""
    from ..metrics import read_mask, standard_mask

    m, binary = standard_mask(read_mask(path))
    lab = np.zeros(m.shape, np.uint8)
    if binary:
        lab[m > 0] = FG_ANY
        return lab
    lab[(m >= 64) & (m < 192)] = 1  # as `metrics.mask_regions` reads them for `evaluate`
    lab[m >= 192] = 2
    return lab


def _eq_diameter(fg: np.ndarray) -> float:
    return float(math.sqrt(4.0 * max(1, int(fg.sum())) / math.pi))


def _cells_of(fg: np.ndarray) -> tuple:
    """(WBC diameter, [centre (x, y), ...]) of a mask's WBC pixels, to sample patches around.

    A mask of one cell (every WBC Image Dataset mask) gives the diameter and centre of all its
    pixels. A lab's field of several cells gives one centre per cell and the run's own size
    estimate (`analysis.median_diameter`): taken as one cell, six cells of 150 px had been
    trained on at a third of their size, on patches centred on the glass between them. Cells
    are the components `median_diameter` counts (12 px and 5 % of the largest or more)."""
    from ..analysis import median_diameter

    n, _, stats, centroids = cv2.connectedComponentsWithStats(fg.astype(np.uint8), connectivity=8)
    areas = stats[1:, cv2.CC_STAT_AREA]
    cells = [i for i, a in enumerate(areas) if a >= 12 and a >= 0.05 * areas.max()] if n > 1 else []
    if len(cells) < 2:
        ys, xs = np.nonzero(fg)
        return _eq_diameter(fg), [(xs.mean(), ys.mean())]
    return median_diameter(fg), [tuple(centroids[i + 1]) for i in cells]


@dataclass
class Item:
    rgb: np.ndarray
    labels: np.ndarray              # 0/1/2 or 0/FG_ANY (mask items), 0/FG_ANY/IGNORE (box items)
    diameter: float                 # WBC diameter in source pixels
    centers: list                   # WBC centres (x, y) to sample around
    kind: str                       # "mask" or "box"
    source: str = ""


def load_mask_items(records, log=None) -> list:
    """Images with their mask labels. An image that cannot be read, or whose mask is unreadable,
    of another size or empty, is left out (said through `log`)."""
    items, left = [], []
    for r in records:
        try:
            rgb, lab = _read_rgb(r.image), _mask_labels(r.mask)
        except ValueError as exc:
            left.append(f"{Path(r.image).name} ({exc})")
            continue
        if lab.shape != rgb.shape[:2]:
            left.append(f"{Path(r.image).name} (mask {lab.shape[1]}x{lab.shape[0]}, image "
                        f"{rgb.shape[1]}x{rgb.shape[0]})")
            continue
        if not lab.any():
            left.append(f"{Path(r.image).name} (empty mask)")
            continue
        share = inverted_share(lab > 0)
        if share is not None:
            left.append(f"{Path(r.image).name} (the mask marks {share:.0%} of the image as WBC: "
                        "drawn inverted? WBCs must be the non-zero, light pixels)")
            continue
        items.append(Item(rgb, lab, *_cells_of(lab > 0), "mask", r.source))
    if left and log:
        log(f"{len(left)} masked images left out: " + "; ".join(left[:5])
            + (f"; and {len(left) - 5} more" if len(left) > 5 else ""))
    return items


def box_labels(shape, boxes, ring: float = BOX_RING) -> np.ndarray:
    """0 background, FG_ANY in each box's central ellipse, IGNORE in the box and in a ring of
    `ring` times its sides (+2 px) around it (box annotations are not pixel-exact)."""
    h, w = shape
    lab = np.zeros((h, w), np.uint8)
    for x, y, bw, bh in boxes:
        ex, ey = int(bw * ring) + 2, int(bh * ring) + 2
        cv2.rectangle(lab, (x - ex, y - ey), (x + bw + ex, y + bh + ey), IGNORE, -1)
    for x, y, bw, bh in boxes:
        cv2.ellipse(lab, (int(x + bw / 2), int(y + bh / 2)), (max(1, int(bw * 0.32)), max(1, int(bh * 0.32))),
                    0, 0, 360, FG_ANY, -1)
    return lab


def load_box_items(records, ring: float = BOX_RING, log=None) -> list:
    """Field images with their box labels (`box_labels`); an image that cannot be read is left
    out, said through `log`, as `load_mask_items` leaves one out."""
    items, left = [], []
    for r in records:
        if not r.boxes:
            continue
        try:
            rgb = _read_rgb(r.image)
        except ValueError as exc:
            left.append(f"{Path(r.image).name} ({exc})")
            continue
        sizes = [math.sqrt(bw * bh) * 0.95 for _, _, bw, bh in r.boxes]
        centers = [(x + bw / 2, y + bh / 2) for x, y, bw, bh in r.boxes]
        items.append(Item(rgb, box_labels(rgb.shape[:2], r.boxes, ring), float(np.median(sizes)),
                          centers, "box", r.source))
    if left and log:
        log(f"{len(left)} box images left out: " + "; ".join(left[:5])
            + (f"; and {len(left) - 5} more" if len(left) > 5 else ""))
    return items


def sample_patch(item: Item, rng: np.random.Generator, patch: int, diameter: float,
                 wide_frac: float = 0.3, colour: dict | None = None):
    """Cut one augmented training patch: (uint8 RGB patch, uint8 labels). `colour` holds
    `photometric`'s gray_p / hue / sat (its defaults when None)."""
    if rng.random() >= wide_frac:
        jitter = math.exp(rng.uniform(math.log(0.8), math.log(1.25)))
    else:
        jitter = math.exp(rng.uniform(math.log(0.45), math.log(2.2)))
    scale = diameter * jitter / item.diameter
    rgb, lab, pre = item.rgb, item.labels, 1.0
    if scale < 0.8:                       # shrink by area averaging first, as run time does
        pre = scale
        size = (max(8, int(rgb.shape[1] * pre)), max(8, int(rgb.shape[0] * pre)))
        rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
        lab = cv2.resize(lab, size, interpolation=cv2.INTER_NEAREST)
    if item.kind == "box" and rng.random() < 0.25:
        cx, cy = rng.uniform(0, item.rgb.shape[1]), rng.uniform(0, item.rgb.shape[0])
    else:
        cx, cy = item.centers[int(rng.integers(len(item.centers)))]
        off = 0.3 * patch / scale
        cx, cy = cx + rng.uniform(-off, off), cy + rng.uniform(-off, off)
    m = affine((cx * pre, cy * pre), scale / pre, rng.uniform(0, 360), rng.random() < 0.5, patch)
    img = cv2.warpAffine(rgb, m, (patch, patch), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    lbl = cv2.warpAffine(lab, m, (patch, patch), flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_REFLECT_101)
    return photometric(img, rng, **(colour or {})), lbl


def _normalize_patch(rgb: np.ndarray) -> np.ndarray:
    from ..preprocess import normalize
    return normalize(rgb)


# --- loss ----------------------------------------------------------------------------------------

def seg_loss(logits, target):
    """Cross-entropy on labelled pixels, 'any WBC' likelihood on FG_ANY pixels, Dice on WBC."""
    import torch
    import torch.nn.functional as F

    logp = F.log_softmax(logits.float(), dim=1)
    exact = target <= 2
    fg_any = target == FG_ANY
    n = exact.sum() + fg_any.sum()
    ce = F.nll_loss(logp, torch.where(exact, target, torch.zeros_like(target)), reduction="none")
    total = (ce * exact).sum()
    total = total + (-torch.logsumexp(logp[:, 1:], dim=1) * fg_any).sum()
    loss = total / n.clamp(min=1)
    # Dice on the whole-WBC foreground where the pixels are exactly labelled
    p_fg = 1 - logp[:, 0].exp()
    t_fg = ((target == 1) | (target == 2)).float()
    w = exact.float()
    inter = (p_fg * t_fg * w).sum()
    dice = 1 - (2 * inter + 1) / ((p_fg * w).sum() + (t_fg * w).sum() + 1)
    return loss + 0.5 * dice


# --- validation ------------------------------------------------------------------------------------

def _forward_full(model, rgb: np.ndarray, scale: float, bf16: bool = True) -> np.ndarray:
    """Class labels at original size, from a forward pass at `scale` (like run time).

    With `bf16` the pass runs under the same bfloat16 autocast as training: where that is native,
    about a third of the validation time saved, for checkpoint scores within about 1e-4 of
    float32's (they only rank checkpoints; run time stays float32).
    """
    import torch
    from ..preprocess import normalize, pad_to_multiple, resize

    work = resize(rgb, scale)
    x, (h, w) = pad_to_multiple(normalize(work), 32)
    device = next(model.parameters()).device
    with torch.inference_mode(), autocast(str(device), bf16):
        x = torch.from_numpy(x[None]).to(device)
        logits = model(x)[0, :, :h, :w].float().cpu().contiguous().numpy()
    up = np.stack([cv2.resize(c, (rgb.shape[1], rgb.shape[0]), interpolation=cv2.INTER_LINEAR) for c in logits])
    return np.argmax(up, axis=0)


def validate(model, mask_items: list, box_items: list, diameter: float, bf16: bool = True) -> dict:
    model.eval()
    out = {}
    for src in sorted({it.source for it in mask_items}):
        tp = fp = fn = ntp = nfp = nfn = 0
        for it in (i for i in mask_items if i.source == src):
            pred = _forward_full(model, it.rgb, diameter / it.diameter, bf16)
            p, t = pred > 0, it.labels > 0
            tp += int((p & t).sum()); fp += int((p & ~t).sum()); fn += int((~p & t).sum())
            pn, tn_ = pred == 2, it.labels == 2
            ntp += int((pn & tn_).sum()); nfp += int((pn & ~tn_).sum()); nfn += int((~pn & tn_).sum())
        out[f"{src}/wbc_iou"] = tp / max(1, tp + fp + fn)
        out[f"{src}/nucleus_iou"] = ntp / max(1, ntp + nfp + nfn)
    if box_items:
        hit = total = fpix = bgpix = 0
        for it in box_items:
            pred = _forward_full(model, it.rgb, diameter / it.diameter, bf16) > 0
            for cx, cy in it.centers:
                total += 1
                r = max(2, int(it.diameter * 0.2))
                y0, x0 = int(cy) - r, int(cx) - r
                win = pred[max(0, y0):int(cy) + r, max(0, x0):int(cx) + r]
                hit += int(win.size > 0 and win.mean() > 0.5)
            bg = it.labels == 0
            fpix += int((pred & bg).sum()); bgpix += int(bg.sum())
        out["boxes/recall"] = hit / max(1, total)
        out["boxes/fp_frac"] = fpix / max(1, bgpix)
    ious = [v for k, v in out.items() if k.endswith("wbc_iou")]
    nious = [v for k, v in out.items() if k.endswith("nucleus_iou")]
    score = (np.mean(ious) if ious else 0) + 0.5 * (np.mean(nious) if nious else 0)
    if box_items:
        score += 0.5 * out["boxes/recall"] - 2.0 * out["boxes/fp_frac"]
    out["score"] = float(score)
    model.train()
    return out


# --- training ------------------------------------------------------------------------------------

def txl_val_halves(records: list) -> tuple[list, list]:
    """TXL-PBC val records split in two fixed halves by image name: (select, judge).

    `select` (every second image, starting with the first) may choose a checkpoint. It is the
    half the shipped run-time rules (min_area_frac, min_nucleus_frac, border_frac) were chosen
    on, so `judge` (the others) is the half that no choice has seen, kept to measure choices.
    Other sources are ignored.
    """
    txl = sorted((r for r in records if r.source == "txl-pbc"), key=lambda r: str(r.image))
    return txl[0::2], txl[1::2]


def is_eval_step(cfg: SegTrainConfig, step: int) -> bool:
    """Whether `step` is validated (a candidate checkpoint): every `eval_every` steps from
    `eval_from` on, and always the last step, so that there is one to keep."""
    return step == cfg.steps or (step >= cfg.eval_from and step % cfg.eval_every == 0)


def _val_box_records(cfg: SegTrainConfig, records: list) -> list:
    """Box records that score checkpoints: BCCD val, plus TXL-PBC's select half if asked."""
    chosen = [r for r in records if r.source == "bccd"]
    return chosen + (txl_val_halves(records)[0] if cfg.select_on_txl else [])


def _gather(cfg: SegTrainConfig, split: str):
    masks, boxes = [], []
    if cfg.use_public:
        masks += ds.wbc_image_dataset(cfg.data, split, splits=cfg.splits)
        if cfg.use_boxes:
            boxes += ds.bccd(cfg.data, split, cfg.splits) + ds.txl_pbc(cfg.data, split, cfg.splits)
    return masks, boxes


def _training_data(cfg: SegTrainConfig, log) -> tuple:
    """-> (train mask items, train box items, val mask items, val box items), loaded once,
    the lab's masked images (`--lab-masks`) among the train mask items.

    :raises TrainingDataError: no masked image to train on, or none of the lab's usable.
    """
    t0 = time.time()
    mrec, brec = _gather(cfg, "train")
    lab_rec = [r for folder in cfg.lab_masks for r in ds.read_mask_folder(Path(folder), log)]
    mask_items = load_mask_items(mrec + lab_rec, log)
    box_items = load_box_items(brec, cfg.box_ring, log)
    if lab_rec:
        n_lab = sum(it.source == "lab" for it in mask_items)
        log(f"lab: {n_lab} masked images of {len(lab_rec)} with a mask")
        if not n_lab:
            raise ds.TrainingDataError("--lab-masks: none of the lab's masked images could be used "
                                       "(see the lines above)")
    vm, vb = _gather(cfg, "val")
    # val keeps the default ring, so that checkpoint scores compare across --box-ring settings
    val_masks, val_boxes = load_mask_items(vm, log), load_box_items(_val_box_records(cfg, vb),
                                                                    log=log)
    log(f"train: {len(mask_items)} masked images, {len(box_items)} box images; "
        f"val: {len(val_masks)} masked, {len(val_boxes)} box ({time.time() - t0:.0f}s to load)")
    if not mask_items:
        raise ds.TrainingDataError("no training images with masks found")
    return mask_items, box_items, val_masks, val_boxes


def _source_weights(items) -> np.ndarray:
    """Sampling probabilities that give each source (dataset) the same share of the draws."""
    by = {}
    for it in items:
        by[it.source] = by.get(it.source, 0) + 1
    return np.array([1.0 / by[it.source] for it in items]) / len(by)


def _fit(model, mask_items, box_items, val_masks, val_boxes, cfg: SegTrainConfig, rng,
         device: str, bf16: bool, log) -> tuple:
    """The steps: AdamW with a one-cycle schedule on patches drawn from the mask images or,
    with probability `cfg.box_frac`, the box images (each source equally often), validated
    every `eval_every` steps. -> (best val score, the kept weights on the CPU, the val
    history); without val data the last step is kept and the history says so."""
    import torch

    from .folders import warn_short_fine_tune
    from .schedule import one_cycle

    mw = _source_weights(mask_items)
    bw = _source_weights(box_items) if box_items else None
    warn_short_fine_tune(cfg, cfg.steps, log)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = one_cycle(opt, cfg.lr, cfg.steps, warmup=0.05)
    best, best_state, history = -1e9, None, []
    has_val = bool(val_masks or val_boxes)
    colour = colour_settings(cfg)
    t_start = last_log = time.time()
    for step in range(1, cfg.steps + 1):
        xs, ys = [], []
        for _ in range(cfg.batch):
            if bw is not None and rng.random() < cfg.box_frac:
                it = box_items[rng.choice(len(box_items), p=bw)]
            else:
                it = mask_items[rng.choice(len(mask_items), p=mw)]
            img, lbl = sample_patch(it, rng, cfg.patch, cfg.diameter, cfg.wide_frac, colour)
            xs.append(_normalize_patch(img)); ys.append(lbl)
        x = torch.from_numpy(np.stack(xs)).to(device)
        y = torch.from_numpy(np.stack(ys).astype(np.int64)).to(device)
        with autocast(device, bf16):
            logits = model(x)
        loss = seg_loss(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step(); sched.step()
        if step == 1 or step % cfg.log_every == 0 or time.time() - last_log >= cfg.log_seconds:
            last_log = time.time()
            el = last_log - t_start
            log(f"step {step}/{cfg.steps} loss {loss.item():.4f} {el / step:.2f}s/step "
                f"eta {el / step * (cfg.steps - step) / 60:.1f} min")
        if has_val and is_eval_step(cfg, step):
            metrics = validate(model, val_masks, val_boxes, cfg.diameter, bf16)
            metrics["step"] = step
            history.append(metrics)
            log("val " + _shown_metrics(metrics))
            if best_state is None or metrics["score"] > best:
                best = metrics["score"]
                best_state = state_on_cpu(model)
    if not has_val:
        best_state = state_on_cpu(model)
        history.append({"step": cfg.steps, "note": "no val data: the last step is kept"})
    return best, best_state, history


@releases_out
def train_segmenter(cfg: SegTrainConfig, log=print) -> dict:
    """Train, keep the best-on-val weights in `cfg.out/segmenter.safetensors`, return a summary.

    Before any work: OUT is checked (`folders.check_out`) and the `--init` weights are loaded
    once (`_check_init`); OUT is made before the training starts, not after it.

    :raises folders.BundleFolderError: OUT or INIT cannot be used.
    :raises TrainingDataError: the data leave nothing to train on.
    """
    from ..nets import SEGMENTER_DEFAULTS, UNet, load_weights, to_device
    from .folders import SHIPPED, config_record, make_out, shown, start_checks, warn_below_start

    stages = start_checks(cfg, "segmenter", _check_init, log)
    rng, device, bf16 = seeded_start(cfg, log)
    t0 = time.time()
    mask_items, box_items, val_masks, val_boxes = _training_data(cfg, log)
    if not cfg.use_public and not cfg.init:
        log(f"WARNING: --no-public without --init: the segmenter starts from random weights and "
            f"learns from the lab's {len(mask_items)} images alone, far fewer than the shipped one "
            f"was trained on. To fine-tune the shipped segmenter instead, add --init {SHIPPED}")
    make_out(Path(cfg.out))  # before the training, which a folder that cannot be made would lose
    had_classifier = (Path(cfg.out) / "classifier.safetensors").exists()
    model = UNet(**SEGMENTER_DEFAULTS)
    if cfg.init:
        load_weights(model, Path(cfg.init) / "segmenter.safetensors")
        log(f"starting from {Path(cfg.init) / 'segmenter.safetensors'}")
    to_device(model, device).train()
    if device != "cpu":
        log(f"training on {device}")
    # lab-only training has no val split: nothing to choose on, so the last step is kept
    has_val = bool(val_masks or val_boxes)
    start = None
    # a lab's fine-tune: say whether it made val better (`warn_below_start`); not the recipe's
    # second stage, whose time the model card measured
    if has_val and cfg.init and cfg.lab_masks:
        log(f"scoring the --init weights on val first ({len(val_masks)} masked and "
            f"{len(val_boxes)} box images; minutes on a CPU)")
        start = validate(model, val_masks, val_boxes, cfg.diameter, bf16)
        log("val of the --init weights, before any training: " + _shown_metrics(start))
    best, best_state, history = _fit(model, mask_items, box_items, val_masks, val_boxes, cfg,
                                     rng, device, bf16, log)
    best_metrics = max(history, key=lambda m: m.get("score", 0.0))
    summary = {
        "arch": SEGMENTER_DEFAULTS, "diameter": cfg.diameter, "patch": cfg.patch,
        "trained_on": sorted({it.source for it in mask_items + box_items}),
        "val": best_metrics, "steps": cfg.steps, "seed": cfg.seed, "precision": "bf16" if bf16 else "fp32",
        "device": str(device),  # the one used: config.device is the one asked for ("cuda")
        "train_seconds": round(time.time() - t0, 1),
        "config": config_record(cfg),
    }
    if start is not None:
        summary["val_at_start"] = start
    if cfg.init:  # where it started: every earlier stage, then the --init segmenter itself
        summary["stages"] = stages
        summary["trained_on"] = sorted(set(summary["trained_on"]) | set(stages[-1].get("trained_on", [])))
        _take_init_classifier(Path(cfg.init), Path(cfg.out))
    summary[WEIGHTS_SHA256] = save_weights(best_state, Path(cfg.out) / "segmenter.safetensors")
    _update_meta(Path(cfg.out), "segmenter", summary)  # straight after the weights it describes
    if (Path(cfg.out) / "classifier.safetensors").exists():
        whose = ("the classifier already there is kept as it was" if had_classifier
                 else "the --init bundle's classifier is copied there unchanged")
        log(f"{shown(Path(cfg.out))}: {whose}; it learned from crops cut by an earlier segmenter, "
            "so where this one outlines cells differently, train the classifier again "
            "(wbc-batch train classifier -o OUT ...)")
    if has_val:
        log(f"kept step {best_metrics['step']} (val score {best:.4f}); {summary['train_seconds']:.0f}s in all")
        warn_below_start(best, start and start["score"], f"step {best_metrics['step']}", log)
    else:
        log(f"kept the last step, {cfg.steps} (no val data to choose on); "
            f"{summary['train_seconds']:.0f}s in all")
    return summary


def _shown_metrics(metrics: dict) -> str:
    return " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())


def _check_init(cfg: SegTrainConfig) -> None:
    """Load, before any work, the `--init` weights the run will use: its segmenter, into the
    network this run trains, and its classifier when OUT has none (it will be copied there,
    `_take_init_classifier`). BundleFolderError names a damaged or mismatched file."""
    from ..bundle import FILES
    from ..nets import SEGMENTER_DEFAULTS, UNet, build_classifier
    from .folders import check_init

    meta = check_init(Path(cfg.init), {"segmenter": lambda: UNet(**SEGMENTER_DEFAULTS)})
    if not (Path(cfg.out) / FILES["classifier"]).exists() and "classifier" in meta:
        check_init(Path(cfg.init), {"classifier": lambda: build_classifier(meta)})


def _take_init_classifier(init: Path, out: Path) -> None:
    """Fine-tuning the segmenter into a new bundle keeps the `init` bundle's classifier (weights
    and its bundle.json section), so that OUT is a whole bundle `run --model OUT` can use. A
    classifier already in OUT is left alone."""
    from ..atomic import atomic_copy

    section = _read_meta(init).get("classifier")
    if (out / "classifier.safetensors").exists() or section is None \
            or not (init / "classifier.safetensors").is_file():
        return
    atomic_copy(init / "classifier.safetensors", out / "classifier.safetensors")
    _update_meta(out, "classifier", section)


def save_weights(state: dict, path: Path) -> str:
    """Write a network's weights to `path` atomically (a stop leaves the old file whole), readable
    as the tool's other results are (mode 0666 less the umask; safetensors' own writer makes
    0600 files). Returns their sha256, for bundle.json (`bundle.WEIGHTS_SHA256`): write it
    straight after, so that weights and the bundle.json describing them change together, and
    `load_bundle` refuses a pair that does not."""
    import hashlib

    from safetensors.torch import save

    from ..atomic import atomic_write_bytes

    data = save(state)
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def _read_meta(folder: Path) -> dict:
    """OUT's bundle.json ({} without one); BundleFolderError, one line, for a damaged one."""
    from .folders import read_meta

    return read_meta(Path(folder), option="-o")


def _update_meta(out: Path, key: str, section: dict) -> None:
    from .. import CLASSES, __version__
    from ..bundle import BUNDLE_FORMAT, write_meta

    meta = _read_meta(Path(out))
    meta["format"] = BUNDLE_FORMAT  # OUT's is checked before the training (`check_out`)
    meta["classes"] = list(CLASSES)
    meta["wbc_batch_version"] = __version__
    meta[key] = section
    write_meta(Path(out), meta)
