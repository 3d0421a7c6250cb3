"""Speaker-verification evaluation: trial lists, EER / minDCF against independent references, cosine scores.

References: s3prl's EER recipe (sklearn ``roc_curve`` + scipy ``interp1d`` / ``brentq``) and a brute-force
threshold sweep for minDCF. scikit-learn is a test-only dependency (requirements-bench.txt).
"""

import numpy as np
import pytest
import torch

from speechkd.eval.metrics import equal_error_rate, min_dcf
from speechkd.eval.verification import cosine_scores, read_trials

# ---------------------------------------------------------------- trial lists

# (corpus, file, targets, non-targets), as the corpora READMEs give them
_TRIAL_FILES = [
    ("fsdd", "heldout_george_lucas.tsv", 1000, 999),
    ("librispeech_spk", "sv_dev.tsv", 180, 600),
    ("librispeech_spk", "sv_test.tsv", 270, 1500),
    ("librispeech_spk", "sv_all_test-other.tsv", 450, 4500),
    ("speech_commands_v2_test", "sv_dev.tsv", 799, 819),
    ("speech_commands_v2_test", "sv_test.tsv", 617, 628),
]


@pytest.mark.parametrize("corpus,name,n_target,n_nontarget", _TRIAL_FILES)
def test_read_trials_shared_corpora(corpora_dir, corpus, name, n_target, n_nontarget):
    trials = read_trials(corpora_dir / corpus / "trials" / name)
    assert len(trials) == n_target + n_nontarget
    assert trials.labels.dtype == np.int64
    assert int(trials.labels.sum()) == n_target
    ids = set(trials.utterance_ids())
    with open(corpora_dir / corpus / "metadata.tsv", encoding="utf-8") as f:
        header = f.readline().rstrip("\n").split("\t")
        rows = [dict(zip(header, line.rstrip("\n").split("\t"))) for line in f]
    speaker = {r["id"]: r["speaker"] for r in rows}
    assert ids <= set(speaker)
    same = np.array([speaker[e] == speaker[t] for e, t in zip(trials.enroll_ids, trials.test_ids)])
    assert np.array_equal(same, trials.labels == 1)


def test_read_trials_small_file_and_errors(tmp_path):
    p = tmp_path / "t.tsv"
    p.write_text("label\tenroll_id\ttest_id\n1\ta\tb\n0\ta\tc\n0\tb\tc")  # no final newline
    t = read_trials(p)
    assert t.labels.tolist() == [1, 0, 0]
    assert t.enroll_ids == ["a", "a", "b"] and t.test_ids == ["b", "c", "c"]
    assert t.utterance_ids() == ["a", "b", "c"]

    cases = {
        "": "empty file",
        "label\tenroll_id\ttest_id\n": "no trials",
        "label enroll_id test_id\n1\ta\tb\n": r"t\.tsv:1: header",
        "label\tenroll_id\ttest_id\n1\ta\tb\n1\ta b\n": r"t\.tsv:3: expected 3 tab-separated fields",
        "label\tenroll_id\ttest_id\n1\ta\tb\n\n": r"t\.tsv:3: expected 3",
        "label\tenroll_id\ttest_id\n2\ta\tb\n": r"t\.tsv:2: label must be 0 or 1",
        "label\tenroll_id\ttest_id\n1\ta\t\n": r"t\.tsv:2: utterance ids",
        "label\tenroll_id\ttest_id\n1\ta\tb\n0\ta\tb\n": r"t\.tsv:3: trial a / b repeats line 2",
    }
    for text, msg in cases.items():
        p.write_text(text)
        with pytest.raises(ValueError, match=msg):
            read_trials(p)
    with pytest.raises(FileNotFoundError):
        read_trials(tmp_path / "missing.tsv")


# ---------------------------------------------------------------- EER


def _s3prl_eer(scores, labels):
    """s3prl downstream/sv_voxceleb1/utils.py: EER where FPR == 1 - TPR on the interpolated ROC."""
    from scipy.interpolate import interp1d
    from scipy.optimize import brentq
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(labels, scores)
    return brentq(lambda x: 1.0 - x - interp1d(fpr, tpr)(x), 0.0, 1.0)


def _sklearn_segment_threshold(scores, labels, eer):
    """Threshold interpolated between the adjacent (unpruned) sklearn ROC points where FNR - FPR changes sign."""
    from sklearn.metrics import roc_curve

    fpr, tpr, thr = roc_curve(labels, scores, drop_intermediate=False)
    d = (1.0 - tpr) - fpr
    j = int(np.nonzero(d <= 0)[0][0])
    if j == 1:  # between sklearn's (0, 0, inf) start point and the first real point
        return thr[1]
    t = d[j - 1] / (d[j - 1] - d[j])
    return thr[j - 1] + t * (thr[j] - thr[j - 1])


