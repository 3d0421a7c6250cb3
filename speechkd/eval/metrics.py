"""Evaluation metrics: word error rate, classification accuracy, EER and minDCF.

WER uses :func:`kaldialign.edit_distance` (the same Levenshtein alignment icefall uses).
The speaker-verification metrics (:func:`equal_error_rate`, :func:`min_dcf`) are pure numpy.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import kaldialign
import numpy as np

from speechkd.utils import write_text_atomic

__all__ = [
    "WerStats",
    "word_error_rate",
    "write_wer_details",
    "accuracy",
    "equal_error_rate",
    "min_dcf",
]

Transcript = Union[str, Sequence[str]]

_EPS = "*"  # placeholder for insertions/deletions in alignments written by write_wer_details


@dataclass(frozen=True)
class WerStats:
    """Word-error counts summed over a set of utterances.

    Attributes:
        errors: total word errors, ``ins + dels + subs``.
        ref_words: number of words in the references.
        ins: inserted words (in the hypothesis, not the reference).
        dels: deleted words (in the reference, missing from the hypothesis).
        subs: substituted words.

    Raises:
        ValueError: on a negative count or when ``errors != ins + dels + subs``.

    Stats add up with ``+`` (and ``sum(stats_list)`` works, starting from 0).
    """

    errors: int
    ref_words: int
    ins: int
    dels: int
    subs: int

    def __post_init__(self) -> None:
        for field in ("errors", "ref_words", "ins", "dels", "subs"):
            if getattr(self, field) < 0:
                raise ValueError(f"WerStats.{field} must be >= 0, got {getattr(self, field)}")
        if self.errors != self.ins + self.dels + self.subs:
            raise ValueError(
                f"WerStats.errors ({self.errors}) != ins + dels + subs "
                f"({self.ins} + {self.dels} + {self.subs})"
            )

    @property
    def wer(self) -> float:
        """Word error rate in percent: ``100 * errors / ref_words`` (can exceed 100).

        Raises:
            ValueError: when ``ref_words == 0`` (WER is undefined).
        """
        if self.ref_words == 0:
            raise ValueError("WER is undefined with 0 reference words")
        return 100.0 * self.errors / self.ref_words

    def __add__(self, other: "WerStats") -> "WerStats":
        if not isinstance(other, WerStats):
            return NotImplemented
        return WerStats(
            errors=self.errors + other.errors,
            ref_words=self.ref_words + other.ref_words,
            ins=self.ins + other.ins,
            dels=self.dels + other.dels,
            subs=self.subs + other.subs,
        )

    def __radd__(self, other: object) -> "WerStats":
        # Lets sum([...]) start from the integer 0.
        if isinstance(other, int) and other == 0:
            return self
        return NotImplemented

    def __str__(self) -> str:
        wer = f"{self.wer:.2f}" if self.ref_words else "nan"
        return (
            f"%WER {wer} [ {self.errors} / {self.ref_words}, "
            f"{self.ins} ins, {self.dels} del, {self.subs} sub ]"
        )


def _words(text: Transcript, what: str, index: int) -> list[str]:
    """Split one transcript into words: a str is split on whitespace, a word list is kept."""
    if isinstance(text, str):
        return text.split()
    if isinstance(text, (list, tuple)) and all(isinstance(w, str) for w in text):
        return list(text)
    raise TypeError(
        f"{what}[{index}] must be a str or a list of str words, got {type(text).__name__}"
    )


def _check_pair(refs: Sequence[Transcript], hyps: Sequence[Transcript]) -> None:
    for what, seq in (("refs", refs), ("hyps", hyps)):
        if isinstance(seq, str):
            raise TypeError(f"{what} must be a sequence of transcripts, not a single str")
    if len(refs) != len(hyps):
        raise ValueError(f"refs and hyps differ in length: {len(refs)} != {len(hyps)}")
    if len(refs) == 0:
        raise ValueError("empty reference set: WER is undefined")


def _utterance_stats(ref: list[str], hyp: list[str]) -> WerStats:
    d = kaldialign.edit_distance(ref, hyp)
    return WerStats(
        errors=int(d["total"]),
        ref_words=len(ref),
        ins=int(d["ins"]),
        dels=int(d["del"]),
        subs=int(d["sub"]),
    )


def word_error_rate(refs: Sequence[Transcript], hyps: Sequence[Transcript]) -> WerStats:
    """Corpus-level word errors between references and hypotheses.

    Args:
        refs: N reference transcripts, each a whitespace-separated str or a list of words.
        hyps: N hypotheses, same forms, aligned with ``refs``.

    Returns:
        :class:`WerStats` summed over the N utterances; ``.wer`` is in percent.

    Raises:
        ValueError: when the lengths differ, N == 0, or the references hold no word at all.
        TypeError: when an item is neither a str nor a list of str (or refs/hyps is one str).
    """
    _check_pair(refs, hyps)
    total = sum(
        _utterance_stats(_words(r, "refs", i), _words(h, "hyps", i))
        for i, (r, h) in enumerate(zip(refs, hyps))
    )
    if total.ref_words == 0:
        raise ValueError("empty reference set: the references contain no words")
    return total


def write_wer_details(
    path: Union[str, os.PathLike],
    ids: Sequence[str],
    refs: Sequence[Transcript],
    hyps: Sequence[Transcript],
) -> WerStats:
    """Write a per-utterance error file (a simple take on icefall's ``errs-*.txt``), atomically.

    The file starts with the corpus summary line ``%WER 12.34 [ 5 / 40, 1 ins, 2 del, 2 sub ]``,
    then one block per utterance, in the given order::

        utt1:	ref=the cat sat
        utt1:	hyp=the hat sat down
        utt1:	align=the (cat->hat) sat (*->down)
        utt1:	errors=2 ins=1 del=0 sub=1 ref_words=3

    In ``align``, ``(a->b)`` is a substitution, ``(*->b)`` an insertion, ``(a->*)`` a deletion.

    Args:
        path: output text file (parent dirs are created).
        ids: N utterance ids.
        refs, hyps: N transcripts each, as for :func:`word_error_rate`.

    Returns:
        The corpus :class:`WerStats` (same as :func:`word_error_rate`).

    Raises:
        ValueError: on length mismatch (ids, refs, hyps) or an empty reference set.
        TypeError: as for :func:`word_error_rate`.
    """
    _check_pair(refs, hyps)
    if len(ids) != len(refs):
        raise ValueError(f"ids and refs differ in length: {len(ids)} != {len(refs)}")
    blocks = []
    per_utt = []
    for i, (uid, r, h) in enumerate(zip(ids, refs, hyps)):
        ref, hyp = _words(r, "refs", i), _words(h, "hyps", i)
        st = _utterance_stats(ref, hyp)
        per_utt.append(st)
        align = " ".join(
            a if a == b else f"({a}->{b})" for a, b in kaldialign.align(ref, hyp, _EPS)
        )
        blocks.append(
            f"{uid}:\tref={' '.join(ref)}\n"
            f"{uid}:\thyp={' '.join(hyp)}\n"
            f"{uid}:\talign={align}\n"
            f"{uid}:\terrors={st.errors} ins={st.ins} del={st.dels} sub={st.subs} "
            f"ref_words={st.ref_words}\n"
        )
    total = sum(per_utt)
    if total.ref_words == 0:
        raise ValueError("empty reference set: the references contain no words")
    write_text_atomic(Path(path), f"{total}\n\n" + "\n".join(blocks))
    return total


def read_wer_details(path: Union[str, os.PathLike]) -> dict[str, tuple[int, int]]:
    """Per-utterance ``{id: (errors, ref_words)}`` of a file written by :func:`write_wer_details`, in file order.

    Raises:
      FileNotFoundError: no such file. ValueError: an ``errors=`` line that does not parse (naming file and line).
    """
    out: dict[str, tuple[int, int]] = {}
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            uid, sep, rest = line.rstrip("\n").partition(":\terrors=")
            if not sep:
                continue
            try:
                fields = dict(kv.split("=", 1) for kv in ("errors=" + rest).split())
                out[uid] = (int(fields["errors"]), int(fields["ref_words"]))
            except (KeyError, ValueError) as e:
                raise ValueError(f"{path}:{lineno}: not an errors line of write_wer_details ({e})") from e
    return out


def accuracy(preds: Sequence, labels: Sequence) -> float:
    """Fraction of positions where ``preds[i] == labels[i]``.

    Args:
        preds: N predicted class ids (or any comparable values), 1-D.
        labels: N true class ids.

    Returns:
        Accuracy as a fraction in [0, 1] (not percent).

    Raises:
        ValueError: when the shapes differ, the inputs are not 1-D, or N == 0.
    """
    p, y = np.asarray(preds), np.asarray(labels)
    if p.ndim != 1 or y.ndim != 1:
        raise ValueError(f"preds and labels must be 1-D, got shapes {p.shape} and {y.shape}")
    if p.shape != y.shape:
        raise ValueError(f"preds and labels differ in length: {p.shape[0]} != {y.shape[0]}")
    if p.size == 0:
        raise ValueError("accuracy of an empty set is undefined")
    return float(np.mean(p == y))


def _roc(scores: Sequence[float], labels: Sequence) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC points of a detector that accepts a trial when ``score >= threshold``.

    Returns ``(fpr, fnr, thresholds)``, each of length K+1 for K distinct scores: point 0 is
    "reject all" (threshold +inf, fpr 0, fnr 1); point k accepts the k highest distinct scores;
    the last point is "accept all" (fpr 1, fnr 0).
    """
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels)
    if s.ndim != 1 or y.ndim != 1:
        raise ValueError(f"scores and labels must be 1-D, got shapes {s.shape} and {y.shape}")
    if s.shape != y.shape:
        raise ValueError(f"scores and labels differ in length: {s.shape[0]} != {y.shape[0]}")
    if s.size == 0:
        raise ValueError("empty input: no trials to score")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores must be finite (found NaN or inf)")
    if y.dtype == bool:
        y = y.astype(np.int64)
    if not np.all((y == 0) | (y == 1)):
        raise ValueError("labels must be 0 (non-target) or 1 (target)")
    y = y.astype(np.int64)
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        raise ValueError(
            f"need both target and non-target trials, got {n_pos} targets and {n_neg} non-targets"
        )
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last_of_run = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]  # last index of each distinct score
    tps = np.cumsum(y)[last_of_run]
    fps = last_of_run + 1 - tps
    fpr = np.r_[0.0, fps / n_neg]
    fnr = np.r_[1.0, 1.0 - tps / n_pos]
    thr = np.r_[np.inf, s[last_of_run]]
    return fpr, fnr, thr


