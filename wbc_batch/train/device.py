"""The device training runs on: the CPU by default, a GPU when asked.

Training defaults to the CPU so that `scripts/train_default_models.sh` gives the same bytes on
machines of the same kind; `--device auto|cuda[:N]` trains on a GPU (a lab fine-tuning on its
workstation), resolved by the same rules as `run` (`wbc_batch.devices.resolve_device`), with the
same one-line note when it falls back to the CPU.

Precision (`--precision`). Mixed precision is bfloat16 autocast, but only where the hardware does
bfloat16 arithmetic: on a CPU without AVX512-BF16 or AMX, PyTorch emulates it, and training steps
take more than twice as long as in float32 (`benchmarks/train_step.py`). `auto` (the default)
therefore takes bfloat16 where it is native (such CPUs, and CUDA devices that support it) and
float32 elsewhere, with a one-line note. The two give different bytes, so a run records the
precision it used (bundle.json).
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


PRECISIONS = ("auto", "bf16", "fp32")
#: the note `auto` logs where it falls back to float32
NO_NATIVE_BF16 = "no native bfloat16 on this {what}, where float32 is faster than emulated bfloat16"


def native_bf16(device: str) -> bool:
    """Whether `device` ("cpu" or "cuda:N") does bfloat16 arithmetic in hardware. Never raises:
    a PyTorch without the probe counts as no."""
    import torch

    try:
        if device.startswith("cuda"):
            return bool(torch.cuda.is_bf16_supported())
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)
    except Exception:  # noqa: BLE001 - a probe that fails is a "no", not a failed training
        return False


def resolve_precision(requested: str, device: str, native: bool) -> tuple:
    """The precision to train in, "bf16" or "fp32", and a note for the user ("" when none).

    `auto` is bf16 where `native` (see `native_bf16`), else fp32 with a note; `bf16` and `fp32`
    are taken as asked, with a note when bf16 is asked for where it is emulated (slow).

    :raises ValueError: for a name not in PRECISIONS.
    """
    if requested not in PRECISIONS:
        raise ValueError(f"invalid precision {requested!r}: use one of {', '.join(PRECISIONS)}")
    what = "GPU" if device.startswith("cuda") else "CPU"
    if requested == "auto":
        return ("bf16", "") if native else ("fp32", NO_NATIVE_BF16.format(what=what))
    if requested == "bf16" and not native:
        return "bf16", (f"bfloat16 asked for, but this {what} emulates it: expect training to take "
                        "more than twice as long as with --precision fp32")
    return requested, ""


def training_precision(requested: str, device: str, log=print) -> str:
    """Resolve `requested` for `device` on this machine; log the precision and any note."""
    precision, note = resolve_precision(requested, device, native_bf16(device))
    log(f"precision: {precision}" + (f" ({note})" if note else ""))
    return precision


def autocast(device: str, enabled: bool = True):
    """The training's bfloat16 autocast on `device` ("cpu" or "cuda:N"); a no-op when not
    `enabled` (float32 training)."""
    import torch

    return torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=enabled)


def state_on_cpu(model) -> dict:
    """A copy of the model's weights on the CPU, contiguous (what safetensors saves)."""
    return {k: v.detach().to("cpu").clone().contiguous() for k, v in model.state_dict().items()}


def seeded_start(cfg, log=print) -> tuple:
    """A trainer's start, the same for both: torch and numpy seeded from `cfg.seed`, torch's
    threads set, the device and precision chosen (and said). -> (numpy Generator, device,
    whether to autocast in bfloat16)."""
    import numpy as np
    import torch

    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    rng = np.random.default_rng(cfg.seed)
    device = training_device(cfg.device, log)
    return rng, device, training_precision(cfg.precision, device, log) == "bf16"