def _random_case(rng, ties: bool):
    n_pos, n_neg = int(rng.integers(1, 60)), int(rng.integers(1, 60))
    pos = rng.normal(rng.uniform(0, 2), 1.0, n_pos)
    neg = rng.normal(0.0, rng.uniform(0.5, 1.5), n_neg)
    scores = np.r_[pos, neg]
    if ties:
        scores = np.round(scores, 1)
    labels = np.r_[np.ones(n_pos, int), np.zeros(n_neg, int)]
    perm = rng.permutation(scores.size)
    return scores[perm], labels[perm]


def test_eer_separated_scores_is_zero():
    eer, thr = equal_error_rate([0.9, 0.8, 0.7, 0.2, 0.1], [1, 1, 1, 0, 0])
    assert eer == 0.0
    assert 0.2 < thr <= 0.7
    assert min_dcf([0.9, 0.8, 0.7, 0.2, 0.1], [1, 1, 1, 0, 0]) == 0.0


def test_eer_identical_distributions_is_one_half():
    # the same scores for targets and non-targets: the ROC is the diagonal
    s = np.linspace(-1, 1, 11)
    eer, _ = equal_error_rate(np.r_[s, s], np.r_[np.ones(11), np.zeros(11)])
    assert eer == pytest.approx(0.5, abs=1e-12)
    # large samples from one distribution
    rng = np.random.default_rng(1)
    scores, labels = rng.normal(size=40000), rng.integers(0, 2, size=40000)
    eer, _ = equal_error_rate(scores, labels)
    assert eer == pytest.approx(0.5, abs=0.02)
    assert 0.95 <= min_dcf(scores, labels, p_target=0.5) <= 1.0


def test_eer_hand_computed():
    # Sorted: .9T .8N .6T .5N .4N .3T .1N (3 targets, 4 non-targets) -> ROC points (FPR, FNR):
    # (0,1) (0,2/3) (1/4,2/3) (1/4,1/3) (1/2,1/3) (3/4,1/3) (3/4,0) (1,0). FNR - FPR changes sign on the
    # horizontal segment (1/4,1/3)-(1/2,1/3): EER = 1/3, reached 1/3 of the way from score .6 to .5.
    scores = [0.4, 0.9, 0.1, 0.6, 0.8, 0.3, 0.5]
    labels = [0, 1, 0, 1, 0, 1, 0]
    eer, thr = equal_error_rate(scores, labels)
    assert eer == pytest.approx(1 / 3)
    assert thr == pytest.approx(0.6 - 0.1 / 3)
    # minDCF at p_target .5: DCF = (FNR + FPR) / 2, least at (1/4, 1/3): 7/24, over C_def = 1/2 -> 7/12.
    assert min_dcf(scores, labels, p_target=0.5) == pytest.approx(7 / 12)
    # p_target .01: a false alarm costs .99/4 each, so the best point is (0, 2/3): .01 * 2/3, over .01 -> 2/3.
    assert min_dcf(scores, labels) == pytest.approx(2 / 3)
    # c_fa = 10 at p_target .5: C_def = .5 (reject all); (0, 2/3) costs 1/3 -> 2/3
    assert min_dcf(scores, labels, p_target=0.5, c_fa=10) == pytest.approx(2 / 3)


@pytest.mark.parametrize("ties", [False, True])
def test_eer_matches_s3prl_sklearn_reference(ties):
    rng = np.random.default_rng(10 + ties)
    for _ in range(60):
        scores, labels = _random_case(rng, ties)
        if labels.min() == labels.max():
            continue
        eer, thr = equal_error_rate(scores, labels)
        assert eer == pytest.approx(_s3prl_eer(scores, labels), abs=1e-9)
        assert thr == pytest.approx(_sklearn_segment_threshold(scores, labels, eer), abs=1e-9)
        assert scores.min() <= thr <= scores.max()


def test_eer_large_sample_agrees_with_reference():
    rng = np.random.default_rng(3)
    n = 5000
    scores = np.r_[rng.normal(1.0, 1.0, n), rng.normal(0.0, 1.0, n)]
    labels = np.r_[np.ones(n, int), np.zeros(n, int)]
    eer, _ = equal_error_rate(scores, labels)
    assert eer == pytest.approx(_s3prl_eer(scores, labels), abs=1e-6)
    assert eer == pytest.approx(0.3085, abs=0.015)  # Phi(-1/2) for unit-variance Gaussians one apart


# ---------------------------------------------------------------- minDCF


