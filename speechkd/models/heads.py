"""Downstream heads for keyword spotting (KWS) and speaker verification (SV) on top of an SSL speech encoder.

They follow the SUPERB benchmark (Yang et al., Interspeech 2021, arXiv 2105.01051) as implemented in s3prl, as
used for the multi-task fine-tuning of distilled SSL models in arXiv 2210.16611:

* :class:`WeightedLayerSum` -- s3prl's ``Featurizer``: a learnable softmax-weighted sum of the encoder's layer
  outputs, optionally after a parameter-free layer norm of each layer.
* :class:`KwsHead` -- SUPERB KS (``downstream/speech_commands``: ``projector_dim: 256``, ``UtteranceLevel`` with
  ``MeanPooling``): weighted layer sum -> linear projection -> mean over valid frames -> linear classifier.
* :class:`XVectorHead` -- SUPERB ASV (``downstream/sv_voxceleb1``): weighted layer sum -> linear projection ->
  x-vector TDNN stack (Snyder et al., "X-vectors: Robust DNN embeddings for speaker recognition", ICASSP 2018,
  table 1: contexts [t-2, t+2], {t-2, t, t+2}, {t-3, t, t+3}, {t}, {t}) -> statistics pooling (mean and standard
  deviation over valid frames) -> embedding layer.
* :class:`AMSoftmaxLoss` -- additive margin softmax (Wang et al., "Additive Margin Softmax for Face
  Verification", IEEE SPL 2018, eq. 6), s = 30, m = 0.4 as in s3prl's SV recipe.

Padding never changes an output: every head takes ``lens`` and computes each utterance from its valid frames
only (padded frames are zeroed before every temporal convolution and excluded from pooling and from batch
normalisation statistics), so an utterance alone and the same utterance padded in a batch give the same result
(bit-exact up to float summation order). Frame counts ``lens`` are in encoder frames (20 ms for HuBERT /
wav2vec 2.0 / WavLM, see :class:`speechkd.teachers.hf.SSLTeacher`).
"""

from __future__ import annotations

from typing import Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from speechkd.models.conformer import tracing

__all__ = [
    "KWS_NUM_CLASSES",
    "WeightedLayerSum",
    "KwsHead",
    "MaskedBatchNorm1d",
    "TdnnLayer",
    "XVectorHead",
    "AMSoftmaxLoss",
    "frame_mask",
    "masked_mean",
    "masked_mean_std",
]

KWS_NUM_CLASSES = 12
"""Speech Commands v0.02 12-class task (10 words, ``_unknown_``, ``_silence_``), see
:data:`speechkd.data.classification.KWS_CLASSES`."""

XVECTOR_CONTEXTS: tuple[tuple[int, int], ...] = ((5, 1), (3, 2), (3, 3), (1, 1), (1, 1))
"""(kernel size, dilation) of the five frame-level x-vector layers (Snyder et al. 2018, table 1; s3prl
``XVector``). Receptive field: 15 frames."""

STD_FLOOR = 1e-5
"""Variance floor of statistics pooling (keeps the gradient of the square root finite)."""

Layers = Union[Sequence[torch.Tensor], torch.Tensor]


def frame_mask(lens: torch.Tensor, num_frames: int) -> torch.Tensor:
    """Valid-frame mask.

    Args:
        lens: ``(N,)`` integer valid frame counts.
        num_frames: T, the padded length.

    Returns:
        ``(N, T)`` bool, True where ``t < lens[n]``.
    """
    return torch.arange(num_frames, device=lens.device)[None, :] < lens[:, None]


def _check_lens(lens: torch.Tensor, batch: int, num_frames: int, what: str = "lens") -> torch.Tensor:
    """Validate ``lens (N,)`` against a padded ``(N, T, ...)`` input; return it as int64."""
    if not isinstance(lens, torch.Tensor) or lens.dim() != 1 or lens.shape[0] != batch:
        shape = tuple(lens.shape) if isinstance(lens, torch.Tensor) else type(lens).__name__
        raise ValueError(f"{what} must be a (N,) = ({batch},) tensor, got {shape}")
    if lens.is_floating_point() or lens.is_complex() or lens.dtype == torch.bool:
        raise ValueError(f"{what} must be an integer tensor, got {lens.dtype}")
    if batch and not tracing() and (int(lens.min()) < 1 or int(lens.max()) > num_frames):
        raise ValueError(f"{what} must be in [1, T={num_frames}], got min {int(lens.min())}, max {int(lens.max())}")
    return lens.long()


