"""Downstream heads (SUPERB KWS, x-vector SV) and the AM-softmax loss, on tiny random tensors."""

import pytest
import torch
import torch.nn.functional as F

from speechkd.models.heads import (
    AMSoftmaxLoss,
    KwsHead,
    WeightedLayerSum,
    XVectorHead,
    masked_mean,
    masked_mean_std,
)


def _layers(L=3, N=2, T=20, C=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(N, T, C, generator=g) for _ in range(L)]


def _pad(layers, extra, value=7.0):
    """Append ``extra`` garbage frames to every layer (N, T, C) -> (N, T + extra, C)."""
    return [torch.cat([h, torch.full((h.shape[0], extra, h.shape[2]), value)], dim=1) for h in layers]


def test_am_softmax_matches_hand_computation():
    torch.manual_seed(0)
    loss_fn = AMSoftmaxLoss(embed_dim=4, num_classes=3, s=30.0, m=0.4)
    x = torch.randn(5, 4)
    y = torch.tensor([0, 2, 1, 1, 0])
    w = loss_fn.weight.detach()
    cos = (x / x.norm(dim=1, keepdim=True)) @ (w / w.norm(dim=1, keepdim=True)).T  # (N, K)
    expected = []
    for n in range(5):
        target = 30.0 * (cos[n, y[n]] - 0.4)
        others = torch.stack([30.0 * cos[n, k] for k in range(3) if k != y[n]])
        expected.append(-(target - torch.log(torch.exp(target) + torch.exp(others).sum())))
    expected = torch.stack(expected)
    torch.testing.assert_close(loss_fn(x, y, reduction="none"), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss_fn(x, y), expected.mean(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss_fn.cosine(x), cos, rtol=1e-5, atol=1e-6)


def test_am_softmax_without_margin_is_scaled_softmax_ce_and_ignores():
    torch.manual_seed(1)
    loss_fn = AMSoftmaxLoss(embed_dim=6, num_classes=4, s=30.0, m=0.0)
    x = torch.randn(7, 6)
    y = torch.randint(0, 4, (7,))
    torch.testing.assert_close(loss_fn(x, y), F.cross_entropy(30.0 * loss_fn.cosine(x), y))
    m_fn = AMSoftmaxLoss(embed_dim=6, num_classes=4)
    y2 = y.clone()
    y2[[1, 4]] = -100
    keep = y2 != -100
    torch.testing.assert_close(m_fn(x, y2), m_fn(x[keep], y[keep]))
    all_ignored = m_fn(x, torch.full((7,), -100))
    assert all_ignored.item() == 0.0 and all_ignored.requires_grad
    with pytest.raises(ValueError, match=r"targets must be in \[0, 4\)"):
        m_fn(x, torch.full((7,), 4))


def test_weighted_layer_sum_one_hot_picks_layer_and_masks():
    layers = _layers(L=4)
    wls = WeightedLayerSum(4)
    with torch.no_grad():
        wls.weights.copy_(torch.tensor([-1e4, -1e4, 0.0, -1e4]))
    torch.testing.assert_close(wls(layers), layers[2])
    torch.testing.assert_close(wls(torch.stack(layers)), layers[2])
    out = wls(layers, torch.tensor([20, 5]))
    assert out[1, 5:].abs().sum() == 0 and torch.equal(out[1, :5], layers[2][1, :5])
    # default: uniform average; layer norm variant normalises each frame before the sum
    torch.testing.assert_close(WeightedLayerSum(4)(layers), torch.stack(layers).mean(0))
    ln = WeightedLayerSum(4, layer_norm=True)(layers)
    torch.testing.assert_close(ln, torch.stack([F.layer_norm(h, (8,)) for h in layers]).mean(0))
    with pytest.raises(ValueError, match="expected 4 layers"):
        wls(layers[:3])


def test_masked_pooling_ignores_padding():
    x = torch.randn(1, 6, 3)
    torch.testing.assert_close(masked_mean(x, torch.tensor([4])), x[:, :4].mean(1))
    stats = masked_mean_std(x, torch.tensor([4]))
    torch.testing.assert_close(stats[:, 3:], x[:, :4].std(1, unbiased=False))
    with pytest.raises(ValueError, match=r"lens must be in \[1, T=6\]"):
        masked_mean(x, torch.tensor([7]))


@pytest.mark.parametrize("head_kind", ["kws", "xvector", "xvector_same"])
def test_heads_padding_never_changes_outputs(head_kind):
    torch.manual_seed(0)
    L, C = 3, 8
    if head_kind == "kws":
        head = KwsHead(L, C, num_classes=12, proj_dim=16)
    else:
        head = XVectorHead(L, C, proj_dim=16, stats_dim=24, embed_dim=10,
                           padding="same" if head_kind == "xvector_same" else "valid")
    long_, short = _layers(L, N=1, T=30, C=C, seed=1), _layers(L, N=1, T=18, C=C, seed=2)
    batch = [torch.cat([a, torch.cat([b, torch.full((1, 12, C), 5.0)], 1)], 0) for a, b in zip(long_, short)]
    lens = torch.tensor([30, 18])
    # training mode (batch norm with batch statistics): extra padding of the whole batch changes nothing
    head.train()
    out = head(batch, lens)
    torch.testing.assert_close(head(_pad(batch, 9), lens), out, rtol=1e-5, atol=1e-5)
    # eval mode: an utterance alone == the same utterance padded in a batch
    head.eval()
    with torch.no_grad():
        out = head(batch, lens)
        torch.testing.assert_close(out[1:], head(short, torch.tensor([18])), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out[:1], head(long_, torch.tensor([30])), rtol=1e-5, atol=1e-5)


def test_xvector_shapes_and_min_frames():
    head = XVectorHead(num_layers=2, input_dim=8, proj_dim=16, stats_dim=24, embed_dim=10)
    assert head.min_frames == 15
    emb = head(_layers(L=2, N=3, T=20), torch.tensor([20, 15, 17]))
    assert emb.shape == (3, 10)
    assert KwsHead(2, 8)(_layers(L=2, N=3, T=20), torch.tensor([20, 1, 7])).shape == (3, 12)
    with pytest.raises(ValueError, match=">= 15 frames"):
        head(_layers(L=2, N=2, T=20), torch.tensor([20, 14]))
    same = XVectorHead(num_layers=2, input_dim=8, proj_dim=16, stats_dim=24, embed_dim=10, padding="same")
    assert same.min_frames == 1 and same(_layers(L=2, N=2, T=20), torch.tensor([20, 3])).shape == (2, 10)
