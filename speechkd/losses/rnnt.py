"""RNN-Transducer (RNN-T) loss in pure PyTorch.

Implements the negative log-likelihood of Graves (2012), "Sequence Transduction with Recurrent
Neural Networks" (arXiv:1211.3711), Sec. 2.3-2.4: the forward variable alpha(t, u) of eq. (16)-(17)
on the (T, U+1) output lattice and P(y|x) = alpha(T-1, U) * blank(T-1, U) of eq. (18) (0-based).

Gradients come from autograd. The forward recursion is run with a single Python loop over the shorter
lattice axis: over the label positions u when U+1 < T (the usual case: a few labels, many frames), each
column solved in closed form along t, or over the frames t, each row solved along u; both closed forms are
a cumulative log-sum-exp (see :func:`rnnt_loss`). They are the same recursion, equal to rounding.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["rnnt_loss", "RNNT_LOOPS"]

_REDUCTIONS = ("none", "sum", "mean")
#: How :func:`rnnt_loss` runs its Python loop: ``auto`` (the shorter axis), ``frames`` (over t), ``labels`` (over u).
RNNT_LOOPS = ("auto", "frames", "labels")


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
    loop: str = "auto",
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

    with ``cumY(t, u) = sum_{k<u} y(t, k)``. Along one column u the recursion in t is the same kind of scan::

        alpha(t, 0) = cumB(t, 0)
        alpha(t, u) = cumB(t, u) + logcumsumexp_{t'<=t}(alpha(t', u-1) + y(t', u-1) - cumB(t', u))   (u >= 1)

    with ``cumB(t, u) = sum_{k<t} blank(k, u)``. One Python loop runs over the shorter axis (``loop="auto"``):
    a batch of ~66 frames and ~4 labels takes 5 steps instead of 66. The two orders differ only by rounding
    (float64: below 1e-12 relative on the tests' lattices).

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
        loop: ``auto`` (over u when U+1 < T, else over t), ``frames`` or ``labels``: which axis the Python loop
            runs over; the result is the same up to rounding.

    Returns:
        Tensor of dtype float32 (float64 for float64 input): (N,) for "none", else a scalar.

    Raises:
        ValueError: on wrong ranks/shapes/dtypes, lengths out of bounds, target ids out of range or
            equal to blank within ``target_lens``, blank out of range, an unknown reduction or loop.
    """
    _check_inputs(logits, targets, logit_lens, target_lens, blank, reduction)
    if loop not in RNNT_LOOPS:
        raise ValueError(f"loop must be one of {RNNT_LOOPS}, got {loop!r}")
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
        label_lp = x[:, :, :U, :].gather(-1, index).squeeze(-1) - log_norm[:, :, :U]  # (N, T, U): y(t, u)
    else:
        label_lp = x.new_zeros(N, T, 0)  # (N, T, 0)

    if loop == "labels" or (loop == "auto" and U1 < T):
        alpha = _alpha_by_labels(blank_lp, label_lp)  # (N, T, U+1)
    else:
        alpha = _alpha_by_frames(blank_lp, label_lp)  # (N, T, U+1)

    batch = torch.arange(N, device=device)
    t_last = logit_lens - 1  # (N,)
    log_like = alpha[batch, t_last, target_lens] + blank_lp[batch, t_last, target_lens]  # (N,)
    loss = -log_like  # (N,)
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.mean()
    return loss


def _alpha_by_frames(blank_lp: Tensor, label_lp: Tensor) -> Tensor:
    """The forward variable alpha: (N, T, U+1), one lattice row t at a time, each row in closed form along u.

    Args: ``blank_lp (N, T, U+1)`` log p(blank | t, u); ``label_lp (N, T, U)`` log p(y_{u+1} | t, u).
    """
    N, T, U1 = blank_lp.shape
    cum_y = torch.cat([blank_lp.new_zeros(N, T, 1), torch.cumsum(label_lp, dim=-1)], dim=-1)  # (N, T, U+1)
    alphas = [cum_y[:, 0]]  # alpha(0, u) = cumY(0, u); each entry (N, U+1)
    for t in range(1, T):
        prev = alphas[-1] + blank_lp[:, t - 1] - cum_y[:, t]  # (N, U+1)
        alphas.append(cum_y[:, t] + torch.logcumsumexp(prev, dim=-1))  # (N, U+1)
    return torch.stack(alphas, dim=1)  # (N, T, U+1)


def _alpha_by_labels(blank_lp: Tensor, label_lp: Tensor) -> Tensor:
    """The forward variable alpha: (N, T, U+1), one lattice column u at a time, each column in closed form along t.

    Args: as :func:`_alpha_by_frames`.
    """
    N, T, U1 = blank_lp.shape
    cum_b = torch.cat([blank_lp.new_zeros(N, 1, U1), torch.cumsum(blank_lp[:, :-1], dim=1)], dim=1)  # (N, T, U+1)
    columns = [cum_b[:, :, 0]]  # alpha(t, 0) = cumB(t, 0); each entry (N, T)
    for u in range(1, U1):
        into = columns[-1] + label_lp[:, :, u - 1] - cum_b[:, :, u]  # (N, T): arrivals from (t, u-1)
        columns.append(cum_b[:, :, u] + torch.logcumsumexp(into, dim=1))  # (N, T)
    return torch.stack(columns, dim=2)  # (N, T, U+1)
