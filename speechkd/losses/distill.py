"""Distillation losses shared by the KD methods (per frame or per token)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def codebook_ce_loss(logits: torch.Tensor, indexes: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Cross-entropy of predicted codebook indexes, summed over codebooks, averaged over valid frames.

    Guo et al. (ICASSP 2023, arXiv 2211.00508, sec. 2.3): the student predicts each of the teacher's
    ``num_codebooks`` indexes per frame with its own 256-way softmax; the KD loss is the sum of the
    per-codebook cross-entropies.

    Args:
      logits: ``(N, T, num_codebooks, codebook_size)`` unnormalised scores.
      indexes: ``(N, T, num_codebooks)`` int64 target indexes, ``ignore_index`` at padded frames.

    Returns:
      scalar: sum over codebooks of the mean CE over non-ignored frames (0 when every frame is padding).

    Raises:
      ValueError: shape mismatch.
    """
    if logits.shape[:-1] != indexes.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not fit indexes {tuple(indexes.shape)}")
    num_codebooks = indexes.shape[-1]
    valid = (indexes != ignore_index).sum()
    if int(valid) == 0:
        return logits.sum() * 0.0
    ce = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), indexes.reshape(-1), ignore_index=ignore_index, reduction="sum"
    )
    return ce / valid * num_codebooks


def frame_regression_loss(pred: torch.Tensor, target: torch.Tensor, lens: torch.Tensor, kind: str = "l1") -> torch.Tensor:
    """L1 or L2 (squared error) regression to teacher embeddings over valid frames.

    Args:
      pred: ``(N, T, D)`` student predictions.
      target: ``(N, T, D)`` teacher embeddings.
      lens: ``(N,)`` valid frames per utterance.
      kind: ``"l1"`` (mean absolute error) or ``"l2"`` (mean squared error), averaged over valid frames and
        dimensions.

    Raises:
      ValueError: shape mismatch or unknown ``kind``.
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    if kind not in ("l1", "l2"):
        raise ValueError(f"kind must be 'l1' or 'l2', got {kind!r}")
    mask = (torch.arange(pred.shape[1], device=pred.device)[None, :] < lens[:, None]).unsqueeze(-1)  # (N, T, 1)
    diff = (pred - target).float()
    err = diff.abs() if kind == "l1" else diff.pow(2)
    denom = mask.sum() * pred.shape[-1]
    return (err * mask).sum() / denom.clamp(min=1)


def masked_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, lens: torch.Tensor,
              temperature: float = 1.0) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher/T) || softmax(student/T))`` summed over valid positions, / N.

    The distillation loss of Hinton et al. (2015, sec. 2; the T^2 keeps gradients on the scale of a hard-label
    loss), used per token by word-level KD (Kim & Rush 2016, eq. 3) and per frame on CoDERT's encoder logits
    (Swaminathan et al. 2021, sec. 2.2).

    Args:
      student_logits, teacher_logits: ``(N, U, V)`` logits at the same positions (tokens or frames).
      lens: ``(N,)`` valid positions per utterance (padding ignored).
      temperature: T > 0.

    Returns:
      scalar, nats per utterance (the scale of a per-utterance sequence CE).

    Raises:
      ValueError: shape mismatch or T <= 0.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} != teacher logits {tuple(teacher_logits.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)  # (N, U, V)
    log_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)  # (N, U, V)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)  # (N, U)
    valid = torch.arange(kl.shape[1], device=kl.device)[None, :] < lens[:, None]  # (N, U)
    return (temperature ** 2) * (kl * valid).sum() / kl.shape[0]
