"""Pre-training a small HuBERT teacher here (first iteration: masked prediction of MFCC k-means clusters).

HuBERT (Hsu et al., IEEE/ACM TASLP 2021, arXiv 2106.07447, sec. II-III, IV-C; fairseq ``hubert``) trains a
wav2vec 2.0-style encoder (CNN feature encoder at 50 Hz, transformer) to predict, at frames whose CNN features were
replaced by a learned mask embedding, the cluster ids of an offline clustering of the audio. In the first iteration
the targets are k-means clusters (100 clusters) of 39-dim MFCC frames (13 cepstra + deltas + delta-deltas) at 100
Hz. No pretrained weights can be downloaded here, so this module pre-trains such a teacher on the shared corpora,
to be distilled into a DistilHuBERT student (:mod:`speechkd.models.ssl`).

Pieces, all reusing existing code:

- :func:`mfcc_features`: lhotse's Kaldi-compatible MFCC (``lhotse.features.Mfcc``, 13 cepstra, 25 ms windows,
  10 ms shift, ``snip_edges=True`` as fairseq's ``dump_mfcc_feature.py`` computes them with
  ``torchaudio.compliance.kaldi.mfcc``) plus deltas and delta-deltas (``torchaudio.functional.compute_deltas``'s
  formula, window 5; torchaudio itself is not installed).
- :func:`mfcc_targets`: k-means (:mod:`speechkd.mvq.quantizer`'s k-means++ seeding + Lloyd iterations, fixed seed)
  of the 100 Hz MFCC frames, then one cluster id per *model* frame (:func:`label_frame_index`): the MFCC frame whose
  window centre is nearest the model frame's receptive-field centre. For HuBERT's CNN (20 ms stride, 25 ms receptive
  field) that is exactly MFCC frame ``2 t`` for model frame ``t``, which is what fairseq does for 100 Hz labels and a
  50 Hz model (``feat2tar_ratio = 2``, ``target_inds = arange(T) * 2``).
- :class:`HubertPretrainer`: a ``transformers`` ``HubertModel`` (its own span masking: ``_compute_mask_indices``
  and ``masked_spec_embed``, substituted by passing ``mask_time_indices`` to ``HubertModel.forward``), fairseq's
  ``final_proj`` and ``label_embs_concat``, and the masked-prediction loss (cosine similarity / temperature 0.1,
  cross-entropy on masked frames only, i.e. the paper's alpha = 1).
- :func:`pretrain_hubert`: a step-based Lightning fit (:func:`speechkd.training.fit_steps`: lhotse's sampler over
  windows of the utterances, :class:`CropDataset` in a DataLoader worker, exact resume, DDP with several
  processes) that exports a ``save_pretrained`` directory (``config.json`` with ``model_type: hubert`` +
  ``model.safetensors``) which :func:`speechkd.teachers.hf.load_ssl_model` / ``load_ssl_teacher`` load like a
  downloaded HuBERT.

Differences from fairseq HuBERT Base (deliberate, for a small CPU run): a narrower, shallower default model
(:func:`hubert_config`); no feature penalty (``feature_pen_weight``); fairseq's ``dropout_input`` is HF's
``feat_proj_dropout`` (after, not before, the feature projection); batches are buckets of similar-length utterances
cropped to the shortest (fairseq ``pad_audio=False``) under a sample budget rather than a token budget per GPU, and
long utterances are cut into fixed windows of ``max_samples`` first (fairseq crops each anew every epoch).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from speechkd.data.corpora import Utterance, utterances_to_cuts
from speechkd.models.ssl import _GradScale
from speechkd.mvq.quantizer import _assign, _kmeans
from speechkd.teachers.hf import SAMPLE_RATE, _receptive_field, _samples_per_frame, write_preprocessor_config
from speechkd.utils import atomic_dir, atomic_path, set_thread_policy

__all__ = [
    "HUBERT_BASE_CONV",
    "MFCC_DIM",
    "MFCC_SHIFT",
    "MFCC_WINDOW",
    "SUMMARY_FILE",
    "CropDataset",
    "HubertPretrainer",
    "MfccTargets",
    "PretrainResult",
    "hubert_config",
    "iter_waveforms",
    "assign_mfcc_targets",
    "label_frame_index",
    "load_waveforms",
    "mfcc_centroids",
    "mfcc_features",
    "mfcc_targets",
    "pretrain_hubert",
    "training_windows",
]

MFCC_WINDOW = 400
"""MFCC window in samples at 16 kHz (25 ms)."""
MFCC_SHIFT = 160
"""MFCC frame shift in samples at 16 kHz (10 ms, i.e. 100 Hz)."""
MFCC_DIM = 39
"""Width of :func:`mfcc_features`: 13 cepstra + 13 deltas + 13 delta-deltas (HuBERT sec. IV-C)."""
HUBERT_BASE_CONV = ((10, 3, 3, 3, 3, 2, 2), (5, 2, 2, 2, 2, 2, 2))
"""Kernels and strides of the CNN feature encoder of HuBERT / wav2vec 2.0 (320 samples = 20 ms per frame, 400
samples = 25 ms receptive field)."""
SUMMARY_FILE = "hubert_pretrain.json"
"""File of the exported directory that records the pre-training settings and loss history."""
_DELTA_WINDOW = 2  # N of the regression delta formula: window 2N + 1 = 5 frames (torchaudio/Kaldi default)
_MAX_CLUSTERS = 32767

PathLike = Union[str, os.PathLike]
AudioData = Union[Sequence[Utterance], Iterable, Mapping[str, torch.Tensor]]


# ------------------------------------------------------------------------------------------------ model config
def hubert_config(
    hidden_size: int = 256,
    num_layers: int = 6,
    num_heads: int = 4,
    intermediate_size: Optional[int] = None,
    conv_dim: Union[int, Sequence[int]] = 256,
    conv_kernel: Sequence[int] = HUBERT_BASE_CONV[0],
    conv_stride: Sequence[int] = HUBERT_BASE_CONV[1],
    num_conv_pos_embeddings: int = 128,
    num_conv_pos_embedding_groups: int = 16,
    **overrides: Any,
):
    """A ``transformers`` ``HubertConfig`` for a small HuBERT teacher (post-LN "Base" layout, GroupNorm CNN).

    Everything not set here is HF's HuBERT Base default, except the regularisation of fairseq's
    ``hubert_base_librispeech`` pre-training config: ``hidden_dropout = attention_dropout = 0.1``,
    ``activation_dropout = 0.0``, ``feat_proj_dropout = 0.1`` (fairseq ``dropout_input``), ``layerdrop = 0.05``.
    ``mask_time_prob`` keeps HF's 0.05 (the SpecAugment rate HuBERT checkpoints are fine-tuned with; > 0 also makes
    the model own ``masked_spec_embed``); pre-training masks with :class:`HubertPretrainer`'s own ``mask_prob``.

    Args:
        hidden_size: transformer width C (HuBERT Base: 768).
        num_layers: transformer layers L (Base: 12).
        num_heads: attention heads; must divide ``hidden_size``.
        intermediate_size: feed-forward width (default ``4 * hidden_size``).
        conv_dim: CNN channels, one int for every layer or one per layer (Base: 512 each).
        conv_kernel, conv_stride: CNN kernels and strides in samples (default HuBERT's, 20 ms per frame).
        num_conv_pos_embeddings, num_conv_pos_embedding_groups: positional convolution kernel and groups (the
            groups must divide ``hidden_size``).
        **overrides: any other ``HubertConfig`` attribute.

    Returns:
        The ``HubertConfig``.

    Raises:
        ValueError: ``num_heads`` or ``num_conv_pos_embedding_groups`` not dividing ``hidden_size``; CNN lists of
            different lengths; an override that is not a ``HubertConfig`` attribute.
    """
    import transformers

    kernel, stride = [int(k) for k in conv_kernel], [int(s) for s in conv_stride]
    dims = [int(conv_dim)] * len(kernel) if isinstance(conv_dim, int) else [int(d) for d in conv_dim]
    if not (len(dims) == len(kernel) == len(stride)) or not dims:
        raise ValueError(f"conv_dim, conv_kernel, conv_stride need one entry per CNN layer: {dims}, {kernel}, {stride}")
    if hidden_size % num_heads:
        raise ValueError(f"num_heads {num_heads} does not divide hidden_size {hidden_size}")
    if hidden_size % num_conv_pos_embedding_groups:
        raise ValueError(f"num_conv_pos_embedding_groups {num_conv_pos_embedding_groups} does not divide {hidden_size}")
    known = transformers.HubertConfig().to_dict()
    unknown = sorted(k for k in overrides if k not in known)
    if unknown:
        raise ValueError(f"unknown HubertConfig attribute(s) {unknown}")
    settings = dict(
        hidden_size=int(hidden_size),
        num_hidden_layers=int(num_layers),
        num_attention_heads=int(num_heads),
        intermediate_size=int(intermediate_size or 4 * hidden_size),
        conv_dim=dims,
        conv_kernel=kernel,
        conv_stride=stride,
        num_conv_pos_embeddings=int(num_conv_pos_embeddings),
        num_conv_pos_embedding_groups=int(num_conv_pos_embedding_groups),
        hidden_dropout=0.1,
        attention_dropout=0.1,
        activation_dropout=0.0,
        feat_proj_dropout=0.1,
        layerdrop=0.05,
    )
    return transformers.HubertConfig(**{**settings, **overrides})


# ------------------------------------------------------------------------------------------------ audio, MFCC
def iter_waveforms(data: AudioData) -> Iterable[tuple[str, torch.Tensor]]:
    """Yield ``(id, (S,) float32 16 kHz mono waveform)`` one utterance at a time (lhotse loads and resamples), so only
    one waveform is in memory at once.

    Args:
        data: corpus :class:`~speechkd.data.corpora.Utterance` records, lhotse cuts (the whole cut is read), or a
            mapping id -> ``(S,)`` waveform already at 16 kHz.

    Raises:
        ValueError: no utterances, a repeated id (ids are only unique within a corpus: prefix them when mixing
            corpora), a multi-channel cut, or a waveform that is not 1-D.
        speechkd.data.corpora.CorpusError: a missing audio file.
    """
    seen = set()
    if isinstance(data, Mapping):
        items = ((str(uid), torch.as_tensor(wav, dtype=torch.float32)) for uid, wav in data.items())
    else:
        data = list(data)
        if data and all(isinstance(u, Utterance) for u in data):
            data = list(utterances_to_cuts(data, SAMPLE_RATE))

        def from_cuts():
            for cut in data:
                if cut.sampling_rate != SAMPLE_RATE:
                    cut = cut.resample(SAMPLE_RATE)
                audio = cut.load_audio()  # (channels, S) float32
                if audio.ndim != 2 or audio.shape[0] != 1:
                    raise ValueError(f"cut {cut.id!r} has audio of shape {audio.shape}; mono audio is expected")
                yield cut.id, torch.from_numpy(np.ascontiguousarray(audio[0], dtype=np.float32))

        items = from_cuts()
    for uid, wav in items:
        if wav.dim() != 1:
            raise ValueError(f"waveform {uid!r} must be 1-D (S,) samples, got shape {tuple(wav.shape)}")
        if uid in seen:
            raise ValueError(f"utterance id {uid!r} occurs twice (prefix ids when mixing corpora)")
        seen.add(uid)
        yield uid, wav
    if not seen:
        raise ValueError("no utterances given")


def load_waveforms(data: AudioData) -> dict[str, torch.Tensor]:
    """Read utterances into memory as 16 kHz mono float32 waveforms (:func:`iter_waveforms`, all at once).

    Returns:
        id -> ``(S,)`` float32 tensor in ``[-1, 1]`` (samples at 16 kHz), in input order. Memory: 230 MB per hour.

    Raises:
        as :func:`iter_waveforms`.
    """
    return dict(iter_waveforms(data))


_MFCC_EXTRACTOR = None


def _mfcc_extractor():
    global _MFCC_EXTRACTOR
    if _MFCC_EXTRACTOR is None:
        from lhotse.features import Mfcc, MfccConfig

        with warnings.catch_warnings():  # lhotse warns that snip_edges=True does not fit its duration bookkeeping
            warnings.simplefilter("ignore", UserWarning)
            _MFCC_EXTRACTOR = Mfcc(MfccConfig(sampling_rate=SAMPLE_RATE, num_ceps=13, snip_edges=True))
    return _MFCC_EXTRACTOR


def _deltas(x: torch.Tensor, n: int = _DELTA_WINDOW) -> torch.Tensor:
    """Regression deltas of ``x: (F, D)`` over frames, edges replicated: ``sum_k k (x[t+k] - x[t-k]) / (2 sum k^2)``."""
    pad = torch.cat([x[:1].expand(n, -1), x, x[-1:].expand(n, -1)])  # (F + 2n, D)
    num = sum(k * (pad[n + k : n + k + x.shape[0]] - pad[n - k : n - k + x.shape[0]]) for k in range(1, n + 1))
    return num / (2 * sum(k * k for k in range(1, n + 1)))


def mfcc_features(wav: torch.Tensor) -> torch.Tensor:
    """39-dim MFCC frames of one waveform, as for HuBERT's first-iteration targets (sec. IV-C).

    lhotse's Kaldi-compatible MFCC (13 cepstra with C0, no energy, 23 mel bins from 20 Hz to 7.6 kHz -- fairseq's
    ``torchaudio.compliance.kaldi.mfcc`` goes up to 8 kHz --, Povey window, pre-emphasis 0.97, lifter 22, no
    dither) with ``snip_edges=True``: frame j covers samples ``[160 j, 160 j + 400)``, and there are
    ``1 + (S - 400) // 160`` frames. Deltas and delta-deltas as ``torchaudio.functional.compute_deltas`` (window 5,
    edges replicated), as fairseq's ``dump_mfcc_feature.py``.

    Args:
        wav: ``(S,)`` float waveform at 16 kHz.

    Returns:
        ``(F, 39)`` float32 frames at 100 Hz: ``[mfcc, delta, delta-delta]``.

    Raises:
        ValueError: ``wav`` not 1-D, or shorter than one MFCC window (400 samples = 25 ms).
    """
    if wav.dim() != 1:
        raise ValueError(f"wav must be (S,) samples, got shape {tuple(wav.shape)}")
    if wav.shape[0] < MFCC_WINDOW:
        raise ValueError(f"waveform of {wav.shape[0]} samples is shorter than one MFCC window ({MFCC_WINDOW} samples)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        mfcc = _mfcc_extractor().extract(wav.detach().to(torch.float32).cpu().numpy(), SAMPLE_RATE)
    mfcc = torch.from_numpy(np.asarray(mfcc, dtype=np.float32))  # (F, 13)
    d1 = _deltas(mfcc)
    return torch.cat([mfcc, d1, _deltas(d1)], dim=1)


def label_frame_index(
    num_frames: int, num_mfcc_frames: int, conv_kernel: Sequence[int], conv_stride: Sequence[int]
) -> torch.Tensor:
    """For each model frame, the 100 Hz MFCC frame whose label it gets.

    Model frame t (CNN without padding) sees samples ``[t * P, t * P + R)`` with ``P = prod(conv_stride)`` and
    ``R`` the receptive field; MFCC frame j (``snip_edges=True``) sees ``[160 j, 160 j + 400)``. Frame t gets the MFCC
    frame with the nearest centre, ``j = round((t P + (R - 400) / 2) / 160)`` (halves rounded up), clamped to
    ``[0, num_mfcc_frames - 1]``. For HuBERT's CNN (P = 320, R = 400) this is exactly ``j = 2 t`` -- fairseq's
    downsampling of 100 Hz labels to the 50 Hz model (every second label) -- and never clamps, since
    ``2 (T - 1) <= F - 1``; the clamp only matters for other CNNs (e.g. the tiny test models, R < 400).

    Args:
        num_frames: T, the model's frame count for the utterance (``_get_feat_extract_output_lengths``).
        num_mfcc_frames: F >= 1, the utterance's MFCC frames.
        conv_kernel, conv_stride: the CNN's kernels and strides in samples.

    Returns:
        ``(T,)`` int64 MFCC frame indices.

    Raises:
        ValueError: ``num_mfcc_frames < 1`` or ``num_frames < 0``.
    """
    if num_mfcc_frames < 1 or num_frames < 0:
        raise ValueError(f"need num_mfcc_frames >= 1 and num_frames >= 0, got {num_mfcc_frames}, {num_frames}")
    p = _samples_per_frame(conv_stride)
    r = _receptive_field(conv_kernel, conv_stride)
    t = torch.arange(num_frames, dtype=torch.long)
    j = torch.div(2 * p * t + (r - MFCC_WINDOW) + MFCC_SHIFT, 2 * MFCC_SHIFT, rounding_mode="floor")
    return j.clamp_(0, num_mfcc_frames - 1)


class MfccTargets(NamedTuple):
    """What :func:`mfcc_targets` returns.

    Attributes:
        labels: utterance id -> ``(T,)`` cluster ids, one per model frame (T = the model's frame count of the
            whole utterance, 50 Hz for HuBERT's CNN); ``uint8`` for <= 256 clusters, else ``int16``.
        centroids: ``(K, 39)`` float32 k-means centroids in MFCC space (pass them back to label other data alike).
    """

    labels: dict[str, torch.Tensor]
    centroids: torch.Tensor


def _frames(config, num_samples: int) -> int:
    """Model frames of ``num_samples`` samples (the CNN formula of ``_get_feat_extract_output_lengths``)."""
    n = int(num_samples)
    for k, s in zip(config.conv_kernel, config.conv_stride):
        n = (n - int(k)) // int(s) + 1
    return n


def mfcc_targets(
    data: AudioData,
    config,
    num_clusters: int = 100,
    kmeans_iters: int = 30,
    max_kmeans_frames: Optional[int] = 500_000,
    seed: int = 0,
    centroids: Optional[torch.Tensor] = None,
    progress: bool = False,
) -> MfccTargets:
    """HuBERT first-iteration targets: k-means cluster ids of 39-dim MFCC frames, one per model frame.

    1. :func:`mfcc_features` of every utterance (100 Hz, 39 dims; not normalised, as fairseq).
    2. k-means with ``num_clusters`` clusters (HuBERT: 100) of all MFCC frames, or of a random subset of
       ``max_kmeans_frames`` of them: k-means++ seeding on at most 50,000 frames, then ``kmeans_iters`` Lloyd
       iterations (:mod:`speechkd.mvq.quantizer`'s ``_kmeans``; fairseq uses scikit-learn's MiniBatchKMeans), with
       a generator seeded by ``seed`` -- skipped when ``centroids`` are given.
    3. each model frame t gets the cluster of MFCC frame :func:`label_frame_index` (``2 t`` for HuBERT's CNN).

    The labels cover the whole utterance (T frames for its S samples); a training crop starting at a multiple of
    ``prod(conv_stride)`` samples uses the slice of labels of its frames (the CNN has no padding).

    Args:
        data: utterances, cuts or id -> 16 kHz waveform (see :func:`iter_waveforms`: read one at a time; the MFCC of
            every utterance, 56 MB per hour, are held for the k-means).
        config: the model's config (anything with ``conv_kernel`` and ``conv_stride``, e.g. a ``HubertConfig``).
        num_clusters: K (<= 32767).
        kmeans_iters: Lloyd iterations (>= 0).
        max_kmeans_frames: frames the k-means is fitted on at most (None: all).
        seed: seeds the k-means (same data and seed: same centroids).
        centroids: ``(K, 39)`` centroids to assign to instead of fitting (``num_clusters`` is then ignored).
        progress: show a progress bar over utterances.

    Returns:
        :class:`MfccTargets` (labels by utterance id, centroids).

    Raises:
        ValueError: an utterance shorter than one MFCC window (400 samples) or than the CNN's receptive field;
            fewer MFCC frames than clusters; ``num_clusters`` outside ``[1, 32767]``; ``centroids`` not ``(K, 39)``;
            or as :func:`load_waveforms`.
    """
    if centroids is None:
        centroids = mfcc_centroids(data, config, num_clusters, kmeans_iters, max_kmeans_frames, seed, progress)
    labels = dict(assign_mfcc_targets(data, config, centroids, progress=progress))
    return MfccTargets(labels=labels, centroids=torch.as_tensor(centroids, dtype=torch.float32))


def _utterance_mfcc(uid: str, wav: torch.Tensor, config) -> torch.Tensor:
    """:func:`mfcc_features` of one utterance, checked against the CNN's receptive field (errors name it)."""
    if _frames(config, wav.shape[0]) < 1:
        raise ValueError(f"utterance {uid!r} ({wav.shape[0]} samples) is shorter than the CNN's receptive field")
    try:
        return mfcc_features(wav)
    except ValueError as e:
        raise ValueError(f"utterance {uid!r}: {e}") from None


def mfcc_centroids(data: AudioData, config, num_clusters: int = 100, kmeans_iters: int = 30,
                   max_kmeans_frames: Optional[int] = 500_000, seed: int = 0, progress: bool = False) -> torch.Tensor:
    """The k-means centroids of :func:`mfcc_targets` (step 2), reading the audio one utterance at a time.

    The frames clustered are every MFCC frame of ``data`` in order, or, when there are more than
    ``max_kmeans_frames``, the frames ``torch.randperm(total, generator)[:max_kmeans_frames]`` of their
    concatenation (generator seeded by ``seed``), gathered by a second pass that computes the MFCC only of the
    utterances holding one: only the clustered frames are held in memory.

    Returns:
        ``(K, 39)`` float32 centroids.

    Raises:
        ValueError: as :func:`mfcc_targets`.
    """
    if not 1 <= int(num_clusters) <= _MAX_CLUSTERS:
        raise ValueError(f"num_clusters must be in [1, {_MAX_CLUSTERS}], got {num_clusters}")
    if kmeans_iters < 0:
        raise ValueError(f"kmeans_iters must be >= 0, got {kmeans_iters}")
    from tqdm.auto import tqdm

    counts = []  # MFCC frames per utterance (pass 1)
    everything = []
    for uid, wav in tqdm(iter_waveforms(data), desc="MFCC (count)", unit="utt", disable=not progress):
        feat = _utterance_mfcc(uid, wav, config)
        counts.append(feat.shape[0])
        if everything is not None:  # held only while they may all be clustered
            everything.append(feat)
            if max_kmeans_frames is not None and sum(counts) > max_kmeans_frames:
                everything = None
    total = sum(counts)
    if total < num_clusters:
        raise ValueError(f"{total} MFCC frames cannot make {num_clusters} clusters")
    gen = torch.Generator().manual_seed(int(seed))
    if max_kmeans_frames is None or total <= max_kmeans_frames:
        frames = torch.cat(everything)  # (total, 39)
    else:
        wanted = torch.randperm(total, generator=gen)[: int(max_kmeans_frames)]  # (M,) rows of the concatenation
        order = torch.argsort(wanted)
        sorted_rows = wanted[order]
        starts = np.cumsum([0] + counts)
        frames = torch.empty(len(wanted), MFCC_DIM)
        pos = 0
        for k, (uid, wav) in enumerate(tqdm(iter_waveforms(data), desc="MFCC (sample)", unit="utt",
                                            disable=not progress)):
            end = pos + int(np.searchsorted(sorted_rows[pos:].numpy(), starts[k + 1]))
            if end > pos:
                feat = _utterance_mfcc(uid, wav, config)
                frames[order[pos:end]] = feat[sorted_rows[pos:end] - int(starts[k])]
                pos = end
    centroids, _ = _kmeans(frames, int(num_clusters), int(kmeans_iters), gen, seed_rows=50_000)
    return torch.as_tensor(centroids, dtype=torch.float32)


def assign_mfcc_targets(data: AudioData, config, centroids: torch.Tensor, progress: bool = False
                        ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(utterance id, (T,) cluster ids)`` for every utterance of ``data``, one at a time (:func:`mfcc_targets`
    step 3): the nearest centroid of MFCC frame :func:`label_frame_index` of each of the T model frames; ``uint8``
    for <= 256 clusters, else ``int16``. Each utterance's ids depend on it alone (any sharding gives the same).

    Raises:
        ValueError: ``centroids`` not ``(K, 39)``; as :func:`mfcc_targets`.
    """
    from tqdm.auto import tqdm

    centroids = torch.as_tensor(centroids, dtype=torch.float32)
    if centroids.dim() != 2 or centroids.shape[1] != MFCC_DIM or not 1 <= centroids.shape[0] <= _MAX_CLUSTERS:
        raise ValueError(
            f"centroids must be (K, {MFCC_DIM}) with 1 <= K <= {_MAX_CLUSTERS}, got {tuple(centroids.shape)}"
        )
    dtype = torch.uint8 if centroids.shape[0] <= 256 else torch.int16
    cb_sq = (centroids * centroids).sum(1)
    for uid, wav in tqdm(iter_waveforms(data), desc="MFCC targets", unit="utt", disable=not progress):
        feat = _utterance_mfcc(uid, wav, config)
        index = label_frame_index(_frames(config, wav.shape[0]), feat.shape[0], config.conv_kernel,
                                  config.conv_stride)
        ids, _ = _assign(feat[index], centroids, cb_sq)
        yield uid, ids.to(dtype)


# ------------------------------------------------------------------------------------------------ the model
class HubertPretrainer(nn.Module):
    """``HubertModel`` plus HuBERT's masked-prediction head and loss (Hsu et al. 2021, sec. II; fairseq ``hubert``).

    Forward: CNN features -> feature projection -> span masking (masked frames replaced by the model's
    ``masked_spec_embed``, ``transformers``' own masking, by passing ``mask_time_indices``) -> transformer -> last
    hidden state ``o_t`` -> ``final_proj`` (Linear(C, final_dim)) -> logits
    ``cos(final_proj(o_t), e_k) / logit_temp`` over the K cluster embeddings ``e_k`` (``label_embs``, initialised
    uniform in [0, 1) as fairseq's ``label_embs_concat``). Loss: cross-entropy of the target cluster ids averaged
    over the masked valid frames only (the paper's alpha = 1; fairseq ``pred_masked_weight=1``,
    ``pred_nomask_weight=0``). The CNN's gradient is scaled by ``feature_grad_mult`` (fairseq: 0.1).

    Masks (:meth:`sample_mask`): ``transformers``' ``_compute_mask_indices`` (fairseq's ``compute_mask_indices``):
    per utterance ``int(mask_prob * T_valid / mask_length + u)`` span starts (u ~ U[0, 1), at least ``min_masks``)
    drawn without replacement among valid frames, each masking ``mask_length`` frames; HuBERT: ``mask_prob = 0.8``,
    ``mask_length = 10`` (about half of the frames end up masked, as spans overlap).

    Args:
        config: ``HubertConfig`` (see :func:`hubert_config`); needs ``mask_time_prob > 0`` or
            ``mask_feature_prob > 0`` (so the model has ``masked_spec_embed``) and ``apply_spec_augment``.
        num_clusters: K target clusters.
        final_dim: width of the projection and the cluster embeddings (fairseq Base: 256).
        logit_temp: cosine temperature (0.1).
        mask_prob, mask_length, min_masks: span masking, as above.
        feature_grad_mult: gradient scale into the CNN (0: frozen CNN output, 1: unscaled).

    Shapes:
        ``forward(wavs: (N, S) float 16 kHz, lens: (N,) int samples, targets: (N, T) int, mask: (N, T) bool)``
        -> ``(loss: scalar, logs: dict of detached scalars)``; ``logits(...) -> ((N, T, K), (N,) frames)``.

    Raises:
        ValueError: a config whose model would have no ``masked_spec_embed`` or ignores ``mask_time_indices``
            (``apply_spec_augment=False``), ``num_clusters < 1``, ``final_dim < 1``, ``logit_temp <= 0``,
            ``mask_prob`` outside [0, 1], ``mask_length < 1``, ``feature_grad_mult < 0``.
    """

    def __init__(
        self,
        config,
        num_clusters: int = 100,
        final_dim: int = 256,
        logit_temp: float = 0.1,
        mask_prob: float = 0.8,
        mask_length: int = 10,
        min_masks: int = 2,
        feature_grad_mult: float = 0.1,
    ):
        super().__init__()
        import transformers

        if not (config.mask_time_prob > 0 or config.mask_feature_prob > 0):
            raise ValueError("config.mask_time_prob or mask_feature_prob must be > 0, else HubertModel has no "
                             "masked_spec_embed to mask with")
        if not getattr(config, "apply_spec_augment", True):
            raise ValueError("config.apply_spec_augment=False makes HubertModel ignore mask_time_indices")
        if num_clusters < 1 or final_dim < 1 or logit_temp <= 0 or mask_length < 1 or feature_grad_mult < 0:
            raise ValueError(f"bad settings: num_clusters={num_clusters}, final_dim={final_dim}, logit_temp="
                             f"{logit_temp}, mask_length={mask_length}, feature_grad_mult={feature_grad_mult}")
        if not 0.0 <= mask_prob <= 1.0:
            raise ValueError(f"mask_prob must be in [0, 1], got {mask_prob}")
        self.model = transformers.HubertModel(config)
        self.num_clusters, self.final_dim, self.logit_temp = int(num_clusters), int(final_dim), float(logit_temp)
        self.mask_prob, self.mask_length, self.min_masks = float(mask_prob), int(mask_length), int(min_masks)
        self.feature_grad_mult = float(feature_grad_mult)
        self.final_proj = nn.Linear(config.hidden_size, self.final_dim)
        self.label_embs = nn.Parameter(torch.empty(self.num_clusters, self.final_dim).uniform_())
        self.model.feature_extractor.register_forward_hook(self._scale_feature_grad)

    def _scale_feature_grad(self, module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        """Forward hook on the CNN: its ``(N, C_cnn, T)`` output with the gradient scaled (fairseq GradMultiply)."""
        if self.feature_grad_mult == 1.0 or not output.requires_grad:
            return output
        if self.feature_grad_mult == 0.0:
            return output.detach()
        return _GradScale.apply(output, self.feature_grad_mult)

    @property
    def config(self):
        """The ``HubertConfig`` of :attr:`model`."""
        return self.model.config

    @property
    def samples_per_frame(self) -> int:
        """Frame shift in samples, ``prod(conv_stride)`` (320 = 20 ms for HuBERT's CNN)."""
        return _samples_per_frame(self.config.conv_stride)

    @property
    def min_samples(self) -> int:
        """Receptive field in samples: the shortest input with one frame (400 for HuBERT's CNN)."""
        return _receptive_field(self.config.conv_kernel, self.config.conv_stride)

    def settings(self) -> dict:
        """The head and masking settings (JSON-serialisable), as passed to the constructor."""
        return {
            "num_clusters": self.num_clusters,
            "final_dim": self.final_dim,
            "logit_temp": self.logit_temp,
            "mask_prob": self.mask_prob,
            "mask_length": self.mask_length,
            "min_masks": self.min_masks,
            "feature_grad_mult": self.feature_grad_mult,
        }

    def frame_lens(self, lens: torch.Tensor) -> torch.Tensor:
        """Valid frames ``(N,)`` int64 of ``lens: (N,)`` samples (``_get_feat_extract_output_lengths``)."""
        return self.model._get_feat_extract_output_lengths(lens.to(torch.long)).to(torch.long)

    def sample_mask(self, frame_lens: torch.Tensor, num_frames: Optional[int] = None, seed: Optional[int] = None
                    ) -> torch.Tensor:
        """Span mask over the frames (``transformers``' ``_compute_mask_indices``, see the class docstring).

        Args:
            frame_lens: ``(N,)`` valid frames per utterance.
            num_frames: T, the padded frame axis (default ``frame_lens.max()``).
            seed: seeds numpy's global generator for this call only (its state is restored afterwards), so a
                given seed gives a given mask; None draws from the current global state.

        Returns:
            ``(N, T)`` bool, True = masked; never True at or after ``frame_lens[n]``.

        Raises:
            ValueError: ``num_frames < mask_length`` (``_compute_mask_indices`` needs T >= mask_length).
        """
        from transformers.models.hubert.modeling_hubert import _compute_mask_indices

        frame_lens = frame_lens.detach().to("cpu", torch.long)
        t = int(frame_lens.max()) if num_frames is None else int(num_frames)
        if t < self.mask_length:
            raise ValueError(f"{t} frames are fewer than mask_length = {self.mask_length}")
        valid = torch.arange(t)[None, :] < frame_lens[:, None]  # (N, T)
        state = np.random.get_state() if seed is not None else None
        try:
            if seed is not None:
                np.random.seed(int(seed) % 2**32)
            mask = _compute_mask_indices((valid.shape[0], t), self.mask_prob, self.mask_length,
                                         attention_mask=valid.long(), min_masks=self.min_masks)
        finally:
            if state is not None:
                np.random.set_state(state)
        return torch.from_numpy(mask) & valid

    def _check(self, wavs: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
        if wavs.dim() != 2 or not wavs.is_floating_point():
            raise ValueError(f"wavs must be a float (N, S) tensor, got {tuple(wavs.shape)} {wavs.dtype}")
        if lens.shape != (wavs.shape[0],) or lens.is_floating_point():
            raise ValueError(
                f"lens must be (N,) = ({wavs.shape[0]},) integer samples, got {tuple(lens.shape)} {lens.dtype}"
            )
        lens = lens.to(wavs.device, torch.long)
        if int(lens.max()) > wavs.shape[1] or int(lens.min()) < self.min_samples:
            raise ValueError(f"lens must lie in [{self.min_samples}, S = {wavs.shape[1]}] samples, got "
                             f"[{int(lens.min())}, {int(lens.max())}]")
        return lens

    def logits(self, wavs: torch.Tensor, lens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cluster logits of every frame, with the CNN features at ``mask`` replaced by ``masked_spec_embed``.

        Args:
            wavs: ``(N, S)`` float 16 kHz waveforms, right-padded (padding goes to the transformer as an attention
                mask; with a GroupNorm CNN padding still changes the CNN output, so the training loop avoids it).
            lens: ``(N,)`` valid samples.
            mask: ``(N, T)`` bool frames to mask, T = frames of S samples.

        Returns:
            ``(logits (N, T, K) = cos / logit_temp, frame_lens (N,))``.

        Raises:
            ValueError: bad shapes, ``lens`` outside ``[min_samples, S]``, a mask not ``(N, T)``.
        """
        lens = self._check(wavs, lens)
        t = _frames(self.config, wavs.shape[1])
        if mask.shape != (wavs.shape[0], t) or mask.dtype != torch.bool:
            raise ValueError(f"mask must be (N, T) = ({wavs.shape[0]}, {t}) bool, got {tuple(mask.shape)} {mask.dtype}")
        attention = None
        if int(lens.min()) < wavs.shape[1]:
            attention = (torch.arange(wavs.shape[1], device=wavs.device)[None, :] < lens[:, None]).long()
        out = self.model(wavs, attention_mask=attention, mask_time_indices=mask.to(wavs.device), return_dict=True)
        proj = F.normalize(self.final_proj(out.last_hidden_state), dim=-1)  # (N, T, D)
        logits = proj @ F.normalize(self.label_embs, dim=-1).t() / self.logit_temp  # (N, T, K)
        return logits, self.frame_lens(lens)

    def forward(
        self,
        wavs: torch.Tensor,
        lens: torch.Tensor,
        targets: torch.Tensor,
        mask: Optional[torch.Tensor] = None,
        seed: Optional[int] = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Masked-prediction loss of a batch (HuBERT eq. 2-3 with alpha = 1).

        Args:
            wavs: ``(N, S)`` float 16 kHz waveforms, right-padded.
            lens: ``(N,)`` valid samples.
            targets: ``(N, T)`` integer cluster ids in ``[0, K)`` per model frame (values at padded frames ignored).
            mask: ``(N, T)`` bool frames to mask and predict (default :meth:`sample_mask` with ``seed``).
            seed: see :meth:`sample_mask` (only used when ``mask`` is None).

        Returns:
            ``(loss, logs)``: the mean cross-entropy (nats) over masked valid frames (0, with a gradient, when no frame
            is masked), and detached scalars ``loss``, ``acc_m`` / ``acc_u`` (accuracy on masked / unmasked valid
            frames), ``mask_frac`` (share of valid frames masked), ``frames`` (valid frames).

        Raises:
            ValueError: ``targets`` not ``(N, T)``, or a target id outside ``[0, K)`` at a valid frame; or as
                :meth:`logits`.
        """
        lens = self._check(wavs, lens)
        frame_lens = self.frame_lens(lens)
        t = _frames(self.config, wavs.shape[1])
        if mask is None:
            mask = self.sample_mask(frame_lens, t, seed=seed)
        if targets.shape != (wavs.shape[0], t) or targets.is_floating_point():
            raise ValueError(f"targets must be (N, T) = ({wavs.shape[0]}, {t}) integer ids, got "
                             f"{tuple(targets.shape)} {targets.dtype}")
        logits, frame_lens = self.logits(wavs, lens, mask)
        valid = torch.arange(t, device=logits.device)[None, :] < frame_lens[:, None]  # (N, T)
        targets = targets.to(logits.device, torch.long)
        if bool(((targets < 0) | (targets >= self.num_clusters))[valid].any()):
            raise ValueError(f"target ids must lie in [0, {self.num_clusters}) at valid frames")
        mask = mask.to(logits.device) & valid
        unmasked = valid & ~mask
        n_masked = int(mask.sum())
        if n_masked:
            loss = F.cross_entropy(logits[mask], targets[mask])
        else:
            loss = logits.sum() * 0.0
        with torch.no_grad():
            correct = logits.argmax(-1) == targets
            logs = {
                "loss": loss.detach(),
                "acc_m": correct[mask].float().mean() if n_masked else logits.new_zeros(()),
                "acc_u": correct[unmasked].float().mean() if bool(unmasked.any()) else logits.new_zeros(()),
                "mask_frac": mask.sum() / valid.sum().clamp_min(1),
                "frames": valid.sum(),
            }
        return loss, logs

    def save_pretrained(self, out_dir: PathLike, extra: Optional[dict] = None) -> Path:
        """Export the encoder as a Hugging Face HuBERT directory, atomically (temporary directory, then rename).

        Writes ``config.json`` (``model_type: hubert``) + ``model.safetensors`` (``HubertModel.save_pretrained``;
        loadable by :func:`speechkd.teachers.hf.load_ssl_model` / ``load_ssl_teacher``), ``preprocessor_config.json``
        (``do_normalize: false``, as HuBERT Base) and :data:`SUMMARY_FILE` (the head settings plus ``extra``). The
        pre-training head itself is not exported (it is in the training checkpoint).

        Args:
            out_dir: the directory; an existing one is replaced only if it is empty or holds :data:`SUMMARY_FILE`
                (an earlier export).
            extra: more JSON-serialisable entries for :data:`SUMMARY_FILE`.

        Returns:
            ``out_dir``.

        Raises:
            FileExistsError: ``out_dir`` exists, is not empty and is not an earlier export (it is left untouched).
        """
        out_dir = Path(out_dir)
        if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir())
                                                             and not (out_dir / SUMMARY_FILE).is_file())):
            raise FileExistsError(f"{out_dir} exists and is not an earlier HuBERT export: not overwriting it")
        with atomic_dir(out_dir) as tmp:
            self.model.save_pretrained(tmp)
            write_preprocessor_config(tmp, normalize=False)
            summary = {"method": "HuBERT iteration 1 (MFCC k-means targets), arXiv 2106.07447", **self.settings(),
                       **(extra or {})}
            (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        return out_dir


# ------------------------------------------------------------------------------------------------ training
class PretrainResult(NamedTuple):
    """What :func:`pretrain_hubert` returns.

    Attributes:
        model_dir: the exported Hugging Face directory.
        pretrainer: the trained :class:`HubertPretrainer`, in eval mode.
        step: optimizer steps done in total (over all resumed runs).
        history: one dict per logged step: ``step``, ``lr``, ``loss``, ``acc_m``, ``acc_u``, ``mask_frac``, ``frames``.
        resumed_from: the checkpoint's step this run started from (0 for a fresh run).
    """

    model_dir: Path
    pretrainer: HubertPretrainer
    step: int
    history: list[dict]
    resumed_from: int


#: Cut custom fields of a training window: the utterance whose targets it reads, and its first sample in it.
SOURCE_KEY, OFFSET_KEY = "hubert_source", "hubert_offset"


def training_windows(cuts, window_samples: int, min_samples: int):
    """Every cut cut into consecutive windows of ``window_samples`` samples (the last one shorter), keeping the
    windows of at least ``min_samples``: the units lhotse's sampler batches. Each window records its utterance and
    its first sample in it (``custom[SOURCE_KEY]``, ``custom[OFFSET_KEY]``), so it reads that utterance's targets.

    Args:
        cuts: lhotse cuts at 16 kHz (resampled ones are fine).
        window_samples: window length, a multiple of the model's samples per frame (so windows start on frames).
        min_samples: shortest window kept (the receptive field plus ``mask_length - 1`` frames).

    Returns:
        an eager ``CutSet`` of the windows, in order.
    """
    from lhotse import CutSet

    out = []
    for cut in cuts:
        n = cut.num_samples if cut.sampling_rate == SAMPLE_RATE else int(round(cut.duration * SAMPLE_RATE))
        for k, start in enumerate(range(0, n, window_samples)):
            length = min(window_samples, n - start)
            if length < min_samples:
                continue
            w = cut.truncate(offset=start / SAMPLE_RATE, duration=length / SAMPLE_RATE, preserve_id=False)
            w = w.with_id(f"{cut.id}_w{k}")
            w.custom = {**(w.custom or {}), SOURCE_KEY: cut.id, OFFSET_KEY: start}
            out.append(w)
    return CutSet.from_cuts(out)


class CropDataset(torch.utils.data.Dataset):
    """Collates a batch of training windows for :class:`HubertPretrainer`: every window cropped to the batch's
    shortest (no padding: a GroupNorm CNN is not padding-invariant; fairseq ``pad_audio=False``) at a random offset
    that is a multiple of the samples per frame, so the crop's frames are frames of the whole utterance and take
    their targets.

    The offsets are drawn from a generator seeded by ``seed`` and the batch's window ids (the same batch always gets
    the same crops, in any worker and on resume).

    Args:
        targets: utterance id -> ``(T,)`` cluster ids of the whole utterance (:func:`mfcc_targets`).
        config: the model config (CNN kernels and strides).
        seed: crop seed.

    Returns (``__getitem__``): ``wavs (N, C)`` float32, ``lens (N,)`` (all C samples), ``targets (N, T)`` int64,
    ``cut_ids``.
    """

    def __init__(self, targets: Mapping[str, torch.Tensor], config, seed: int):
        self.targets, self.config, self.seed = targets, config, int(seed)
        self.spf = _samples_per_frame(config.conv_stride)

    def __getitem__(self, cuts) -> dict:
        import zlib

        cuts = list(cuts)
        wavs = []
        for c in cuts:
            audio = (c if c.sampling_rate == SAMPLE_RATE else c.resample(SAMPLE_RATE)).load_audio()  # (1, S)
            if audio.ndim != 2 or audio.shape[0] != 1:
                raise ValueError(f"cut {c.id!r} has audio of shape {audio.shape}; mono audio is expected")
            wavs.append(torch.from_numpy(np.ascontiguousarray(audio[0], dtype=np.float32)))
        crop = min(w.shape[0] for w in wavs)
        num_frames = _frames(self.config, crop)
        key = zlib.crc32("\n".join(c.id for c in cuts).encode())
        rng = np.random.default_rng([self.seed, key])
        xs, ys = [], []
        for c, w in zip(cuts, wavs):
            shift = int(rng.integers(0, (w.shape[0] - crop) // self.spf + 1)) * self.spf
            xs.append(w[shift:shift + crop])
            first = (int(c.custom[OFFSET_KEY]) + shift) // self.spf
            y = self.targets[c.custom[SOURCE_KEY]][first:first + num_frames].long()
            if y.shape[0] != num_frames:
                raise ValueError(f"window {c.id!r}: {y.shape[0]} target frames, {num_frames} model frames")
            ys.append(y)
        return {"wavs": torch.stack(xs), "lens": torch.full((len(cuts),), crop, dtype=torch.long),
                "targets": torch.stack(ys), "cut_ids": [c.id for c in cuts]}


def _data_fingerprint(ids: list[str], labels: list[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for uid, lab in zip(ids, labels):
        h.update(f"{uid}\t{lab.shape[0]}\n".encode())
        h.update(lab.to("cpu", torch.int16).numpy().tobytes())
    return h.hexdigest()[:16]


def pretrain_hubert(
    data,
    out_dir: PathLike,
    steps: Optional[int] = None,
    epochs: Optional[int] = None,
    config=None,
    hidden_size: int = 256,
    num_layers: int = 6,
    num_heads: int = 4,
    conv_dim: Union[int, Sequence[int]] = 256,
    num_clusters: int = 100,
    final_dim: int = 256,
    mask_prob: float = 0.8,
    mask_length: int = 10,
    lr: float = 5e-4,
    warmup_steps: Optional[int] = None,
    weight_decay: float = 0.01,
    grad_clip: float = 10.0,
    max_samples: int = 15 * SAMPLE_RATE,
    max_batch_samples: int = 64 * SAMPLE_RATE,
    seed: int = 0,
    ckpt_every: int = 500,
    log_every: int = 10,
    kmeans_iters: int = 30,
    max_kmeans_frames: Optional[int] = 500_000,
    num_threads: Optional[int] = None,
    progress: bool = True,
    callback: Optional[Callable[[int, dict], None]] = None,
    runtime=None,
    targets: Optional[MfccTargets] = None,
) -> PretrainResult:
    """Pre-train a HuBERT teacher from scratch (first iteration, MFCC k-means targets) with Lightning and export it.

    Steps: targets (:func:`mfcc_targets`, the waveforms read one at a time; the centroids are stored in
    ``<out_dir>.fit/centroids.safetensors`` and reused on resume), training windows (:func:`training_windows`:
    utterances cut into windows of ``max_samples``), :class:`HubertPretrainer` on ``config`` (default
    :func:`hubert_config` with the given sizes), a step-based Lightning fit (:func:`speechkd.training.fit_steps`: lhotse's
    bucketing sampler over the windows, ``max_batch_samples`` of audio per batch and process, :class:`CropDataset`
    in a DataLoader worker), export with :meth:`HubertPretrainer.save_pretrained` (rank 0).

    Optimisation (fairseq ``hubert_base_librispeech``): AdamW (betas 0.9, 0.98, eps 1e-6, ``weight_decay``), learning
    rate linearly warmed up over ``warmup_steps`` (default 8% of the steps) then linearly decayed to 0, gradient norm
    clipped to ``grad_clip``. Every step seeds torch from (seed, step, rank) (dropout, LayerDrop, the span mask's
    seed); crops are seeded by the batch.

    Resume: ``<out_dir>.fit/ckpt/last.ckpt`` (Lightning, every ``ckpt_every`` steps); a later call resumes from it
    exactly (a larger ``steps`` continues training). A checkpoint made with other settings is refused.

    Args:
        data: utterances (e.g. ``read_split(...)``) or lhotse cuts (ids unique; 16 kHz after resampling).
        out_dir: the exported directory (see :meth:`HubertPretrainer.save_pretrained`).
        steps: optimizer steps in total; or ``epochs``: passes over the windows (exactly one of them).
        config: a ``HubertConfig`` (then the size arguments are ignored).
        hidden_size, num_layers, num_heads, conv_dim: sizes for :func:`hubert_config`.
        num_clusters: k-means clusters K (HuBERT: 100).
        final_dim, mask_prob, mask_length: as for :class:`HubertPretrainer`.
        lr, warmup_steps, weight_decay, grad_clip: optimisation, as above.
        max_samples: window (and so crop) length in samples at most (default 15 s), rounded down to whole frames.
        max_batch_samples: samples of audio per batch and process (default 64 s).
        seed: seeds the weights, k-means, batches, crops, masks and dropout.
        ckpt_every: steps between checkpoints (>= 1).
        log_every: steps between entries of the history.
        kmeans_iters, max_kmeans_frames: as for :func:`mfcc_targets`.
        num_threads: torch threads (``set_thread_policy``; None keeps torch's setting).
        progress: show progress bars.
        callback: called as ``callback(step, logs)`` after every step (e.g. to watch or stop a run by raising).
        runtime: a :class:`speechkd.config.RuntimeConfig` (devices, precision; default one CPU/GPU process).
        targets: precomputed :class:`MfccTargets` of ``data`` (e.g. the SSL pipeline's sharded ``hubert-targets``
            stage); then nothing is computed and ``kmeans_iters`` / ``max_kmeans_frames`` only enter the fingerprint.

    Returns:
        :class:`PretrainResult`.

    Raises:
        ValueError: not exactly one of ``steps`` / ``epochs``, or < 1; a mapping of waveforms as ``data``; no
            utterance long enough; stored centroids of another cluster count, or a checkpoint made with other
            settings; or as :func:`mfcc_targets` and :class:`HubertPretrainer`.
        FileExistsError: as :meth:`HubertPretrainer.save_pretrained`.
    """
    from safetensors.torch import load_file, save_file

    from speechkd.distributed import barrier, is_main
    from speechkd.training import count_batches, fit_steps

    if (steps is None) == (epochs is None):
        raise ValueError("give exactly one of steps and epochs")
    if (steps is not None and steps < 1) or (epochs is not None and epochs < 1) or ckpt_every < 1 or log_every < 1:
        raise ValueError(f"steps, epochs, ckpt_every and log_every must be >= 1 (got {steps}, {epochs}, "
                         f"{ckpt_every}, {log_every})")
    if isinstance(data, Mapping):
        raise ValueError("pretrain_hubert reads audio through lhotse: give utterances or cuts, not waveforms")
    set_thread_policy(num_threads)
    out_dir = Path(out_dir)
    run_dir = out_dir.with_name(out_dir.name + ".fit")
    if config is None:
        config = hubert_config(hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads, conv_dim=conv_dim)
    config = copy.deepcopy(config)  # the caller's is never changed (save_pretrained sets e.g. `architectures`)
    config_json = json.loads(config.to_json_string())
    for key in ("transformers_version", "dtype", "torch_dtype", "architectures"):
        config_json.pop(key, None)
    data = list(data)
    if data and all(isinstance(u, Utterance) for u in data):
        data = list(utterances_to_cuts(data, SAMPLE_RATE))

    centroids_path = run_dir / "centroids.safetensors"
    stored = load_file(str(centroids_path))["centroids"] if centroids_path.is_file() else None
    if targets is not None:
        stored = targets.centroids if stored is None else stored
    if stored is not None and stored.shape[0] != num_clusters:
        raise ValueError(f"{centroids_path} was made with {stored.shape[0]} clusters, not num_clusters="
                         f"{num_clusters}: delete {run_dir} to start over")
    if targets is None:
        targets = mfcc_targets(data, config, num_clusters=num_clusters, kmeans_iters=kmeans_iters,
                               max_kmeans_frames=max_kmeans_frames, seed=seed, centroids=stored, progress=progress)
    if not centroids_path.is_file() and is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(centroids_path) as tmp:
            save_file({"centroids": targets.centroids.contiguous()}, str(tmp))
    barrier()

    torch.manual_seed(seed)
    pretrainer = HubertPretrainer(config, num_clusters=int(num_clusters), final_dim=final_dim,
                                  mask_prob=mask_prob, mask_length=mask_length)
    spf = pretrainer.samples_per_frame
    min_samples = _receptive_field(config.conv_kernel, config.conv_stride) + (mask_length - 1) * spf
    window = max(int(max_samples), min_samples) // spf * spf  # whole frames, at least mask_length of them
    windows = training_windows(data, window, min_samples)
    if not len(windows):
        raise ValueError(f"no utterance has the {mask_length} frames (mask_length) a training crop needs")
    ids = sorted(targets.labels)
    fingerprint = {
        "config": config_json, "head": pretrainer.settings(), "clusters": int(targets.centroids.shape[0]),
        "kmeans": {"iters": int(kmeans_iters), "max_frames": max_kmeans_frames}, "seed": int(seed),
        "max_samples": int(window), "max_batch_samples": int(max_batch_samples),
        "data": _data_fingerprint(ids, [targets.labels[u] for u in ids]), "windows": len(windows),
    }
    batch_seconds = max_batch_samples / SAMPLE_RATE
    if steps is None:
        from speechkd.data.datamodule import make_sampler

        world = 1 if runtime is None else runtime.world_size()
        steps = int(epochs) * count_batches(make_sampler(windows, batch_seconds, True, seed, world, 0))
    total = int(steps)
    warm = int(round(0.08 * total)) if warmup_steps is None else int(warmup_steps)

    def lr_factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (total - step) / max(1, total - warm))

    def loss_fn(batch):
        mask_seed = int(torch.randint(2**31 - 1, ()))  # torch is seeded per step by the fit
        loss, logs = pretrainer(batch["wavs"], batch["lens"], batch["targets"], seed=mask_seed)
        return loss, {k: float(v) for k, v in logs.items()}

    t0 = time.time()
    summary = fit_steps(
        run_dir, pretrainer, [{"params": list(pretrainer.parameters()), "lr": lr}], windows, loss_fn, steps=total,
        warmup_steps=warm, final_lr_ratio=0.0, weight_decay=weight_decay, grad_clip=grad_clip,
        batch_seconds=batch_seconds, seed=seed, ckpt_every=ckpt_every, fingerprint=fingerprint, progress=progress,
        desc="HuBERT pretrain", log_every=log_every, runtime=runtime, dataset=CropDataset(targets.labels, config, seed),
        lr_factor=lr_factor, optimizer_kwargs={"betas": (0.9, 0.98), "eps": 1e-6}, callback=callback,
    )
    extra = {
        "steps": summary.steps,
        "resumed_from": summary.resumed_from,
        "utterances": len(ids),
        "windows": len(windows),
        "hours": round(sum(c.duration for c in data) / 3600, 4),
        "targets": f"k-means of 39-dim MFCC (lhotse, snip_edges) at 100 Hz, {targets.centroids.shape[0]} clusters, "
                   "MFCC frame round((t P + (R - 400) / 2) / 160) for model frame t",
        "seed": int(seed),
        "lr": lr,
        "warmup_steps": warm,
        "max_samples": int(window),
        "max_batch_samples": int(max_batch_samples),
        "train_seconds_this_run": round(time.time() - t0, 1),
        "train_seconds": round(summary.seconds, 1),
        "train_cpu_seconds": round(summary.cpu_seconds, 1),
        "history": summary.history,
    }
    model_dir = out_dir
    if is_main():
        model_dir = pretrainer.save_pretrained(out_dir, extra=extra)
    barrier()
    return PretrainResult(model_dir=model_dir, pretrainer=pretrainer, step=summary.steps, history=summary.history,
                          resumed_from=summary.resumed_from)
