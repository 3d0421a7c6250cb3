"""MVQ-KD and L1/L2 loss terms: frame alignment, padding ignored, equality with hand computations."""

import math

import pytest
import torch
import torch.nn.functional as F

from speechkd.losses.distill import codebook_ce_loss, frame_regression_loss
from speechkd.methods.base import align_teacher_frames, pick_layer
from speechkd.methods.mvq_kd import CI_KEY, EMB_KEY, MvqKD, RegressionKD


def test_align_concat_and_truncate_match_manual():
    lab = torch.arange(2 * 7 * 3).reshape(2, 7, 3)  # (N, T_t, C)
    lens = torch.tensor([7, 4])
    out, out_lens = align_teacher_frames(lab, lens, num_frames=3, ratio=2, mode="concat")
    assert out.shape == (2, 3, 6) and out_lens.tolist() == [3, 2]
    assert torch.equal(out[0, 1], torch.cat([lab[0, 2], lab[0, 3]]))
    assert (out[1, 2] == -100).all() and torch.equal(out[1, 1], torch.cat([lab[1, 2], lab[1, 3]]))
    tr, tr_lens = align_teacher_frames(lab, lens, num_frames=4, ratio=2, mode="truncate")
    assert torch.equal(tr[0, :3], lab[0, 0:6:2]) and (tr[0, 3] == -100).all() and tr_lens.tolist() == [3, 2]
    same, _ = align_teacher_frames(lab.float(), lens, num_frames=9, ratio=1)
    assert same.shape == (2, 9, 3) and (same[0, 7:] == 0).all() and (same[1, 4:] == 0).all()
    with pytest.raises(ValueError):
        align_teacher_frames(lab, lens, 3, ratio=0)


def test_codebook_ce_equals_manual_and_ignores_padding():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 3, 256)
    idx = torch.randint(0, 256, (2, 5, 3))
    idx[1, 3:] = -100
    loss = codebook_ce_loss(logits, idx)
    manual, frames = 0.0, 0
    for n in range(2):
        for t in range(5):
            if idx[n, t, 0] == -100:
                continue
            frames += 1
            for q in range(3):
                manual += -F.log_softmax(logits[n, t, q], -1)[idx[n, t, q]].item()
    assert loss.item() == pytest.approx(manual / frames, rel=1e-5)
    logits2 = logits.clone()
    logits2[1, 3:] = 1e3 * torch.randn_like(logits2[1, 3:])  # garbage at padded frames
    assert codebook_ce_loss(logits2, idx).item() == pytest.approx(loss.item(), rel=1e-6)
    assert codebook_ce_loss(logits, torch.full_like(idx, -100)).item() == 0.0


def test_frame_regression_matches_manual_and_ignores_padding():
    torch.manual_seed(1)
    pred, tgt = torch.randn(2, 4, 3), torch.randn(2, 4, 3)
    lens = torch.tensor([4, 2])
    valid = torch.cat([(pred - tgt)[0], (pred - tgt)[1, :2]])
    assert frame_regression_loss(pred, tgt, lens, "l1").item() == pytest.approx(valid.abs().mean().item(), rel=1e-6)
    assert frame_regression_loss(pred, tgt, lens, "l2").item() == pytest.approx(valid.pow(2).mean().item(), rel=1e-6)
    pred2 = pred.clone()
    pred2[1, 2:] += 100
    assert frame_regression_loss(pred2, tgt, lens, "l1").item() == pytest.approx(valid.abs().mean().item(), rel=1e-6)


def test_mvq_head_on_valid_frames_equals_the_head_on_every_frame():
    # the head runs on the valid frames only; the reference runs it on every frame and masks the padded ones
    torch.manual_seed(3)
    x = torch.randn(3, 7, 8, requires_grad=True)  # (N, T_s, C)
    idx = torch.randint(0, 256, (3, 14, 2)).long()  # 2x the student's frame rate, concatenated
    label_lens, enc_lens = torch.tensor([14, 9, 12]), torch.tensor([7, 7, 4])  # both limits bite
    batch = {"labels": {CI_KEY: (idx, label_lens)}}
    kd = MvqKD(8, num_codebooks=2, layer=-1, frame_ratio=2, mode="concat", scale=0.7)
    loss, _ = kd(batch, x, enc_lens, [x])
    loss.backward()
    grads = (x.grad.clone(), kd.head.weight.grad.clone())
    x.grad, kd.head.weight.grad = None, None
    al, al_lens = align_teacher_frames(idx, label_lens, 7, 2, "concat")
    lens = torch.minimum(al_lens, enc_lens)  # [7, 4, 4]
    masked = al.masked_fill((torch.arange(7)[None, :] >= lens[:, None])[..., None], -100)
    ref = 0.7 * codebook_ce_loss(kd.head(x).reshape(3, 7, 4, 256), masked)
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    torch.testing.assert_close(grads[0], x.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grads[1], kd.head.weight.grad, rtol=1e-5, atol=1e-7)
    assert (grads[0][1, 4:] == 0).all() and (grads[0][2, 4:] == 0).all()  # padded frames get no gradient


def test_mvq_method_uses_chosen_layer_and_learns():
    torch.manual_seed(0)
    layers = [torch.randn(2, 6, 8), torch.randn(2, 6, 8)]
    idx = torch.randint(0, 256, (2, 12, 2)).long()
    batch = {"labels": {CI_KEY: (idx, torch.tensor([12, 8]))}}
    kd = MvqKD(8, num_codebooks=2, layer=1, frame_ratio=2, mode="concat")
    loss, logs = kd(batch, layers[-1], torch.tensor([6, 6]), layers)
    # initial CE is about log(256) per codebook, times 2 x 2 concatenated codebooks
    assert logs["mvq_ce"] == pytest.approx(4 * math.log(256), rel=0.2)
    layers2 = [layers[0], torch.randn(2, 6, 8)]  # a different last layer must not change a layer-1 loss
    assert kd(batch, layers2[-1], torch.tensor([6, 6]), layers2)[0].item() == pytest.approx(loss.item())
    opt = torch.optim.Adam(kd.parameters(), lr=0.05)
    for _ in range(100):
        opt.zero_grad()
        l, _ = kd(batch, layers[-1], torch.tensor([6, 6]), layers)
        l.backward()
        opt.step()
    assert l.item() < 0.5 * loss.item()
    with pytest.raises(ValueError, match="out of range"):
        pick_layer(layers, 3)


def test_regression_method_shapes():
    layers = [torch.randn(2, 5, 8)]
    emb = torch.randn(2, 5, 4)
    kd = RegressionKD(8, teacher_dim=4, kind="l2")
    loss, logs = kd({"labels": {EMB_KEY: (emb, torch.tensor([5, 3]))}}, layers[0], torch.tensor([5, 5]), layers)
    assert loss.item() > 0 and "l2_loss" in logs