def _check_frames(x: torch.Tensor, what: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{what} must be a (N, T, C) tensor, got {shape}")
    if not x.is_floating_point():
        raise ValueError(f"{what} must be floating point, got {x.dtype}")
    if x.shape[0] == 0:
        raise ValueError(f"{what}: empty batch")


def masked_mean(x: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    """Mean over the valid frames of each utterance (s3prl ``MeanPooling``).

    Args:
        x: ``(N, T, C)`` frames (padded frames may hold anything: they are not read).
        lens: ``(N,)`` integer valid frame counts, each in ``[1, T]``.

    Returns:
        ``(N, C)``: ``mean_{t < lens[n]} x[n, t]``.

    Raises:
        ValueError: bad shapes, non-integer ``lens`` or a length outside ``[1, T]``.
    """
    _check_frames(x, "x")
    lens = _check_lens(lens, x.shape[0], x.shape[1])
    mask = frame_mask(lens, x.shape[1]).unsqueeze(-1)  # (N, T, 1)
    return torch.where(mask, x, x.new_zeros(())).sum(1) / lens[:, None].to(x.dtype)


def masked_mean_std(x: torch.Tensor, lens: torch.Tensor, floor: float = STD_FLOOR) -> torch.Tensor:
    """Statistics pooling: mean and standard deviation over the valid frames (Snyder et al. 2018, sec. 2.1).

    The standard deviation is the population one, ``sqrt(max(mean_t (x - mu)^2, floor))`` (Kaldi's
    ``StatisticsPoolingComponent`` with a variance floor; s3prl's ``SP`` uses the unbiased ``torch.std``, which is
    undefined for one frame).

    Args:
        x: ``(N, T, C)`` frames (padded frames are not read).
        lens: ``(N,)`` integer valid frame counts, each in ``[1, T]``.
        floor: variance floor.

    Returns:
        ``(N, 2 * C)``: ``[mean, std]`` concatenated along the last dimension.

    Raises:
        ValueError: bad shapes, non-integer ``lens`` or a length outside ``[1, T]``.
    """
    mean = masked_mean(x, lens)  # validates
    mask = frame_mask(lens.long(), x.shape[1]).unsqueeze(-1)
    dev = torch.where(mask, x - mean[:, None, :], x.new_zeros(()))
    var = dev.pow(2).sum(1) / lens[:, None].to(x.dtype)
    return torch.cat([mean, var.clamp_min(floor).sqrt()], dim=-1)


class WeightedLayerSum(nn.Module):
    """Learnable softmax-weighted sum of L layer outputs (SUPERB, Yang et al. 2021, sec. 3; s3prl ``Featurizer``).

    ``out = sum_l softmax(w)_l * f(h_l)``, with ``f`` the identity or, when ``layer_norm`` is set, a layer norm
    over the channel dimension without learnable parameters (s3prl's ``normalize``). The weights start at 0
    (uniform average), as in s3prl.

    Args:
        num_layers: L, the number of layer outputs summed (e.g. 13 for a 12-layer Base model with layer 0).
        layer_norm: normalise each layer's frames before the sum.

    Raises:
        ValueError: ``num_layers < 1``.
    """

    def __init__(self, num_layers: int, layer_norm: bool = False):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.num_layers = num_layers
        self.layer_norm = layer_norm
        self.weights = nn.Parameter(torch.zeros(num_layers))

    @property
    def layer_weights(self) -> torch.Tensor:
        """``(L,)`` the softmax-normalised layer weights (sum to 1)."""
        return F.softmax(self.weights, dim=-1)

    def forward(self, hidden_states: Layers, lens: torch.Tensor | None = None) -> torch.Tensor:
        """Weighted sum of the layers.

        Args:
            hidden_states: L layer outputs, each ``(N, T, C)`` (e.g. :attr:`speechkd.teachers.hf.SSLOutput.
                hidden_states`), or one stacked ``(L, N, T, C)`` tensor; a single ``(N, T, C)`` tensor counts as
                L = 1.
            lens: optional ``(N,)`` valid frame counts; frames at and after ``lens[n]`` of the output are zeroed.

        Returns:
            ``(N, T, C)`` the weighted sum.

        Raises:
            ValueError: a layer count other than L, layers of different shapes, bad ``lens``.
        """
        if isinstance(hidden_states, torch.Tensor):
            if hidden_states.dim() == 3:
                hidden_states = hidden_states.unsqueeze(0)
            if hidden_states.dim() != 4:
                raise ValueError(f"hidden_states must be (L, N, T, C) or a list of (N, T, C), got "
                                 f"{tuple(hidden_states.shape)}")
            stacked = hidden_states
        else:
            hidden_states = list(hidden_states)
            if not hidden_states:
                raise ValueError("hidden_states is empty")
            for i, h in enumerate(hidden_states):
                _check_frames(h, f"hidden_states[{i}]")
            shapes = [tuple(h.shape) for h in hidden_states]
            if any(s != shapes[0] for s in shapes[1:]):
                raise ValueError(f"all layers must have the same (N, T, C) shape, got {sorted(set(shapes))}")
            stacked = torch.stack(hidden_states, dim=0)
        if stacked.shape[0] != self.num_layers:
            raise ValueError(f"expected {self.num_layers} layers, got {stacked.shape[0]}")
        _check_frames(stacked[0], "hidden_states")
        if self.layer_norm:
            stacked = F.layer_norm(stacked, (stacked.shape[-1],))
        out = torch.einsum("l,lntc->ntc", self.layer_weights.to(stacked.dtype), stacked)
        if lens is not None:
            lens = _check_lens(lens, out.shape[0], out.shape[1])
            out = out.masked_fill(~frame_mask(lens, out.shape[1]).unsqueeze(-1), 0.0)
        return out


class KwsHead(nn.Module):
    """SUPERB keyword-spotting head (s3prl ``downstream/speech_commands``; arXiv 2210.16611 KWS fine-tuning).

    ``logits = W_c * mean_{t < lens} (W_p * WeightedLayerSum(h)_t + b_p) + b_c``.

    Args:
        num_layers: L, encoder layer outputs fed to the :class:`WeightedLayerSum` (1 for the last layer only).
        input_dim: C, the encoder's hidden size.
        num_classes: K, 12 for Speech Commands (:data:`KWS_NUM_CLASSES`).
        proj_dim: projection size (s3prl ``projector_dim: 256``).
        layer_norm: layer-normalise each layer before the weighted sum.

    Raises:
        ValueError: a non-positive size.
    """

    def __init__(self, num_layers: int, input_dim: int, num_classes: int = KWS_NUM_CLASSES, proj_dim: int = 256,
                 layer_norm: bool = False):
        super().__init__()
        for name, v in (("input_dim", input_dim), ("num_classes", num_classes), ("proj_dim", proj_dim)):
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        self.featurizer = WeightedLayerSum(num_layers, layer_norm=layer_norm)
        self.projector = nn.Linear(input_dim, proj_dim)
        self.classifier = nn.Linear(proj_dim, num_classes)

    def forward(self, hidden_states: Layers, lens: torch.Tensor) -> torch.Tensor:
        """Class logits per utterance.

        Args:
            hidden_states: L layer outputs ``(N, T, C)`` each, or ``(L, N, T, C)`` (see :class:`WeightedLayerSum`).
            lens: ``(N,)`` integer valid frame counts, each in ``[1, T]``.

        Returns:
            ``(N, K)`` unnormalised class logits (use with ``F.cross_entropy``).

        Raises:
            ValueError: bad shapes or lengths (see :class:`WeightedLayerSum`, :func:`masked_mean`).
        """
        x = self.featurizer(hidden_states)
        return self.classifier(masked_mean(self.projector(x), lens))


class MaskedBatchNorm1d(nn.BatchNorm1d):
    """``nn.BatchNorm1d`` over the valid frames of a padded ``(N, C, T)`` batch only.

    In training mode the batch statistics (and the running-statistics update) use only frames ``t < lens[n]``, so
    padding changes nothing; in eval mode it is the ordinary per-channel affine map. Padded output frames are 0.
    Same arguments as ``nn.BatchNorm1d``.
    """

    def forward(self, x: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """Normalise the valid frames.

        Args:
            x: ``(N, C, T)`` frames, channels first.
            lens: ``(N,)`` int64 valid frame counts, each in ``[1, T]`` (not re-validated).

        Returns:
            ``(N, C, T)``; frames at and after ``lens[n]`` are 0.

        Raises:
            ValueError: (training mode, from torch) a single valid frame in the whole batch.
        """
        mask = frame_mask(lens, x.shape[2])  # (N, T)
        if not self.training and self.track_running_stats:  # a per-channel affine map: no gather (exportable)
            return super().forward(x).masked_fill(~mask.unsqueeze(1), 0.0)
        x_t = x.transpose(1, 2)  # (N, T, C)
        valid = super().forward(x_t[mask])  # (M, C), M = lens.sum()
        out = x_t.new_zeros(x_t.shape[:2] + valid.shape[1:])
        out[mask] = valid
        return out.transpose(1, 2)


class TdnnLayer(nn.Module):
    """One x-vector frame-level layer: dilated Conv1d (a TDNN affine over a frame context) -> ReLU -> BatchNorm
    -> dropout (Snyder et al. 2018; s3prl ``TDNN`` order: affine, non-linearity, batch norm).

    Args:
        in_dim: input channels.
        out_dim: output channels.
        kernel_size: frames of context (odd).
        dilation: frame step inside the context.
        padding: ``"valid"`` (Kaldi / s3prl: no padding, the output has ``dilation * (kernel_size - 1)`` fewer
            frames) or ``"same"`` (zero padding at both ends of each utterance, same frame count).
        batch_norm: use :class:`MaskedBatchNorm1d`.
        dropout: dropout probability.

    Raises:
        ValueError: an even kernel, a non-positive size, an unknown padding.
    """

    def __init__(self, in_dim: int, out_dim: int, kernel_size: int, dilation: int = 1, padding: str = "valid",
                 batch_norm: bool = True, dropout: float = 0.0):
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0 or dilation < 1:
            raise ValueError(f"kernel_size must be odd and >= 1 and dilation >= 1, got {kernel_size}, {dilation}")
        if padding not in ("valid", "same"):
            raise ValueError(f"padding must be 'valid' or 'same', got {padding!r}")
        self.context = dilation * (kernel_size - 1)
        self.padding = padding
        self.conv = nn.Conv1d(in_dim, out_dim, kernel_size, dilation=dilation,
                              padding=0 if padding == "valid" else self.context // 2)
        self.bn = MaskedBatchNorm1d(out_dim) if batch_norm else None
        self.dropout = nn.Dropout(dropout)

    def output_lens(self, lens: torch.Tensor) -> torch.Tensor:
        """``(N,)`` output frame counts for ``(N,)`` input frame counts."""
        return lens - self.context if self.padding == "valid" else lens

    def forward(self, x: torch.Tensor, lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Apply the layer to the valid frames.

        Args:
            x: ``(N, C_in, T)`` frames whose padded frames are 0.
            lens: ``(N,)`` int64 valid input frame counts.

        Returns:
            ``(y, out_lens)``: ``y (N, C_out, T')`` with padded frames 0 (``T' = T - context`` for ``"valid"``),
            ``out_lens (N,)``.
        """
        out_lens = self.output_lens(lens)
        y = F.relu(self.conv(x))
        if self.bn is not None:
            y = self.bn(y, out_lens)
        y = self.dropout(y)
        return y.masked_fill(~frame_mask(out_lens, y.shape[2]).unsqueeze(1), 0.0), out_lens


class XVectorHead(nn.Module):
    """SUPERB speaker-verification x-vector head (s3prl ``downstream/sv_voxceleb1``; Snyder et al. 2018).

    WeightedLayerSum -> Linear(C, proj_dim) -> 5 TDNN layers (contexts :data:`XVECTOR_CONTEXTS`, widths
    ``proj_dim`` x 4 and ``stats_dim``) -> statistics pooling over valid frames (:func:`masked_mean_std`) ->
    Linear(2 * stats_dim, embed_dim). The embedding is the affine output before any non-linearity (Kaldi's
    "embedding a", used for both the AM-softmax loss and cosine scoring; s3prl instead trains on a second
    ReLU layer and scores on the ReLU of the first).

    Args:
        num_layers: L, encoder layer outputs fed to the :class:`WeightedLayerSum`.
        input_dim: C, the encoder's hidden size.
        proj_dim: projection size and TDNN width (s3prl ``input_dim: 512``).
        stats_dim: width of the last TDNN layer, pooled (Snyder et al.: 1500; s3prl ``agg_dim``).
        embed_dim: embedding size (Snyder et al.: 512).
        layer_norm: layer-normalise each layer before the weighted sum.
        batch_norm: batch norm in the TDNN layers (over valid frames only, :class:`MaskedBatchNorm1d`).
        dropout: dropout of the TDNN layers.
        padding: TDNN padding, ``"valid"`` (Kaldi / s3prl; utterances need at least :attr:`min_frames` frames)
            or ``"same"``.

    Raises:
        ValueError: a non-positive size or a bad padding.
    """

    def __init__(self, num_layers: int, input_dim: int, proj_dim: int = 512, stats_dim: int = 1500,
                 embed_dim: int = 512, layer_norm: bool = False, batch_norm: bool = True, dropout: float = 0.0,
                 padding: str = "valid"):
        super().__init__()
        for name, v in (("input_dim", input_dim), ("proj_dim", proj_dim), ("stats_dim", stats_dim),
                        ("embed_dim", embed_dim)):
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        self.featurizer = WeightedLayerSum(num_layers, layer_norm=layer_norm)
        self.projector = nn.Linear(input_dim, proj_dim)
        dims = [proj_dim] * len(XVECTOR_CONTEXTS) + [stats_dim]
        self.tdnn = nn.ModuleList(
            TdnnLayer(dims[i], dims[i + 1], k, d, padding=padding, batch_norm=batch_norm, dropout=dropout)
            for i, (k, d) in enumerate(XVECTOR_CONTEXTS)
        )
        self.embedding = nn.Linear(2 * stats_dim, embed_dim)
        self.embed_dim = embed_dim

    @property
    def min_frames(self) -> int:
        """Fewest input frames an utterance may have (15 with ``"valid"`` padding, 1 with ``"same"``)."""
        return 1 + sum(layer.context for layer in self.tdnn if layer.padding == "valid")

    def forward(self, hidden_states: Layers, lens: torch.Tensor) -> torch.Tensor:
        """Speaker embeddings.

        Args:
            hidden_states: L layer outputs ``(N, T, C)`` each, or ``(L, N, T, C)`` (see :class:`WeightedLayerSum`).
            lens: ``(N,)`` integer valid frame counts, each in ``[min_frames, T]``.

        Returns:
            ``(N, embed_dim)`` embeddings (for :class:`AMSoftmaxLoss` in training, cosine scoring in evaluation:
            :func:`speechkd.eval.verification.cosine_scores`).

        Raises:
            ValueError: bad shapes or lengths, or an utterance shorter than :attr:`min_frames` frames (the message
                gives the count).
        """
        x = self.featurizer(hidden_states)
        lens = _check_lens(lens, x.shape[0], x.shape[1])
        if not tracing() and int(lens.min()) < self.min_frames:
            raise ValueError(f"XVectorHead with 'valid' TDNN padding needs >= {self.min_frames} frames per "
                             f"utterance, got an utterance of {int(lens.min())} (use padding='same')")
        x = self.projector(x).masked_fill(~frame_mask(lens, x.shape[1]).unsqueeze(-1), 0.0)
        x = x.transpose(1, 2)  # (N, C, T)
        for layer in self.tdnn:
            x, lens = layer(x, lens)
        return self.embedding(masked_mean_std(x.transpose(1, 2), lens))


class AMSoftmaxLoss(nn.Module):
    """Additive margin softmax loss (Wang et al., IEEE SPL 2018, eq. 6; s3prl ``AMSoftmaxLoss``).

    With ``cos_{n,k} = <x_n / ||x_n||, w_k / ||w_k||>``::

        loss_n = -log( exp(s (cos_{n,y_n} - m)) / (exp(s (cos_{n,y_n} - m)) + sum_{k != y_n} exp(s cos_{n,k})) )

    i.e. cross-entropy of the logits ``s * (cos - m * onehot(y))``. With ``m = 0`` it is softmax cross-entropy
    of ``s * cos`` (normalised softmax).

    Args:
        embed_dim: D, the embedding size.
        num_classes: K, the number of training speakers.
        s: scale.
        m: additive cosine margin.
        ignore_index: target value that contributes no loss (e.g. utterances without a speaker label in joint
            multi-task batches; :data:`speechkd.data.classification.IGNORE_INDEX`).

    Raises:
        ValueError: a non-positive size or scale, or a negative margin.
    """

    def __init__(self, embed_dim: int, num_classes: int, s: float = 30.0, m: float = 0.4, ignore_index: int = -100):
        super().__init__()
        if embed_dim < 1 or num_classes < 1:
            raise ValueError(f"embed_dim and num_classes must be >= 1, got {embed_dim}, {num_classes}")
        if s <= 0 or m < 0:
            raise ValueError(f"need s > 0 and m >= 0, got s={s}, m={m}")
        self.s, self.m, self.ignore_index = float(s), float(m), ignore_index
        self.num_classes = num_classes
        self.weight = nn.Parameter(torch.empty(num_classes, embed_dim))  # (K, D), one class centre per row
        nn.init.xavier_normal_(self.weight)

    def cosine(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of each embedding with each class weight.

        Args:
            embeddings: ``(N, D)``.

        Returns:
            ``(N, K)`` cosines in [-1, 1] (for speaker-identification accuracy: argmax over K).

        Raises:
            ValueError: not ``(N, D)``.
        """
        if embeddings.dim() != 2 or embeddings.shape[1] != self.weight.shape[1]:
            raise ValueError(f"embeddings must be (N, D={self.weight.shape[1]}), got {tuple(embeddings.shape)}")
        return F.linear(F.normalize(embeddings, dim=1), F.normalize(self.weight, dim=1))

    def forward(self, embeddings: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """The AM-softmax loss.

        Args:
            embeddings: ``(N, D)`` speaker embeddings (unnormalised).
            targets: ``(N,)`` int64 class indices in ``[0, K)``, or ``ignore_index``.
            reduction: ``"mean"`` (over non-ignored utterances; 0, still connected to the graph, when all are
                ignored), ``"sum"`` or ``"none"`` (``(N,)``, 0 for ignored ones).

        Returns:
            a scalar (``"mean"``, ``"sum"``) or ``(N,)`` (``"none"``) loss in nats.

        Raises:
            ValueError: bad shapes, a bad reduction, or a target outside ``[0, K)`` that is not ``ignore_index``.
        """
        cos = self.cosine(embeddings)  # (N, K)
        if targets.dim() != 1 or targets.shape[0] != cos.shape[0] or targets.is_floating_point():
            raise ValueError(f"targets must be an integer (N,) = ({cos.shape[0]},) tensor, got "
                             f"{tuple(targets.shape)} {targets.dtype}")
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        targets = targets.long()
        keep = targets != self.ignore_index
        bad = keep & ((targets < 0) | (targets >= self.num_classes))
        if bool(bad.any()):
            raise ValueError(f"targets must be in [0, {self.num_classes}) or {self.ignore_index}, "
                             f"got {int(targets[bad][0])}")
        margin = F.one_hot(targets.clamp_min(0), self.num_classes).to(cos.dtype) * self.m * keep[:, None]
        logits = self.s * (cos - margin)
        loss = F.cross_entropy(logits, targets, ignore_index=self.ignore_index, reduction="none")  # (N,)
        if reduction == "none":
            return loss
        if reduction == "sum":
            return loss.sum()
        return loss.sum() / keep.sum().clamp_min(1)
