"""Tests for speechkd.eval.metrics and speechkd.eval.speed."""

import math
import random
import time

import jiwer
import numpy as np
import pytest
import torch

from speechkd.eval import metrics as M
from speechkd.eval import speed as S


# ---------------------------------------------------------------- WER
def test_wer_identical_is_zero():
    st = M.word_error_rate(["a b c", "d e"], ["a b c", "d e"])
    assert (st.errors, st.ref_words, st.wer) == (0, 5, 0.0)


def test_wer_one_substitution_in_four_words():
    st = M.word_error_rate(["the cat sat down"], ["the hat sat down"])
    assert (st.subs, st.ins, st.dels, st.errors, st.ref_words) == (1, 0, 0, 1, 4)
    assert st.wer == pytest.approx(25.0)


def test_wer_insertions_and_deletions_counted_and_can_exceed_100():
    st = M.word_error_rate([["a"]], [["x", "a", "y", "z"]])  # word lists are accepted too
    assert (st.ins, st.dels, st.subs, st.ref_words) == (3, 0, 0, 1)
    assert st.wer == pytest.approx(300.0)
    st = M.word_error_rate(["a b c d"], [""])
    assert (st.dels, st.errors, st.wer) == (4, 4, 100.0)


def test_wer_stats_add_and_sum():
    a = M.word_error_rate(["a b"], ["a c"])
    b = M.word_error_rate(["a b c"], ["a b c d"])
    both = M.word_error_rate(["a b", "a b c"], ["a c", "a b c d"])
    assert a + b == both == sum([a, b])
    assert both.wer == pytest.approx(100 * 2 / 5)
    with pytest.raises(ValueError):
        M.WerStats(errors=3, ref_words=4, ins=1, dels=1, subs=0)


def test_wer_matches_jiwer_on_random_strings():
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(6)]
    refs = [" ".join(rng.choices(vocab, k=rng.randint(1, 12))) for _ in range(200)]
    hyps = [" ".join(rng.choices(vocab, k=rng.randint(0, 12))) for _ in range(200)]
    ours = M.word_error_rate(refs, hyps)
    theirs = jiwer.process_words(refs, hyps)
    jiwer_errors = theirs.substitutions + theirs.deletions + theirs.insertions
    assert ours.errors == jiwer_errors
    assert ours.wer == pytest.approx(100 * theirs.wer)
    # ins/del/sub split may differ between equally good alignments; ins - del may not.
    n_hyp = sum(len(h.split()) for h in hyps)
    assert ours.ins - ours.dels == n_hyp - ours.ref_words


def test_wer_errors():
    with pytest.raises(ValueError, match="length"):
        M.word_error_rate(["a"], ["a", "b"])
    with pytest.raises(ValueError, match="empty"):
        M.word_error_rate([], [])
    with pytest.raises(ValueError, match="no words"):
        M.word_error_rate([""], ["a"])
    with pytest.raises(TypeError):
        M.word_error_rate("a b", "a b")
    with pytest.raises(TypeError):
        M.word_error_rate([3], ["a"])


def test_write_wer_details(tmp_path):
    out = tmp_path / "sub" / "errs-test.txt"
    st = M.write_wer_details(out, ["u1", "u2"], ["the cat sat", "a b"], ["the hat sat down", "a b"])
    assert (st.errors, st.ref_words) == (2, 5)
    text = out.read_text()
    assert text.startswith("%WER 40.00 [ 2 / 5, 1 ins, 0 del, 1 sub ]")
    assert "u1:\talign=the (cat->hat) sat (*->down)" in text
    assert "u1:\terrors=2 ins=1 del=0 sub=1 ref_words=3" in text
    assert "u2:\thyp=a b" in text
    assert [p.name for p in out.parent.iterdir()] == ["errs-test.txt"]  # no temp file left
    with pytest.raises(ValueError, match="ids"):
        M.write_wer_details(out, ["u1"], ["a", "b"], ["a", "b"])


# ---------------------------------------------------------------- accuracy
def test_accuracy():
    assert M.accuracy([1, 2, 3, 4], [1, 2, 0, 4]) == pytest.approx(0.75)
    with pytest.raises(ValueError):
        M.accuracy([1], [1, 2])
    with pytest.raises(ValueError):
        M.accuracy([], [])


