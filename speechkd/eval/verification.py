"""Speaker-verification evaluation inputs: trial lists and cosine scoring.

Trial lists are the shared corpora's ``<corpus>/trials/*.tsv`` files (:func:`read_trials`). A system embeds
every utterance and scores each trial by the cosine similarity of its enrollment and test embeddings
(:func:`cosine_scores`); the scores are measured by :func:`speechkd.eval.metrics.equal_error_rate` (as s3prl
computes it) and :func:`speechkd.eval.metrics.min_dcf` (normalised minDCF, NIST SRE / Kaldi style).
:func:`cosine_scores` needs torch only when given torch tensors.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np

__all__ = ["Trials", "read_trials", "cosine_scores"]

TRIALS_HEADER = ("label", "enroll_id", "test_id")
_HEADER_LINE = "\t".join(TRIALS_HEADER)


@dataclass(frozen=True)
class Trials:
    """A speaker-verification trial list.

    Attributes:
        labels: ``(P,)`` int64, 1 for a target trial (same speaker), 0 for a non-target one.
        enroll_ids: P enrollment utterance ids.
        test_ids: P test utterance ids.
    """

    labels: np.ndarray
    enroll_ids: list[str]
    test_ids: list[str]

    def __len__(self) -> int:
        return len(self.enroll_ids)

    def utterance_ids(self) -> list[str]:
        """Every utterance id the trials use (enrollment and test), once each, in order of first use."""
        return list(dict.fromkeys(i for pair in zip(self.enroll_ids, self.test_ids) for i in pair))


def read_trials(path: Union[str, os.PathLike]) -> Trials:
    """Read a trial list in the shared corpora's format.

    UTF-8, tab-separated, the header line ``label<TAB>enroll_id<TAB>test_id``, then one trial a line:
    label ``1`` (same speaker) or ``0`` (different speakers), and two non-empty utterance ids (see
    ``shared/corpora/README.md``, "Common file formats"). A final newline is optional; blank lines are errors.

    Args:
        path: the ``.tsv`` file.

    Returns:
        :class:`Trials` with P >= 1 trials, in file order.

    Raises:
        FileNotFoundError: no such file.
        ValueError: bad header, a line without exactly 3 fields, a label other than 0/1, an empty id, a
            duplicated trial, or no trial at all; the message names the file and the 1-based line number.
    """
    path = Path(path)
    with open(path, encoding="utf-8", newline="") as f:
        text = f.read()
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # final newline
    if not lines:
        raise ValueError(f"{path}: empty file (expected the header {_HEADER_LINE!r})")
    header = tuple(lines[0].rstrip("\r").split("\t"))
    if header != TRIALS_HEADER:
        raise ValueError(f"{path}:1: header must be {_HEADER_LINE!r}, got {lines[0]!r}")
    labels: list[int] = []
    enroll: list[str] = []
    test: list[str] = []
    seen: dict[tuple[str, str], int] = {}
    for lineno, line in enumerate(lines[1:], start=2):
        fields = line.rstrip("\r").split("\t")
        if len(fields) != 3:
            raise ValueError(f"{path}:{lineno}: expected 3 tab-separated fields (label, enroll_id, test_id), "
                             f"got {len(fields)}: {line!r}")
        label, e, t = fields
        if label not in ("0", "1"):
            raise ValueError(f"{path}:{lineno}: label must be 0 or 1, got {label!r}")
        if not e.strip() or not t.strip() or e != e.strip() or t != t.strip():
            raise ValueError(f"{path}:{lineno}: utterance ids must be non-empty, without surrounding spaces: "
                             f"{line!r}")
        if (e, t) in seen:
            raise ValueError(f"{path}:{lineno}: trial {e} / {t} repeats line {seen[(e, t)]}")
        seen[(e, t)] = lineno
        labels.append(int(label))
        enroll.append(e)
        test.append(t)
    if not labels:
        raise ValueError(f"{path}: no trials after the header")
    return Trials(labels=np.asarray(labels, dtype=np.int64), enroll_ids=enroll, test_ids=test)


def cosine_scores(emb_a, emb_b, eps: float = 1e-8):
    """Cosine similarity of paired embeddings, one score per trial.

    ``score[p] = <a_p, b_p> / (max(||a_p||, eps) * max(||b_p||, eps))``, so a zero embedding scores 0.

    Args:
        emb_a: ``(P, D)`` enrollment embeddings (numpy array or torch tensor).
        emb_b: ``(P, D)`` test embeddings, same type, row p paired with row p of ``emb_a``.
        eps: smallest norm used in the division.

    Returns:
        ``(P,)`` scores in [-1, 1]: a float64 numpy array for numpy inputs, a tensor (dtype of the inputs) for
        torch inputs.

    Raises:
        ValueError: inputs not 2-D, shapes that differ, or non-finite values.
        TypeError: one numpy and one torch input.
    """
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a project dependency
        torch = None
    is_t = [torch is not None and isinstance(e, torch.Tensor) for e in (emb_a, emb_b)]
    if is_t[0] != is_t[1]:
        raise TypeError("emb_a and emb_b must both be numpy arrays or both torch tensors")
    if is_t[0]:
        a, b = emb_a, emb_b
        finite = bool(torch.isfinite(a).all() and torch.isfinite(b).all())
    else:
        a, b = np.asarray(emb_a, dtype=np.float64), np.asarray(emb_b, dtype=np.float64)
        finite = bool(np.isfinite(a).all() and np.isfinite(b).all())
    if a.ndim != 2 or b.ndim != 2 or tuple(a.shape) != tuple(b.shape):
        raise ValueError(f"emb_a and emb_b must both be (P, D), got {tuple(a.shape)} and {tuple(b.shape)}")
    if not finite:
        raise ValueError("embeddings must be finite (found NaN or inf)")
    if is_t[0]:
        na = torch.linalg.vector_norm(a, dim=1).clamp_min(eps)
        nb = torch.linalg.vector_norm(b, dim=1).clamp_min(eps)
        return (a * b).sum(1) / (na * nb)
    na = np.maximum(np.linalg.norm(a, axis=1), eps)
    nb = np.maximum(np.linalg.norm(b, axis=1), eps)
    return np.einsum("pd,pd->p", a, b) / (na * nb)
