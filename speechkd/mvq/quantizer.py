"""Multi-codebook vector quantizer (MVQ) for MVQ-KD labels: PCA + product-quantizer init, additive refinement.

MVQ-KD (Guo et al., "Predicting Multi-Codebook Vector Quantization Indexes for Knowledge Distillation",
ICASSP 2023, arXiv 2211.00508, sec. 2.2) compresses each teacher frame ``x: (D,)`` into ``num_codebooks``
codebook indexes (CI), one byte each; the frame is approximated by the sum of one codeword per codebook (a
"direct sum" or additive code) and the student is trained to predict the CI. The paper uses k2-fsa's
``multi_quantization`` (codebooks trained by gradient descent, indexes found by a learned guess plus iterative
refinement; GPU-oriented). This module trains the same kind of additive code with closed-form steps, fast on a
CPU:

1. normalisation ``xn = (x - mean) / scale`` (one global RMS value by default, so the plain squared error of
   ``x`` is what is minimised);
2. PCA of the training frames and reverse water-filling (Cover & Thomas, "Elements of Information Theory",
   sec. 10.3.3): for ``num_codebooks * log2(codebook_size)`` bits, only the ``p`` principal directions whose
   variance exceeds the water level get any bits; the codewords live in that ``p``-dimensional subspace (the
   other directions would only fit noise: on held-out frames this matters more than anything else);
3. product-quantizer initialisation with OPQ's parametric eigenvalue allocation (Ge et al., "Optimized
   Product Quantization", CVPR 2013, sec. 4): the ``p`` directions are dealt to the codebooks so that the
   products of their variances are balanced, and each codebook is a k-means codebook (k-means++ seeding,
   Arthur & Vassilvitskii 2007; Lloyd iterations with matmul distances; James-Stein shrunk centroids) of its
   own directions. Such codebooks are mutually orthogonal, so encoding is exact and independent per codebook;
4. optional joint refinement (additive quantization, Babenko & Lempitsky CVPR 2014, by coordinate descent):
   each round re-fits every codebook to the residual of the others over the whole subspace, re-assigns its
   indexes and re-encodes the frames with the beam search below; rounds are kept only while the error on a
   validation split of the training frames drops significantly (early stopping), so refinement is used only
   where it generalises (on synthetic low-rank data it does not: the product quantizer is kept).
   The residual-VQ candidate (fitted beside the product quantizer; the one with lower validation error is kept)
   spans more directions (``RVQ_DIMS_FACTOR``) and fits codebook ``m`` by k-means on the residuals of every
   path a beam search keeps over codebooks ``0..m-1`` (as faiss's ``ResidualQuantizer`` trains), seeded with
   shrunk random rows (``RVQ_SEED_SCALE``);
5. encoding of non-orthogonal codebooks: beam search over the codebooks in order keeping the ``beam`` best
   partial sums per frame (as in residual-VQ beam search, Martinez et al. 2014; scored from look-up tables of
   ``x . c`` and codebook cross terms, as faiss's ``use_beam_LUT``), then ``refine_iters`` passes of
   iterated conditional modes (ICM: re-choose each codebook's index given the others; never increases the
   error). All searches run in the span of the codewords (``p`` dimensions), where distances differ from those
   in ``D`` dimensions by a per-frame constant only.

Decoding is ``mean + scale * sum_m codebooks[m, indexes[..., m]]``. Quantizers are stored as safetensors files
only; their :attr:`Quantizer.id` (a hash of the buffers) is recorded beside every CI file so labels from
different quantizers are never mixed.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Literal, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Quantizer", "train_quantizer", "FORMAT_VERSION", "DEFAULT_BEAM", "DEFAULT_REFINE_ITERS"]

Pathlike = Union[str, Path]

#: Version of the safetensors layout written by :meth:`Quantizer.save`.
FORMAT_VERSION = "1"
#: Default beam width of the encoder's beam search (partial reconstructions kept per frame).
DEFAULT_BEAM = 8
#: Default number of ICM refinement passes after the beam search.
DEFAULT_REFINE_ITERS = 1
#: Largest table of codebook cross terms (bytes, float32) the encoder builds for its look-up-table search:
#: M (M - 1) / 2 K^2 values, 32 MiB for 16 codebooks of 256; beyond it the search uses residual vectors.
_CROSS_BYTES = 1 << 27
#: Elements per temporary (chunk, beam, max(D, K)) tensor; bounds encode memory to a few tens of MB.
_CHUNK_ELEMS = 1 << 21
_BUFFERS = ("mean", "scale", "codebooks")
#: Most rows each k-means of the beam-trained residual VQ sees (256 per centroid of a 256-entry codebook).
_KMEANS_ROWS = 256 * 256
#: Seeds of each residual-VQ codebook's k-means: random residual rows pulled to this fraction of their distance
#: from the residuals' mean. Seeds at full distance (random rows, or k-means++) leave later codebooks in a worse
#: local optimum: on Whisper tiny.en layer-2 frames (8 codebooks, beam 8, held-out error) random rows 0.298,
#: k-means++ 0.292, 0.1 x random rows 0.273 (docs/quantizer_benchmark.md). faiss's ResidualQuantizer gets part
#: of this gain by chance: it seeds every stage with the same rows, whose residuals shrink stage by stage.
RVQ_SEED_SCALE = 0.1
#: The residual-VQ candidate's codewords span this many times the principal directions chosen for the product
#: quantizer (at most all D). Its held-out error falls with more directions (Whisper tiny.en layer 2, 16 codebooks:
#: 122 directions 0.224, 192 0.213, 244 0.209; our transducer's last layer, 8 codebooks: 40 -> 0.084, 80 -> 0.076,
#: 120 -> 0.075; docs/quantizer_benchmark.md) while the search costs little more (its tables do not grow with D).
RVQ_DIMS_FACTOR = 3.0


def _content_id(mean: torch.Tensor, scale: torch.Tensor, codebooks: torch.Tensor) -> str:
    """First 16 hex digits of the sha256 of the buffers (name, shape, little-endian float32 bytes), in order."""
    h = hashlib.sha256()
    for name, t in zip(_BUFFERS, (mean, scale, codebooks)):
        a = np.ascontiguousarray(t.detach().to("cpu", torch.float32).numpy()).astype("<f4", copy=False)
        h.update(name.encode())
        h.update(repr(tuple(a.shape)).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def _chunk_rows(width: int) -> int:
    """Rows per chunk so that a (rows, width) float32 temporary holds about ``_CHUNK_ELEMS`` elements."""
    return max(1, _CHUNK_ELEMS // max(1, width))


def _check_x(x: torch.Tensor, dim: Optional[int], what: str = "x") -> None:
    """Raise ValueError unless ``x`` is a floating tensor ``(..., dim)`` of finite values."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{what} must be a floating-point tensor, got dtype {x.dtype}")
    if x.ndim < 1 or (dim is not None and x.shape[-1] != dim):
        raise ValueError(f"{what} must have shape (..., {dim}), got {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{what} contains NaN or infinite values")


