"""SSL-model distillation (DistilHuBERT, Chang et al., ICASSP 2022, arXiv 2110.01900; as used by arXiv 2210.16611):
a small student (the teacher's CNN and K transformer layers, :mod:`speechkd.models.ssl`) whose prediction heads
learn chosen teacher layers with L1 + log-sigmoid cosine (:meth:`speechkd.models.ssl.DistilHubertStudent.distill_loss`).

The recipe around it (pre-training the teacher, fine-tuning for KWS and SV, evaluation) is the SSL pipeline,
:mod:`speechkd.ssl_pipeline`.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

__all__ = ["default_target_layers", "distill_loss_fn"]


def default_target_layers(num_teacher_layers: int, count: int = 3) -> list[int]:
    """``count`` evenly spaced teacher layers ending at the last (DistilHuBERT: 4, 8, 12 of 12).

    ``round(L * i / count)`` for i = 1..count, without repeats or layer 0 (so fewer for a shallow teacher).
    """
    layers = sorted({int(round(num_teacher_layers * i / count)) for i in range(1, count + 1)} - {0})
    return layers or [num_teacher_layers]


def distill_loss_fn(teacher, student, cfg) -> Callable:
    """The DistilHuBERT training loss of one batch, for :func:`speechkd.training.fit_steps`.

    Args:
      teacher: the frozen :class:`speechkd.teachers.hf.SSLTeacher` (run without a graph).
      student: the :class:`speechkd.models.ssl.DistilHubertStudent` (its ``target_layers`` name the teacher layers).
      cfg: the recipe's student section (``l1_weight``, ``l2_weight``, ``cos_weight``, ``cos_type``,
        ``layer_reduction``).

    Returns:
      ``batch -> (loss, {"loss", "cos_sim"})`` for a waveform batch (``wavs (N, S)``, ``lens (N,)`` samples);
      ``cos_sim`` is the mean over target layers of the cosine similarity of prediction and teacher layer.
    """
    weights = dict(l1_weight=cfg.l1_weight, l2_weight=cfg.l2_weight, cos_weight=cfg.cos_weight, cos_type=cfg.cos_type,
                   layer_reduction=cfg.layer_reduction)

    def step(batch):
        t_out = teacher(batch["wavs"], batch["lens"], layers=student.target_layers)  # frozen: no graph
        s_out = student(batch["wavs"], batch["lens"])
        loss, terms = student.distill_loss(s_out, t_out, **weights)
        cos = [float(terms[f"cos_sim_l{layer}"]) for layer in student.target_layers]
        return loss, {"loss": float(loss.detach()), "cos_sim": float(np.mean(cos))}

    return step
