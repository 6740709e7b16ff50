"""Time one training step of each default network: float32 and bfloat16 autocast, and the
memory order of the weights.

    python benchmarks/train_step.py [--threads 2] [--steps 4] [--device cpu]

The recipe's training time depends on whether the machine does bfloat16 in hardware (a CPU with
AVX512-BF16 or AMX, most CUDA GPUs); elsewhere PyTorch emulates it and autocast is slower than
float32. `wbc-batch train --precision auto` picks by the same probe this script prints
(`wbc_batch.train.device.native_bf16`). On a CPU the trainers also keep the weights in
channels-last memory order (`wbc_batch.nets.to_device`); the column "fp32 NCHW" is float32 in
PyTorch's default order, for comparison. Each step is a forward and backward pass and an AdamW
update on random data of the recipe's shapes: the segmenter on a batch of 12 192x192 patches,
the classifier on a batch of 64 96x96 crops, with the architectures of the shipped bundle. The
settings take turns, step by step, so that a machine that gets busier or quieter part way
affects each alike. The first step of each setting is a warm-up and is not counted; the median
of the others is printed.
"""

from __future__ import annotations

import argparse
import statistics
import time


def one_step(model, opt, x, y, bf16: bool, device: str) -> float:
    """Seconds of one training step (forward, backward, AdamW update)."""
    import torch
    import torch.nn.functional as F

    from wbc_batch.train.device import autocast

    t = time.perf_counter()
    with autocast(device, bf16):
        logits = model(x)
    loss = F.cross_entropy(logits.float(), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t


def settings(model, device: str) -> dict:
    """name -> (model copy, its optimiser, bf16): the weights as the trainers place them
    (`nets.to_device`) in float32 and in bfloat16 autocast, and float32 in the default order."""
    import copy

    import torch

    from wbc_batch.nets import to_device

    out = {}
    for name, bf16, place in (("fp32 NCHW", False, lambda m: m.to(device)),
                              ("fp32", False, lambda m: to_device(m, device)),
                              ("bf16", True, lambda m: to_device(m, device))):
        m = place(copy.deepcopy(model)).train()
        out[name] = (m, torch.optim.AdamW(m.parameters(), lr=1e-3), bf16)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per setting (after a warm-up)")
    ap.add_argument("--device", default="cpu", help="cpu, auto, cuda or cuda:N")
    args = ap.parse_args(argv)

    import torch

    from wbc_batch.bundle import load_bundle
    from wbc_batch.nets import build_classifier, build_segmenter
    from wbc_batch.train.device import native_bf16, resolve_precision, training_device

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    device = training_device(args.device)
    native = native_bf16(device)
    meta = load_bundle().meta
    print(f"torch {torch.__version__}, {device}, {args.threads} threads; "
          f"native bfloat16: {'yes' if native else 'no'}; "
          f"--precision auto trains in {resolve_precision('auto', device, native)[0]}")
    cases = {
        "segmenter (batch 12, 192x192)": (build_segmenter(meta), (12, 3, 192, 192), (12, 192, 192), 3),
        "classifier (batch 64, 96x96)": (build_classifier(meta), (64, 3, 96, 96), (64,), 5),
    }
    names = ("fp32 NCHW", "fp32", "bf16")
    print(f"{'network, s/step':<32}" + "".join(f"{n:>11}" for n in names)
          + f"{'fp32/NCHW':>11}{'bf16/fp32':>11}")
    for name, (model, xshape, yshape, classes) in cases.items():
        x = torch.randn(xshape, device=device)
        y = torch.randint(0, classes, yshape, device=device)
        runs = settings(model, device)
        times = {n: [] for n in runs}
        for _ in range(args.steps + 1):  # the settings take turns; the first round is a warm-up
            for n, (m, opt, bf16) in runs.items():
                times[n].append(one_step(m, opt, x, y, bf16, device))
        med = {n: statistics.median(t[1:]) for n, t in times.items()}
        print(f"{name:<32}" + "".join(f"{med[n]:>11.3f}" for n in names)
              + f"{med['fp32'] / med['fp32 NCHW']:>10.2f}x{med['bf16'] / med['fp32']:>10.2f}x")


if __name__ == "__main__":
    main()