def _brute_force_min_dcf(scores, labels, p_target, c_miss, c_fa):
    """Sweep every threshold (accept when score >= t): each distinct score, and +inf (reject all)."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    best = np.inf
    for t in np.r_[np.unique(scores), np.inf]:
        p_miss = np.mean(pos < t)
        p_fa = np.mean(neg >= t)
        best = min(best, c_miss * p_miss * p_target + c_fa * p_fa * (1 - p_target))
    return best / min(c_miss * p_target, c_fa * (1 - p_target))


@pytest.mark.parametrize("ties", [False, True])
def test_min_dcf_matches_brute_force(ties):
    rng = np.random.default_rng(20 + ties)
    for _ in range(60):
        scores, labels = _random_case(rng, ties)
        if labels.min() == labels.max():
            continue
        p = float(rng.choice([0.01, 0.05, 0.5, rng.uniform(0.001, 0.999)]))
        c_miss, c_fa = float(rng.uniform(0.1, 10)), float(rng.uniform(0.1, 10))
        got = min_dcf(scores, labels, p_target=p, c_miss=c_miss, c_fa=c_fa)
        assert got == pytest.approx(_brute_force_min_dcf(scores, labels, p, c_miss, c_fa), abs=1e-12)
        assert 0.0 <= got <= 1.0 + 1e-12


def test_metric_input_errors():
    for fn in (equal_error_rate, min_dcf):
        with pytest.raises(ValueError, match="empty"):
            fn([], [])
        with pytest.raises(ValueError, match="both target and non-target"):
            fn([0.1, 0.2], [1, 1])
        with pytest.raises(ValueError, match="both target and non-target"):
            fn([0.1, 0.2], [0, 0])
        with pytest.raises(ValueError, match="differ in length"):
            fn([0.1, 0.2, 0.3], [1, 0])
        with pytest.raises(ValueError, match="finite"):
            fn([0.1, float("nan")], [1, 0])
        with pytest.raises(ValueError, match="finite"):
            fn([0.1, float("inf")], [1, 0])
        with pytest.raises(ValueError, match="labels"):
            fn([0.1, 0.2], [1, 2])
        with pytest.raises(ValueError, match="1-D"):
            fn([[0.1, 0.2]], [[1, 0]])
    with pytest.raises(ValueError, match="p_target"):
        min_dcf([0.1, 0.2], [1, 0], p_target=0.0)
    with pytest.raises(ValueError, match="c_miss"):
        min_dcf([0.1, 0.2], [1, 0], c_fa=0.0)


# ---------------------------------------------------------------- cosine scores


def test_cosine_scores_numpy_and_torch():
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(7, 5)), rng.normal(size=(7, 5))
    a[3] = 0.0  # a zero embedding scores 0
    ref = torch.nn.functional.cosine_similarity(torch.from_numpy(a), torch.from_numpy(b), dim=1).numpy()
    got = cosine_scores(a, b)
    assert got.shape == (7,) and got.dtype == np.float64
    np.testing.assert_allclose(got, ref, atol=1e-12)
    assert got[3] == 0.0
    t = cosine_scores(torch.from_numpy(a).float(), torch.from_numpy(b).float())
    assert t.shape == (7,) and t.dtype == torch.float32
    np.testing.assert_allclose(t.numpy(), ref, atol=1e-6)
    np.testing.assert_allclose(cosine_scores(a, 3 * a)[[0, 1, 2, 4, 5, 6]], 1.0)
    np.testing.assert_allclose(cosine_scores(a, -a)[[0, 1, 2, 4, 5, 6]], -1.0)

    with pytest.raises(ValueError, match=r"\(P, D\)"):
        cosine_scores(a, b[:3])
    with pytest.raises(ValueError, match=r"\(P, D\)"):
        cosine_scores(a[0], b[0])
    with pytest.raises(ValueError, match="finite"):
        cosine_scores(np.full((2, 3), np.nan), b[:2, :3])
    with pytest.raises(TypeError):
        cosine_scores(a, torch.from_numpy(b))


def test_cosine_scores_feed_eer_end_to_end():
    # 8 speakers, 4 noisy embeddings each: trials within a speaker score higher than across
    rng = np.random.default_rng(5)
    centres = rng.normal(size=(8, 16))
    emb = np.repeat(centres, 4, axis=0) + 0.3 * rng.normal(size=(32, 16))
    spk = np.repeat(np.arange(8), 4)
    i, j = np.triu_indices(32, k=1)
    scores = cosine_scores(emb[i], emb[j])
    labels = (spk[i] == spk[j]).astype(int)
    eer, _ = equal_error_rate(scores, labels)
    assert eer < 0.05
    assert min_dcf(scores, labels, p_target=0.05) < 0.5
