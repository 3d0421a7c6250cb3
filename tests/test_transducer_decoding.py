"""Tests for the stateless transducer model and its greedy / beam search decoding."""

import itertools
import math

import pytest
import torch
from torch import nn

from speechkd.decoding.transducer import beam_search, greedy_search
from speechkd.losses.rnnt import rnnt_loss
from speechkd.models.transducer import Decoder, Joiner, Transducer

torch.set_num_threads(1)


class LinearEncoder(nn.Module):
    """Toy encoder: x (N, T, F) -> Linear -> (N, T, C); lens unchanged; layer_outputs [out]."""

    def __init__(self, feat_dim: int, output_dim: int):
        super().__init__()
        self.output_dim = output_dim
        self.linear = nn.Linear(feat_dim, output_dim)

    def forward(self, x, x_lens):
        out = self.linear(x)
        return out, x_lens, [out]


def make_model(seed=0, V=5, context_size=2, blank=0, blank_bias=0.0, F=4, C=6, D=5, J=7):
    torch.manual_seed(seed)
    model = Transducer(
        LinearEncoder(F, C), Decoder(V, D, blank_id=blank, context_size=context_size), Joiner(C, D, J, V), blank
    )
    with torch.no_grad():
        model.joiner.output_linear.weight.mul_(3.0)  # make distributions less flat
        model.joiner.output_linear.bias[blank] += blank_bias
    return model.eval()


@torch.no_grad()
def lattice_log_probs(model, enc, y):
    """log p(k | t, y[:u]) for one utterance via the training path: enc (T, C), y list -> (T, U+1, V)."""
    y_t = torch.tensor([y], dtype=torch.long).reshape(1, len(y))
    dec = model.decoder(model.decoder_input(y_t, torch.tensor([len(y)])))[0]  # (U+1, D)
    return model.joiner(enc[:, None, :], dec[None, :, :]).log_softmax(-1)  # (T, U+1, V)


def forced_one_sym_score(model, enc, y):
    """log-sum over all one-symbol-per-frame alignments of y (len(y) labels, T - len(y) blanks)."""
    T, U = enc.shape[0], len(y)
    if U > T:
        return -math.inf
    lp = lattice_log_probs(model, enc, y).double()
    a = [[-math.inf] * (U + 1) for _ in range(T + 1)]
    a[0][0] = 0.0
    for t in range(T):
        for u in range(U + 1):
            if a[t][u] == -math.inf:
                continue
            stay = a[t][u] + float(lp[t, u, model.blank_id])
            a[t + 1][u] = float(torch.logaddexp(torch.tensor(a[t + 1][u]), torch.tensor(stay)))
            if u < U:
                go = a[t][u] + float(lp[t, u, y[u]])
                a[t + 1][u + 1] = float(torch.logaddexp(torch.tensor(a[t + 1][u + 1]), torch.tensor(go)))
    return a[T][U]


def reference_greedy(model, enc, max_sym):
    """Unbatched greedy walk on the lattice; returns (tokens, path log-prob)."""
    y, score = [], 0.0
    for t in range(enc.shape[0]):
        for _ in range(max_sym):
            lp = lattice_log_probs(model, enc[t : t + 1], y)[0, -1]  # (V,) at node (t, len(y))
            k = int(lp.argmax())
            score += float(lp[k])
            if k == model.blank_id:
                break
            y.append(k)
    return y, score


def encode(model, seed, N=3, T=5, F=4, lens=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, T, F, generator=g)
    x_lens = torch.tensor(lens if lens is not None else [T] * N)
    with torch.no_grad():
        enc, enc_lens, _ = model.encode(x, x_lens)
    return enc, enc_lens


