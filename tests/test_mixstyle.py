"""MixStyle in the classifier's training (wbc_batch.train.mixstyle): what it mixes, and that
it is gone outside training."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from wbc_batch.nets import ResNetClassifier  # noqa: E402
from wbc_batch.train.mixstyle import mix_styles, mixing_styles, stage_ends  # noqa: E402


def _maps(seed=0, n=6):
    g = torch.Generator().manual_seed(seed)
    scale = torch.linspace(0.5, 3.0, n).view(n, 1, 1, 1)  # each sample its own style
    return torch.randn(n, 4, 9, 9, generator=g) * scale + torch.arange(n).view(n, 1, 1, 1)


def test_mixed_maps_take_a_mix_of_two_samples_statistics_and_keep_their_content():
    x = _maps()
    out = mix_styles(x, np.random.default_rng(1), p=1.0)
    rng = np.random.default_rng(1)  # the same draws, in the same order
    rng.random()
    lam = rng.beta(0.1, 0.1, size=6).reshape(6, 1, 1)
    perm = rng.permutation(6)
    mu, sig = x.mean(dim=(2, 3)).numpy(), (x.var(dim=(2, 3)) + 1e-6).sqrt().numpy()
    want_mu = lam[:, :, 0] * mu + (1 - lam[:, :, 0]) * mu[perm]
    want_sig = lam[:, :, 0] * sig + (1 - lam[:, :, 0]) * sig[perm]
    np.testing.assert_allclose(out.mean(dim=(2, 3)).numpy(), want_mu, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out.std(dim=(2, 3)).numpy(), want_sig, rtol=1e-3)
    # the pattern within each map is its own: standardised, the maps are the same
    z = lambda t: (t - t.mean(dim=(2, 3), keepdim=True)) / t.std(dim=(2, 3), keepdim=True)  # noqa: E731
    np.testing.assert_allclose(z(out).numpy(), z(x).numpy(), atol=1e-3)
    assert not np.allclose(out.numpy(), x.numpy())


def test_no_mixing_at_p_zero_or_for_a_single_sample():
    x = _maps()
    assert mix_styles(x, np.random.default_rng(0), p=0.0) is x
    one = x[:1]
    assert mix_styles(one, np.random.default_rng(0), p=1.0) is one


def test_mixing_keeps_a_bfloat16_map_bfloat16():
    x = _maps().to(torch.bfloat16)
    out = mix_styles(x, np.random.default_rng(2), p=1.0)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape


def test_the_hooks_sit_after_the_first_two_stages_and_mix_in_training_only():
    assert stage_ends((2, 2, 2, 2)) == [1, 3]
    assert stage_ends((1, 3, 1, 1)) == [0, 3]
    torch.manual_seed(0)
    model = ResNetClassifier(widths=(8, 8, 16, 16), blocks=(1, 1, 1, 1)).eval()
    x = torch.randn(4, 3, 32, 32) * torch.tensor([0.5, 1, 2, 4]).view(4, 1, 1, 1)
    plain = model(x)
    with mixing_styles(model, (1, 1, 1, 1), p=1.0, seed=0):
        assert [len(model.layers[i]._forward_hooks) for i in range(4)] == [1, 1, 0, 0]
        assert torch.equal(model(x), plain)  # eval mode: never mixed
        model.train()
        model.dropout.p = 0.0
        mixed = model(x)
        model.eval()
    assert not torch.allclose(mixed, plain)
    assert all(not model.layers[i]._forward_hooks for i in range(4))  # gone after the block
    assert torch.equal(model(x), plain)


def test_at_p_zero_nothing_is_hooked_or_drawn(monkeypatch):
    import wbc_batch.train.mixstyle as mixstyle

    monkeypatch.setattr(mixstyle.np.random, "default_rng",
                        lambda *a: pytest.fail("a generator was made at p = 0"))
    model = ResNetClassifier(widths=(8, 8, 16, 16), blocks=(1, 1, 1, 1))
    with mixing_styles(model, (1, 1, 1, 1), p=0.0, seed=0):
        assert all(not model.layers[i]._forward_hooks for i in range(4))


def test_the_hooks_are_removed_when_training_fails():
    model = ResNetClassifier(widths=(8, 8, 16, 16), blocks=(1, 1, 1, 1))
    with pytest.raises(RuntimeError):
        with mixing_styles(model, (1, 1, 1, 1), p=0.5, seed=0):
            raise RuntimeError("training stopped")
    assert all(not model.layers[i]._forward_hooks for i in range(4))


def test_the_statistics_are_taken_as_constants():
    """As in the paper: the gradient flows through each map's own pattern only, scaled by the
    mixed spread over its own, and not through the means and spreads that were mixed."""
    x = _maps().requires_grad_(True)
    out = mix_styles(x, np.random.default_rng(3), p=1.0)
    out.sum().backward()
    rng = np.random.default_rng(3)
    rng.random()
    lam = rng.beta(0.1, 0.1, size=6).reshape(6, 1)
    perm = rng.permutation(6)
    sig = (x.detach().var(dim=(2, 3)) + 1e-6).sqrt().numpy()
    want = (lam * sig + (1 - lam) * sig[perm]) / sig
    np.testing.assert_allclose(x.grad.numpy(), np.broadcast_to(want[:, :, None, None], x.shape),
                               rtol=1e-4)
