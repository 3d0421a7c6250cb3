"""CoDERT: distil a transducer's encoder logits into a smaller transducer's.

Swaminathan et al., "CoDERT: Distilling Encoder Representations with Co-learning for Transducer-based Speech
Recognition", Interspeech 2021, arXiv 2106.07734. The "encoder logits" of a transducer are its joiner applied
to the encoder output alone, predictor branch left out (:meth:`speechkd.models.transducer.Transducer.encoder_logits`,
Sec. 2); the paper finds them of high entropy, rich in acoustically confusable word pieces, and distils them
frame by frame:

    L = L_rnnt(student) + alpha * tau^2 * KL(softmax(z_teacher / tau) || softmax(z_student / tau))

summed over the valid frames and averaged over utterances (:func:`speechkd.losses.distill.masked_kl`, Sec. 2.2;
``alpha`` is the recipe's ``kd.scale``, ``tau`` its ``kd.temperature``). The paper compares three ways of
getting the teacher (the modes of :class:`CodertKD`):

* ``static``: a pre-trained teacher transducer, frozen;
* ``tandem``: teacher and student trained together from scratch in one run ("tandem training" with in-place
  encoder distillation), each on its own RNN-T loss, the student also on the KL to the teacher's current
  encoder logits (no gradient flows back into the teacher through the KL);
* ``shared``: tandem, but both encoders feed one predictor and one joiner (the student's), so the student
  also learns from the teacher through the shared output layers ("implicit distillation").
"""

from __future__ import annotations

import math
import numbers
from typing import Literal, Optional

import torch
from pydantic import Field
from torch import nn

from speechkd.config import KDSettings

from speechkd.losses.distill import masked_kl
from speechkd.methods import register
from speechkd.methods.base import KDMethod, align_teacher_frames
from speechkd.models.transducer import Transducer

MODES = ("static", "tandem", "shared")


def _integer_ratio(ratio) -> int:
    """``ratio`` as a positive int.

    Raises:
      ValueError: a ratio that is not a positive integer (e.g. 1.5: the student's subsampling is not a multiple
        of the teacher's).
    """
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not float(ratio).is_integer() or ratio < 1:
        raise ValueError(f"teacher frames per student frame must be a positive integer, got {ratio!r}")
    return int(ratio)


