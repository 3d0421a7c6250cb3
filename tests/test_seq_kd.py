"""Sequence-level / word-level KD pieces: N-best weights and loss, token KL, WER filter, teacher-layer init."""

import math

import pytest
import torch

from speechkd.config import ModelConfig
from speechkd.losses.distill import masked_kl as token_kl
from speechkd.methods.seq_kd import SequenceKD, collate_nbest, init_from_teacher, nbest_weights, spaced_layers
from speechkd.models.build import build_model


def test_nbest_weights_uniform_and_posterior():
    scores = torch.tensor([-1.0, -2.0, -4.0])
    assert torch.allclose(nbest_weights(scores, "uniform"), torch.full((3,), 1 / 3))
    e = [math.exp(-1.0), math.exp(-2.0), math.exp(-4.0)]
    expected = torch.tensor([v / sum(e) for v in e])
    assert torch.allclose(nbest_weights(scores, "posterior"), expected, atol=1e-6)
    with pytest.raises(ValueError):
        nbest_weights(scores, "softmax")


def test_collate_nbest_takes_first_k_and_pads():
    lists = [[{"tokens": [3, 4], "score": -1.0}, {"tokens": [3], "score": -2.0}, {"tokens": [5, 5, 5], "score": -9.0}],
             [{"tokens": [], "score": -0.5}]]
    index, y, y_lens, w = collate_nbest(lists, k=2, weighting="uniform")
    assert index.tolist() == [0, 0, 1]
    assert y_lens.tolist() == [2, 1, 0]
    assert y[0].tolist() == [3, 4] and y[1, 0] == 3
    assert w.tolist() == [0.5, 0.5, 1.0]
    with pytest.raises(ValueError, match="no pseudo label"):
        collate_nbest([[]], k=1, weighting="uniform")


@pytest.mark.parametrize("arch", ["transducer", "aed"])
@pytest.mark.parametrize("weighting,lam", [("uniform", 0.0), ("posterior", 0.3)])
def test_weighted_nbest_loss_equals_hand_sum(arch, weighting, lam):
    """The N-best term equals (1 - lambda) * sum_n sum_k w_nk * L(x_n, hyp_nk) / N, each L computed alone."""
    torch.manual_seed(0)
    cfg = ModelConfig(arch=arch, dim=16, num_layers=1, num_heads=2, ff_dim=32, decoder_dim=16, joiner_dim=16,
                      decoder_layers=1, decoder_heads=2, decoder_ff_dim=32, dropout=0.0, subsampling=2)
    model = build_model(cfg, vocab_size=7).eval()
    x, x_lens = torch.randn(2, 30, 80), torch.tensor([30, 22])
    enc, enc_lens, layers = model.encode(x, x_lens)
    lists = [[{"tokens": [2, 3], "score": -1.5}, {"tokens": [2, 4, 4], "score": -2.5}, {"tokens": [6], "score": -3.0}],
             [{"tokens": [5], "score": -0.2}, {"tokens": [5, 5], "score": -0.9}]]

    def utt_loss(e, el, y, yl):
        return model.sequence_loss(e, el, y, yl, reduction="none")

    from speechkd.training import KDContext

    kd = SequenceKD(use_nbest=True, nbest=2, weighting=weighting, reference_weight=lam)
    loss, logs = kd({"labels": {"nbest": lists}}, enc, enc_lens, layers, KDContext(model, utt_loss))
    hand = 0.0
    for n, hyps in enumerate(lists):
        hyps = hyps[:2]
        scores = [h["score"] for h in hyps]
        ws = [1 / len(hyps)] * len(hyps) if weighting == "uniform" else [math.exp(s) / sum(math.exp(t) for t in scores) for s in scores]
        for h, wk in zip(hyps, ws):
            y = torch.tensor([h["tokens"]])
            with torch.no_grad():
                alone = model.sequence_loss(enc[n:n + 1, : int(enc_lens[n])], enc_lens[n:n + 1], y,
                                            torch.tensor([len(h["tokens"])]), reduction="none")
            hand += wk * float(alone[0])
    hand /= 2
    assert loss.item() == pytest.approx((1 - lam) * hand, rel=1e-4)
    assert logs["seq_kd"] == pytest.approx(hand, rel=1e-4)
    assert kd.reference_weight == lam


def test_token_kl_zero_for_equal_positive_otherwise_and_ignores_padding():
    torch.manual_seed(0)
    t = torch.randn(2, 4, 5)
    lens = torch.tensor([4, 2])
    assert token_kl(t, t, lens).item() == pytest.approx(0.0, abs=1e-6)
    s = torch.randn(2, 4, 5)
    T = 2.0
    kl = token_kl(s, t, lens, temperature=T)
    # brute force: sum over valid positions of sum_v p_t (log p_t - log p_s), times T^2, over N
    hand = 0.0
    for n in range(2):
        for u in range(int(lens[n])):
            pt = torch.softmax(t[n, u] / T, -1)
            ps = torch.softmax(s[n, u] / T, -1)
            hand += float((pt * (pt.log() - ps.log())).sum())
    assert kl.item() == pytest.approx(T * T * hand / 2, rel=1e-5)
    s2 = s.clone()
    s2[1, 2:] = 100.0  # padding of utterance 1 changes nothing
    assert token_kl(s2, t, lens, temperature=T).item() == pytest.approx(kl.item(), rel=1e-6)


def test_sequence_kd_refuses_nothing_to_learn():
    with pytest.raises(ValueError, match="nothing to distil"):
        SequenceKD(use_nbest=False)
    with pytest.raises(ValueError, match="teacher"):
        SequenceKD(use_nbest=True, kl_scale=1.0)


