"""The device training runs on: the CPU by default, a GPU when asked.

Training defaults to the CPU so that `scripts/train_default_models.sh` gives the same bytes on
every machine; `--device auto|cuda[:N]` trains on a GPU (a lab fine-tuning on its workstation),
resolved by the same rules as `run` (`wbc_batch.devices.resolve_device`), with the same
one-line note when it falls back to the CPU. Mixed precision is bfloat16 autocast on either.
"""

from __future__ import annotations

from ..devices import resolve_device


def training_device(requested: str, log=print) -> str:
    """Resolve `requested` ("cpu", "auto", "cuda", "cuda:N") for torch; log the fallback note.

    :raises wbc_batch.devices.DeviceError: malformed name, or a CUDA index that does not exist.
    """
    from ..nets import torch_cuda_devices

    device, note = resolve_device(requested, *torch_cuda_devices())
    if note:
        log(f"Note: {note}")
    return device


def autocast(device: str, enabled: bool = True):
    """The training's bfloat16 autocast on `device` ("cpu" or "cuda:N")."""
    import torch

    return torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=enabled)


def state_on_cpu(model) -> dict:
    """A copy of the model's weights on the CPU, contiguous (what safetensors saves)."""
    return {k: v.detach().to("cpu").clone().contiguous() for k, v in model.state_dict().items()}


class WeightEMA:
    """An exponential moving average of a model's weights, kept in a copy (`self.model`) that is
    validated and saved in place of the trained one. Its time constant is `span` optimiser steps;
    early on the decay is held at (1 + t) / (10 + t) so that the random start fades quickly.
    Averaging the last stretch of a run settles on a flatter minimum than its last step (SWA,
    Izmailov et al. 2018; SWAD, Cha et al. 2021, for images from unseen domains)."""

    def __init__(self, model, span: float):
        import copy

        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.decay = 1.0 - 1.0 / max(1.0, span)
        self.steps = 0

    def update(self, model) -> None:
        """Move the average towards `model`'s current weights (call after each optimiser step)."""
        import torch

        self.steps += 1
        d = min(self.decay, (1 + self.steps) / (10 + self.steps))
        with torch.no_grad():
            ours = list(self.model.state_dict().values())
            theirs = [v.detach() for v in model.state_dict().values()]
            torch._foreach_lerp_(ours, theirs, 1.0 - d)
