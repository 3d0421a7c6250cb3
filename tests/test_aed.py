"""Tests for the attention encoder-decoder (AED) model and its greedy / beam search decoding."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from speechkd.decoding.aed import beam_search, greedy_search
from speechkd.models.aed import AttentionDecoder, AttentionEncoderDecoder
from speechkd.models.conformer import ConformerEncoder

torch.set_num_threads(1)

FEAT = 8  # input feature dim F


def make_model(seed=0, V=8, decoder_dim=16, ctc_head=False, sharpen=1.0, trainable=False):
    """Tiny Conformer (dim 16, 1 layer, 2x subsampling) + 1-layer decoder, eval mode, no dropout.

    Parameters are frozen unless ``trainable`` (the tests only read values).
    """
    torch.manual_seed(seed)
    enc = ConformerEncoder(input_dim=FEAT, dim=16, num_layers=1, num_heads=2, ff_dim=32, conv_kernel=3,
                           subsampling=2, dropout=0.0)
    dec = AttentionDecoder(V, encoder_dim=16, decoder_dim=decoder_dim, num_layers=1, num_heads=2, ff_dim=32,
                           dropout=0.0)
    model = AttentionEncoderDecoder(enc, dec, ctc_head=ctc_head)
    with torch.no_grad():
        model.decoder.output_linear.weight.mul_(sharpen)  # less flat distributions for decoding tests
    return model.eval().requires_grad_(trainable)


def encode(model, seed, N=3, T=16, lens=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, T, FEAT, generator=g)
    x_lens = torch.tensor(lens if lens is not None else [T] * N)
    with torch.no_grad():
        enc, enc_lens, _ = model.encode(x, x_lens)
    return enc, enc_lens


def labels(seed, N=3, U=5, V=8, lens=(5, 2, 0)):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(1, V, (N, U), generator=g)
    return y, torch.tensor(lens)


@torch.no_grad()
def forced_score(model, enc, enc_len, hyp):
    """-sequence_loss (no smoothing) of one hypothesis: log P(hyp, eos | x) by teacher forcing."""
    y = torch.tensor([hyp], dtype=torch.long).reshape(1, len(hyp))
    loss = model.sequence_loss(enc[None, :enc_len], torch.tensor([enc_len]), y, torch.tensor([len(hyp)]))
    return -float(loss[0])


@pytest.mark.parametrize("decoder_dim", [16, 8])
def test_logits_shape_and_sequence_loss_equals_gathered_log_probs(decoder_dim):
    model = make_model(0, decoder_dim=decoder_dim)
    enc, enc_lens = encode(model, 0, lens=[16, 11, 7])
    y, y_lens = labels(0)
    logits = model.decoder_logits(enc, enc_lens, y, y_lens)
    assert logits.shape == (3, 6, 8)
    lp = logits.detach().log_softmax(-1)
    per = model.sequence_loss(enc, enc_lens, y, y_lens)
    assert per.shape == (3,)
    for n in range(3):
        L = int(y_lens[n])
        targets = y[n, :L].tolist() + [model.eos_id]
        ref = -sum(float(lp[n, u, k]) for u, k in enumerate(targets))
        assert float(per[n]) == pytest.approx(ref, abs=1e-5)
    torch.testing.assert_close(model.sequence_loss(enc, enc_lens, y, y_lens, reduction="mean"), per.mean())
    torch.testing.assert_close(model.sequence_loss(enc, enc_lens, y, y_lens, reduction="sum"), per.sum())
    # padding values beyond y_lens (even invalid ids) change nothing
    y_pad = y.clone()
    y_pad[1, 2:] = -1
    y_pad[2, :] = 123
    torch.testing.assert_close(model.sequence_loss(enc, enc_lens, y_pad, y_lens), per)
    torch.testing.assert_close(model.decoder_logits(enc, enc_lens, y_pad, y_lens)[0], logits[0])


def test_label_smoothing_matches_cross_entropy():
    model = make_model(1)
    enc, enc_lens = encode(model, 1, lens=[16, 12, 9])
    y, y_lens = labels(1, lens=(4, 5, 1))
    eps = 0.1
    logits = model.decoder_logits(enc, enc_lens, y, y_lens)
    per = model.sequence_loss(enc, enc_lens, y, y_lens, label_smoothing=eps)
    for n in range(3):
        L = int(y_lens[n])
        targets = torch.tensor(y[n, :L].tolist() + [model.eos_id])
        ref = F.cross_entropy(logits[n, : L + 1], targets, label_smoothing=eps, reduction="sum")
        assert float(per[n]) == pytest.approx(float(ref), abs=1e-5)
    loss, *_ = model(torch.randn(2, 12, FEAT), torch.tensor([12, 10]), y[:2], y_lens[:2], label_smoothing=eps)
    assert loss.dim() == 0 and torch.isfinite(loss)


def test_decoder_is_causal():
    model = make_model(2)
    enc, enc_lens = encode(model, 2, N=2, lens=[16, 10])
    y, y_lens = labels(2, N=2, U=5, lens=(5, 5))
    logits = model.decoder_logits(enc, enc_lens, y, y_lens)
    for k in range(5):
        y2 = y.clone()
        y2[:, k] = y2[:, k] % 7 + 1  # a different label
        logits2 = model.decoder_logits(enc, enc_lens, y2, y_lens)
        torch.testing.assert_close(logits2[:, : k + 1], logits[:, : k + 1])  # positions <= k untouched
        assert not torch.allclose(logits2[:, k + 1], logits[:, k + 1])  # position k+1 sees y[k]


def test_encoder_padding_is_ignored():
    model = make_model(3)
    enc, enc_lens = encode(model, 3, N=2, lens=[16, 9])
    y, y_lens = labels(3, N=2, lens=(3, 4))
    logits = model.decoder_logits(enc, enc_lens, y, y_lens)
    g = torch.Generator().manual_seed(30)
    padded = torch.cat([enc, 100 * torch.randn(2, 5, enc.shape[2], generator=g)], dim=1)  # garbage frames
    torch.testing.assert_close(model.decoder_logits(padded, enc_lens, y, y_lens), logits)
    # and the shorter utterance's own padding inside the batch: same as decoding it alone
    T1 = int(enc_lens[1])
    alone = model.decoder_logits(enc[1:, :T1], enc_lens[1:], y[1:], y_lens[1:])
    torch.testing.assert_close(alone, logits[1:], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(model.decoder_logits(enc, enc_lens - 1, y, y_lens), logits)  # frames do matter


def test_beam_nbest_sorted_distinct_and_scores_equal_forced_rescoring():
    model = make_model(4, sharpen=3.0)
    enc, enc_lens = encode(model, 4, N=3, lens=[16, 12, 8])
    out = beam_search(model, enc, enc_lens, beam=5)
    for n in range(3):
        T_n = int(enc_lens[n])
        assert 2 <= len(out[n]) <= 5
        seqs = [tuple(h) for h, _ in out[n]]
        assert len(set(seqs)) == len(seqs)
        scores = [s for _, s in out[n]]
        assert scores == sorted(scores, reverse=True)
        for h, s in out[n]:
            assert all(1 <= k < model.vocab_size for k in h) and len(h) <= T_n
            assert s == pytest.approx(forced_score(model, enc[n], T_n, h), abs=1e-4)
    # batched forced rescoring of a whole N-best list (padded y) gives the same scores
    hyps = [h for h, _ in out[0]]
    U = max(len(h) for h in hyps)
    y = torch.tensor([h + [-7] * (U - len(h)) for h in hyps], dtype=torch.long).reshape(len(hyps), U)
    H = len(hyps)
    per = model.sequence_loss(enc[:1].expand(H, -1, -1), enc_lens[:1].expand(H), y, torch.tensor([len(h) for h in hyps]))
    torch.testing.assert_close(-per.double(), torch.tensor([s for _, s in out[0]], dtype=torch.float64), atol=1e-4, rtol=0)


def test_max_len_forces_eos_step():
    model = make_model(5, sharpen=3.0)
    with torch.no_grad():
        model.decoder.output_linear.bias[model.eos_id] -= 10.0  # eos very unlikely: hypotheses hit max_len
    enc, enc_lens = encode(model, 5, N=2, lens=[16, 10])
    out = beam_search(model, enc, enc_lens, beam=3, max_len=3)
    greedy = greedy_search(model, enc, enc_lens, max_len=3)
    assert all(len(h) == 3 for h in greedy)
    assert [b[0][0] for b in beam_search(model, enc, enc_lens, beam=1, max_len=3)] == greedy
    for n in range(2):
        assert len(out[n]) == 3
        for h, s in out[n]:
            assert len(h) == 3
            assert s == pytest.approx(forced_score(model, enc[n], int(enc_lens[n]), h), abs=1e-4)
    assert beam_search(model, enc, enc_lens, beam=2, max_len=0) == [
        [([], pytest.approx(forced_score(model, enc[n], int(enc_lens[n]), []), abs=1e-4))] for n in range(2)
    ]


def test_unpruned_beam_equals_exhaustive_search():
    # V=3 (labels 1, 2), max_len=3: 1+2+4+8 = 15 sequences; at most 8 running hyps x 3 tokens per step,
    # so beam=24 never prunes and the N-best must be the exact top of all 15 (also checks early stopping).
    model = make_model(11, V=3, sharpen=3.0)
    enc, enc_lens = encode(model, 11, N=2, lens=[16, 9])
    out = beam_search(model, enc, enc_lens, beam=24, nbest=5, max_len=3)
    everything = beam_search(model, enc, enc_lens, beam=24, max_len=3)
    for n in range(2):
        T_n = int(enc_lens[n])
        seqs = [list(s) for L in range(4) for s in itertools.product([1, 2], repeat=L)]
        ref = sorted(((forced_score(model, enc[n], T_n, s), s) for s in seqs), key=lambda p: p[0], reverse=True)
        assert [h for h, _ in out[n]] == [s for _, s in ref[:5]]
        assert [sc for _, sc in out[n]] == pytest.approx([sc for sc, _ in ref[:5]], abs=1e-4)
        assert sorted(tuple(h) for h, _ in everything[n]) == sorted(tuple(s) for s in seqs)


@pytest.mark.parametrize("seed", [6, 7, 8])
def test_beam1_equals_greedy_and_wider_beam_not_worse(seed):
    model = make_model(seed, sharpen=2.0)
    enc, enc_lens = encode(model, seed, N=4, lens=[16, 13, 9, 5])
    greedy = greedy_search(model, enc, enc_lens)
    beam1 = beam_search(model, enc, enc_lens, beam=1)
    assert [b[0][0] for b in beam1] == greedy
    assert sum(len(h) for h in greedy) > 0  # non-vacuous
    best = [[b[0][1] for b in beam1]]
    for width in (2, 4, 8):
        out = beam_search(model, enc, enc_lens, beam=width, nbest=1)
        assert all(len(o) == 1 for o in out)
        best.append([o[0][1] for o in out])
    for narrow, wide in zip(best, best[1:]):
        for a, b in zip(narrow, wide):
            assert b >= a - 1e-6
    # nbest only truncates: the top of the full list is the nbest=1 answer
    full = beam_search(model, enc, enc_lens, beam=8)
    assert [f[0] for f in full] == [o[0] for o in beam_search(model, enc, enc_lens, beam=8, nbest=1)]


def test_tiny_model_overfits_two_utterances():
    model = make_model(9, trainable=True).train()
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 20, FEAT, generator=g)
    x_lens = torch.tensor([20, 17])
    y = torch.tensor([[3, 5, 2, 7], [4, 1, 6, -1]])
    y_lens = torch.tensor([4, 3])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(120):
        loss, *_ = model(x, x_lens, y, y_lens)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        enc, enc_lens, _ = model.encode(x, x_lens)
    assert greedy_search(model, enc, enc_lens) == [[3, 5, 2, 7], [4, 1, 6]]
    assert [b[0][0] for b in beam_search(model, enc, enc_lens, beam=3)] == [[3, 5, 2, 7], [4, 1, 6]]


def test_ctc_loss_and_argument_validation():
    model = make_model(10, ctc_head=True)
    enc, enc_lens = encode(model, 10, lens=[16, 12, 9])
    y, y_lens = labels(10, lens=(4, 2, 0))
    ctc = model.ctc_loss(enc, enc_lens, y, y_lens)
    assert ctc.dim() == 0 and torch.isfinite(ctc) and float(ctc) > 0
    assert model.ctc_loss(enc, enc_lens, y, y_lens, reduction="none").shape == (3,)
    with pytest.raises(ValueError, match="CTC head"):
        make_model(10).ctc_loss(enc, enc_lens, y, y_lens)
    with pytest.raises(ValueError, match="beam"):
        beam_search(model, enc, enc_lens, beam=0)
    with pytest.raises(ValueError, match="nbest"):
        beam_search(model, enc, enc_lens, beam=2, nbest=3)
    with pytest.raises(ValueError, match="encoder_out_lens"):
        greedy_search(model, enc, enc_lens + 10)
    with pytest.raises(ValueError, match="encoder_out"):
        beam_search(model, enc[..., :8], enc_lens)
    with pytest.raises(ValueError, match="max_len"):
        greedy_search(model, enc, enc_lens, max_len=-1)
    with pytest.raises(ValueError, match="labels"):
        model.sequence_loss(enc, enc_lens, torch.zeros(3, 2, dtype=torch.long), torch.tensor([2, 1, 0]))
    with pytest.raises(ValueError, match="reduction"):
        model.sequence_loss(enc, enc_lens, y, y_lens, reduction="avg")
    with pytest.raises(ValueError, match="encoder_dim"):
        AttentionEncoderDecoder(model.encoder, AttentionDecoder(8, encoder_dim=12, decoder_dim=16, num_heads=2))
    with pytest.raises(ValueError, match="num_heads"):
        AttentionDecoder(8, encoder_dim=16, decoder_dim=16, num_heads=3)


# ------------------------------------------------------------------ joint CTC/attention decoding (Watanabe et al.)
def _collapse(path, blank=0):
    out, prev = [], None
    for k in path:
        if k != blank and k != prev:
            out.append(k)
        prev = k
    return out


def _brute_ctc(log_probs, prefix, full):
    """log of the summed probability of every CTC path (all V^T of them) whose labels are ``prefix`` (``full``) or
    start with it."""
    T, V = log_probs.shape
    total = []
    for path in itertools.product(range(V), repeat=T):
        lab = _collapse(path)
        if (lab == prefix) if full else (lab[: len(prefix)] == prefix):
            total.append(sum(float(log_probs[t, k]) for t, k in enumerate(path)))
    return float(torch.logsumexp(torch.tensor(total, dtype=torch.float64), 0)) if total else float("-inf")


def test_ctc_prefix_scores_equal_brute_force_path_sums():
    from speechkd.decoding.aed import CTCPrefixScorer

    g = torch.Generator().manual_seed(0)
    T, V = 5, 3
    lp = torch.randn(T, V, generator=g, dtype=torch.float64).log_softmax(-1)
    scorer = CTCPrefixScorer(lp)
    state = scorer.initial_state()
    # walk the prefixes [] -> [1] -> [1, 1] -> [1, 1, 2], checking every extension at each step
    for prefix, nxt in (([], 1), ([1], 1), ([1, 1], 2), ([1, 1, 2], None)):
        log_psi, r_new = scorer.score(state)
        for c in range(1, V):
            assert float(log_psi[0, c]) == pytest.approx(_brute_ctc(lp, prefix + [c], full=False), abs=1e-10)
        assert float(log_psi[0, 0]) == pytest.approx(_brute_ctc(lp, prefix, full=True), abs=1e-10)  # eos
        if nxt is not None:
            state = (r_new[:, :, nxt], torch.tensor([nxt]))
    # the eos score is the whole CTC probability, as torch's CTC loss computes it
    ref = -F.ctc_loss(lp[:, None], torch.tensor([[1, 1, 2]]), torch.tensor([T]), torch.tensor([3]),
                      reduction="none")
    assert float(log_psi[0, 0]) == pytest.approx(float(ref[0]), abs=1e-9)
    with pytest.raises(ValueError, match="log_probs"):
        CTCPrefixScorer(lp[0])


def test_joint_search_scores_are_the_weighted_attention_and_ctc_log_probs():
    model = make_model(4, V=6, ctc_head=True, sharpen=3.0)
    enc, enc_lens = encode(model, 4, N=2, lens=[16, 10])
    lam = 0.4
    out = beam_search(model, enc, enc_lens, beam=4, ctc_weight=lam)
    for n in range(2):
        T_n = int(enc_lens[n])
        with torch.no_grad():
            lp = model.ctc_output(enc[n, :T_n]).float().log_softmax(-1)  # (T_n, V)
        assert 1 <= len(out[n]) <= 4
        for h, s in out[n]:
            ctc = -F.ctc_loss(lp[:, None].double(), torch.tensor([h or [1]])[:, : len(h)], torch.tensor([T_n]),
                              torch.tensor([len(h)]), reduction="none")[0]
            ref = (1 - lam) * forced_score(model, enc[n], T_n, h) + lam * float(ctc)
            assert s == pytest.approx(ref, abs=1e-4)
    assert beam_search(model, enc, enc_lens, beam=3, ctc_weight=0.0) == beam_search(model, enc, enc_lens, beam=3)
    with pytest.raises(ValueError, match="ctc_weight"):
        beam_search(model, enc, enc_lens, ctc_weight=1.5)
    with pytest.raises(ValueError, match="CTC head"):
        beam_search(make_model(4, V=6), enc, enc_lens, ctc_weight=0.3)


def test_joint_search_with_ctc_only_stops_where_ctc_says():
    # an attention decoder that never emits eos runs to max_len alone; with ctc_weight 1 and a beam that never
    # prunes, the search returns the exact most probable label sequence under CTC (at most T_n labels)
    model = make_model(5, V=4, ctc_head=True, sharpen=3.0)
    with torch.no_grad():
        model.decoder.output_linear.bias[model.eos_id] -= 30.0
    enc, enc_lens = encode(model, 5, N=1, lens=[8])
    T_n = int(enc_lens[0])  # 4 frames after 2x subsampling
    assert all(len(h) == T_n for h, _ in beam_search(model, enc, enc_lens, beam=3)[0])  # ran to max_len
    with torch.no_grad():
        lp = model.ctc_output(enc[0, :T_n]).double().log_softmax(-1)  # (T_n, V)
    seqs = [list(s) for L in range(T_n + 1) for s in itertools.product([1, 2, 3], repeat=L)]  # 121: every one
    ref = sorted(((_brute_ctc(lp, q, full=True), q) for q in seqs), key=lambda p: p[0], reverse=True)
    out = beam_search(model, enc, enc_lens, beam=128, nbest=3, ctc_weight=1.0)[0]  # <= 81 running: no pruning
    assert [h for h, _ in out] == [q for _, q in ref[:3]]
    assert [sc for _, sc in out] == pytest.approx([sc for sc, _ in ref[:3]], abs=1e-6)  # float32 posteriors
    assert len(out[0][0]) < T_n