def equal_error_rate(scores: Sequence[float], labels: Sequence) -> tuple[float, float]:
    """Equal error rate of a verification detector, from its ROC curve.

    The ROC points (one per distinct score, trial accepted when ``score >= threshold``) are
    joined by straight lines, as s3prl does with ``interp1d`` over sklearn's ``roc_curve``, and
    the EER is where that polyline crosses FPR == FNR. The threshold is interpolated linearly
    between the two ROC points around the crossing (the top score when the crossing lies
    between "reject all" and the first point).

    Args:
        scores: N trial scores, higher = more likely the same speaker.
        labels: N labels, 1 (or True) for target trials, 0 for non-target.

    Returns:
        ``(eer, threshold)``: EER as a fraction in [0, 1] (not percent) and the score threshold.

    Raises:
        ValueError: empty input, inputs not 1-D or of different lengths, non-finite scores, labels not in
            {0, 1}, or only one class.
    """
    fpr, fnr, thr = _roc(scores, labels)
    d = fnr - fpr  # strictly decreasing from 1 to -1 (each step adds >= 1 trial)
    j = int(np.nonzero(d <= 0)[0][0])  # j >= 1 since d[0] == 1
    if d[j] == 0:
        return float(fpr[j]), float(thr[j])
    i = j - 1
    t = d[i] / (d[i] - d[j])
    eer = fpr[i] + t * (fpr[j] - fpr[i])
    threshold = thr[j] if i == 0 else thr[i] + t * (thr[j] - thr[i])
    return float(eer), float(threshold)