# ---------------------------------------------------------------- EER / minDCF
def _phi(x):
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def test_eer_separated_scores_is_zero():
    eer, thr = M.equal_error_rate([0.9, 0.8, 0.7, 0.2, 0.1], [1, 1, 1, 0, 0])
    assert eer == 0.0
    assert 0.2 < thr <= 0.7  # any threshold in (0.2, 0.7] separates the classes
    assert M.min_dcf([0.9, 0.8, 0.7, 0.2, 0.1], [1, 1, 1, 0, 0]) == 0.0


def test_eer_hand_computed():
    # Sorted: .9N .8P .5N .3P .1N  -> ROC points (FPR, FNR):
    # (0,1) (1/3,1) (1/3,1/2) (2/3,1/2) (2/3,0) (1,0).  The segment (1/3,1/2)-(2/3,1/2)
    # crosses FPR == FNR at its midpoint: EER = 1/2, threshold halfway between .8 and .5.
    scores = [0.8, 0.3, 0.9, 0.5, 0.1]
    labels = [1, 1, 0, 0, 0]
    eer, thr = M.equal_error_rate(scores, labels)
    assert eer == pytest.approx(0.5)
    assert thr == pytest.approx(0.65)
    # One target at .8 above one of three non-targets: FNR falls 1 -> 0 at FPR 1/3 -> EER 1/3,
    # reached 2/3 of the way from the .9 point to the .8 point.
    eer, thr = M.equal_error_rate([0.8, 0.9, 0.5, 0.1], [True, False, False, False])
    assert eer == pytest.approx(1 / 3)
    assert thr == pytest.approx(0.9 - 2 / 3 * 0.1)
    # Tied scores: ROC goes straight from (0,1) to (1,0).
    assert M.equal_error_rate([0.5, 0.5], [1, 0]) == (pytest.approx(0.5), 0.5)


def test_eer_gaussian_matches_analytic_and_threshold_is_consistent():
    rng = np.random.default_rng(0)
    n = 20000
    pos, neg = rng.normal(1.0, 1.0, n), rng.normal(0.0, 1.0, n)
    scores = np.r_[pos, neg]
    labels = np.r_[np.ones(n), np.zeros(n)]
    eer, thr = M.equal_error_rate(scores, labels)
    assert eer == pytest.approx(_phi(-0.5), abs=0.01)  # 0.3085
    assert thr == pytest.approx(0.5, abs=0.05)
    # empirical error rates at the returned threshold, counted directly
    assert np.mean(pos < thr) == pytest.approx(eer, abs=2 / n)
    assert np.mean(neg >= thr) == pytest.approx(eer, abs=2 / n)


def test_eer_and_min_dcf_identical_distributions():
    rng = np.random.default_rng(1)
    scores = rng.normal(size=40000)
    labels = rng.integers(0, 2, size=40000)
    eer, _ = M.equal_error_rate(scores, labels)
    assert eer == pytest.approx(0.5, abs=0.02)
    assert 0.95 <= M.min_dcf(scores, labels, p_target=0.5) <= 1.0


def test_min_dcf_hand_computed_and_bounds():
    scores = [0.8, 0.3, 0.9, 0.5, 0.1]
    labels = [1, 1, 0, 0, 0]
    # p_target .5: DCF = .5 FNR + .5 FPR over the ROC points above; min at (2/3, 0) -> 1/3,
    # normalised by min(.5, .5): 2/3.
    assert M.min_dcf(scores, labels, p_target=0.5) == pytest.approx(2 / 3)
    # p_target .01: any false alarm costs .99/3 > .01, so rejecting all is best -> 1.
    assert M.min_dcf(scores, labels) == pytest.approx(1.0)
    # costs: c_miss=10 at p=.5 -> default cost .5 (accept all); point (2/3, 0) costs 1/3 -> 2/3
    assert M.min_dcf(scores, labels, p_target=0.5, c_miss=10) == pytest.approx(2 / 3)
    rng = np.random.default_rng(2)
    for _ in range(5):
        s, y = rng.normal(size=50), rng.integers(0, 2, size=50)
        y[:2] = [0, 1]
        assert 0.0 <= M.min_dcf(s, y, p_target=rng.uniform(0.01, 0.99)) <= 1.0