# ----------------------------------------------------------------------------------------------- search kernels
def _assign(r: torch.Tensor, cb: torch.Tensor, cb_sq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest codeword of each row.

    Args:
      r: (N, D) vectors.  cb: (K, D) codewords.  cb_sq: (K,) squared norms of the codewords.

    Returns:
      idx: (N,) int64 nearest codeword;  dist: (N,) float32 squared distance to it (clamped at 0).
    """
    n = r.shape[0]
    idx = torch.empty(n, dtype=torch.long, device=r.device)
    dist = torch.empty(n, dtype=r.dtype, device=r.device)
    step = _chunk_rows(cb.shape[0])
    for s in range(0, n, step):
        rc = r[s : s + step]  # (n_c, D)
        scores = torch.addmm(cb_sq, rc, cb.t(), alpha=-2.0)  # (n_c, K) = ||c||^2 - 2 r.c
        val, i = scores.min(dim=1)  # (n_c,)
        idx[s : s + step] = i
        dist[s : s + step] = (val + (rc * rc).sum(1)).clamp_min_(0.0)
    return idx, dist


def _extend_paths(resid: torch.Tensor, cost: torch.Tensor, hist: torch.Tensor, cb: torch.Tensor, cb_sq: torch.Tensor,
                  beam: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One beam-search stage: extend every kept path by each codeword of ``cb`` and keep the ``beam`` best.

    Args:
      resid: (n, b, D) residual of each kept path.  cost: (n, b) its squared norm.  hist: (n, b, m) its indexes.
      cb: (K, D) the next codebook.  cb_sq: (K,) its squared norms.  beam: paths to keep (>= 1).

    Returns:
      resid (n, keep, D), cost (n, keep) (recomputed exactly, not accumulated), hist (n, keep, m + 1), with
      ``keep = min(beam, b * K)``, best path first.
    """
    n, b, d = resid.shape
    k, m = cb.shape[0], hist.shape[2]
    scores = torch.addmm(cb_sq, resid.reshape(n * b, d), cb.t(), alpha=-2.0)  # (n*b, K)
    scores = scores.view(n, b, k).add_(cost.unsqueeze(2)).view(n, b * k)  # (n, b*K) new squared errors
    keep = min(beam, b * k)
    if keep == 1:
        flat = scores.argmin(dim=1, keepdim=True)  # (n, 1)
    else:
        flat = torch.topk(scores, keep, dim=1, largest=False, sorted=True).indices  # (n, keep)
    parent = torch.div(flat, k, rounding_mode="floor")  # (n, keep) which path is extended
    code = flat - parent * k  # (n, keep) with which codeword
    rows = (parent + torch.arange(n, device=resid.device).unsqueeze(1) * b).reshape(-1)  # (n*keep,) parent rows
    resid = resid.reshape(n * b, d).index_select(0, rows).sub_(cb.index_select(0, code.reshape(-1))).view(n, keep, d)
    hist = torch.cat([hist.reshape(n * b, m).index_select(0, rows).view(n, keep, m), code.unsqueeze(2)], dim=2)
    return resid, (resid * resid).sum(2), hist


def _beam_search(xn: torch.Tensor, codebooks: torch.Tensor, cb_sq: torch.Tensor,
                 beam: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Beam search over the codebooks in order (stage ``m`` extends each kept partial sum by codebook ``m``).

    Args:
      xn: (n, D) normalised frames.  codebooks: (M, K, D).  cb_sq: (M, K) squared codeword norms.
      beam: partial reconstructions kept per frame (1 = greedy residual VQ).

    Returns:
      idx: (n, M) int64 indexes of the best full path;  resid: (n, D) its residual ``xn - sum of codewords``.
    """
    n = xn.shape[0]
    resid = xn.unsqueeze(1)  # (n, b, D) residual of each kept path, b = 1 at the start
    cost = (xn * xn).sum(1, keepdim=True)  # (n, b) squared residual norm of each path
    hist = torch.zeros(n, 1, 0, dtype=torch.long, device=xn.device)  # (n, b, m) indexes chosen so far
    for m in range(codebooks.shape[0]):
        resid, cost, hist = _extend_paths(resid, cost, hist, codebooks[m], cb_sq[m], beam)
    best = cost.argmin(dim=1)  # (n,)
    rows = torch.arange(n, device=xn.device)
    return hist[rows, best], resid[rows, best]


def _icm(idx: torch.Tensor, resid: torch.Tensor, codebooks: torch.Tensor, cb_sq: torch.Tensor,
         iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Iterated conditional modes: ``iters`` passes re-choosing each codebook's index given the others.

    Each choice is the exact minimiser given the other indexes, so the squared error never increases.

    Args:
      idx: (n, M) int64 indexes (modified in place and returned).  resid: (n, D) residual for ``idx``.
      codebooks: (M, K, D).  cb_sq: (M, K).  iters: passes over the M codebooks (stops early when stable).

    Returns:
      (idx (n, M), resid (n, D)).
    """
    m_total = codebooks.shape[0]
    for _ in range(iters):
        changed = False
        for m in range(m_total):
            cb = codebooks[m]  # (K, D)
            old = idx[:, m]  # (n,)
            r = resid + cb[old]  # (n, D) residual of the other codebooks
            new = torch.addmm(cb_sq[m], r, cb.t(), alpha=-2.0).argmin(dim=1)  # (n,)
            if not changed and bool((new != old).any()):
                changed = True
            idx[:, m] = new
            resid = r - cb[new]  # (n, D)
        if not changed:
            break
    return idx, resid


def _cross_terms(codebooks: torch.Tensor) -> Optional[list[torch.Tensor]]:
    """Inner products of every codeword with the codewords of the codebooks before it, for :func:`_beam_search_lut`.

    Args:
      codebooks: (M, K, D).

    Returns:
      a list of M tensors, entry ``m`` of shape ``(m * K, K)`` with row ``l * K + i``, column ``j`` holding
      ``codebooks[l, i] . codebooks[m, j]`` (entry 0 is empty); None when they would exceed ``_CROSS_BYTES``.
    """
    m_total, k, d = codebooks.shape
    if m_total * (m_total - 1) // 2 * k * k * 4 > _CROSS_BYTES:
        return None
    flat = codebooks.reshape(m_total * k, d)  # (M*K, D)
    return [flat[: m * k] @ codebooks[m].t() for m in range(m_total)]  # (m*K, K) each


def _beam_search_lut(xn: torch.Tensor, codebooks: torch.Tensor, cb_sq: torch.Tensor, beam: int,
                     cross: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_beam_search` without residual vectors: each extension's squared error from look-up tables.

    A path with codewords ``c_0..c_{m-1}`` has residual ``r = x - sum_l c_l``; extending it by ``c`` gives
    ``||r - c||^2 = ||r||^2 + ||c||^2 - 2 x.c + 2 sum_l c_l.c``: ``x . C_m`` for every codebook comes from one
    matrix product per frame and the cross terms ``c_l . c`` from :func:`_cross_terms` (the table faiss's
    residual quantizer uses with ``use_beam_LUT``; Babenko & Lempitsky, CVPR 2014, sec. 3), so a stage costs
    ``beam * m * K`` additions per frame instead of a ``beam * K * D`` product. The path errors are accumulated
    in float32; the returned residual is recomputed exactly from the chosen codewords.

    Args:
      xn: (n, D) frames.  codebooks: (M, K, D).  cb_sq: (M, K).  beam: paths kept (>= 1).
      cross: :func:`_cross_terms` of ``codebooks``.

    Returns:
      idx: (n, M) int64 indexes of the best full path;  resid: (n, D) its residual.
    """
    n, d = xn.shape
    m_total, k, _ = codebooks.shape
    xc = xn @ codebooks.reshape(m_total * k, d).t()  # (n, M*K): x . every codeword
    cost = (xn * xn).sum(1, keepdim=True)  # (n, b) squared residual norm of each path
    hist = torch.zeros(n, 1, 0, dtype=torch.long, device=xn.device)  # (n, b, m) indexes chosen so far
    base = torch.arange(n, device=xn.device).unsqueeze(1)  # (n, 1)
    for m in range(m_total):
        b = cost.shape[1]
        xdot = xc[:, m * k : (m + 1) * k].unsqueeze(1)  # (n, 1, K) x . c
        if m > 0:  # sum over the path's codewords c_l . c (rows l*K + i_l of the table) minus x . c = -r . c
            rows = (hist + torch.arange(m, device=xn.device) * k).reshape(n * b, m)  # (n*b, m)
            neg = F.embedding_bag(rows, cross[m], mode="sum").view(n, b, k).sub_(xdot)  # (n, b, K)
        else:
            neg = -xdot  # (n, 1, K)
        scores = neg.mul_(2.0).add_(cost.unsqueeze(2)).add_(cb_sq[m]).view(n, b * k)  # (n, b*K) new errors
        keep = min(beam, b * k)
        if keep == 1:
            val, flat = scores.min(dim=1, keepdim=True)  # (n, 1)
        else:
            val, flat = torch.topk(scores, keep, dim=1, largest=False, sorted=True)  # (n, keep)
        parent = torch.div(flat, k, rounding_mode="floor")  # (n, keep)
        code = flat - parent * k  # (n, keep)
        prev = hist.reshape(n * b, m).index_select(0, (parent + base * b).reshape(-1)).view(n, keep, m)
        hist = torch.cat([prev, code.unsqueeze(2)], dim=2)  # (n, keep, m + 1)
        cost = val
    best = hist[torch.arange(n, device=xn.device), cost.argmin(dim=1)]  # (n, M)
    resid = xn.clone()
    for m in range(m_total):
        resid -= codebooks[m].index_select(0, best[:, m])
    return best, resid


def _encode_normalised(xn: torch.Tensor, codebooks: torch.Tensor, cb_sq: torch.Tensor, beam: int,
                       refine_iters: int, cross: Optional[list] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked beam search + ICM. xn: (N, D) -> (indexes (N, M) int64, residual (N, D) float32).

    ``cross``: :func:`_cross_terms` of ``codebooks`` (computed here when not given and small enough): the search
    uses the look-up tables (:func:`_beam_search_lut`), else residual vectors (:func:`_beam_search`).
    """
    n = xn.shape[0]
    m_total, k, d = codebooks.shape
    if cross is None and m_total > 1:
        cross = _cross_terms(codebooks)
    idx = torch.empty(n, m_total, dtype=torch.long, device=xn.device)
    resid = torch.empty_like(xn)
    step = _chunk_rows(beam * max(k, d))
    for s in range(0, n, step):
        if cross is not None:
            i, r = _beam_search_lut(xn[s : s + step], codebooks, cb_sq, beam, cross)
        else:
            i, r = _beam_search(xn[s : s + step], codebooks, cb_sq, beam)
        if refine_iters > 0:
            i, r = _icm(i, r, codebooks, cb_sq, refine_iters)
        idx[s : s + step] = i
        resid[s : s + step] = r
    return idx, resid


def _encode_independent(xr: torch.Tensor, codebooks: torch.Tensor, cb_sq: torch.Tensor) -> torch.Tensor:
    """Exact indexes for mutually orthogonal codebooks: each codebook's nearest codeword, chosen independently.

    With ``c_i . c_j = 0`` for codewords of different codebooks, ``||x - sum_m c_m||^2 = ||x||^2 +
    sum_m (||c_m||^2 - 2 x . c_m)``, so the joint minimum is the per-codebook minimum.

    Args:
      xr: (n, r) frames in the search space.  codebooks: (M, K, r).  cb_sq: (M, K).

    Returns:
      (n, M) int64 indexes.
    """
    m_total, k, r = codebooks.shape
    flat = codebooks.reshape(m_total * k, r)  # (M*K, r)
    out = torch.empty(xr.shape[0], m_total, dtype=torch.long, device=xr.device)
    step = _chunk_rows(m_total * k)
    for s in range(0, xr.shape[0], step):
        scores = torch.addmm(cb_sq.reshape(-1), xr[s : s + step], flat.t(), alpha=-2.0)  # (n_c, M*K)
        out[s : s + step] = scores.view(-1, m_total, k).argmin(dim=2)  # (n_c, M)
    return out


def _search_space(codebooks: torch.Tensor) -> tuple[Optional[torch.Tensor], torch.Tensor, torch.Tensor, bool]:
    """Where to search: an orthonormal basis of the span of the codewords, and whether codebooks are orthogonal.

    Args:
      codebooks: (M, K, D) float32.

    Returns:
      basis: (D, r) float32 with r < D, or None when the codewords span all D dimensions;
      cb_r: (M, K, r) codewords in basis coordinates (or the codebooks themselves);
      cb_sq: (M, K) their squared norms;
      orthogonal: True when codewords of different codebooks are orthogonal (to 1e-5 of the largest squared
        norm), so :func:`_encode_independent` is exact.
    """
    m_total, k, d = codebooks.shape
    flat = codebooks.reshape(-1, d).to(torch.float64)  # (M*K, D)
    ev, vec = torch.linalg.eigh(flat.t() @ flat)  # ascending eigenvalues of the (D, D) Gram matrix
    keep = ev > 1e-9 * float(ev.max().clamp_min(1e-300))
    r = int(keep.sum())
    if 0 < r < d:
        basis = vec[:, keep].flip(1).to(codebooks.dtype).contiguous()  # (D, r)
        cb_r = (codebooks @ basis).contiguous()  # (M, K, r)
    else:
        basis, cb_r = None, codebooks
    cb_sq = (cb_r * cb_r).sum(2)  # (M, K)
    tol = 1e-5 * float(cb_sq.max().clamp_min(1e-30))
    orthogonal = m_total == 1 or all(
        float((cb_r[i] @ cb_r[j].t()).abs().max()) <= tol for i in range(m_total) for j in range(i + 1, m_total)
    )
    return basis, cb_r, cb_sq, orthogonal


# ----------------------------------------------------------------------------------------------- the module
class Quantizer(nn.Module):
    """A trained multi-codebook quantizer: ``num_codebooks`` one-byte indexes per frame (MVQ-KD, sec. 2.2).

    Buffers (float32): ``mean (D,)``, ``scale (D,)`` (the normalisation ``xn = (x - mean) / scale``) and
    ``codebooks (num_codebooks, codebook_size, D)`` in the normalised space. Build one with
    :func:`train_quantizer` or :meth:`load`.

    Args:
      mean: (D,) per-dimension mean of the training frames.
      scale: (D,) positive scale of each dimension.
      codebooks: (M, K, D) codewords, ``K <= 256``.
      beam: default beam width of :meth:`encode` (>= 1).
      refine_iters: default ICM passes of :meth:`encode` (>= 0).

    Raises:
      ValueError: inconsistent shapes, ``K > 256``, non-finite values or non-positive scale, bad defaults.
    """

    mean: torch.Tensor
    scale: torch.Tensor
    codebooks: torch.Tensor

    def __init__(self, mean: torch.Tensor, scale: torch.Tensor, codebooks: torch.Tensor,
                 beam: int = DEFAULT_BEAM, refine_iters: int = DEFAULT_REFINE_ITERS):
        super().__init__()
        if codebooks.ndim != 3:
            raise ValueError(f"codebooks must be (num_codebooks, codebook_size, dim), got {tuple(codebooks.shape)}")
        m, k, d = codebooks.shape
        if m < 1 or not 1 <= k <= 256 or d < 1:
            raise ValueError(f"need num_codebooks >= 1, 1 <= codebook_size <= 256 (one byte), dim >= 1; "
                             f"got {(m, k, d)}")
        if tuple(mean.shape) != (d,) or tuple(scale.shape) != (d,):
            raise ValueError(f"mean and scale must be ({d},), got {tuple(mean.shape)} and {tuple(scale.shape)}")
        for name, t in (("mean", mean), ("scale", scale), ("codebooks", codebooks)):
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name} contains NaN or infinite values")
        if not bool((scale > 0).all()):
            raise ValueError("scale must be positive")
        _check_search(beam, refine_iters)
        self.register_buffer("mean", mean.detach().to(torch.float32).clone())
        self.register_buffer("scale", scale.detach().to(torch.float32).clone())
        self.register_buffer("codebooks", codebooks.detach().to(torch.float32).contiguous().clone())
        self.beam = int(beam)
        self.refine_iters = int(refine_iters)

    # --------------------------------------------------------------------------------------- properties
    @property
    def dim(self) -> int:
        """D, the dimension of the quantized frames."""
        return int(self.codebooks.shape[2])

    @property
    def num_codebooks(self) -> int:
        """M, the number of codebooks (= indexes per frame)."""
        return int(self.codebooks.shape[0])

    @property
    def codebook_size(self) -> int:
        """K, the codewords per codebook (<= 256)."""
        return int(self.codebooks.shape[1])

    @property
    def bytes_per_frame(self) -> int:
        """Bytes of CI per frame (one uint8 per codebook, = num_codebooks)."""
        return self.num_codebooks

    @property
    def subspace_dim(self) -> int:
        """r, the dimension of the span of the codewords (<= D): where the encoder searches."""
        basis, _, _, _ = self._search_tables()
        return self.dim if basis is None else int(basis.shape[1])

    @property
    def orthogonal_codebooks(self) -> bool:
        """True when codewords of different codebooks are orthogonal: then encoding is exact per codebook."""
        return self._search_tables()[3]

    @property
    def id(self) -> str:
        """16 hex digits: the first 64 bits of the sha256 of the buffers (mean, scale, codebooks).

        Stable across save/load and machines; it identifies what decoding means, so it is stored with every CI
        file (see :mod:`speechkd.labels.store`). The encoder's search defaults are not part of it.
        """
        return _content_id(self.mean, self.scale, self.codebooks)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_codebooks={self.num_codebooks}, codebook_size={self.codebook_size}, "
                f"beam={self.beam}, refine_iters={self.refine_iters}")

    # --------------------------------------------------------------------------------------- encode / decode
    @torch.no_grad()
    def encode(self, x: torch.Tensor, beam: Optional[int] = None, refine_iters: Optional[int] = None) -> torch.Tensor:
        """Codebook indexes (CI) of frames: beam search over the codebooks, then ICM refinement.

        When the codebooks are mutually orthogonal (a product quantizer, as :func:`train_quantizer` returns
        unless refinement helped), the exact indexes are found codebook by codebook and ``beam``/``refine_iters``
        have no effect. The search runs in the span of the codewords (see the module docstring).

        Args:
          x: (..., D) float frames (any float dtype; computed in float32, in chunks so memory stays bounded).
          beam: partial reconstructions kept per frame (default: ``self.beam``); 1 = greedy residual VQ.
          refine_iters: ICM passes after the search (default: ``self.refine_iters``); each never increases the
            error of any frame.

        Returns:
          indexes: (..., num_codebooks) uint8, on ``x``'s device.

        Raises:
          ValueError: wrong last dimension, non-float or non-finite input, bad beam/refine_iters.
        """
        beam = self.beam if beam is None else beam
        refine_iters = self.refine_iters if refine_iters is None else refine_iters
        _check_search(beam, refine_iters)
        _check_x(x, self.dim)
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.dim)  # (N, D)
        out = torch.empty(flat.shape[0], self.num_codebooks, dtype=torch.uint8, device=x.device)
        basis, cb_r, cb_sq, orthogonal = self._search_tables()
        step = max(_chunk_rows(beam * max(self.codebook_size, self.dim)), 1024)
        for s in range(0, flat.shape[0], step):
            xn = self._normalise(flat[s : s + step])  # (n, D)
            xr = xn @ basis if basis is not None else xn  # (n, r) coordinates in the span of the codewords
            if orthogonal:
                idx = _encode_independent(xr, cb_r, cb_sq)  # exact; beam and refine_iters cannot change it
            else:
                idx, _ = _encode_normalised(xr, cb_r, cb_sq, beam, refine_iters, cross=self._cross())
            out[s : s + step] = idx.to(device=x.device, dtype=torch.uint8)
        return out.reshape(*lead, self.num_codebooks)

    @torch.no_grad()
    def decode(self, indexes: torch.Tensor) -> torch.Tensor:
        """Reconstruct frames from CI: ``mean + scale * sum_m codebooks[m, indexes[..., m]]``.

        Args:
          indexes: (..., num_codebooks) integer tensor (uint8 or int64), values in ``[0, codebook_size)``.

        Returns:
          (..., D) float32 on the quantizer's device.

        Raises:
          ValueError: non-integer dtype, wrong last dimension or an index out of range.
        """
        if (not isinstance(indexes, torch.Tensor) or indexes.is_floating_point() or indexes.is_complex()
                or indexes.dtype == torch.bool):
            raise ValueError(f"indexes must be an integer tensor, got {getattr(indexes, 'dtype', type(indexes))}")
        if indexes.ndim < 1 or indexes.shape[-1] != self.num_codebooks:
            raise ValueError(f"indexes must have shape (..., {self.num_codebooks}), got {tuple(indexes.shape)}")
        lead = indexes.shape[:-1]
        idx = indexes.reshape(-1, self.num_codebooks).to(device=self.codebooks.device, dtype=torch.long)  # (N, M)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.codebook_size):
            raise ValueError(f"indexes must lie in [0, {self.codebook_size}), got [{int(idx.min())}, {int(idx.max())}]")
        k = self.codebook_size
        offsets = torch.arange(self.num_codebooks, device=idx.device) * k  # (M,)
        table = self.codebooks.reshape(-1, self.dim)  # (M*K, D)
        xn = F.embedding_bag(idx + offsets, table, mode="sum")  # (N, D) sum of one codeword per codebook
        return (xn * self.scale + self.mean).reshape(*lead, self.dim)

    @torch.no_grad()
    def relative_error(self, x: torch.Tensor, beam: Optional[int] = None, refine_iters: Optional[int] = None) -> float:
        """``sum ||x - decode(encode(x))||^2 / sum ||x - mean(x)||^2`` over the frames of ``x`` (float64 sums).

        The mean-only reconstruction scores 1 and a perfect one 0; ``mean(x)`` is the mean of ``x`` itself, so
        on held-out frames this is the paper's relative reconstruction error.

        Args:
          x: (..., D) float frames.  beam, refine_iters: as in :meth:`encode`.

        Raises:
          ValueError: as :meth:`encode`; or all frames identical (the denominator is 0).
        """
        _check_x(x, self.dim)
        flat = x.reshape(-1, self.dim)
        if flat.shape[0] == 0:
            raise ValueError("x has no frames")
        mu = flat.to(torch.float64).mean(0)  # (D,)
        num = den = 0.0
        step = 8192
        for s in range(0, flat.shape[0], step):
            xc = flat[s : s + step]
            rec = self.decode(self.encode(xc, beam, refine_iters)).to(torch.float64)  # (n, D)
            xc = xc.to(device=rec.device, dtype=torch.float64)
            num += float(((xc - rec) ** 2).sum())
            den += float(((xc - mu.to(rec.device)) ** 2).sum())
        if den == 0.0:
            raise ValueError("relative error undefined: all frames of x are identical")
        return num / den

    def _search_tables(self) -> tuple[Optional[torch.Tensor], torch.Tensor, torch.Tensor, bool]:
        """:func:`_search_space` of the codebooks, cached until the codebooks buffer changes (or moves)."""
        cb = self.codebooks
        key = (cb.data_ptr(), cb._version, str(cb.device), tuple(cb.shape))
        cached = getattr(self, "_tables", None)
        if cached is None or cached[0] != key:
            cached = (key, _search_space(cb))
            self._tables = cached
        return cached[1]

    def _cross(self) -> Optional[list]:
        """:func:`_cross_terms` of the search-space codebooks, cached like :meth:`_search_tables`."""
        tables = self._search_tables()
        cached = getattr(self, "_cross_cache", None)
        if cached is None or cached[0] is not tables:
            cached = (tables, _cross_terms(tables[1]))
            self._cross_cache = cached
        return cached[1]

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        """(n, D) frames -> (n, D) float32 ``(x - mean) / scale`` on the quantizer's device."""
        x = x.to(device=self.codebooks.device, dtype=torch.float32)
        return (x - self.mean) / self.scale

    # --------------------------------------------------------------------------------------- storage
    def save(self, path: Pathlike) -> None:
        """Write the quantizer to a safetensors file atomically (temp file in the same directory, then rename).

        Tensors: ``mean``, ``scale``, ``codebooks`` (float32). Metadata (strings): ``id``, ``dim``,
        ``num_codebooks``, ``codebook_size``, ``format_version``, ``beam``, ``refine_iters``.
        """
        from safetensors.torch import save_file

        from speechkd.utils import atomic_path

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {name: getattr(self, name).detach().to("cpu", torch.float32).contiguous() for name in _BUFFERS}
        meta = {
            "id": self.id, "dim": str(self.dim), "num_codebooks": str(self.num_codebooks),
            "codebook_size": str(self.codebook_size), "format_version": FORMAT_VERSION,
            "beam": str(self.beam), "refine_iters": str(self.refine_iters),
        }
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)

    @classmethod
    def load(cls, path: Pathlike, device: Union[str, torch.device] = "cpu") -> "Quantizer":
        """Load a quantizer written by :meth:`save` (safetensors only) and verify it.

        Args:
          path: the ``.safetensors`` file.
          device: where to put the buffers.

        Raises:
          ValueError (naming ``path``): not a readable safetensors file, unknown ``format_version``, missing
            tensors or metadata, metadata inconsistent with the tensors, or the stored ``id`` differs from the
            hash of the stored tensors (the file was modified or corrupted).
        """
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise ValueError(f"{path}: no such quantizer file")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = dict(f.metadata() or {})
                keys = set(f.keys())
                missing = [n for n in _BUFFERS if n not in keys]
                if missing:
                    raise ValueError(f"{path}: missing tensors {missing} (found {sorted(keys)})")
                tensors = {n: f.get_tensor(n) for n in _BUFFERS}
        except ValueError:
            raise
        except Exception as e:  # safetensors raises its own error types for malformed files
            raise ValueError(f"{path}: not a readable safetensors quantizer file ({e})") from e
        for key in ("id", "format_version", "dim", "num_codebooks"):
            if key not in meta:
                raise ValueError(f"{path}: metadata lacks '{key}' (not written by Quantizer.save?)")
        if meta["format_version"] != FORMAT_VERSION:
            raise ValueError(f"{path}: format_version {meta['format_version']!r} is not supported "
                             f"(expected {FORMAT_VERSION!r})")
        for name, t in tensors.items():
            if t.dtype != torch.float32:
                raise ValueError(f"{path}: tensor '{name}' has dtype {t.dtype}, expected float32")
        cb = tensors["codebooks"]
        if cb.ndim != 3 or str(cb.shape[2]) != meta["dim"] or str(cb.shape[0]) != meta["num_codebooks"]:
            raise ValueError(f"{path}: codebooks shape {tuple(cb.shape)} disagrees with metadata dim={meta['dim']}, "
                             f"num_codebooks={meta['num_codebooks']}")
        actual = _content_id(tensors["mean"], tensors["scale"], cb)
        if actual != meta["id"]:
            raise ValueError(f"{path}: stored id {meta['id']} does not match the hash of its tensors ({actual}); "
                             "the file was modified or is corrupted")
        try:
            beam = int(meta.get("beam", DEFAULT_BEAM))
            refine = int(meta.get("refine_iters", DEFAULT_REFINE_ITERS))
            q = cls(tensors["mean"], tensors["scale"], cb, beam=beam, refine_iters=refine)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e
        return q.to(device)


def _check_search(beam: int, refine_iters: int) -> None:
    """Raise ValueError unless ``beam >= 1`` and ``refine_iters >= 0`` are ints."""
    if isinstance(beam, bool) or not isinstance(beam, (int, np.integer)) or beam < 1:
        raise ValueError(f"beam must be an int >= 1, got {beam!r}")
    if isinstance(refine_iters, bool) or not isinstance(refine_iters, (int, np.integer)) or refine_iters < 0:
        raise ValueError(f"refine_iters must be an int >= 0, got {refine_iters!r}")


# ----------------------------------------------------------------------------------------------- training
def _kmeans_pp(r: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii, SODA 2007). r: (N, D) -> (k, D) initial codewords."""
    n = r.shape[0]
    r_sq = (r * r).sum(1)  # (N,)
    first = int(torch.randint(n, (1,), generator=gen))
    centers = torch.empty(k, r.shape[1], dtype=r.dtype)
    centers[0] = r[first]
    d2 = (r_sq - 2 * r @ r[first] + r_sq[first]).clamp_min_(0.0)  # (N,) squared distance to nearest center
    for j in range(1, k):
        total = float(d2.sum())
        if total > 0.0 and math.isfinite(total):
            pick = int(torch.multinomial(d2.to(torch.float64), 1, generator=gen))
        else:  # every point already coincides with a center: any point will do
            pick = int(torch.randint(n, (1,), generator=gen))
        centers[j] = r[pick]
        torch.minimum(d2, (r_sq - 2 * r @ r[pick] + r_sq[pick]).clamp_min_(0.0), out=d2)
    return centers


def _kmeans(r: torch.Tensor, k: int, iters: int, gen: torch.Generator, seed_rows: int,
            shrink: bool = False, seed_scale: Optional[float] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means of ``r: (N, D)`` into ``k`` clusters.

    Seeding: k-means++ on at most ``seed_rows`` rows (a random subset); or, with ``seed_scale``, ``k`` distinct
    random rows pulled towards the mean ``g`` of ``r``: ``g + seed_scale * (r_i - g)`` (see
    :data:`RVQ_SEED_SCALE`). Empty clusters are re-seeded with the worst-fitted rows. Returns
    ``(codewords (k, D), assignment (N,) int64)`` where the assignment is to the returned codewords.
    """
    n = r.shape[0]
    if seed_scale is not None:
        g = r.mean(0)  # (D,)
        pick = torch.randperm(n, generator=gen)[:k]  # (k,) distinct rows (n >= k)
        cb = g + float(seed_scale) * (r[pick] - g)  # (k, D)
    elif n > seed_rows:
        sub = torch.randperm(n, generator=gen)[:seed_rows]
        cb = _kmeans_pp(r[sub], k, gen)
    else:
        cb = _kmeans_pp(r, k, gen)
    idx, dist = _assign(r, cb, (cb * cb).sum(1))
    for _ in range(iters):
        cb = _refit(r, idx, dist, cb, shrink)
        idx, dist = _assign(r, cb, (cb * cb).sum(1))
    return cb, idx


def _refit(r: torch.Tensor, idx: torch.Tensor, dist: torch.Tensor, cb: torch.Tensor,
           shrink: bool = False) -> torch.Tensor:
    """Cluster means of ``r: (N, D)`` under ``idx: (N,)``; empty clusters get the rows with largest ``dist: (N,)``.

    With ``shrink``, each mean is pulled towards the overall mean of ``r`` by the positive-part James-Stein
    factor ``1 - (D - 2) s2_k / (n_k ||m_k - g||^2)`` (James & Stein 1961; ``s2_k`` the within-cluster variance
    per dimension, ``n_k`` the cluster size): a cluster mean estimated from few noisy rows is shrunk, which
    lowers the error on held-out frames (a 256-entry codebook in a few hundred dimensions overfits tens of
    thousands of frames otherwise).

    Returns new codewords (K, D); a re-seeded codeword equals a data row.
    """
    k, d = cb.shape
    sums = torch.zeros_like(cb).index_add_(0, idx, r)  # (K, D)
    counts = torch.bincount(idx, minlength=k)  # (K,)
    n_k = counts.clamp_min(1).unsqueeze(1).to(r.dtype)  # (K, 1)
    means = sums / n_k  # (K, D)
    if shrink and d > 2:
        g = r.mean(0)  # (D,)
        sumsq = torch.zeros(k, dtype=r.dtype).index_add_(0, idx, (r * r).sum(1))  # (K,)
        within = (sumsq / n_k.squeeze(1) - (means * means).sum(1)).clamp_min(0.0) / d  # (K,) per-dim variance
        dev = means - g  # (K, D)
        factor = 1.0 - (d - 2) * within / (n_k.squeeze(1) * (dev * dev).sum(1).clamp_min(1e-30))  # (K,)
        means = g + factor.clamp(0.0, 1.0).unsqueeze(1) * dev
    new = torch.where((counts > 0).unsqueeze(1), means, cb)
    empty = torch.nonzero(counts == 0).flatten()
    if empty.numel():
        worst = torch.topk(dist, min(int(empty.numel()), r.shape[0])).indices  # rows fitted worst
        new[empty[: worst.numel()]] = r[worst]
    return new


def _waterfill_dims(lam: torch.Tensor, bits: float) -> int:
    """Number of principal directions that get bits under reverse water-filling.

    For independent Gaussian components of variances ``lam`` (descending) coded with ``bits`` bits in total,
    the rate-distortion optimum gives ``0.5 * log2(lam_i / theta)`` bits to each component above the water
    level ``theta`` and none to the rest (Cover & Thomas, sec. 10.3.3). Returns how many lie above ``theta``
    (all positive ones when ``bits`` is enough for every component).
    """
    lam = lam.to(torch.float64).clamp_min(0.0)
    pos = lam[lam > 0]
    if pos.numel() == 0:
        return 0

    def rate(theta: float) -> float:
        return float(0.5 * torch.log2((pos / theta).clamp_min(1.0)).sum())

    lo, hi = float(pos.min()), float(pos.max())
    if rate(lo) <= bits:
        return int(pos.numel())
    for _ in range(200):  # bisection on log(theta): rate(lo) > bits >= rate(hi)
        mid = math.sqrt(lo * hi)
        if rate(mid) > bits:
            lo = mid
        else:
            hi = mid
    return int((pos > hi).sum())


def _balanced_groups(lam: torch.Tensor, num_groups: int) -> list[list[int]]:
    """Deal ``p`` directions (variances ``lam``, descending) to groups of near-equal size (p // G or p // G + 1).

    OPQ's eigenvalue allocation (Ge et al., CVPR 2013, sec. 4.2): each direction in turn goes to the non-full
    group whose product of variances is smallest, balancing the groups' products. Requires ``p >= G``.
    """
    p = lam.numel()
    caps = [p // num_groups + (1 if g < p % num_groups else 0) for g in range(num_groups)]
    logs = [0.0] * num_groups
    groups: list[list[int]] = [[] for _ in range(num_groups)]
    for j in range(p):
        g = min((g for g in range(num_groups) if len(groups[g]) < caps[g]), key=lambda g: (logs[g], g))
        groups[g].append(j)
        logs[g] += math.log(max(float(lam[j]), 1e-30))
    return groups


def _frame_errors(z: torch.Tensor, codebooks: torch.Tensor, beam: int, refine_iters: int,
                  cross: Optional[list] = None) -> torch.Tensor:
    """(n,) float64 squared error of each frame of ``z: (n, p)`` encoded with ``codebooks: (M, K, p)`` (``cross``:
    their :func:`_cross_terms`, when the caller has them)."""
    basis, cb_r, cb_sq, orthogonal = _search_space(codebooks)
    if orthogonal:
        zr = z @ basis if basis is not None else z  # (n, r): search in the span of the codewords, as encode() does
        idx = _encode_independent(zr, cb_r, cb_sq)  # (n, M)
        resid = z - sum(codebooks[m][idx[:, m]] for m in range(codebooks.shape[0]))  # (n, p)
    else:
        _, resid = _encode_normalised(z, codebooks, (codebooks * codebooks).sum(2), beam, refine_iters, cross)
    return (resid.double() ** 2).sum(1)


def _significantly_lower(new: torch.Tensor, old: torch.Tensor) -> bool:
    """Paired test on per-frame errors (n,): is the mean of ``new - old`` below zero by over 2 standard errors?"""
    diff = new - old  # (n,)
    if diff.numel() < 2:
        return False
    se = float(diff.std()) / math.sqrt(diff.numel())
    return float(diff.mean()) < -2.0 * se


def _init_codebooks(z: torch.Tensor, groups: list[list[int]], k: int, kmeans_iters: int, shrink: bool,
                    gen: torch.Generator, bar=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stage-wise k-means: codebook ``m`` clusters the current residual on its directions ``groups[m]``.

    Disjoint groups give a product quantizer, identical groups a residual VQ.

    Args:
      z: (N, p) frames.  groups: per codebook, the directions (columns of z) it spans.
      k, kmeans_iters, shrink: as in :func:`train_quantizer`.  gen: random generator.  bar: optional tqdm bar.

    Returns:
      codebooks (M, K, p), indexes (N, M) int64, residual (N, p).
    """
    m_total, p = len(groups), z.shape[1]
    codebooks = torch.zeros(m_total, k, p)  # (M, K, p)
    idx = torch.empty(z.shape[0], m_total, dtype=torch.long)  # (N, M)
    resid = z.clone()  # (N, p)
    seed_rows = max(32 * k, 4096)
    for m, cols in enumerate(groups):
        cols_t = torch.tensor(cols, dtype=torch.long)
        cb, a = _kmeans(resid[:, cols_t].contiguous(), k, kmeans_iters, gen, seed_rows, shrink)  # (K, |cols|)
        codebooks[m][:, cols_t] = cb
        idx[:, m] = a
        resid[:, cols_t] -= cb[a]
        if bar is not None:
            bar.update(1)
    return codebooks, idx, resid


def _init_rvq_beam(z: torch.Tensor, m_total: int, k: int, kmeans_iters: int, shrink: bool, gen: torch.Generator,
                   beam: int, bar=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Residual-VQ initialisation trained on the beam search's residuals (as faiss's ``ResidualQuantizer``).

    Stage ``m`` runs k-means on the residuals of every path the beam keeps after stages ``0..m-1`` (at most
    ``_KMEANS_ROWS`` of them, a random subset, the 256 rows per centroid that faiss's k-means also samples), then
    extends each path by the new codebook and keeps the ``beam`` best, so each codebook is fitted to the
    residuals the encoder will actually see (a greedy residual VQ fits only the best-so-far path's). With
    ``beam = 1`` this is the plain stage-wise residual VQ.

    Args:
      z: (N, p) frames.  m_total: codebooks M.  k, kmeans_iters, shrink: as in :func:`train_quantizer`.
      gen: random generator.  beam: paths kept per frame (>= 1).  bar: optional tqdm bar (advanced per codebook).

    Returns:
      codebooks (M, K, p), indexes (N, M) int64 of each frame's best path, its residual (N, p).
    """
    n, p = z.shape
    codebooks = torch.zeros(m_total, k, p)  # (M, K, p)
    resid = z.unsqueeze(1)  # (N, b, p) residual of each kept path, b = 1 at the start
    cost = (z * z).sum(1, keepdim=True)  # (N, b)
    hist = torch.zeros(n, 1, 0, dtype=torch.long)  # (N, b, m) indexes chosen so far
    seed_rows = max(32 * k, 4096)
    for m in range(m_total):
        b = resid.shape[1]
        data = resid.reshape(n * b, p)  # (N*b, p) residuals of all kept paths
        rows = data if n * b <= _KMEANS_ROWS else data[torch.randperm(n * b, generator=gen)[:_KMEANS_ROWS]]
        cb, _ = _kmeans(rows.contiguous(), k, kmeans_iters, gen, seed_rows, shrink, seed_scale=RVQ_SEED_SCALE)
        codebooks[m] = cb
        cb_sq = (cb * cb).sum(1)  # (K,)
        step = _chunk_rows(b * max(k, p))
        parts = [_extend_paths(resid[s : s + step], cost[s : s + step], hist[s : s + step], cb, cb_sq, beam)
                 for s in range(0, n, step)]  # extend every path by codebook m, keep the beam best (chunked)
        resid, cost, hist = (torch.cat(t) for t in zip(*parts))
        if bar is not None:
            bar.update(1)
    best = cost.argmin(dim=1)  # (N,)
    rows_n = torch.arange(n)
    return codebooks, hist[rows_n, best], resid[rows_n, best].contiguous()


def _fit_codebooks(z: torch.Tensor, z_val: torch.Tensor, groups: list[list[int]], k: int, kmeans_iters: int,
                   refine_rounds: int, beam: int, refine_iters: int, shrink: bool, gen: torch.Generator,
                   bar, train_beam: int = 1) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Stage-wise k-means initialisation over ``groups`` of directions, then validated joint refinement.

    Args:
      z: (N_fit, p) frames to fit.  z_val: (N_val, p) validation frames (N_val may be 0: no refinement).
      groups: per codebook, the directions it spans (disjoint: product quantizer; all: residual VQ).
      k, kmeans_iters, refine_rounds, beam, refine_iters, shrink: as in :func:`train_quantizer`.
      gen: random generator.  bar: tqdm bar, advanced once per codebook and per refinement round.
      train_beam: for a residual VQ (every group spans all directions), the beam whose residuals each stage's
        k-means is fitted on (:func:`_init_rvq_beam`); 1 = stage-wise residual VQ on the greedy residuals.

    Returns:
      codebooks (M, K, p), and the per-frame validation errors (N_val,) float64 (None without validation).
    """
    m_total = len(groups)
    full = list(range(z.shape[1]))
    if m_total > 1 and all(g == full for g in groups):  # residual VQ: fit on the beam's residuals
        codebooks, idx, resid = _init_rvq_beam(z, m_total, k, kmeans_iters, shrink, gen, train_beam, bar)
    else:
        codebooks, idx, resid = _init_codebooks(z, groups, k, kmeans_iters, shrink, gen, bar)
    if z_val.shape[0] == 0:
        return codebooks, None
    best_val = _frame_errors(z_val, codebooks, beam, refine_iters)  # (N_val,)
    best = codebooks.clone()
    for _ in range(refine_rounds):
        for m in range(m_total):
            cb = codebooks[m]  # (K, p)
            r = resid + cb[idx[:, m]]  # (N_fit, p) residual of the other codebooks
            cb = _refit(r, idx[:, m], (resid * resid).sum(1), cb, shrink)
            a, _ = _assign(r, cb, (cb * cb).sum(1))
            codebooks[m] = cb
            idx[:, m] = a
            resid = r - cb[a]
        cross = _cross_terms(codebooks) if m_total > 1 else None  # shared by both encodings below
        new_idx, new_resid = _encode_normalised(z, codebooks, (codebooks * codebooks).sum(2), beam, refine_iters,
                                                cross)
        better = (new_resid * new_resid).sum(1) < (resid * resid).sum(1)  # (N_fit,)
        idx[better] = new_idx[better]
        resid[better] = new_resid[better]
        val = _frame_errors(z_val, codebooks, beam, refine_iters, cross)  # (N_val,)
        bar.update(1)
        if _significantly_lower(val, best_val):
            best_val, best = val, codebooks.clone()
        else:
            break
    return best, best_val


def train_quantizer(
    x: torch.Tensor,
    num_codebooks: int,
    codebook_size: int = 256,
    kmeans_iters: int = 20,
    refine_rounds: int = 4,
    beam: int = DEFAULT_BEAM,
    refine_iters: int = DEFAULT_REFINE_ITERS,
    structure: Literal["auto", "pq", "rvq"] = "auto",
    normalize: Literal["global", "per_dim"] = "global",
    shrink: bool = True,
    valid_fraction: float = 0.1,
    subspace_search: bool = True,
    train_beam: Optional[int] = None,
    seed: int = 0,
    progress: bool = True,
) -> Quantizer:
    """Train a :class:`Quantizer` (see the module docstring for the algorithm and its sources).

    Steps: normalise; hold out ``valid_fraction`` of the frames for validation; PCA; keep the ``p`` principal
    directions that reverse water-filling gives bits to (at least ``num_codebooks``; with ``subspace_search``,
    the best of a few sizes around it on validation frames); initialise a product
    quantizer over them (``"pq"``) and/or a residual VQ (``"rvq"``: every codebook spans the first
    ``RVQ_DIMS_FACTOR * p`` directions (at most D), fitted stage by stage on the residuals of every path of a beam
    search, each k-means seeded with shrunk rows, ``RVQ_SEED_SCALE``); refine each by up to ``refine_rounds`` rounds of coordinate descent, keeping a round
    only if it lowers the validation error significantly (paired test over the validation frames: mean change
    below -2 standard errors); with ``structure="auto"``, return whichever has the lower validation error
    (counting the energy outside each one's subspace).
    Runs in float32 on the CPU; deterministic for a given ``seed`` (and torch thread count). Whisper tiny.en
    layer-2 frames (D 384), 16 codebooks, 20000 frames: about 2 minutes on one CPU thread.

    Args:
      x: (N, D) float training frames (e.g. teacher embeddings), N >= codebook_size.
      num_codebooks: M, bytes per frame of the CI (>= 1).
      codebook_size: K codewords per codebook (2..256, one byte).
      kmeans_iters: Lloyd iterations per codebook in the initialisation (>= 0).
      refine_rounds: most joint refinement rounds (>= 0; 0 keeps the initial quantizer).
      beam: beam width of the encoder (used in refinement and stored as the default, >= 1).
      refine_iters: ICM passes of the encoder (used in refinement and stored as the default, >= 0).
      structure: ``"auto"`` (fit both below, keep the better on validation frames; ``"pq"`` when there is no
        validation split), ``"pq"`` (product-quantizer initialisation: unless refinement is kept, exact and very
        fast encoding) or ``"rvq"`` (residual VQ initialisation).
      normalize: ``"global"``: ``scale`` is one RMS value, so codebooks minimise the plain squared error of
        ``x`` (the relative error of :meth:`Quantizer.relative_error`); ``"per_dim"``: per-dimension standard
        deviations (all dimensions weigh the same).
      shrink: shrink k-means centroids towards their residuals' mean by the James-Stein factor (see
        ``_refit``); lowers held-out error when frames are few for the number of codewords.
      valid_fraction: share of the frames (at most 10000) held out to decide on refinement rounds and the
        structure; none (no refinement, ``"pq"``) when it is 0 or fewer than ``codebook_size`` frames would
        be left to fit.
      subspace_search: besides the water-filled number of directions ``p``, try ``p`` times 0.5, 0.75, 1.5 and 2
        with a product quantizer and keep the size with the lowest validation error (needs a validation split).
      train_beam: the residual-VQ candidate fits each codebook on the residuals of every path of a beam search of
        this width over the codebooks before it (as faiss's ``ResidualQuantizer`` trains; 1 = the greedy
        stage-wise residual VQ; default: ``beam``). On Whisper tiny.en layer-2 frames at 16 bytes this lowered
        the held-out error from 0.253 to 0.236 (docs/quantizer_benchmark.md).
      seed: seeds k-means++, the seeding subsets and the validation split.
      progress: show a tqdm progress bar.

    Returns:
      the trained :class:`Quantizer` (CPU, float32 buffers; codebooks (M, K, D) in the normalised space).

    Raises:
      ValueError: ``x`` not (N, D) float, non-finite, N < codebook_size, or a bad argument.
    """
    from tqdm import tqdm

    _check_x(x, None)
    if x.ndim != 2:
        raise ValueError(f"x must be (N, D) frames, got shape {tuple(x.shape)}")
    for name, v, lo in (("num_codebooks", num_codebooks, 1), ("codebook_size", codebook_size, 2),
                        ("kmeans_iters", kmeans_iters, 0), ("refine_rounds", refine_rounds, 0)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    if codebook_size > 256:
        raise ValueError(f"codebook_size must be <= 256 (indexes are stored as one byte), got {codebook_size}")
    _check_search(beam, refine_iters)
    train_beam = beam if train_beam is None else train_beam
    if isinstance(train_beam, bool) or not isinstance(train_beam, (int, np.integer)) or train_beam < 1:
        raise ValueError(f"train_beam must be an int >= 1, got {train_beam!r}")
    if structure not in ("auto", "pq", "rvq"):
        raise ValueError(f"structure must be 'auto', 'pq' or 'rvq', got {structure!r}")
    if normalize not in ("global", "per_dim"):
        raise ValueError(f"normalize must be 'global' or 'per_dim', got {normalize!r}")
    if not 0.0 <= float(valid_fraction) < 1.0:
        raise ValueError(f"valid_fraction must be in [0, 1), got {valid_fraction!r}")
    n, d = x.shape
    if n < codebook_size:
        raise ValueError(f"need at least codebook_size={codebook_size} training frames, got {n}")
    m_total, k = int(num_codebooks), int(codebook_size)

    # 1) normalisation
    gen = torch.Generator().manual_seed(int(seed))
    x64 = x.detach().to("cpu", torch.float64)
    mean = x64.mean(0)  # (D,)
    var = x64.var(0, unbiased=False)  # (D,)
    if normalize == "global":
        s = float(var.mean().sqrt())
        scale = torch.full((d,), s if s > 0 else 1.0, dtype=torch.float64)
    else:
        std = var.sqrt()
        scale = torch.where(std > 0, std, torch.ones_like(std))
    del x64
    xn = ((x.detach().to("cpu", torch.float32) - mean.float()) / scale.float()).contiguous()  # (N, D)

    # validation split for the refinement decision
    wants_valid = refine_rounds > 0 or structure == "auto" or subspace_search
    n_valid = min(int(round(n * float(valid_fraction))), 10000) if wants_valid else 0
    if n_valid < 1 or n - n_valid < k:
        n_valid = 0
    order = torch.randperm(n, generator=gen)
    x_fit, x_val = xn[order[n_valid:]], xn[order[:n_valid]]  # (N_fit, D), (N_val, D)

    # 2) PCA and the water-filled subspace
    xf = x_fit.to(torch.float64)
    cov = (xf.t() @ xf) / xf.shape[0] - torch.outer(xf.mean(0), xf.mean(0))  # (D, D)
    del xf
    lam, vec = torch.linalg.eigh(cov)
    lam, vec = lam.flip(0).clamp_min(0.0), vec.flip(1)  # descending
    p_wf = min(d, max(_waterfill_dims(lam, m_total * math.log2(k)), m_total))
    p = p_wf
    if n_valid and subspace_search:
        # water-filling is exact for Gaussian data and ideal codes; check a few nearby sizes on validation frames
        # with a product quantizer (cheap: k-means in p / M dimensions)
        sizes = sorted({min(d, max(m_total, int(round(p_wf * f)))) for f in (0.5, 0.75, 1.0, 1.5, 2.0)})
        scores = []
        for size in sizes:
            b = vec[:, :size].to(torch.float32)  # (D, size)
            zf, zv = x_fit @ b, x_val @ b  # (N_fit, size), (N_val, size)
            outside = ((x_val.double() ** 2).sum(1) - (zv.double() ** 2).sum(1)).clamp_min(0.0)  # (N_val,)
            groups = _balanced_groups(lam[:size], m_total) if size >= m_total else [list(range(size))] * m_total
            cb = _init_codebooks(zf, groups, k, kmeans_iters, shrink, torch.Generator().manual_seed(int(seed)))[0]
            scores.append(float((_frame_errors(zv, cb, beam, refine_iters) + outside).mean()))
        p = sizes[min(range(len(sizes)), key=lambda i: (scores[i], abs(sizes[i] - p_wf)))]
    # 3) + 4) initialisation and validated refinement, for each candidate structure; the residual VQ gets
    # RVQ_DIMS_FACTOR times the product quantizer's directions (its codewords span all of them, so it uses more)
    candidates = ["pq", "rvq"] if structure == "auto" else [structure]
    if structure == "auto" and not n_valid:
        candidates = ["pq"]  # nothing to choose with
    bar = tqdm(total=len(candidates) * (m_total + refine_rounds), desc="train quantizer", unit="step",
               disable=not progress)
    fits = []
    for kind in candidates:
        size = p if kind == "pq" else min(d, max(p, int(round(RVQ_DIMS_FACTOR * p))))
        basis = vec[:, :size].to(torch.float32).contiguous()  # (D, size)
        z, z_val = x_fit @ basis, x_val @ basis  # (N_fit, size), (N_val, size)
        groups = (_balanced_groups(lam[:size], m_total) if kind == "pq" and size >= m_total
                  else [list(range(size))] * m_total)
        cb, val = _fit_codebooks(z, z_val, groups, k, kmeans_iters, refine_rounds, beam, refine_iters, shrink, gen,
                                 bar, train_beam=train_beam)
        # compare candidates on the full error: in their subspace plus the energy outside it
        outside = ((x_val.double() ** 2).sum(1) - (z_val.double() ** 2).sum(1)).clamp_min(0.0)  # (N_val,)
        fits.append((float((val + outside).mean()) if val is not None else 0.0, kind, cb @ basis.t()))
    _, chosen, codebooks = min(fits, key=lambda f: f[0])
    bar.set_postfix(structure=chosen)
    bar.close()
    return Quantizer(mean.float(), scale.float(), codebooks, beam=beam, refine_iters=refine_iters)