@pytest.mark.parametrize("seed,context_size,blank", [(0, 2, 0), (1, 1, 0), (2, 3, 4)])
def test_beam1_equals_greedy_and_reference(seed, context_size, blank):
    model = make_model(seed, context_size=context_size, blank=blank, blank_bias=-1.0)
    enc, enc_lens = encode(model, seed, N=4, T=6, lens=[6, 3, 5, 1])
    greedy = greedy_search(model, enc, enc_lens, max_sym_per_frame=1)
    beam1 = beam_search(model, enc, enc_lens, beam=1, nbest=1)
    assert sum(len(h) for h in greedy) > 0  # non-vacuous: something was emitted
    for n in range(4):
        ref_y, ref_score = reference_greedy(model, enc[n, : int(enc_lens[n])], max_sym=1)
        assert greedy[n] == ref_y
        assert beam1[n][0][0] == greedy[n]
        assert beam1[n][0][1] == pytest.approx(ref_score, abs=1e-4)


@pytest.mark.parametrize("max_sym", [2, 3])
def test_greedy_multi_symbol_matches_reference(max_sym):
    model = make_model(3, blank_bias=-3.0)
    enc, enc_lens = encode(model, 3, N=3, T=4, lens=[4, 2, 3])
    hyps = greedy_search(model, enc, enc_lens, max_sym_per_frame=max_sym)
    refs = [reference_greedy(model, enc[n, : int(enc_lens[n])], max_sym)[0] for n in range(3)]
    assert hyps == refs
    assert max(len(h) / int(l) for h, l in zip(hyps, enc_lens)) > 1  # some frame emitted > 1 symbol


def test_exhaustive_beam_scores_equal_forced_rescoring():
    # V=3 (2 labels), T<=3: at most 1+2+4+8 = 15 label sequences, so beam=16 never prunes.
    model = make_model(4, V=3, blank_bias=-1.0)
    enc, enc_lens = encode(model, 4, N=2, T=3, lens=[3, 2])
    out = beam_search(model, enc, enc_lens, beam=16, nbest=16)
    for n in range(2):
        T_n = int(enc_lens[n])
        e = enc[n, :T_n]
        all_seqs = {s for L in range(T_n + 1) for s in itertools.product([1, 2], repeat=L)}
        assert {tuple(h) for h, _ in out[n]} == all_seqs
        scores = [s for _, s in out[n]]
        assert scores == sorted(scores, reverse=True)
        for h, s in out[n]:
            assert s == pytest.approx(forced_one_sym_score(model, e, h), abs=1e-4)
        # one-symbol-per-frame alignments partition the probability mass
        assert torch.logsumexp(torch.tensor(scores), 0).item() == pytest.approx(0.0, abs=1e-5)
        # best hypothesis is at least as likely as greedy's single path
        _, greedy_path = reference_greedy(model, e, max_sym=1)
        assert out[n][0][1] >= greedy_path - 1e-6


def test_pruned_beam_nbest_sorted_and_bounded_by_forced_score():
    model = make_model(5, V=5, blank_bias=-0.5)
    enc, enc_lens = encode(model, 5, N=2, T=6, lens=[6, 4])
    out = beam_search(model, enc, enc_lens, beam=4, nbest=4)
    for n in range(2):
        e = enc[n, : int(enc_lens[n])]
        assert len(out[n]) == 4
        seqs = [tuple(h) for h, _ in out[n]]
        assert len(set(seqs)) == len(seqs)  # merged: no duplicate label sequences
        scores = [s for _, s in out[n]]
        assert scores == sorted(scores, reverse=True)
        for h, s in out[n]:
            assert all(k != model.blank_id for k in h)
            # pruning only drops alignments, so the score can't exceed the full forced score
            assert s <= forced_one_sym_score(model, e, h) + 1e-5


