"""Tests for speechkd.losses.rnnt.rnnt_loss against a brute-force path enumeration and warprnnt-numba."""

import itertools

import pytest
import torch

from speechkd.losses.rnnt import rnnt_loss

torch.set_num_threads(1)


def brute_force_nll(logits: torch.Tensor, targets, T: int, U: int, blank: int) -> torch.Tensor:
    """-log P(y|x) by summing over every monotonic alignment of one utterance.

    logits: (T_max, U_max+1, V) for one utterance; the alignment is a sequence of T blanks and U
    labels whose last symbol is a blank (the terminal blank at node (T-1, U)).
    """
    lp = torch.log_softmax(logits.double(), dim=-1)
    path_scores = []
    # Choose which of the first T-1+U steps are label emissions; the final step is the terminal blank.
    for label_steps in itertools.combinations(range(T - 1 + U), U):
        t, u, score = 0, 0, lp.new_zeros(())
        for step in range(T - 1 + U):
            if step in label_steps:
                score = score + lp[t, u, targets[u]]
                u += 1
            else:
                score = score + lp[t, u, blank]
                t += 1
        assert (t, u) == (T - 1, U)
        path_scores.append(score + lp[T - 1, U, blank])
    return -torch.logsumexp(torch.stack(path_scores), dim=0)


def random_batch(seed: int, N=3, T=4, U=3, V=4, blank=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, T, U + 1, V, generator=g) * 2
    logit_lens = torch.randint(1, T + 1, (N,), generator=g)
    logit_lens[0] = T
    target_lens = torch.randint(0, U + 1, (N,), generator=g)
    target_lens[0] = U
    non_blank = torch.tensor([v for v in range(V) if v != blank])
    targets = non_blank[torch.randint(0, V - 1, (N, U), generator=g)]
    # pad positions beyond target_lens with junk (including blank) - must be ignored
    pad = torch.arange(U)[None, :] >= target_lens[:, None]
    targets = torch.where(pad, torch.full_like(targets, blank), targets)
    return logits, targets, logit_lens, target_lens


@pytest.mark.parametrize("loop", ["frames", "labels"])
@pytest.mark.parametrize("seed,blank", [(0, 0), (1, 0), (2, 3), (3, 1)])
def test_loss_and_grad_match_brute_force(seed, blank, loop):
    logits, targets, logit_lens, target_lens = random_batch(seed, blank=blank)
    logits_a = logits.clone().requires_grad_(True)
    loss = rnnt_loss(logits_a, targets, logit_lens, target_lens, blank=blank, reduction="none", loop=loop)
    logits_b = logits.double().clone().requires_grad_(True)
    ref = torch.stack(
        [
            brute_force_nll(logits_b[n], targets[n].tolist(), int(logit_lens[n]), int(target_lens[n]), blank)
            for n in range(logits.shape[0])
        ]
    )
    assert loss.shape == (logits.shape[0],)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref, atol=1e-5, rtol=1e-5)

    w = torch.tensor([1.0, -0.5, 2.0])  # distinct per-utterance weights to test per-utterance grads
    (loss * w).sum().backward()
    (ref * w.double()).sum().backward()
    torch.testing.assert_close(logits_a.grad.double(), logits_b.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("loop", ["frames", "labels"])
def test_reductions_and_padding_invariance(loop):
    logits, targets, logit_lens, target_lens = random_batch(7, N=3, T=4, U=3, V=5)
    per = rnnt_loss(logits, targets, logit_lens, target_lens, reduction="none", loop=loop)
    torch.testing.assert_close(rnnt_loss(logits, targets, logit_lens, target_lens, reduction="sum"), per.sum())
    torch.testing.assert_close(rnnt_loss(logits, targets, logit_lens, target_lens), per.mean())
    # Garbage in padded regions (frames >= T_n, lattice rows > U_n, labels > U_n) must not matter.
    logits2 = logits.clone()
    targets2 = targets.clone()
    for n in range(3):
        logits2[n, int(logit_lens[n]):] = 100.0
        logits2[n, :, int(target_lens[n]) + 1:] = -50.0
        targets2[n, int(target_lens[n]):] = 4
    per2 = rnnt_loss(logits2, targets2, logit_lens, target_lens, reduction="none", loop=loop)
    torch.testing.assert_close(per2, per)


def test_half_input_computed_in_float32():
    logits, targets, logit_lens, target_lens = random_batch(11)
    half = logits.half()
    out = rnnt_loss(half, targets, logit_lens, target_lens, reduction="none")
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, rnnt_loss(half.float(), targets, logit_lens, target_lens, reduction="none"))


