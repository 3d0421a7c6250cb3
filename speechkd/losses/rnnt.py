"""RNN-Transducer (RNN-T) loss in pure PyTorch.

Implements the negative log-likelihood of Graves (2012), "Sequence Transduction with Recurrent
Neural Networks" (arXiv:1211.3711), Sec. 2.3-2.4: the forward variable alpha(t, u) of eq. (16)-(17)
on the (T, U+1) output lattice and P(y|x) = alpha(T-1, U) * blank(T-1, U) of eq. (18) (0-based).

Gradients come from autograd. The forward recursion is run with a single Python loop over the
acoustic frames t; each lattice row is solved in closed form along u with a cumulative
log-sum-exp (see :func:`rnnt_loss`).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["rnnt_loss"]

_REDUCTIONS = ("none", "sum", "mean")


def _check_inputs(
    logits: Tensor,
    targets: Tensor,
    logit_lens: Tensor,
    target_lens: Tensor,
    blank: int,
    reduction: str,
) -> None:
    """Validate the arguments of :func:`rnnt_loss`; raise ValueError naming the faulty one."""
    if not isinstance(logits, Tensor) or logits.dim() != 4:
        raise ValueError(
            f"logits must be a 4-D tensor (N, T, U+1, V), got shape "
            f"{tuple(logits.shape) if isinstance(logits, Tensor) else type(logits)}"
        )
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point, got dtype {logits.dtype}")
    N, T, U1, V = logits.shape
    if N == 0 or T == 0 or V == 0:
        raise ValueError(f"logits must have non-empty N, T and V dimensions, got shape {tuple(logits.shape)}")
    if not isinstance(targets, Tensor) or targets.dim() != 2:
        raise ValueError("targets must be a 2-D integer tensor (N, U)")
    if targets.is_floating_point() or targets.dtype == torch.bool:
        raise ValueError(f"targets must be an integer tensor, got dtype {targets.dtype}")
    if targets.shape[0] != N or targets.shape[1] + 1 != U1:
        raise ValueError(
            f"targets shape {tuple(targets.shape)} does not match logits shape {tuple(logits.shape)}: "
            f"expected targets of shape (N={N}, U={U1 - 1}) for logits (N, T, U+1, V)"
        )
    for name, lens in (("logit_lens", logit_lens), ("target_lens", target_lens)):
        if not isinstance(lens, Tensor) or lens.dim() != 1 or lens.shape[0] != N:
            raise ValueError(f"{name} must be a 1-D tensor of shape (N={N},)")
        if lens.is_floating_point() or lens.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor, got dtype {lens.dtype}")
    if not (0 <= blank < V):
        raise ValueError(f"blank={blank} is out of range for vocabulary size V={V}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if bool((logit_lens < 1).any()) or bool((logit_lens > T).any()):
        raise ValueError(f"logit_lens must lie in [1, T={T}], got {logit_lens.tolist()}")
    if bool((target_lens < 0).any()) or bool((target_lens > U1 - 1).any()):
        raise ValueError(f"target_lens must lie in [0, U={U1 - 1}], got {target_lens.tolist()}")
    if targets.shape[1] > 0:
        valid = torch.arange(targets.shape[1], device=targets.device)[None, :] < target_lens[:, None]
        if bool(((targets < 0) | (targets >= V))[valid].any()):
            raise ValueError(f"targets contain ids outside [0, V={V}) within target_lens")
        if bool((targets == blank)[valid].any()):
            raise ValueError(f"targets contain the blank id {blank} within target_lens")


def rnnt_loss(
    logits: Tensor,
    targets: Tensor,
    logit_lens: Tensor,
    target_lens: Tensor,
    blank: int = 0,
    reduction: str = "mean",
) -> Tensor:
    """RNN-T negative log-likelihood -log P(y|x) (Graves 2012, eq. 16-18).

    With log-probabilities ``blank(t, u) = log p(blank | t, u)`` and
    ``y(t, u) = log p(y_{u+1} | t, u)`` (0-based lattice nodes, u = number of labels emitted),
    the forward variable obeys (Graves 2012, eq. 16-17)::

        alpha(0, 0) = 0
        alpha(t, u) = logaddexp(alpha(t-1, u) + blank(t-1, u), alpha(t, u-1) + y(t, u-1))

    and the loss is ``-(alpha(T_n-1, U_n) + blank(T_n-1, U_n))`` (eq. 18). Along one row t the
    recursion in u is a linear (log-semiring) scan whose closed form is::

        alpha(t, u) = cumY(t, u) + logcumsumexp_{u'<=u}(alpha(t-1, u') + blank(t-1, u') - cumY(t, u'))

    with ``cumY(t, u) = sum_{k<u} y(t, k)``. So only the loop over t is in Python.

    The computation runs in float32 (float64 if ``logits`` is float64); half/bfloat16 inputs are
    upcast before the log-softmax. Gradients are obtained by autograd.

    Args:
        logits: (N, T, U+1, V) unnormalised joiner outputs (log-softmax is applied here over V).
        targets: (N, U) int label ids, padded arbitrarily beyond ``target_lens``; must lie in
            [0, V) and differ from ``blank`` within ``target_lens``.
        logit_lens: (N,) int number of valid acoustic frames T_n, 1 <= T_n <= T.
        target_lens: (N,) int number of valid labels U_n, 0 <= U_n <= U.
        blank: id of the blank symbol, 0 <= blank < V.
        reduction: "none" -> (N,) per-utterance losses (nats); "sum" -> scalar sum over the batch;
            "mean" -> scalar mean over utterances (not normalised by length).

    Returns:
        Tensor of dtype float32 (float64 for float64 input): (N,) for "none", else a scalar.

    Raises:
        ValueError: on wrong ranks/shapes/dtypes, lengths out of bounds, target ids out of range or
            equal to blank within ``target_lens``, blank out of range, or an unknown reduction.
    """
    _check_inputs(logits, targets, logit_lens, target_lens, blank, reduction)
    N, T, U1, V = logits.shape
    U = U1 - 1
    device = logits.device
    compute_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    x = logits.to(compute_dtype)
    log_norm = torch.logsumexp(x, dim=-1)  # (N, T, U+1)
    blank_lp = x[..., blank] - log_norm  # (N, T, U+1): log p(blank | t, u)

    targets = targets.to(device=device, dtype=torch.int64)
    logit_lens = logit_lens.to(device=device, dtype=torch.int64)
    target_lens = target_lens.to(device=device, dtype=torch.int64)
    if U > 0:
        valid = torch.arange(U, device=device)[None, :] < target_lens[:, None]  # (N, U)
        safe_targets = torch.where(valid, targets, torch.full_like(targets, blank))  # (N, U)
        index = safe_targets[:, None, :, None].expand(N, T, U, 1)
        label_lp = x[:, :, :U, :].gather(-1, index).squeeze(-1) - log_norm[:, :, :U]  # (N, T, U)
        cum_y = torch.cat(
            [x.new_zeros(N, T, 1), torch.cumsum(label_lp, dim=-1)], dim=-1
        )  # (N, T, U+1): sum_{k<u} y(t, k)
    else:
        cum_y = x.new_zeros(N, T, 1)  # (N, T, 1)

    alphas = [cum_y[:, 0]]  # alpha(0, u) = cumY(0, u); each entry (N, U+1)
    for t in range(1, T):
        prev = alphas[-1] + blank_lp[:, t - 1] - cum_y[:, t]  # (N, U+1)
        alphas.append(cum_y[:, t] + torch.logcumsumexp(prev, dim=-1))  # (N, U+1)
    alpha = torch.stack(alphas, dim=1)  # (N, T, U+1)

    batch = torch.arange(N, device=device)
    t_last = logit_lens - 1  # (N,)
    log_like = alpha[batch, t_last, target_lens] + blank_lp[batch, t_last, target_lens]  # (N,)
    loss = -log_like  # (N,)
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.mean()
    return loss