def align_teacher_logits(logits: torch.Tensor, lens: torch.Tensor, num_frames: int, ratio: int,
                         temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Bring teacher encoder logits to the student's frame rate by averaging the teacher's probabilities.

    When the teacher runs at ``ratio`` times the student's frame rate (e.g. subsampling 4 against 8: ratio 2),
    each student frame covers ``ratio`` successive teacher frames; its target distribution is their mean,
    ``p = mean_k softmax(z_k / tau)`` over k = 0..ratio-1. Averaging is chosen over keeping every ``ratio``-th
    frame (truncation) because it uses every teacher frame and is the teacher's posterior over the student
    frame's whole span. The result is returned as logits ``tau * log(p)``, so that
    ``softmax(result / tau) == p``, which is what :func:`speechkd.losses.distill.masked_kl` applies. A trailing
    group of fewer than ``ratio`` frames is dropped (``lens // ratio``). Then the time axis is cut or padded to
    the student's ``num_frames`` (the front ends' edge effects leave the two a frame or so apart), as
    :func:`speechkd.methods.base.align_teacher_frames` does. With ratio 1 the logits are only cut or padded.

    Args:
      logits: ``(N, T_t, V)`` teacher encoder logits.
      lens: ``(N,)`` valid teacher frames.
      num_frames: T_s, the student's padded number of frames.
      ratio: teacher frames per student frame (a positive integer).
      temperature: tau > 0 of the KL the result feeds.

    Returns:
      ``(logits (N, T_s, V), lens (N,))``: padding frames hold 0, ``lens`` counts valid student frames
      (``min(lens // ratio, T_s)``).

    Raises:
      ValueError: a ratio that is not a positive integer, tau <= 0, or logits not 3-D.
    """
    ratio = _integer_ratio(ratio)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if logits.dim() != 3:
        raise ValueError(f"teacher logits must be (N, T, V), got {tuple(logits.shape)}")
    if ratio > 1:
        n, t, v = logits.shape
        groups = t // ratio
        log_p = torch.log_softmax(logits[:, : groups * ratio].float() / temperature, dim=-1)  # (N, G*r, V)
        log_p = log_p.reshape(n, groups, ratio, v)
        log_mean = torch.logsumexp(log_p, dim=2) - math.log(ratio)  # (N, G, V): log of the mean probability
        logits = temperature * log_mean
        lens = lens // ratio
    return align_teacher_frames(logits, lens, num_frames, ratio=1)


def _pad_tokens(tokens: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y (N, U) int64 padded with 0, y_lens (N,))`` of N token lists."""
    y_lens = torch.tensor([len(t) for t in tokens], dtype=torch.long)
    y = torch.zeros(len(tokens), max(1, int(y_lens.max())), dtype=torch.long)
    for i, t in enumerate(tokens):
        y[i, : len(t)] = torch.tensor(t, dtype=torch.long)
    return y.to(device), y_lens.to(device)


class CodertKD(KDMethod):
    """CoDERT encoder-logit distillation from a static, tandem or shared-decoder teacher (arXiv 2106.07734).

    Args:
      mode: ``static``, ``tandem`` or ``shared`` (see the module docstring).
      teacher: a :class:`speechkd.models.transducer.Transducer`. ``static``: a trained teacher; it is frozen
        (eval mode, ``requires_grad`` off) and kept out of this module's parameters and state dict (never
        trained, never checkpointed). ``tandem``: a freshly built teacher, registered as ``self.teacher`` so
        that it trains with the student (the trainer's optimiser takes this module's parameters) and is saved
        in the training checkpoint for resuming (never in the exported student). ``shared``: only its encoder
        is kept (``self.teacher_encoder``, registered); its predictor, joiner and CTC head are dropped, the
        student's serve both encoders.
      scale: alpha >= 0, the weight of the KL (the recipe's ``kd.scale``).
      temperature: tau > 0 of the KL (the recipe's ``kd.temperature``).
      frame_ratio: teacher frames per student frame (student subsampling / teacher subsampling), a positive
        integer; see :func:`align_teacher_logits`.
      ctc_weight: tandem/shared: weight of the teacher's CTC loss in its own loss (give the student's
        ``train.ctc_weight``); used when the teacher's heads have a CTC head (tandem: the teacher's own;
        shared: the student's, applied to the projected teacher frames).
      student_dim: shared: the student encoder's width C_s. The teacher's frames (width C_t) go through
        ``self.proj``, a ``Linear(C_t, C_s)`` when the widths differ, else ``nn.Identity``.
      teacher_lr: tandem/shared: peak learning rate of the co-learned teacher (its encoder, and in tandem mode
        its predictor and joiner; in shared mode also ``proj``), an optimiser group of its own with its own
        gradient clipping (:meth:`extra_param_groups`); None: it trains in the student's group, at the
        student's lr, its gradients clipped together with the student's.

    ``forward(batch, encoder_out (N, T_s, C_s), encoder_out_lens (N,), layer_outputs, ctx) -> (loss, logs)``:
    ``batch["features"]: (N, T, F)`` and ``batch["feature_lens"]: (N,)`` feed the teacher (the same, possibly
    SpecAugmented, features as the student), ``batch["tokens"]`` (N token lists) its own loss in tandem/shared;
    ``ctx.model`` is the student transducer. ``loss = teacher_loss + scale * encoder_kl`` (nats per utterance;
    :meth:`teacher_loss` in tandem/shared only, :meth:`encoder_kl` the KL over the frames valid for both, with
    the teacher's logits detached). ``logs``: ``codert_kl`` (the unscaled KL), and ``teacher_rnnt`` (+
    ``teacher_ctc``) in tandem/shared. A co-learned teacher trains with the student's optimiser and schedule, at
    ``teacher_lr`` when given.

    Raises:
      ValueError: unknown mode, a teacher that is not a transducer, scale < 0, temperature <= 0, ctc_weight < 0,
        teacher_lr <= 0,
        a frame ratio that is not a positive integer, or shared mode without ``student_dim``; in ``forward``,
        no ``ctx``, a student that is not a transducer, or teacher and student vocabularies that differ.
    """

    def __init__(self, mode: str, teacher: nn.Module, scale: float = 1.0, temperature: float = 1.0,
                 frame_ratio: int = 1, ctc_weight: float = 0.0, student_dim: Optional[int] = None,
                 teacher_lr: Optional[float] = None):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"CoDERT mode must be one of {MODES}, got {mode!r}")
        if not isinstance(teacher, Transducer):
            raise ValueError(f"the CoDERT teacher must be a transducer, got {type(teacher).__name__}")
        if scale < 0:
            raise ValueError(f"scale must be >= 0, got {scale}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if ctc_weight < 0:
            raise ValueError(f"ctc_weight must be >= 0, got {ctc_weight}")
        if teacher_lr is not None and teacher_lr <= 0:
            raise ValueError(f"teacher_lr must be > 0, got {teacher_lr}")
        self.mode, self.scale, self.temperature, self.ctc_weight = mode, scale, temperature, ctc_weight
        self.teacher_lr = teacher_lr
        self.frame_ratio = _integer_ratio(frame_ratio)
        self._frozen = []  # static teacher, unregistered
        if mode == "static":
            self._frozen = [teacher.eval().requires_grad_(False)]
        elif mode == "tandem":
            self.teacher = teacher
        else:
            if student_dim is None:
                raise ValueError("shared mode needs student_dim (the student encoder's width)")
            self.teacher_encoder = teacher.encoder
            t_dim = teacher.encoder.output_dim
            self.proj = nn.Linear(t_dim, student_dim) if t_dim != student_dim else nn.Identity()

    def extra_param_groups(self) -> list[dict]:
        """The co-learned teacher as its own optimiser group (tandem/shared with ``teacher_lr``), else none."""
        if self.mode == "static" or self.teacher_lr is None:
            return []
        params = [p for p in self.parameters() if p.requires_grad]  # tandem: the teacher; shared: encoder + proj
        return [{"params": params, "lr": self.teacher_lr}]

    @property
    def frozen_teacher(self) -> Optional[nn.Module]:
        """The static teacher (frozen, unregistered), or None in tandem/shared mode."""
        return self._frozen[0] if self._frozen else None

    def frozen_modules(self) -> list[nn.Module]:
        return list(self._frozen)

    def teacher_frames(self, x: torch.Tensor, x_lens: torch.Tensor, student: nn.Module):
        """The teacher's encoder output and the transducer whose heads read it.

        Args:
          x: ``(N, T, F)`` features; x_lens: ``(N,)`` valid frames.
          student: the student transducer (shared mode: its predictor, joiner and CTC head serve the teacher).

        Returns:
          ``(frames (N, T_t, C), lens (N,), heads)``: static/tandem: the teacher's encoder output (C = C_t) and
          the teacher; shared: the teacher encoder's output through ``proj`` (C = C_s) and the student. In
          static mode the frames carry no gradient.
        """
        if self.mode == "static":
            teacher = self.frozen_teacher
            p = next(teacher.parameters(), None)
            if p is not None and p.device != x.device:
                teacher.to(x.device)
            with torch.no_grad():
                enc, lens, _ = teacher.encode(x, x_lens)
            return enc, lens, teacher
        if self.mode == "tandem":
            enc, lens, _ = self.teacher.encode(x, x_lens)
            return enc, lens, self.teacher
        enc, lens, _ = self.teacher_encoder(x, x_lens)
        return self.proj(enc), lens, student

    def teacher_loss(self, frames: torch.Tensor, lens: torch.Tensor, heads: nn.Module,
                     tokens: list[list[int]]) -> tuple[torch.Tensor, dict]:
        """The co-learned teacher's own loss on the references: ``mean RNN-T + ctc_weight * mean CTC``.

        Args:
          frames: ``(N, T_t, C)`` and lens: ``(N,)`` from :meth:`teacher_frames`; heads: the transducer it
            returned (the teacher in tandem mode, the student in shared mode).
          tokens: N reference token lists.

        Returns:
          ``(scalar loss in nats per utterance, {"teacher_rnnt": ..., "teacher_ctc": ...})``; the CTC term only
          when ``ctc_weight > 0`` and ``heads`` has a CTC head.
        """
        y, y_lens = _pad_tokens(tokens, frames.device)
        rnnt = heads.sequence_loss(frames, lens, y, y_lens, reduction="none").mean()
        loss, logs = rnnt, {"teacher_rnnt": float(rnnt.detach())}
        if self.ctc_weight > 0 and heads.ctc_output is not None:
            ctc = heads.ctc_loss(frames, lens, y, y_lens, reduction="none").mean()
            loss = loss + self.ctc_weight * ctc
            logs["teacher_ctc"] = float(ctc.detach())
        return loss, logs

    def encoder_kl(self, encoder_out: torch.Tensor, encoder_out_lens: torch.Tensor, frames: torch.Tensor,
                   lens: torch.Tensor, heads: nn.Module, student: nn.Module) -> torch.Tensor:
        """The unscaled KD term: ``tau^2 * KL(teacher / tau || student / tau)`` of the encoder logits (Sec. 2.2).

        The teacher's logits ``heads.encoder_logits(frames)`` are computed detached (targets only: no gradient
        reaches the teacher, nor, in shared mode, the joiner through the teacher's side), aligned to the
        student's frames by :func:`align_teacher_logits`, and the KL is summed over the frames valid for both
        (``min(encoder_out_lens, lens // frame_ratio)``) and divided by N.

        Args:
          encoder_out: ``(N, T_s, C_s)`` student encoder output; encoder_out_lens: ``(N,)``.
          frames, lens, heads: as returned by :meth:`teacher_frames` (``(N, T_t, C)``, ``(N,)``).
          student: the student transducer.

        Returns:
          scalar, nats per utterance.

        Raises:
          ValueError: teacher and student vocabularies differ (from :func:`masked_kl`).
        """
        with torch.no_grad():  # the teacher's logits are targets: detached, no graph built
            t_logits = heads.encoder_logits(frames)  # (N, T_t, V)
        t_logits, t_lens = align_teacher_logits(t_logits, lens, encoder_out.shape[1], self.frame_ratio,
                                                self.temperature)  # (N, T_s, V)
        s_logits = student.encoder_logits(encoder_out)  # (N, T_s, V)
        valid = torch.minimum(t_lens.to(encoder_out_lens.device), encoder_out_lens)
        return masked_kl(s_logits, t_logits, valid, self.temperature)

    def forward(self, batch, encoder_out, encoder_out_lens, layer_outputs, ctx=None):
        if ctx is None:
            raise ValueError("CodertKD needs the trainer's KDContext (the student transducer)")
        student = ctx.model
        if not isinstance(student, Transducer):
            raise ValueError(f"CoDERT needs a transducer student, got {type(student).__name__}")
        frames, lens, heads = self.teacher_frames(batch["features"], batch["feature_lens"], student)
        loss, logs = encoder_out.new_zeros(()), {}
        if self.mode != "static":
            loss, logs = self.teacher_loss(frames, lens, heads, batch["tokens"])
        kl = self.encoder_kl(encoder_out, encoder_out_lens, frames, lens, heads, student)
        logs["codert_kl"] = float(kl.detach())
        return loss + self.scale * kl, logs


CODERT_TEACHER_SEED_OFFSET = 10_000
"""A CoDERT KD module (a co-learned teacher, the shared mode's projection) is initialised under torch seed
``offset + student seed``: it varies with the student's seed without replaying the student's own random stream
(which would give the student's first layer a copy of the teacher's first filters), and the same seed rebuilds
it the same (the KD method is built before the trainer seeds the global generator)."""


class CodertKDConfig(KDSettings):
    """CoDERT settings (``kd.method: codert``, Swaminathan et al. 2021; transducer teacher and student): the student's
    encoder logits (its joiner without the predictor) learn the teacher's through
    ``scale * T^2 * KL(teacher/T || student/T)`` over the valid frames, so ``scale`` is the paper's alpha and
    ``temperature`` its tau.

    ``codert_mode``: ``static`` (the trained teacher of the ``teacher`` stage, frozen), ``tandem`` (a teacher of the
    recipe's ``teacher.model`` trained from scratch with the student in the same run, on its own RNN-T (+ CTC) loss)
    or ``shared`` (tandem, the two encoders sharing the student's predictor and joiner). When the teacher has 2x the
    student's frame rate, each student frame's target is the mean of the teacher's distributions over its frames.
    ``teacher_lr``: tandem/shared: peak lr of the co-learned teacher, an optimiser group of its own with its own
    gradient clipping; null: the ``teacher`` stage's ``train.lr`` (the lr its model is tuned for).
    """

    method: Literal["codert"] = "codert"
    scale: float = Field(1.0, ge=0)
    temperature: float = Field(1.0, gt=0)
    codert_mode: Literal["static", "tandem", "shared"] = "static"
    teacher_lr: Optional[float] = Field(None, gt=0)


def build(exp, run, seed: int = 0):
    """CoDERT for a student run: the static teacher loaded, or a co-learned one built, under torch seed
    :data:`CODERT_TEACHER_SEED_OFFSET` + ``seed`` (the global random state is left alone). Returns
    ``(CodertKD, training CutSet)``.

    Raises:
      ValueError: a teacher or student that is not a transducer (naming the run).
    """
    from speechkd.models.build import build_model, load_model

    kd_cfg, s = run.kd, exp.recipe.student_model_of(run)
    t_cfg = exp.recipe.teacher.model
    if t_cfg.arch != "transducer" or s.arch != "transducer":
        raise ValueError(f"student '{run.name}': CoDERT needs a transducer teacher and student "
                         f"(teacher arch {t_cfg.arch!r}, student arch {s.arch!r})")
    ratio = exp.teacher_frame_ratio(run)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(CODERT_TEACHER_SEED_OFFSET + seed)
        if kd_cfg.codert_mode == "static":
            teacher = load_model(exp.teacher_dir)[0]
        else:
            teacher = build_model(t_cfg, exp.tokenizer.vocab_size)
        kd = CodertKD(kd_cfg.codert_mode, teacher, scale=kd_cfg.scale, temperature=kd_cfg.temperature,
                      frame_ratio=ratio, ctc_weight=exp.recipe.student_train.ctc_weight, student_dim=s.dim,
                      teacher_lr=None if kd_cfg.codert_mode == "static"
                      else (kd_cfg.teacher_lr or exp.recipe.teacher.train.lr))
    return kd, exp.cuts("train")


register("codert", build, CodertKDConfig, project_teacher="kd.method 'codert' (CoDERT: the teacher's encoder logits)")
