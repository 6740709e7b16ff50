"""The two networks, in PyTorch: a small U-Net segmenter and a small ResNet classifier.

Both use GroupNorm rather than BatchNorm: its statistics are per image, so a smear from another
lab (other stain, other camera) is not normalised with our training set's running means, which is
where batch-norm classifiers are reported to collapse across labs. Hyper-parameters come from the
bundle metadata (`bundle.json`), so a bundle fully describes the networks it holds.

This module imports torch; the core imports it only lazily (torch backend, export, training).
"""

from __future__ import annotations

import re
import threading

import torch
from torch import nn
import torch.nn.functional as F

SEGMENTER_DEFAULTS = {"widths": [16, 32, 64, 128, 192], "groups": 8}
CLASSIFIER_DEFAULTS = {"widths": [24, 48, 96, 192], "blocks": [1, 1, 1, 1], "groups": 8,
                       "num_classes": 5}


def _gn(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(groups, channels), channels)


class ConvBlock(nn.Sequential):
    """Two 3x3 convolutions, each followed by GroupNorm and ReLU."""

    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False), _gn(cout, groups), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False), _gn(cout, groups), nn.ReLU(inplace=True),
        )


class UNet(nn.Module):
    """U-Net: (N, 3, H, W) normalised image -> (N, 3, H, W) logits (background, cytoplasm, nucleus).

    H and W must be multiples of 2 ** (len(widths) - 1).
    """

    def __init__(self, widths=(16, 32, 64, 128, 192), groups: int = 8, in_channels: int = 3,
                 num_classes: int = 3):
        super().__init__()
        widths = list(widths)
        self.down = nn.ModuleList()
        cin = in_channels
        for w in widths:
            self.down.append(ConvBlock(cin, w, groups))
            cin = w
        self.up = nn.ModuleList()
        for w_skip, w_in in zip(reversed(widths[:-1]), reversed(widths[1:])):
            self.up.append(ConvBlock(w_in + w_skip, w_skip, groups))
        self.head = nn.Conv2d(widths[0], num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            if i:
                x = F.max_pool2d(x, 2)
            x = block(x)
            skips.append(x)
        skips.pop()
        for block in self.up:
            skip = skips.pop()
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], dim=1))
        return self.head(x)


class BasicBlock(nn.Module):
    """ResNet basic block with GroupNorm."""

    def __init__(self, cin: int, cout: int, stride: int, groups: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.gn1 = _gn(cout, groups)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.gn2 = _gn(cout, groups)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                          _gn(cout, groups))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.gn1(self.conv1(x)), inplace=True)
        out = self.gn2(self.conv2(out))
        identity = x if self.shortcut is None else self.shortcut(x)
        return F.relu(out + identity, inplace=True)


class ResNetClassifier(nn.Module):
    """A small ResNet: (N, 3, S, S) normalised crop -> (N, num_classes) logits."""

    def __init__(self, widths=(24, 48, 96, 192), blocks=(1, 1, 1, 1), groups: int = 8,
                 num_classes: int = 5, dropout: float = 0.2):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, stride=2, padding=1, bias=False),
                                  _gn(widths[0], groups), nn.ReLU(inplace=True))
        layers = []
        cin = widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks)):
            for j in range(n):
                layers.append(BasicBlock(cin, w, 2 if (i > 0 and j == 0) else 1, groups))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(x))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(self.dropout(x))


def build_segmenter(meta: dict) -> UNet:
    """The segmenter described by a bundle's metadata (`meta["segmenter"]`); ValueError naming
    bundle.json's field where its numbers build no network."""
    cfg = {**SEGMENTER_DEFAULTS, **meta.get("segmenter", {}).get("arch", {})}
    return _built("segmenter", lambda: UNet(widths=cfg["widths"], groups=cfg["groups"]))