def test_verification_input_errors():
    with pytest.raises(ValueError, match="both"):
        M.equal_error_rate([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="labels"):
        M.equal_error_rate([0.1, 0.2], [1, 2])
    with pytest.raises(ValueError, match="finite"):
        M.equal_error_rate([0.1, float("nan")], [1, 0])
    with pytest.raises(ValueError, match="p_target"):
        M.min_dcf([0.1, 0.2], [1, 0], p_target=1.0)


# ---------------------------------------------------------------- speed / size
def test_count_parameters():
    lin = torch.nn.Linear(3, 2)  # 3*2 weights + 2 biases
    assert S.count_parameters(lin) == 8
    lin.bias.requires_grad_(False)
    assert S.count_parameters(lin, trainable_only=True) == 6
    assert S.count_parameters(torch.nn.Sequential(lin, torch.nn.ReLU(), lin)) == 8  # shared once
    with pytest.raises(TypeError):
        S.count_parameters("not a module")


def test_real_time_factor_times_only_fn_and_skips_warmup():
    calls = []

    def fn(batch):
        calls.append(batch)
        time.sleep(0.2 if len(calls) == 1 else 0.01)  # slow first (warm-up) call

    def batches():
        for b in range(3):
            time.sleep(0.05)  # data loading is not timed
            yield b

    rtf = S.real_time_factor(fn, batches(), audio_seconds=0.3, warmup=1)
    assert calls == [0, 0, 1, 2]
    # 3 * 0.01 s / 0.3 s = 0.1 plus scheduling noise; timing the warm-up call (+0.2 s) or the
    # batch loading (+0.15 s) would push it past 0.5
    assert 0.09 <= rtf < 0.5
    with pytest.raises(ValueError):
        S.real_time_factor(fn, [], audio_seconds=1.0)
    with pytest.raises(ValueError):
        S.real_time_factor(fn, [1], audio_seconds=0.0)


def test_file_bytes(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"x" * 10)
    (tmp_path / "d" / "e").mkdir(parents=True)
    (tmp_path / "d" / "e" / "b.bin").write_bytes(b"y" * 20)
    (tmp_path / "d" / "empty").write_bytes(b"")
    assert S.file_bytes(tmp_path / "a.bin") == 10
    assert S.file_bytes(tmp_path) == 30
    assert S.file_bytes(str(tmp_path / "d")) == 20
    with pytest.raises(FileNotFoundError):
        S.file_bytes(tmp_path / "missing")


# ------------------------------------------------------------------------------------------ sampling error
def test_wilson_interval_equals_scipy():
    from scipy.stats import binomtest

    from speechkd.eval.metrics import wilson_interval

    for k, n in ((652, 692), (0, 10), (10, 10), (81, 263)):
        ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert wilson_interval(k, n) == pytest.approx((ci.low, ci.high), abs=1e-12)
    with pytest.raises(ValueError):
        wilson_interval(5, 4)


def test_bootstrap_wer_interval_agrees_with_scipy_bootstrap():
    from scipy.stats import bootstrap

    from speechkd.eval.metrics import bootstrap_wer_interval

    rng = np.random.default_rng(1)
    ref = rng.integers(1, 5, size=400)
    err = rng.binomial(ref, 0.2)
    ours = bootstrap_wer_interval(err, ref, n_boot=4000, seed=0)
    ref_ci = bootstrap((err, ref), lambda e, r: 100 * e.sum() / r.sum(), paired=True, vectorized=False,
                       n_resamples=4000, method="percentile", random_state=np.random.default_rng(5)).confidence_interval
    assert ours[0] < 100 * err.sum() / ref.sum() < ours[1]
    assert ours == pytest.approx((ref_ci.low, ref_ci.high), abs=0.35)  # Monte Carlo error of two bootstraps
    # paired: a system with one more error on every 10th utterance; its difference is known exactly
    worse = err + (np.arange(400) % 10 == 0)
    lo, hi = bootstrap_wer_interval(worse, ref, n_boot=2000, baseline_errors=err)
    diff = 100 * (worse.sum() - err.sum()) / ref.sum()
    assert lo <= diff <= hi and hi - lo < (ours[1] - ours[0])  # narrower than one system's: shared difficulty cancels
    assert bootstrap_wer_interval(err, ref, baseline_errors=err) == (0.0, 0.0)
    with pytest.raises(ValueError):
        bootstrap_wer_interval(err, ref[:-1])


def test_bootstrap_eer_interval_agrees_with_scipy_bootstrap():
    from scipy.stats import bootstrap

    from speechkd.eval.metrics import bootstrap_eer_interval, equal_error_rate

    rng = np.random.default_rng(2)
    y = (np.arange(600) % 3 == 0).astype(int)
    s = rng.normal(size=600) + 1.5 * y
    eer = equal_error_rate(s, y)[0]
    lo, hi = bootstrap_eer_interval(s, y, n_boot=1000)
    ref_ci = bootstrap((s, y), lambda a, b: equal_error_rate(a, b)[0], paired=True, vectorized=False,
                       n_resamples=1000, method="percentile", random_state=np.random.default_rng(3)).confidence_interval
    assert lo < eer < hi
    assert (lo, hi) == pytest.approx((ref_ci.low, ref_ci.high), abs=0.012)


def test_paired_eer_and_accuracy_intervals_agree_with_scipy_paired_bootstrap():
    """The paired difference of two systems on the same trials / clips against scipy's paired percentile
    bootstrap of the same statistic; identical systems give exactly 0; (S, N) scores give the seeds' mean."""
    from scipy.stats import bootstrap

    from speechkd.eval.metrics import bootstrap_accuracy_interval, bootstrap_eer_interval, equal_error_rate

    rng = np.random.default_rng(7)
    y = (np.arange(600) % 3 == 0).astype(int)
    common = rng.normal(size=600)  # the trials' shared difficulty
    a = common + 0.5 * rng.normal(size=600) + 1.5 * y
    b = common + 0.5 * rng.normal(size=600) + 1.2 * y
    diff = equal_error_rate(a, y)[0] - equal_error_rate(b, y)[0]
    lo, hi = bootstrap_eer_interval(a, y, n_boot=1000, baseline_scores=b)
    ref = bootstrap((a, b, y), lambda p, q, t: equal_error_rate(p, t)[0] - equal_error_rate(q, t)[0], paired=True,
                    vectorized=False, n_resamples=1000, method="percentile",
                    random_state=np.random.default_rng(3)).confidence_interval
    assert lo < diff < hi < 0
    assert (lo, hi) == pytest.approx((ref.low, ref.high), abs=0.01)
    one = bootstrap_eer_interval(a, y, n_boot=1000)
    assert hi - lo < one[1] - one[0]  # the shared difficulty cancels
    assert bootstrap_eer_interval(a, y, n_boot=50, baseline_scores=a) == (0.0, 0.0)
    assert bootstrap_eer_interval(np.stack([a, a]), y, seed=4) == bootstrap_eer_interval(a, y, seed=4)
    with pytest.raises(ValueError, match="scores must be"):
        bootstrap_eer_interval(a, y, baseline_scores=b[:-1])

    # accuracy: 692 clips, the second system right on 20 clips more
    right = (rng.random(692) < 0.9).astype(int)
    better = right.copy()
    better[np.flatnonzero(right == 0)[:20]] = 1
    lo, hi = bootstrap_accuracy_interval(better, baseline_correct=right, n_boot=4000)
    ref = bootstrap((better, right), lambda p, q: 100 * (p.mean() - q.mean()), paired=True, vectorized=False,
                    n_resamples=4000, method="percentile", random_state=np.random.default_rng(5)).confidence_interval
    assert 0 < lo < 100 * 20 / 692 < hi
    assert (lo, hi) == pytest.approx((ref.low, ref.high), abs=0.15)
    single = bootstrap_accuracy_interval(right, n_boot=4000)
    ref = bootstrap((right,), lambda p: 100 * p.mean(), vectorized=False, n_resamples=4000, method="percentile",
                    random_state=np.random.default_rng(6)).confidence_interval
    assert single == pytest.approx((ref.low, ref.high), abs=0.3)
    with pytest.raises(ValueError, match="0 / 1"):
        bootstrap_accuracy_interval([0, 2, 1])


def test_read_wer_details_round_trip_and_seed_means(tmp_path):
    from speechkd.eval.metrics import bootstrap_wer_interval, read_wer_details, write_wer_details

    write_wer_details(tmp_path / "e.txt", ["a", "b", "c"], ["x y z", "p q", "r"], ["x z", "p q s", "t"])
    assert read_wer_details(tmp_path / "e.txt") == {"a": (1, 3), "b": (1, 2), "c": (1, 1)}
    # (S, U) errors: the interval of the seeds' mean WER; identical seeds give the single system's interval
    err, ref = np.array([1, 0, 2, 1, 0, 3]), np.array([3, 2, 4, 2, 1, 5])
    assert bootstrap_wer_interval(np.stack([err, err]), ref, seed=4) == bootstrap_wer_interval(err, ref, seed=4)
    (tmp_path / "bad.txt").write_text("u:\terrors=x ref_words=2\n")
    with pytest.raises(ValueError, match="bad.txt:1"):
        read_wer_details(tmp_path / "bad.txt")