def test_decoder_is_causal_and_pad_consistent():
    torch.manual_seed(0)
    dec = Decoder(vocab_size=7, decoder_dim=4, blank_id=0, context_size=3)
    y = torch.randint(1, 7, (2, 6))
    out = dec(y)  # (N, U, D)
    assert out.shape == (2, 6, 4)
    for k in range(6):
        y2 = y.clone()
        y2[:, k] = (y2[:, k] % 6) + 1  # different non-blank token
        out2 = dec(y2)
        torch.testing.assert_close(out2[:, :k], out[:, :k])  # positions before k untouched
        assert not torch.allclose(out2[:, k], out[:, k])  # position k sees y[k]
    # need_pad=True equals sliding windows over blank-padded context with need_pad=False
    padded = torch.cat([torch.zeros(2, 2, dtype=torch.long), y], dim=1)
    for u in range(6):
        torch.testing.assert_close(dec(padded[:, u : u + 3], need_pad=False)[:, 0], out[:, u])
    with pytest.raises(ValueError, match="context_size"):
        dec(y[:, :2], need_pad=False)
    with pytest.raises(ValueError, match="outside"):
        dec(torch.full((1, 3), 7))


def test_encoder_logits_equals_joiner_without_predictor():
    torch.manual_seed(1)
    joiner = Joiner(encoder_dim=6, decoder_dim=5, joiner_dim=7, vocab_size=9)
    with torch.no_grad():
        joiner.decoder_proj.bias.zero_()
    enc = torch.randn(2, 4, 6)
    ref = joiner(enc, torch.zeros(2, 4, 5))
    torch.testing.assert_close(joiner.encoder_logits(enc), ref)
    # and the broadcasting joiner equals a per-pair loop
    dec = torch.randn(2, 3, 5)
    full = joiner(enc[:, :, None], dec[:, None])  # (N, T, U+1, V)
    assert full.shape == (2, 4, 3, 9)
    torch.testing.assert_close(full[1, 2, 1], joiner(enc[1, 2], dec[1, 1]))


def test_transducer_loss_equals_rnnt_loss_on_hand_built_logits():
    model = make_model(6, V=6, context_size=2).train()
    N, T, U, F = 3, 5, 3, 4
    g = torch.Generator().manual_seed(6)
    x = torch.randn(N, T, F, generator=g)
    x_lens = torch.tensor([5, 4, 2])
    y = torch.randint(1, 6, (N, U), generator=g)
    y_lens = torch.tensor([3, 1, 2])
    y_padded = y.clone()
    y_padded[1, 1:] = -1  # arbitrary padding values beyond y_lens
    y_padded[2, 2:] = 0
    loss, enc, enc_lens, layers = model(x, x_lens, y_padded, y_lens)
    assert len(layers) == 1 and layers[0].shape == (N, T, 6)

    # hand-built lattice: node (t, u) = joiner(enc[t], predictor(last c tokens of [blank]*c + y[:u]))
    logits = torch.zeros(N, T, U + 1, 6)
    for n in range(N):
        for u in range(U + 1):
            hist = [0, 0] + [int(v) for v in y[n, : min(u, int(y_lens[n]))]]
            d = model.decoder(torch.tensor([hist[-2:]]), need_pad=False)[0, 0]  # (D,)
            for t in range(T):
                logits[n, t, u] = model.joiner(enc[n, t], d)
    targets = torch.where(torch.arange(U)[None] < y_lens[:, None], y, torch.zeros_like(y))
    ref = rnnt_loss(logits, targets, enc_lens, y_lens, reduction="none")
    per = model.transducer_loss(enc, enc_lens, y_padded, y_lens, reduction="none")
    torch.testing.assert_close(per, ref)
    torch.testing.assert_close(loss, ref.mean())
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_argument_validation():
    model = make_model(0)
    enc, enc_lens = encode(model, 0)
    with pytest.raises(ValueError, match="beam"):
        beam_search(model, enc, enc_lens, beam=0)
    with pytest.raises(ValueError, match="nbest"):
        beam_search(model, enc, enc_lens, beam=2, nbest=3)
    with pytest.raises(ValueError, match="max_sym_per_frame"):
        greedy_search(model, enc, enc_lens, max_sym_per_frame=0)
    with pytest.raises(ValueError, match="encoder_out_lens"):
        greedy_search(model, enc, enc_lens + 10)
    with pytest.raises(ValueError, match="encoder_dim"):
        Transducer(LinearEncoder(4, 3), Decoder(5, 5), Joiner(6, 5, 7, 5))
