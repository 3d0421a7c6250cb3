"""What every KD method shares: the loss-term interface and teacher/student frame alignment."""

from __future__ import annotations

import torch
from torch import nn


class KDMethod(nn.Module):
    """A KD method adds a loss term to the student's own (RNN-T) loss.

    It names the per-frame teacher labels it needs (``label_keys``: cut custom fields collated by
    :class:`speechkd.data.datamodule.AsrDataset`) and owns any trainable head it uses; the student model
    knows nothing of it, and the head is not part of the exported student.

    Subclasses implement ``forward(batch, encoder_out, encoder_out_lens, layer_outputs, ctx=None) -> (loss,
    logs)`` where ``encoder_out: (N, T, C)``, ``encoder_out_lens: (N,)``, ``layer_outputs``: list of
    ``(N, T, C_l)``, ``ctx`` the trainer's :class:`speechkd.training.KDContext` (the student model and its
    per-utterance loss, for methods that need them), and ``loss`` is a scalar (already scaled), ``logs`` a
    dict of floats for the training log. ``reference_weight`` is the weight the trainer gives the loss on the
    references (1 unless the method replaces the references, as sequence-level KD may).
    """

    label_keys: tuple[str, ...] = ()
    reference_weight: float = 1.0

    def frozen_modules(self) -> list[nn.Module]:
        """Frozen teachers this method holds outside its registered modules (so they are neither trained,
        checkpointed nor counted); default none. :meth:`_apply` moves them with the method, so ``kd.to(device)``
        (Lightning moving the model to a GPU) takes them along."""
        return []

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        for m in self.frozen_modules():
            m._apply(fn, *args, **kwargs)
        return self

    def extra_param_groups(self) -> list[dict]:
        """Parameter groups of this module that train as separate models, each ``{"params": [...], "lr": peak
        lr}``; the trainer gives each its own optimiser group (same warm-up/decay schedule, scaled to its own
        peak lr) and clips its gradient norm on its own. Every other parameter of this module trains in the
        student's group. Default: none (a KD head is part of the student's group)."""
        return []


def pick_layer(layer_outputs: list[torch.Tensor], layer: int) -> torch.Tensor:
    """The output of 1-based block ``layer`` (-1 = last).

    Raises:
      ValueError: layer out of range.
    """
    n = len(layer_outputs)
    if layer == -1:
        return layer_outputs[-1]
    if not 1 <= layer <= n:
        raise ValueError(f"layer {layer} out of range: the encoder has {n} blocks (1..{n}, or -1)")
    return layer_outputs[layer - 1]


def frame_ratio_of(student_frame_shift: float, teacher_frame_shift: float) -> int:
    """Teacher frames per student frame, ``student_frame_shift / teacher_frame_shift``, as the integer that
    :func:`align_teacher_frames` takes.

    E.g. a 4x-subsampled student (40 ms frames) and a HuBERT teacher (20 ms) give 2; the same student and a
    4x-subsampled transducer teacher (40 ms) give 1.

    Args:
      student_frame_shift: seconds per student encoder frame (10 ms x its subsampling).
      teacher_frame_shift: seconds per teacher label frame (as stored with the labels).

    Returns:
      The ratio, an int >= 1.

    Raises:
      ValueError: a shift <= 0, or a ratio that is not a whole number >= 1 (a student with a higher frame rate
        than the teacher, or shifts such as 40 ms vs 30 ms); the message gives both shifts in ms.
    """
    if not (student_frame_shift > 0 and teacher_frame_shift > 0):
        raise ValueError(f"frame shifts must be > 0, got student {student_frame_shift} s, teacher {teacher_frame_shift} s")
    r = student_frame_shift / teacher_frame_shift
    k = int(round(r))
    if k < 1 or abs(r - k) > 1e-6 * r:
        raise ValueError(
            f"the student's frame shift ({1000 * student_frame_shift:g} ms) must be a whole multiple (>= 1) of the "
            f"teacher's ({1000 * teacher_frame_shift:g} ms) for frame-level KD, got a ratio of {r:g}: change the "
            "student's subsampling")
    return k


def align_teacher_frames(
    labels: torch.Tensor, label_lens: torch.Tensor, num_frames: int, ratio: int, mode: str = "concat"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bring per-frame teacher labels to the student's frame rate.

    Following Guo et al. (2023, sec. 2.3) and icefall: when the teacher runs at ``ratio`` times the student's
    frame rate, ``concat`` joins the labels of ``ratio`` successive teacher frames (e.g. 2 x 8 codebook
    indexes -> 16 per student frame) and ``truncate`` keeps every ``ratio``-th teacher frame. Then the time
    axis is cut or padded to the student's ``num_frames`` (the front ends' edge effects leave the two off by
    a frame or two).

    Args:
      labels: ``(N, T_t, C)`` teacher labels (int codebook indexes padded with -100, or float embeddings).
      label_lens: ``(N,)`` valid teacher frames.
      num_frames: T_s, the student's padded number of frames.
      ratio: teacher frames per student frame (1 or 2, or any positive int).
      mode: ``concat`` or ``truncate``.

    Returns:
      ``(labels (N, T_s, C * ratio or C), lens (N,))``; padding positions hold -100 for integer labels and 0
      for float labels, and ``lens`` is the number of valid student frames.

    Raises:
      ValueError: bad ratio or mode.
    """
    if ratio < 1:
        raise ValueError(f"frame ratio must be >= 1, got {ratio}")
    if mode not in ("concat", "truncate"):
        raise ValueError(f"mode must be 'concat' or 'truncate', got {mode!r}")
    pad = -100 if not labels.is_floating_point() else 0.0
    n, t, c = labels.shape
    if ratio > 1:
        t_new = t // ratio
        if mode == "concat":
            labels = labels[:, : t_new * ratio].reshape(n, t_new, ratio * c)  # (N, T_t/r, r*C)
        else:
            labels = labels[:, ::ratio][:, :t_new]  # (N, T_t/r, C)
        label_lens = label_lens // ratio
    t = labels.shape[1]
    if t >= num_frames:
        labels = labels[:, :num_frames]
    else:
        labels = torch.cat([labels, labels.new_full((n, num_frames - t, labels.shape[2]), pad)], dim=1)
    label_lens = label_lens.clamp(max=num_frames)
    mask = torch.arange(num_frames, device=labels.device)[None, :] >= label_lens[:, None]  # (N, T_s)
    labels = labels.masked_fill(mask[..., None], pad)
    return labels, label_lens