@pytest.mark.parametrize("loop", ["frames", "labels"])
def test_gradcheck_float64(loop):
    logits, targets, logit_lens, target_lens = random_batch(5, N=2, T=3, U=2, V=3)
    x = logits.double().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda z: rnnt_loss(z, targets, logit_lens, target_lens, reduction="none", loop=loop), (x,), eps=1e-6,
        atol=1e-6,
    )


def test_label_and_frame_loops_agree_on_a_training_sized_lattice():
    # the shape of a student batch (about 66 frames, 4 labels): the loop over labels is the one `auto` takes
    g = torch.Generator().manual_seed(4)
    N, T, U, V = 6, 66, 5, 40
    logits = (torch.randn(N, T, U + 1, V, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    targets = torch.randint(1, V, (N, U), generator=g)
    logit_lens = torch.tensor([66, 60, 41, 30, 12, 1])
    target_lens = torch.tensor([5, 0, 4, 5, 2, 0])
    out = {}
    for loop in ("frames", "labels", "auto"):
        x = logits.detach().clone().requires_grad_(True)
        loss = rnnt_loss(x, targets, logit_lens, target_lens, reduction="none", loop=loop)
        (loss * torch.arange(1.0, N + 1, dtype=torch.float64)).sum().backward()
        out[loop] = (loss.detach(), x.grad)
    for loop in ("labels", "auto"):
        torch.testing.assert_close(out[loop][0], out["frames"][0], atol=0, rtol=1e-12)
        torch.testing.assert_close(out[loop][1], out["frames"][1], atol=1e-12, rtol=1e-10)
    with pytest.raises(ValueError, match="loop"):
        rnnt_loss(logits, targets, logit_lens, target_lens, loop="columns")


def test_zero_length_targets():
    # U = 0: the only alignment is all blanks, loss = -sum_t log p(blank | t, 0)
    logits = torch.randn(2, 3, 1, 4)
    loss = rnnt_loss(logits, torch.zeros(2, 0, dtype=torch.long), torch.tensor([3, 2]), torch.tensor([0, 0]),
                     reduction="none")
    lp = torch.log_softmax(logits, -1)[..., 0, 0]  # (N, T)
    torch.testing.assert_close(loss, torch.stack([-lp[0].sum(), -lp[1, :2].sum()]))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(logit_lens=torch.tensor([5, 1, 1])), "logit_lens"),
        (dict(logit_lens=torch.tensor([0, 1, 1])), "logit_lens"),
        (dict(target_lens=torch.tensor([4, 0, 0])), "target_lens"),
        (dict(targets=torch.zeros(3, 3, dtype=torch.long), target_lens=torch.tensor([1, 0, 0])), "blank"),
        (dict(targets=torch.full((3, 3), 9), target_lens=torch.tensor([1, 0, 0])), "outside"),
        (dict(targets=torch.ones(3, 2, dtype=torch.long)), "targets shape"),
        (dict(logits=torch.randn(3, 4, 4)), "4-D"),
        (dict(reduction="avg"), "reduction"),
        (dict(blank=7), "blank"),
    ],
)
def test_validation_errors(kwargs, match):
    logits, targets, logit_lens, target_lens = random_batch(0)
    args = dict(logits=logits, targets=targets, logit_lens=logit_lens, target_lens=target_lens)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        rnnt_loss(**args)


@pytest.mark.parametrize("loop", ["frames", "labels"])
def test_matches_warprnnt_numba(loop):
    pytest.importorskip("warprnnt_numba")
    from warprnnt_numba.rnnt_loss.rnnt_pytorch import rnnt_loss as warp_rnnt_loss
    g = torch.Generator().manual_seed(3)
    N, T, U, V = 3, 7, 4, 6
    logits = torch.randn(N, T, U + 1, V, generator=g)
    targets = torch.randint(1, V, (N, U), generator=g)
    logit_lens = torch.tensor([7, 5, 3])
    target_lens = torch.tensor([4, 2, 3])
    x1 = logits.clone().requires_grad_(True)
    ours = rnnt_loss(x1, targets, logit_lens, target_lens, reduction="none", loop=loop)
    (ours * torch.tensor([1.0, 2.0, 3.0])).sum().backward()

    x2 = logits.clone().requires_grad_(True)
    # warprnnt-numba's CPU path applies log_softmax itself on raw activations; int32 labels/lengths.
    ref = warp_rnnt_loss(
        x2, targets.int(), logit_lens.int(), target_lens.int(), blank=0, reduction="none", fastemit_lambda=0.0,
        clamp=0.0,
    )
    (ref * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-5)
    # warprnnt-numba leaves padded frames' grads at 0; so does autograd here.
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-5, rtol=1e-4)