def test_spaced_layers():
    assert spaced_layers(12, 3) == [0, 6, 11]
    assert spaced_layers(4, 2) == [0, 3]
    assert spaced_layers(4, 1) == [3]
    assert spaced_layers(3, 3) == [0, 1, 2]
    with pytest.raises(ValueError):
        spaced_layers(2, 3)


@pytest.mark.parametrize("arch", ["transducer", "aed"])
def test_init_from_teacher_copies_spaced_blocks(arch):
    torch.manual_seed(0)
    base = dict(arch=arch, dim=16, num_heads=2, ff_dim=32, decoder_dim=16, joiner_dim=16, decoder_heads=2,
                decoder_ff_dim=32)
    teacher = build_model(ModelConfig(num_layers=4, decoder_layers=3, **base), vocab_size=7)
    student = build_model(ModelConfig(num_layers=2, decoder_layers=1, **base), vocab_size=7)
    mapping = init_from_teacher(student, teacher)
    t, s = teacher.state_dict(), student.state_dict()
    for name, value in s.items():
        assert torch.equal(value, t[mapping[name]])
    enc0 = [src for name, src in mapping.items() if name.startswith("encoder.layers.0.")]
    enc1 = [src for name, src in mapping.items() if name.startswith("encoder.layers.1.")]
    assert enc0 and all(src.startswith("encoder.layers.0.") for src in enc0)  # first and last teacher blocks
    assert enc1 and all(src.startswith("encoder.layers.3.") for src in enc1)
    narrow = build_model(ModelConfig(num_layers=2, decoder_layers=1, **{**base, "dim": 8}), vocab_size=7)
    with pytest.raises(ValueError, match="widths"):
        init_from_teacher(narrow, teacher)


def test_filter_nbest_drops_bad_hypotheses_and_empty_cuts():
    from lhotse import CutSet, MonoCut, SupervisionSegment

    def cut(cid, text, hyps):
        c = MonoCut(id=cid, start=0, duration=1.0, channel=0,
                    supervisions=[SupervisionSegment(id=cid, recording_id=cid, start=0, duration=1.0, text=text)])
        c.custom = {"nbest": [{"tokens": [], "text": h, "score": 0.0} for h in hyps]}
        return c

    from speechkd.methods.seq_kd import filter_nbest

    cuts = CutSet.from_cuts([cut("a", "one two", ["one two", "one three", "four five six"]),
                             cut("b", "seven", ["eight nine"])])
    kept, stats = filter_nbest(cuts, max_wer=50.0)
    assert [c.id for c in kept] == ["a"]
    assert [h["text"] for h in kept["a"].custom["nbest"]] == ["one two", "one three"]  # 0% and 50% kept, 150% not
    assert stats == {"cuts_in": 2, "cuts_out": 1, "hyps_in": 4, "hyps_out": 2}
    same, _ = filter_nbest(cuts, None)
    assert len(same) == 2


def test_confidence_filter_is_reference_free():
    """min_logprob keeps hypotheses whose log-probability per teacher token (end of sentence counted) reaches the
    threshold, on transcribed and untranscribed cuts alike; empty texts go whenever a filter is on."""
    from lhotse import CutSet, MonoCut, SupervisionSegment

    from speechkd.methods.seq_kd import filter_nbest, token_logprob

    def cut(cid, text, hyps):
        sup = [SupervisionSegment(id=cid, recording_id=cid, start=0, duration=1.0, text=text)] if text else []
        c = MonoCut(id=cid, start=0, duration=1.0, channel=0, supervisions=sup)
        c.custom = {"nbest": [{"tokens": [1] * n, "teacher_tokens": [7] * t, "text": h, "score": s}
                              for h, n, t, s in hyps]}
        return c

    # per token: -3 / (2 + 1) = -1.0, -6 / (2 + 1) = -2.0 (teacher tokens count, not the student's)
    cuts = CutSet.from_cuts([
        cut("a", "one two", [("one two", 5, 2, -3.0), ("one three", 5, 2, -6.0)]),
        cut("u", None, [("", 1, 0, -0.1), ("far off", 1, 2, -6.0)]),  # untranscribed: only the confidence filter
    ])
    assert token_logprob(cuts["a"].custom["nbest"][0]) == -1.0
    kept, stats = filter_nbest(cuts, None, min_logprob=-1.5)
    assert [c.id for c in kept] == ["a"] and [h["text"] for h in kept["a"].custom["nbest"]] == ["one two"]
    assert stats == {"cuts_in": 2, "cuts_out": 1, "hyps_in": 4, "hyps_out": 1}
    both, _ = filter_nbest(cuts, 0.0, min_logprob=-2.5)  # the WER filter leaves the untranscribed cut alone
    assert [h["text"] for h in both["a"].custom["nbest"]] == ["one two"]
    assert [h["text"] for h in both["u"].custom["nbest"]] == ["far off"]



def test_no_speech_filter_drops_the_utterance():
    from lhotse import CutSet, MonoCut

    from speechkd.methods.seq_kd import filter_nbest

    def cut(cid, p):
        c = MonoCut(id=cid, start=0, duration=1.0, channel=0)
        c.custom = {"nbest": [{"tokens": [1], "text": "you", "score": -0.5, "no_speech_prob": p}] * 2}
        return c

    cuts = CutSet.from_cuts([cut("speech", 0.01), cut("silence", 0.9)])
    kept, stats = filter_nbest(cuts, None, max_no_speech=0.6)
    assert [c.id for c in kept] == ["speech"] and stats["hyps_out"] == 2
