"""Train the red-cell sizer (`wbc_batch.red_cells`) on the RBC boxes of BCCD and TXL-PBC fields.

Each field's truth is one number, its red cells' size: the median sqrt(w h) of its RBC boxes
that stay clear of the image border (a red cell cut by the border is smaller than it is), from
fields with at least `MIN_BOXES` such boxes. Each sample is a square window of a train field at
a random scale that puts that size from `MIN_SIZE` to `MAX_SIZE` px across the `SIDE`-px window
(log-uniform); a window larger than the field is cut from the field mirrored about its edges.
The windows are turned, flipped, optionally (`SizerTrainConfig.glass`, off: it was measured and
not adopted) given a part beyond a straight edge painted glass (`glass_edge`: a field at the
edge of the smear, whose red cells keep their size), and put through the segmenter's
photometric augmentation (stain, hue, grey, blur, noise). Loss: L1 on the log size. The last
step's weights are kept: nothing is chosen on val, and test rows are never read.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from . import datasets as ds
from .augment import photometric
from ..imageio import ImageReadError, read_image
from ..red_cells import CHANNELS, GROUPS, MAX_SIZE, MIN_SIZE, SIDE, WEIGHTS_FILE, standardise

#: a field's red-cell size needs at least this many RBC boxes clear of the border
MIN_BOXES = 3
#: RBC boxes within this many px of the border are left out of a field's size
BORDER_MARGIN = 2
#: (width, height) of every BCCD field
BCCD_SIZE = (640, 480)
#: `glass_edge` paints from this to this share of a window
GLASS_SHARE = (0.1, 0.6)
#: ... with camera noise of a standard deviation drawn up to this, grey levels
GLASS_NOISE = 3.0


@dataclass(frozen=True)
class SizerTrainConfig:
    data: Path
    out: Path
    splits: Path | None = None       # split files (`split_overlap_check.py --write-clean`)
    leave_out_bccd: bool = False     # no BCCD field: a fold to judge the sizer on BCCD's (below)
    steps: int = 3000
    batch: int = 32
    lr: float = 2e-3
    seed: int = 0
    threads: int = 2
    log_every: int = 100
    glass: float = 0.0               # share of windows given an edge of glass (`glass_edge`)


def build_net():
    """The torch module whose state_dict `wbc_batch.red_cells.RedCellSizer` reads."""
    from torch import nn

    class SizerNet(nn.Module):
        def __init__(self):
            super().__init__()
            layers, c = [], 3
            for k in CHANNELS:
                for stride in (2, 1):
                    layers += [nn.Conv2d(c, k, 3, stride, 1, bias=False), nn.GroupNorm(GROUPS, k),
                               nn.ReLU(inplace=True)]
                    c = k
            self.body = nn.Sequential(*layers)
            self.head = nn.Linear(c, 1)

        def forward(self, x):
            return self.head(self.body(x).mean(dim=(2, 3)))[:, 0]

    return SizerNet()


def rbc_size(boxes: list, w: int, h: int, margin: int = BORDER_MARGIN,
             min_boxes: int = MIN_BOXES) -> float:
    """Median sqrt(w h) of the (x, y, w, h) boxes clear of the border by `margin` px (a red
    cell cut by the border is smaller than it is); nan when fewer than `min_boxes`."""
    inner = [math.sqrt(bw * bh) for x, y, bw, bh in boxes
             if x > margin and y > margin and x + bw < w - margin and y + bh < h - margin]
    return float(np.median(inner)) if inner and len(inner) >= min_boxes else math.nan


def yolo_boxes(label: Path, w: int, h: int, cls: str) -> list:
    """(x, y, w, h) px boxes of YOLO class `cls` in a label file."""
    out = []
    for line in label.read_text().split("\n"):
        p = line.split()
        if len(p) >= 5 and p[0] == cls:
            cx, cy, bw, bh = (float(v) for v in p[1:5])
            out.append(((cx - bw / 2) * w, (cy - bh / 2) * h, bw * w, bh * h))
    return out


def red_cell_fields(data: Path, split: str, splits: Path | None = None,
                    leave_out_bccd: bool = False) -> list:
    """[(image path, its red cells' size px)] of BCCD and TXL-PBC `split` fields with one; with
    `leave_out_bccd`, no BCCD field, nor any TXL-PBC image of BCCD's size (`BCCD_SIZE`), which
    is where TXL-PBC's copies of BCCD fields are."""
    return [(r.image, size) for r, size in _sized_records(data, split, splits, leave_out_bccd)]


def wbc_over_red_cells(data: Path, split: str, splits: Path | None = None) -> list:
    """Per `red_cell_fields` field with a WBC box: its WBC boxes' median sqrt(w h) over its red
    cells' size (the bar's `red_cells.WBC_OVER_RBC` is their median over the sizer's train
    fields; `scripts/red_cell_scale_check.py --wbc-over-rbc`)."""
    return [float(np.median([math.sqrt(bw * bh) for _, _, bw, bh in r.boxes])) / size
            for r, size in _sized_records(data, split, splits) if r.boxes]


def _sized_records(data: Path, split: str, splits: Path | None = None,
                   leave_out_bccd: bool = False) -> list:
    """[(BoxRecord, its red cells' size px)] of the fields `red_cell_fields` describes."""
    out = []
    for r in ([] if leave_out_bccd else ds.bccd(data, split, splits)):
        stem = Path(r.image).stem
        boxes = ds.read_voc_boxes(data / "bccd" / "BCCD" / "Annotations" / (stem + ".xml"), "RBC")
        w, h = ds.stored_size(r.image)
        out.append((r, rbc_size(boxes, w, h)))
    labels = data / "txl-pbc" / "TXL_PBC" / "labels" / split
    for r in ds.txl_pbc(data, split, splits):
        w, h = ds.stored_size(r.image)
        if leave_out_bccd and (w, h) == BCCD_SIZE:
            continue
        out.append((r, rbc_size(yolo_boxes(labels / (Path(r.image).stem + ".txt"), w, h, "1"),
                                w, h)))
    return [(r, s) for r, s in out if not math.isnan(s)]


def _read_field(path: Path) -> np.ndarray:
    """A training field as `run` reads it; TrainingDataError naming the file and why, where it
    cannot be read (a JPEG cut short had stopped the training with a traceback, unnamed)."""
    try:
        return read_image(path)
    except ImageReadError as exc:
        raise ds.unreadable_image(path, exc) from None


def glass_edge(win: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """`win` with the part beyond a straight edge, at a random angle, painted as bare glass: a
    `GLASS_SHARE` of the window, at each channel's 99th percentile with camera noise. The sizer
    first read glass as very large red cells (docs/EXPERIMENTS.md, "Glass in the red-cell
    sizer's windows"); the red cells left in the window keep their size."""
    h, w = win.shape[:2]
    angle = rng.uniform(0.0, 2.0 * math.pi)
    yy, xx = np.mgrid[0:h, 0:w]
    along = (xx - w / 2) * math.cos(angle) + (yy - h / 2) * math.sin(angle)
    glass = along > np.quantile(along, 1.0 - rng.uniform(*GLASS_SHARE))
    return paint_glass(win, glass, rng.uniform(0.0, GLASS_NOISE), rng)


def paint_glass(rgb: np.ndarray, where: np.ndarray, noise_sd: float,
                rng: np.random.Generator) -> np.ndarray:
    """A copy of `rgb` with the pixels of the bool mask `where` bare glass: each channel's 99th
    percentile over the whole image, with camera noise of sd `noise_sd` (drawn in row order)."""
    level = np.percentile(rgb.reshape(-1, 3), 99, axis=0)
    noise = rng.normal(0.0, noise_sd, (int(where.sum()), 3))
    out = rgb.copy()
    out[where] = np.clip(np.round(level + noise), 0, 255).astype(np.uint8)
    return out


def sample(rgb: np.ndarray, size: float, rng: np.random.Generator, glass: float = 0.0) -> tuple:
    """(SIDE x SIDE uint8 window, its red cells' size in window px) at a random scale; a share
    `glass` of windows with an edge of glass (`glass_edge`). At 0 no draw is made for it, so the
    windows are those of the recipe before it."""
    target = math.exp(rng.uniform(math.log(MIN_SIZE), math.log(MAX_SIZE)))
    side = size * SIDE / target  # the window's side in the field's px
    f = min(1.0, 2.0 * SIDE / side)  # shrink the field first where the window is far larger
    if f < 1.0:
        h, w = rgb.shape[:2]
        rgb = cv2.resize(rgb, (max(1, round(w * f)), max(1, round(h * f))), interpolation=cv2.INTER_AREA)
        side, size = side * f, size * f  # the red cells shrink with it
    s = max(2, int(round(side)))
    h, w = rgb.shape[:2]
    if s > min(h, w):  # a field mirrored about its edges: no seam, red cells of the same size
        rgb = np.pad(rgb, ((0, max(0, s - h)), (0, max(0, s - w)), (0, 0)), mode="symmetric")
        h, w = rgb.shape[:2]
    y, x = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
    win = rgb[y:y + s, x:x + s]
    inter = cv2.INTER_AREA if s >= SIDE else cv2.INTER_LINEAR
    win = cv2.resize(np.ascontiguousarray(win), (SIDE, SIDE), interpolation=inter)
    win = np.rot90(win, int(rng.integers(0, 4)))
    if rng.random() < 0.5:
        win = win[:, ::-1]
    if glass > 0 and rng.random() < glass:
        win = glass_edge(np.ascontiguousarray(win), rng)
    win = photometric(np.ascontiguousarray(win), rng)
    return win, size * SIDE / s


def train_sizer(cfg: SizerTrainConfig, log=print) -> dict:
    """Train and write OUT/red_cells.safetensors; returns a summary (steps, seconds, fields, the
    last 100 steps' mean L1 on log size, seed, the file's sha256).

    :raises TrainingDataError: no train field has a red-cell size (data missing or moved)."""
    import torch

    from .segmenter import save_weights

    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    rng = np.random.default_rng(cfg.seed)
    fields = red_cell_fields(cfg.data, "train", cfg.splits, cfg.leave_out_bccd)
    if not fields:
        raise ds.TrainingDataError(f"no BCCD or TXL-PBC train field with {MIN_BOXES} RBC boxes "
                                   f"clear of its border under {cfg.data}: is the data there?")
    log(f"red-cell sizer: {len(fields)} train fields with a red-cell size; reading them")
    images = [_read_field(p) for p, _ in fields]
    sizes = [s for _, s in fields]
    net = build_net()
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.1)
    t0, recent = time.time(), []
    net.train()
    for step in range(1, cfg.steps + 1):
        xs, ys = [], []
        for i in rng.integers(0, len(images), cfg.batch):
            win, target = sample(images[i], sizes[i], rng, cfg.glass)
            xs.append(standardise(win))
            ys.append(math.log(target))
        x, y = torch.from_numpy(np.stack(xs)), torch.tensor(ys, dtype=torch.float32)
        loss = (net(x) - y).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        recent = (recent + [loss.item()])[-100:]
        if step % cfg.log_every == 0 or step == cfg.steps:
            log(f"step {step}/{cfg.steps}  L1(log size) {np.mean(recent):.4f}  {time.time() - t0:.0f} s")
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    sha = save_weights(state, Path(cfg.out) / WEIGHTS_FILE)  # atomically: a stop leaves none
    return {"steps": cfg.steps, "seconds": round(time.time() - t0, 1), "fields": len(fields),
            "l1_last_100": round(float(np.mean(recent)), 4), "seed": cfg.seed, "glass": cfg.glass,
            "sha256": sha}
