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
