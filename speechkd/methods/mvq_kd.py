"""MVQ-KD: the student predicts the teacher's multi-codebook VQ indexes from a middle encoder layer.

Guo et al., "Predicting Multi-Codebook Vector Quantization Indexes for Knowledge Distillation", ICASSP 2023,
arXiv 2211.00508. Labels: ``codebook_indexes`` (uint8, ``(T_teacher, num_codebooks)`` per cut) written by
``speechkd quantize``; loss: per-codebook cross-entropy (sec. 2.3), scaled and added to the RNN-T loss.
Also here: the paper's comparison, L1/L2 regression to the stored float embeddings.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from speechkd.config import KDSettings

from speechkd.losses.distill import codebook_ce_loss, frame_regression_loss
from speechkd.methods import register
from speechkd.methods.base import KDMethod, align_teacher_frames, pick_layer

CI_KEY = "codebook_indexes"
EMB_KEY = "teacher_embeddings"


class FrameKDConfig(KDSettings):
    """Frame-level KD settings: ``mvq`` (predict the teacher's codebook indexes, Guo et al. 2023) or ``l1`` / ``l2``
    (regress the stored float embeddings: the paper's comparison).

    ``student_layer``: 1-based Conformer block whose output feeds the KD head (-1 = last).
    ``scale``: weight of the KD loss added to the student's own loss.
    ``frame_ratio_mode``: when the teacher has 2x the student's frame rate: ``concat`` successive frames' labels or
    ``truncate`` (keep every other).
    """

    method: Literal["mvq", "l1", "l2"] = "mvq"
    student_layer: int = -1
    scale: float = Field(1.0, ge=0)
    frame_ratio_mode: Literal["concat", "truncate"] = "concat"

    def check_recipe(self, recipe, run) -> None:
        """Raises ValueError: ``student_layer`` is not a block of the student (1..num_layers, or -1), naming the
        student run and its model's ``num_layers``."""
        n = recipe.student_model_of(run).num_layers
        if self.student_layer != -1 and not 1 <= self.student_layer <= n:
            raise ValueError(f"students['{run.name}'].kd.student_layer {self.student_layer}: the student has {n} "
                             f"Conformer blocks (student_model.num_layers): give 1..{n} or -1 (the last)")


class MvqKD(KDMethod):
    """Predict codebook indexes from the student's block ``layer`` through a linear head.

    Args:
      in_dim: the student layer's dim C.
      num_codebooks: teacher bytes per frame.
      layer: 1-based student block (-1 = last).
      frame_ratio: teacher frames per student frame (1 or 2).
      mode: ``concat`` (predict ``ratio * num_codebooks`` indexes per student frame) or ``truncate``.
      scale: weight of the loss.
      codebook_size: entries per codebook (256: one byte).

    ``forward(batch, encoder_out, encoder_out_lens, layer_outputs) -> (scale * CE, {"mvq_ce": CE})`` with the
    labels ``batch["labels"]["codebook_indexes"] = (indexes (N, T_t, num_codebooks), lens (N,))``. The head is
    applied to the valid student frames only (those within both the labels' and the encoder's lengths), so
    padding costs no logits.
    """

    label_keys = (CI_KEY,)

    def __init__(self, in_dim: int, num_codebooks: int, layer: int = -1, frame_ratio: int = 1, mode: str = "concat",
                 scale: float = 1.0, codebook_size: int = 256):
        super().__init__()
        self.layer, self.frame_ratio, self.mode, self.scale = layer, frame_ratio, mode, scale
        self.codebook_size = codebook_size
        self.num_out = num_codebooks * (frame_ratio if mode == "concat" else 1)
        self.head = nn.Linear(in_dim, self.num_out * codebook_size)

    def forward(self, batch, encoder_out, encoder_out_lens, layer_outputs, ctx=None):
        x = pick_layer(layer_outputs, self.layer)  # (N, T_s, C)
        indexes, lens = batch["labels"][CI_KEY]  # (N, T_t, num_codebooks)
        indexes, lens = align_teacher_frames(indexes, lens, x.shape[1], self.frame_ratio, self.mode)
        lens = torch.minimum(lens, encoder_out_lens)
        valid = torch.arange(x.shape[1], device=x.device)[None, :] < lens[:, None]  # (N, T_s)
        # the head runs on the valid frames only (M of N x T_s): padding costs no logits; the loss is the same
        frames = x[valid]  # (M, C)
        logits = self.head(frames).reshape(frames.shape[0], 1, self.num_out, self.codebook_size)  # (M, 1, K, 256)
        ce = codebook_ce_loss(logits, indexes[valid][:, None])  # indexes[valid]: (M, K)
        return self.scale * ce, {"mvq_ce": float(ce.detach())}


class RegressionKD(KDMethod):
    """L1 or L2 regression of the teacher's float embeddings from the student's block ``layer``.

    The paper's baseline (Guo et al. 2023, sec. 3): same head position as MVQ-KD, a linear head to the
    teacher dim, the labels stored as float32 (``teacher_embeddings``), hundreds of times more bytes.

    Args:
      in_dim: the student layer's dim C.
      teacher_dim: the teacher embedding dim D.
      kind: ``l1`` or ``l2``.
      layer, frame_ratio, mode, scale: as :class:`MvqKD`.
    """

    label_keys = (EMB_KEY,)

    def __init__(self, in_dim: int, teacher_dim: int, kind: str = "l1", layer: int = -1, frame_ratio: int = 1,
                 mode: str = "concat", scale: float = 1.0):
        super().__init__()
        self.kind, self.layer, self.frame_ratio, self.mode, self.scale = kind, layer, frame_ratio, mode, scale
        out = teacher_dim * (frame_ratio if mode == "concat" else 1)
        self.head = nn.Linear(in_dim, out)

    def forward(self, batch, encoder_out, encoder_out_lens, layer_outputs, ctx=None):
        x = pick_layer(layer_outputs, self.layer)  # (N, T_s, C)
        emb, lens = batch["labels"][EMB_KEY]  # (N, T_t, D)
        emb, lens = align_teacher_frames(emb.float(), lens, x.shape[1], self.frame_ratio, self.mode)
        lens = torch.minimum(lens, encoder_out_lens)
        loss = frame_regression_loss(self.head(x), emb, lens, self.kind)
        return self.scale * loss, {f"{self.kind}_loss": float(loss.detach())}


def build_mvq(exp, run, seed: int = 0):
    """MVQ-KD for a student run: the stored CI (``quantize`` stage), refused when written by another quantizer; the
    frame ratio from their frame shift (the teacher's own). Returns ``(MvqKD, CutSet with CI)``.

    Raises:
      ValueError: CI of another quantizer; a student frame shift that is not a whole multiple of the labels'.
    """
    from speechkd.data.datamodule import load_cuts
    from speechkd.labels.store import check_label_meta, label_frame_shift
    from speechkd.mvq.quantizer import Quantizer

    kd_cfg, s = run.kd, exp.recipe.student_model_of(run)
    quantizer = Quantizer.load(exp.quantizer_path)
    cuts = load_cuts(exp.ci_cuts_path)
    check_label_meta(cuts, CI_KEY, {"quantizer_id": quantizer.id})
    ratio = exp.teacher_frame_ratio(run, label_frame_shift(cuts, CI_KEY))
    kd = MvqKD(s.dim, quantizer.num_codebooks, layer=kd_cfg.student_layer, frame_ratio=ratio,
               mode=kd_cfg.frame_ratio_mode, scale=kd_cfg.scale)
    return kd, cuts


def build_regression(exp, run, seed: int = 0):
    """L1 / L2 regression of the stored float embeddings (``extract`` stage) for a student run. Returns
    ``(RegressionKD, CutSet with embeddings)``.

    Raises:
      ValueError: a student frame shift that is not a whole multiple of the labels'.
    """
    from speechkd.data.datamodule import load_cuts
    from speechkd.labels.store import label_frame_shift

    kd_cfg, s = run.kd, exp.recipe.student_model_of(run)
    cuts = load_cuts(exp.emb_cuts_path)
    ratio = exp.teacher_frame_ratio(run, label_frame_shift(cuts, EMB_KEY))
    teacher_dim = next(iter(cuts)).custom[EMB_KEY].shape[-1]  # the stored embeddings' width D
    kd = RegressionKD(s.dim, teacher_dim, kind=kd_cfg.method, layer=kd_cfg.student_layer, frame_ratio=ratio,
                      mode=kd_cfg.frame_ratio_mode, scale=kd_cfg.scale)
    return kd, cuts


register("mvq", build_mvq, FrameKDConfig, label_stages=("extract", "quantize"))
register("l1", build_regression, FrameKDConfig, label_stages=("extract",))
register("l2", build_regression, FrameKDConfig, label_stages=("extract",))