def min_dcf(
    scores: Sequence[float],
    labels: Sequence,
    p_target: float = 0.01,
    c_miss: float = 1.0,
    c_fa: float = 1.0,
) -> float:
    """Minimum normalised detection cost function (NIST SRE / VoxCeleb style).

    ``DCF(t) = c_miss * P_miss(t) * p_target + c_fa * P_fa(t) * (1 - p_target)``, minimised over
    all thresholds t (including reject-all and accept-all), divided by the cost of the best
    trivial system ``min(c_miss * p_target, c_fa * (1 - p_target))``. Hence the result lies in
    [0, 1]: 0 for perfectly separated scores, 1 when no threshold beats a constant decision.

    Args:
        scores, labels: as for :func:`equal_error_rate`.
        p_target: prior probability of a target trial, in (0, 1).
        c_miss, c_fa: costs of a miss and of a false alarm, > 0.

    Returns:
        The normalised minimum DCF (unitless).

    Raises:
        ValueError: bad prior/costs, or the input errors of :func:`equal_error_rate`.
    """
    if not 0.0 < p_target < 1.0:
        raise ValueError(f"p_target must be in (0, 1), got {p_target}")
    if c_miss <= 0 or c_fa <= 0:
        raise ValueError(f"c_miss and c_fa must be > 0, got {c_miss} and {c_fa}")
    fpr, fnr, _ = _roc(scores, labels)
    dcf = c_miss * fnr * p_target + c_fa * fpr * (1.0 - p_target)
    c_default = min(c_miss * p_target, c_fa * (1.0 - p_target))
    return float(np.min(dcf) / c_default)