def build_classifier(meta: dict) -> ResNetClassifier:
    """The classifier described by a bundle's metadata (`meta["classifier"]`); ValueError naming
    bundle.json's field where its numbers build no network."""
    cfg = {**CLASSIFIER_DEFAULTS, **meta.get("classifier", {}).get("arch", {})}
    return _built("classifier", lambda: ResNetClassifier(
        widths=cfg["widths"], blocks=cfg["blocks"], groups=cfg["groups"],
        num_classes=cfg["num_classes"]))


def _built(name: str, make):
    try:
        return make()
    except (TypeError, KeyError, IndexError, ValueError) as exc:  # groups 3 for 32 channels...
        raise ValueError(f"the {name} bundle.json describes ({name}.arch) cannot be built: "
                         f"{type(exc).__name__}: {exc}") from exc


def to_device(model: nn.Module, device) -> nn.Module:
    """`model` moved to `device` (in place, and returned); on a CPU, with its convolution weights
    in channels-last (NHWC) memory order.

    The networks run faster that way on a CPU: a training step of the default segmenter takes
    about a quarter less time, the classifier's about a tenth less (`benchmarks/train_step.py`),
    and `wbc-batch evaluate` on PBC test took 111 to 119 s instead of 149 s. A convolution
    with channels-last weights gives channels-last outputs, so inputs need no change; the function
    is the same, and results agree with the default order up to float rounding. On a GPU the
    model is only moved, because the gain there has not been measured.
    """
    model = model.to(device)
    if torch.device(device).type == "cpu":
        model = model.to(memory_format=torch.channels_last)
    return model


# --- loading -----------------------------------------------------------------------------------

