"""MixStyle (Zhou et al., ICLR 2021): mixing crops' feature statistics while the classifier trains.

A convolutional feature map's per-channel mean and spread over the image carry much of its
"style" (for a smear: stain, lamp, camera) and little of its content. After each chosen block,
with chance `p` per batch (drawn at each block on its own), `mix_styles` gives each crop's map
a mean and spread that are a random mix (weight drawn from Beta(`alpha`, `alpha`)) of its own
and those of another crop of the batch, so the later blocks learn to read cells under styles
between the training sources'.

It is attached with forward hooks for the training's duration (`mixing_styles`) and does
nothing in eval mode, so the network, its weights file and the run-time path are unchanged. Its
draws come from a numpy generator of its own, so a training without it draws what it drew.
"""

from __future__ import annotations

import contextlib

import numpy as np

#: the paper's Beta parameter: most weights near 0 or 1, a few in between
ALPHA = 0.1
#: stages (counted from the first) after whose last block styles are mixed, as in the paper
STAGES = 2
EPS = 1e-6


def mix_styles(x, rng: np.random.Generator, p: float, alpha: float = ALPHA):
    """`x` (N, C, H, W) with, with chance `p`, each sample's channel means and spreads mixed
    with those of another sample (a random pairing); `x` itself otherwise, or for N < 2.
    The statistics are computed in float32 and taken as constants (no gradient through them)."""
    import torch

    n = x.shape[0]
    if n < 2 or rng.random() >= p:
        return x
    lam = torch.from_numpy(rng.beta(alpha, alpha, size=n).astype(np.float32)).view(n, 1, 1, 1)
    perm = torch.from_numpy(rng.permutation(n))
    xf = x.float()
    mu = xf.mean(dim=(2, 3), keepdim=True).detach()
    sig = (xf.var(dim=(2, 3), keepdim=True) + EPS).sqrt().detach()
    lam = lam.to(xf.device)
    mixed_mu = lam * mu + (1 - lam) * mu[perm]
    mixed_sig = lam * sig + (1 - lam) * sig[perm]
    return ((xf - mu) / sig * mixed_sig + mixed_mu).to(x.dtype)


def stage_ends(blocks) -> list:
    """Indices, in the ResNet's flat `layers`, of the last block of each of its first `STAGES`
    stages (`blocks`: blocks per stage)."""
    ends = np.cumsum(blocks) - 1
    return [int(i) for i in ends[:STAGES]]


@contextlib.contextmanager
def mixing_styles(model, blocks, p: float, seed: int):
    """Within the block, `model` (a `nets.ResNetClassifier`) mixes styles after the last block
    of its first stages while in training mode; nothing at p = 0 (no hook, no draw)."""
    if p <= 0:
        yield
        return
    rng = np.random.default_rng([seed, 0x5717E])  # its own stream, apart from the training's

    def hook(module, inputs, output):
        return mix_styles(output, rng, p) if module.training else output

    handles = [model.layers[i].register_forward_hook(hook) for i in stage_ends(blocks)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