# ------------------------------------------------------------------------------------------ sampling error
def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (Wilson 1927; Brown, Cai, DasGupta 2001, eq. 4), e.g. the
    sampling error of a KWS accuracy measured on ``n`` test clips.

    ``(p + z^2/2n -+ z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n)`` with ``p = successes / n`` and ``z`` the normal
    quantile of ``(1 + confidence) / 2``.

    Returns:
      ``(low, high)`` as fractions in [0, 1].

    Raises:
      ValueError: ``n < 1``, ``successes`` outside ``[0, n]`` or ``confidence`` outside (0, 1).
    """
    from scipy.stats import norm

    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n and n >= 1, got successes={successes}, n={n}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    z = float(norm.ppf((1 + confidence) / 2))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def _percentile_interval(values: np.ndarray, confidence: float) -> tuple[float, float]:
    lo, hi = np.quantile(values, [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(lo), float(hi)


def bootstrap_wer_interval(errors: Sequence[int], ref_words: Sequence[int], n_boot: int = 2000, seed: int = 0,
                           confidence: float = 0.95, baseline_errors: Optional[Sequence[int]] = None
                           ) -> tuple[float, float]:
    """Percentile bootstrap interval of a corpus WER (percent) over utterances (Bisani & Ney 2004, sec. 2): the
    utterances are drawn with replacement ``n_boot`` times and the WER ``100 * sum(errors) / sum(ref_words)``
    recomputed on each draw. ``errors`` of shape (S, U), S systems (e.g. seeds) decoding the same U utterances,
    gives the interval of their mean WER, every system scored on the same draw.

    With ``baseline_errors`` (the same utterances decoded by another system) the interval is of the paired
    difference ``WER(this) - WER(baseline)`` (Bisani & Ney's "probability of improvement" setting): both systems
    are scored on the same draw, so the utterances' shared difficulty cancels.

    Args:
      errors: (U,) or (S, U) word errors per utterance; ref_words: (U,) reference words per utterance.
      n_boot: bootstrap draws; seed: their generator's seed; confidence: the interval's coverage.
      baseline_errors: (U,) or (S', U): the other system(s)' errors on the same utterances, in the same order.

    Returns:
      ``(low, high)`` in WER percent (points).

    Raises:
      ValueError: lengths differ, no utterance, no reference word, or ``n_boot < 1``.
    """
    e = np.atleast_2d(np.asarray(errors, dtype=np.float64))  # (S, U)
    r = np.asarray(ref_words, dtype=np.float64)  # (U,)
    if e.ndim != 2 or r.ndim != 1 or e.shape[1] != r.shape[0] or r.size == 0:
        raise ValueError(f"errors must be (U,) or (S, U) and ref_words (U,) with U > 0, got {np.shape(errors)} and "
                         f"{r.shape}")
    if r.sum() <= 0:
        raise ValueError("the references contain no words")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    b = None if baseline_errors is None else np.atleast_2d(np.asarray(baseline_errors, dtype=np.float64))
    if b is not None and (b.ndim != 2 or b.shape[1] != r.shape[0]):
        raise ValueError(f"baseline_errors has shape {np.shape(baseline_errors)}, ref_words {r.shape}")
    idx = np.random.default_rng(seed).integers(0, r.size, size=(n_boot, r.size))  # (n_boot, U)
    words = r[idx].sum(1)  # (n_boot,)
    words = np.where(words > 0, words, np.nan)  # a draw of empty references has no WER
    counts = np.stack([row[idx].sum(1) for row in e])  # (S, n_boot): errors of each system on each draw
    wer = 100.0 * counts.mean(0) / words  # (n_boot,) the systems' mean WER
    if b is not None:
        wer = wer - 100.0 * np.stack([row[idx].sum(1) for row in b]).mean(0) / words
    return _percentile_interval(wer[np.isfinite(wer)], confidence)


def bootstrap_eer_interval(scores: Sequence[float], labels: Sequence, n_boot: int = 1000, seed: int = 0,
                           confidence: float = 0.95, baseline_scores: Optional[Sequence[float]] = None
                           ) -> tuple[float, float]:
    """Percentile bootstrap interval of the EER (fraction) over trials: the trials are drawn with replacement
    ``n_boot`` times and :func:`equal_error_rate` recomputed on each draw (draws missing a class are skipped).
    ``scores`` of shape (S, N), S systems (e.g. fine-tuning seeds) scoring the same N trials, gives the interval of
    their mean EER, every system scored on the same draw.

    With ``baseline_scores`` (the same trials scored by other system(s)) the interval is of the paired difference
    ``mean EER(this) - mean EER(baseline)``, both scored on the same draw, as :func:`bootstrap_wer_interval` does for
    WER (Bisani & Ney 2004).

    Trials that share speakers or utterances are not independent, so this interval is narrower than the
    speaker-level sampling error; read it as a lower bound of the uncertainty.

    Args:
      scores: (N,) or (S, N) trial scores; labels: (N,) 1 for target trials, 0 for non-target.
      n_boot, seed, confidence: as :func:`bootstrap_wer_interval`.
      baseline_scores: (N,) or (S', N): the other system(s)' scores of the same trials, in the same order.

    Returns:
      ``(low, high)`` as fractions in [0, 1] (in [-1, 1] for a difference).

    Raises:
      ValueError: as :func:`equal_error_rate` (for every system), shapes that do not match, or ``n_boot < 1``.
    """
    y = np.asarray(labels).astype(np.int64)  # (N,)
    systems = [np.atleast_2d(np.asarray(x, dtype=np.float64)) for x in
               (scores, *(() if baseline_scores is None else (baseline_scores,)))]
    for a in systems:
        if a.ndim != 2 or a.shape[1] != y.shape[0]:
            raise ValueError(f"scores must be (N,) or (S, N) with N = {y.shape[0]} labels, got {a.shape}")
        for row in a:
            equal_error_rate(row, y)  # validates
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    rng = np.random.default_rng(seed)
    eers = []
    for _ in range(n_boot):
        i = rng.integers(0, y.size, size=y.size)  # (N,) one draw of trials
        if 0 < y[i].sum() < y.size:
            means = [np.mean([equal_error_rate(row[i], y[i])[0] for row in a]) for a in systems]
            eers.append(means[0] - (means[1] if len(means) > 1 else 0.0))
    return _percentile_interval(np.asarray(eers), confidence)


def bootstrap_accuracy_interval(correct: Sequence[int], n_boot: int = 2000, seed: int = 0, confidence: float = 0.95,
                                baseline_correct: Optional[Sequence[int]] = None) -> tuple[float, float]:
    """Percentile bootstrap interval of a classification accuracy (percent) over test items, e.g. KWS clips:
    :func:`bootstrap_wer_interval` with one "word" per item and its error ``1 - correct``. ``correct`` of shape
    (S, U) gives the interval of S systems' (seeds') mean accuracy; with ``baseline_correct`` (the same items) the
    interval is of the paired difference ``accuracy(this) - accuracy(baseline)`` in points, the items' shared
    difficulty cancelling.

    Args:
      correct: (U,) or (S, U), 1 where the item was classified right, 0 where not.
      n_boot, seed, confidence: as :func:`bootstrap_wer_interval`.
      baseline_correct: (U,) or (S', U), the other system(s) on the same items in the same order.

    Returns:
      ``(low, high)`` in percent (points for a difference).

    Raises:
      ValueError: values other than 0 / 1, or as :func:`bootstrap_wer_interval`.
    """
    arrays = [np.asarray(x) for x in (correct, *(() if baseline_correct is None else (baseline_correct,)))]
    for a in arrays:
        if a.size and not np.all((a == 0) | (a == 1)):
            raise ValueError("correct must hold 0 / 1 per item")
    u = arrays[0].shape[-1]
    lo, hi = bootstrap_wer_interval(1 - arrays[0], np.ones(u), n_boot=n_boot, seed=seed, confidence=confidence,
                                    baseline_errors=None if len(arrays) == 1 else 1 - arrays[1])
    return (100.0 - hi, 100.0 - lo) if len(arrays) == 1 else (-hi, -lo)
