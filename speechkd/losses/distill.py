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


PREDICTION_COS_TYPES = ("logsigmoid", "cosine")
"""Cosine terms of :func:`prediction_loss`: ``-log sigmoid(cos)`` (DistilHuBERT) or ``1 - cos``."""


def prediction_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    lens: torch.Tensor,
    l1_weight: float = 1.0,
    l2_weight: float = 0.0,
    cos_weight: float = 1.0,
    cos_type: str = "logsigmoid",
    eps: float = 1e-8,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DistilHuBERT's loss of one prediction head against one teacher layer, over valid frames.

    Chang et al. (DistilHuBERT, ICASSP 2022, arXiv 2110.01900, sec. 2, eq. 1) train the head that predicts teacher
    layer l with ``L^(l) = sum_t [ (1/D) ||h_t - hhat_t||_1 - lambda * log sigmoid(cos(h_t, hhat_t)) ]``, lambda = 1,
    where ``h_t`` is the teacher's hidden state and ``hhat_t`` the prediction at frame t. As in s3prl's
    ``pretrain/distiller`` (``compute_loss``), the frame sum is a mean: with ``V = sum_n lens[n]`` valid frames and
    ``D`` feature dims,

    - ``l1  = 1/(V*D) * sum_{n, t < lens[n], d} |pred - target|``
    - ``l2  = 1/(V*D) * sum_{n, t < lens[n], d} (pred - target)^2``  (s3prl's ``loss_type: l2``)
    - ``cos = 1/V * sum_{n, t < lens[n]} c(cos(pred_nt, target_nt))`` with ``c(x) = -log sigmoid(x)``
      (``cos_type="logsigmoid"``, the paper's) or ``c(x) = 1 - x`` (``"cosine"``), and
      ``cos(a, b) = a.b / (max(|a|, eps) * max(|b|, eps))`` (:func:`torch.nn.functional.cosine_similarity`)

    and ``loss = l1_weight * l1 + l2_weight * l2 + cos_weight * cos``. Unlike s3prl, which averages over every
    padded position, padded frames (``t >= lens[n]``) are left out (whatever finite values they hold). Computed
    in float32.

    Args:
      pred: ``(N, T, D)`` head predictions.
      target: ``(N, T, D)`` teacher hidden states of the same frames.
      lens: ``(N,)`` integer valid frame counts, each in ``[0, T]``.
      l1_weight, l2_weight, cos_weight: weights (>= 0) of the three terms; DistilHuBERT: 1, 0, 1.
      cos_type: ``"logsigmoid"`` or ``"cosine"``, see above.
      eps: lower bound of the vector norms in the cosine similarity.

    Returns:
      ``(loss, terms)``: the scalar loss (0, still attached to ``pred``, when no frame is valid) and a dict of the
      detached unweighted scalar terms ``"l1"``, ``"l2"``, ``"cos"`` plus ``"cos_sim"``, the mean cosine
      similarity over valid frames (for logging). Terms of weight 0 are computed without gradient.

    Raises:
      ValueError: ``pred``/``target`` not 3-D or of different shapes, ``lens`` not ``(N,)`` integers in ``[0, T]``,
        a negative weight or all weights 0, or an unknown ``cos_type``.
    """
    if pred.dim() != 3 or pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} must both be (N, T, D)")
    n, t, d = pred.shape
    if lens.shape != (n,) or lens.is_floating_point() or lens.is_complex() or lens.dtype == torch.bool:
        raise ValueError(f"lens must be a ({n},) integer tensor of frame counts, got {tuple(lens.shape)} {lens.dtype}")
    if n and (int(lens.min()) < 0 or int(lens.max()) > t):
        raise ValueError(f"frame counts must lie in [0, T = {t}], got {lens.tolist()}")
    if cos_type not in PREDICTION_COS_TYPES:
        raise ValueError(f"cos_type must be one of {PREDICTION_COS_TYPES}, got {cos_type!r}")
    weights = {"l1": float(l1_weight), "l2": float(l2_weight), "cos": float(cos_weight)}
    if any(w < 0 for w in weights.values()) or not any(w > 0 for w in weights.values()):
        raise ValueError(f"loss weights must be >= 0 with at least one > 0, got {weights}")

    pad = torch.arange(t, device=pred.device)[None, :] >= lens.to(pred.device)[:, None]  # (N, T) True at padding
    frames = (~pad).sum()
    if int(frames) == 0:
        zero = pred.sum() * 0.0
        return zero, {k: zero.detach() for k in ("l1", "l2", "cos", "cos_sim")}
    pred32, target32 = pred.float(), target.float()
    grad = torch.is_grad_enabled()
    with torch.set_grad_enabled(grad and (weights["l1"] > 0 or weights["l2"] > 0)):
        diff = pred32 - target32  # (N, T, D)
    with torch.set_grad_enabled(grad and weights["l1"] > 0):
        l1 = diff.abs().sum(-1).masked_fill(pad, 0.0).sum() / (frames * d)
    with torch.set_grad_enabled(grad and weights["l2"] > 0):
        l2 = diff.pow(2).sum(-1).masked_fill(pad, 0.0).sum() / (frames * d)
    with torch.set_grad_enabled(grad and weights["cos"] > 0):
        sim = F.cosine_similarity(pred32, target32, dim=-1, eps=eps)  # (N, T)
        c = -F.logsigmoid(sim) if cos_type == "logsigmoid" else 1.0 - sim
        cos = c.masked_fill(pad, 0.0).sum() / frames
    terms = {"l1": l1, "l2": l2, "cos": cos}
    loss = sum(weights[k] * v for k, v in terms.items() if weights[k] > 0)
    logs = {k: v.detach() for k, v in terms.items()}
    logs["cos_sim"] = sim.detach().masked_fill(pad, 0.0).sum() / frames
    return loss, logs
