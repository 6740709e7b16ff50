"""Time one training step of each default network in float32 and under bfloat16 autocast.

    python benchmarks/train_step.py [--threads 2] [--steps 4] [--device cpu]

The recipe's training time depends on whether the machine does bfloat16 in hardware (a CPU with
AVX512-BF16 or AMX, most CUDA GPUs); elsewhere PyTorch emulates it and autocast is slower than
float32. `wbc-batch train --precision auto` picks by the same probe this script prints
(`wbc_batch.train.device.native_bf16`). Each step is a forward and backward pass and an AdamW
update on random data of the recipe's shapes: the segmenter on a batch of 12 192x192 patches,
the classifier on a batch of 64 96x96 crops, with the architectures of the shipped bundle. The
first step of each setting is a warm-up and is not counted; the median of the others is printed.
"""

from __future__ import annotations

import argparse
import statistics
import time


def step_seconds(model, x, y, bf16: bool, steps: int, device: str) -> float:
    """Median seconds of a training step (after one warm-up step)."""
    import torch
    import torch.nn.functional as F

    from wbc_batch.train.device import autocast

    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    times = []
    for _ in range(steps + 1):
        t = time.perf_counter()
        with autocast(device, bf16):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
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
    print(f"{'network':<32} {'fp32 s/step':>12} {'bf16 s/step':>12} {'bf16 / fp32':>12}")
    for name, (model, xshape, yshape, classes) in cases.items():
        model.to(device).train()
        x = torch.randn(xshape, device=device)
        y = torch.randint(0, classes, yshape, device=device)
        fp32 = step_seconds(model, x, y, False, args.steps, device)
        bf16 = step_seconds(model, x, y, True, args.steps, device)
        print(f"{name:<32} {fp32:>12.3f} {bf16:>12.3f} {bf16 / fp32:>11.2f}x")


if __name__ == "__main__":
    main()