def load_weights(model: nn.Module, path) -> nn.Module:
    """Load safetensors weights into `model`; a missing, truncated or mismatched file raises
    ValueError naming the file. Nothing is unpickled."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise ValueError(f"cannot read model file {path}: {exc}") from exc
    broken = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:  # NaN weights give NaN logits: every cell 'neutrophil', none flagged for review
        raise ValueError(f"model file {path} holds values that are not finite numbers "
                         f"(in {', '.join(broken[:3])}{' ...' if len(broken) > 3 else ''})")
    expected = model.state_dict()
    not_float = [k for k, v in state.items()
                 if k in expected and expected[k].is_floating_point() and not v.is_floating_point()]
    if not_float:  # load_state_dict would cast them: garbage, with no error (0 WBCs found)
        kinds = sorted({str(state[k].dtype).replace("torch.", "") for k in not_float})
        raise ValueError(f"model file {path} holds {'/'.join(kinds)} tensors where float weights "
                         f"are expected (in {', '.join(not_float[:3])}"
                         f"{' ...' if len(not_float) > 3 else ''}): a quantised or converted copy "
                         "cannot be used; restore the file the bundle was trained or exported with")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise ValueError(f"model file {path} does not fit the architecture in bundle.json: "
                         f"{' '.join(first[:3])[:300]}") from exc
    return model.eval()


def torch_cuda_devices() -> tuple:
    """(count, why_none): the CUDA devices PyTorch can use, and, when there are none although the
    driver sees a GPU, why (for `wbc_batch.devices.resolve_device`'s note; "" otherwise)."""
    import warnings

    from .devices import cuda_driver_device_count

    # PyTorch warns on stderr where CUDA cannot start ("CUDA initialization: The NVIDIA driver
    # on your system is too old ..."): its first sentence goes into the one-line note instead
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        try:
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        except Exception:  # noqa: BLE001 - a broken CUDA setup counts as none
            count = 0
    if count or cuda_driver_device_count() <= 0:
        return count, ""
    if getattr(torch.version, "cuda", None) is None:
        return 0, "a GPU is present, but this PyTorch build has no CUDA support"
    why = next((_cuda_reason(str(w.message)) for w in said if "CUDA" in str(w.message)), "")
    return 0, ("a GPU is present, but PyTorch cannot use it ("
               + (why or "driver too old for this build?") + ")")


def _cuda_reason(text: str) -> str:
    """PyTorch's CUDA warning on one line: its first sentence (up to a full stop before a capital,
    so that "e.g. changing" stays), with the CUDA error it ends with, where it gives one
    ("Error 802: system not yet initialized", the clue on a machine whose fabric manager is
    not running), without its "(Triggered internally at ...)" tail."""
    text = " ".join(text.split()).split(" (Triggered internally")[0]
    first = re.split(r"\.\s+(?=[A-Z])", text, maxsplit=1)[0].rstrip(".")
    code = re.search(r"Error \d+: [^.(]*", text)
    if code is not None and code.group(0).strip() not in first:
        first += f" ({code.group(0).strip()})"
    return first


class TorchSession:
    """Both networks on one torch device; fulfils `wbc_batch.backend.ModelSession`."""

    #: modules in inference mode may be called from several threads at once
    thread_safe = True

    def __init__(self, segmenter: nn.Module, classifier: nn.Module, device: str = "cpu",
                 fallback_note: str = ""):
        self.device = device
        self.fallback_note = fallback_note
        self._dev = torch.device(device)
        self.segmenter = to_device(segmenter, self._dev).eval()
        self.classifier = to_device(classifier, self._dev).eval()
        # after the GPU first runs out of memory, one forward pass at a time (see `_run`)
        self._one_at_a_time = threading.Lock()
        self.serialised = False

    @classmethod
    def from_bundle(cls, bundle, device: str = "cpu", fallback_note: str = "") -> "TorchSession":
        seg = load_weights(build_segmenter(bundle.meta), bundle.path("segmenter"))
        clf = load_weights(build_classifier(bundle.meta), bundle.path("classifier"))
        return cls(seg, clf, device, fallback_note)

    def _run(self, model: nn.Module, batch):
        """One forward pass. `run` calls this from several threads on a GPU; when the GPU runs
        out of memory, the pass is retried alone and every later pass waits its turn, so a
        smaller GPU gets slower instead of failing images."""
        if self.serialised:
            with self._one_at_a_time:
                return self._forward(model, batch)
        try:
            return self._forward(model, batch)
        except torch.cuda.OutOfMemoryError:
            self.serialised = True
            with self._one_at_a_time:
                torch.cuda.empty_cache()
                return self._forward(model, batch)

    def _forward(self, model: nn.Module, batch):
        import numpy as np

        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self._dev)
            return model(x).float().cpu().contiguous().numpy()

    def segment(self, batch):
        return self._run(self.segmenter, batch)

    def classify(self, batch):
        return self._run(self.classifier, batch)

    def close(self) -> None:
        """Give back the thread count the session claimed (`claim_threads`), once."""
        if getattr(self, "threads_claimed", False):
            self.threads_claimed = False
            release_threads()


#: torch's thread count is the whole process's: the host program's count, kept while sessions
#: that set theirs are open, and the number of those sessions
_THREADS = {"host": None, "sessions": 0}
_THREADS_LOCK = threading.Lock()


def claim_threads(threads: int) -> bool:
    """Set torch's thread count for a session that asks for one (`threads` > 0), remembering
    the host program's count while the first such session is open; `release_threads` gives it
    back when the last one closes, whatever order they close in (one never closed keeps it).
    Returns whether it claimed; 0 leaves the count, and the host's changes to it, alone."""
    threads = int(threads or 0)
    if threads <= 0:
        return False
    with _THREADS_LOCK:
        if _THREADS["sessions"] == 0:
            _THREADS["host"] = torch.get_num_threads()
        torch.set_num_threads(threads)
        _THREADS["sessions"] += 1
    return True


def release_threads() -> None:
    """The end of a `claim_threads`: the last session to close puts back the host's count."""
    with _THREADS_LOCK:
        _THREADS["sessions"] = max(0, _THREADS["sessions"] - 1)
        if _THREADS["sessions"] == 0 and _THREADS["host"]:
            torch.set_num_threads(_THREADS["host"])
