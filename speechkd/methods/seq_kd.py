"""Sequence-level and word-level KD: the student learns from the teacher's beam-search output.

Sequence-level KD (Mun'im, Inoue, Shinoda, "Sequence-level knowledge distillation for model compression of
attention-based sequence-to-sequence speech recognition", ICASSP 2019, arXiv 1811.04531, after Kim & Rush,
EMNLP 2016, sec. 3.2): a teacher's beam search writes an N-best list per training utterance (``speechkd
pseudo-label``, :mod:`speechkd.labels.nbest`), and the student is trained on those hypotheses in place
of, or beside, the references:

    L = lambda * L(reference) + (1 - lambda) * sum_k w_k * L(hyp_k)

where L is the student's own per-utterance training loss (label-smoothed CE of an attention decoder or the
RNN-T loss, plus its CTC term), and ``w_k`` is uniform (1/K) or the teacher's sequence posterior
renormalised over the K hypotheses (Mun'im et al., sec. 3, "N-best with sequence scores"). distil-whisper's
practice adds a WER filter on the pseudo labels (:func:`filter_nbest`).

Word-level KD (Kim & Rush 2016, sec. 3.1; Hinton et al. 2015 for the temperature): a token-level
``KL(p_teacher^T || p_student^T)`` on the reference prefixes, scaled by ``T^2``, between attention decoders.

Also here: :func:`init_from_teacher`, the student initialised from maximally spaced teacher blocks
(distil-whisper, Gandhi et al. 2023, sec. 3.1).
"""

from __future__ import annotations

import re
from typing import Literal, Optional

import torch
from pydantic import Field, model_validator
from torch import nn

from speechkd.config import KDSettings
from speechkd.labels.nbest import NBEST_KEY
from speechkd.losses.distill import masked_kl
from speechkd.methods import register
from speechkd.methods.base import KDMethod


def nbest_weights(scores: torch.Tensor, weighting: str = "uniform") -> torch.Tensor:
    """Weights of K hypotheses of one utterance.

    Args:
      scores: ``(K,)`` the teacher's sequence log-probabilities (nats), K >= 1.
      weighting: ``uniform`` (1/K each) or ``posterior`` (``softmax(scores)``: the sequence posteriors
        renormalised over the K hypotheses).

    Returns:
      ``(K,)`` non-negative weights summing to 1.

    Raises:
      ValueError: unknown weighting or K = 0.
    """
    if scores.numel() == 0:
        raise ValueError("no hypotheses to weight")
    if weighting == "uniform":
        return torch.full_like(scores, 1.0 / scores.numel(), dtype=torch.float32)
    if weighting == "posterior":
        return torch.softmax(scores.float(), dim=0)
    raise ValueError(f"weighting must be 'uniform' or 'posterior', got {weighting!r}")


def collate_nbest(nbest_lists: list, k: int, weighting: str, device=None):
    """Flatten the first ``k`` hypotheses of every utterance into one padded batch of label sequences.

    Args:
      nbest_lists: N lists of hypotheses ``{"tokens": [int], "score": float}`` (best first).
      k: hypotheses used per utterance (fewer when an utterance has fewer).
      weighting: see :func:`nbest_weights`.

    Returns:
      ``(index (M,), y (M, U), y_lens (M,), weights (M,))``: ``index[m]`` is the utterance of hypothesis m,
      y its tokens padded with 0; each utterance's weights sum to 1.

    Raises:
      ValueError: an utterance with no hypothesis.
    """
    index, seqs, weights = [], [], []
    for n, hyps in enumerate(nbest_lists):
        hyps = hyps[:k]
        if not hyps:
            raise ValueError(f"utterance {n} of the batch has no pseudo label")
        w = nbest_weights(torch.tensor([float(h["score"]) for h in hyps]), weighting)
        for h, wk in zip(hyps, w):
            index.append(n)
            seqs.append(list(h["tokens"]))
            weights.append(float(wk))
    y_lens = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    y = torch.zeros(len(seqs), max(1, int(y_lens.max())), dtype=torch.long)
    for m, s in enumerate(seqs):
        y[m, : len(s)] = torch.tensor(s, dtype=torch.long)
    return (torch.tensor(index, device=device), y.to(device), y_lens.to(device),
            torch.tensor(weights, dtype=torch.float32, device=device))


class SequenceKD(KDMethod):
    """Sequence-level KD on the teacher's N-best (``use_nbest``) and/or token-level KL to a teacher.

    Args:
      use_nbest: train on the ``nbest`` pseudo labels of each cut (method ``seq``); False for ``word``.
      nbest: hypotheses used per utterance.
      weighting: ``uniform`` or ``posterior`` (see :func:`nbest_weights`).
      reference_weight: lambda; the trainer weights the reference loss by it and this term by 1 - lambda
        (``word`` KD keeps the reference loss whole: lambda = 1).
      teacher: a frozen attention encoder-decoder for the token-level KL (None: no KL). It is kept out of
        this module's parameters and state dict (never trained, never checkpointed).
      kl_scale, temperature: weight and T of the token-level KL.

    ``forward(batch, encoder_out (N, T, C), encoder_out_lens (N,), layer_outputs, ctx) -> (loss, logs)``;
    ``batch["labels"]["nbest"]`` holds N lists of ``{"tokens", "score"}``; ``ctx`` is the trainer's
    :class:`speechkd.training.KDContext` (the student's per-utterance loss for any label sequences).

    Raises:
      ValueError: lambda outside [0, 1], nothing to learn from (no N-best and no KL), or a KL without teacher.
    """

    def __init__(self, use_nbest: bool = True, nbest: int = 1, weighting: str = "uniform",
                 reference_weight: float = 0.0, teacher: Optional[nn.Module] = None, kl_scale: float = 0.0,
                 temperature: float = 1.0):
        super().__init__()
        if not 0 <= reference_weight <= 1:
            raise ValueError(f"reference_weight must lie in [0, 1], got {reference_weight}")
        if kl_scale > 0 and teacher is None:
            raise ValueError("token-level KL (kl_scale > 0) needs a teacher model")
        if not use_nbest and kl_scale <= 0:
            raise ValueError("nothing to distil: neither N-best pseudo labels nor a token-level KL")
        self.use_nbest, self.nbest, self.weighting = use_nbest, nbest, weighting
        self.reference_weight = reference_weight if use_nbest else 1.0
        self.kl_scale, self.temperature = kl_scale, temperature
        self._teacher = [teacher.eval().requires_grad_(False)] if teacher is not None else []  # unregistered
        self.label_keys = (NBEST_KEY,) if use_nbest else ()

    @property
    def teacher(self) -> Optional[nn.Module]:
        """The frozen KL teacher, or None."""
        return self._teacher[0] if self._teacher else None

    def frozen_modules(self) -> list[nn.Module]:
        return list(self._teacher)

    def forward(self, batch, encoder_out, encoder_out_lens, layer_outputs, ctx=None):
        if ctx is None:
            raise ValueError("SequenceKD needs the trainer's KDContext (the student's per-utterance loss)")
        n = encoder_out.shape[0]
        loss = encoder_out.new_zeros(())
        logs = {}
        if self.use_nbest:
            index, y, y_lens, w = collate_nbest(batch["labels"][NBEST_KEY], self.nbest, self.weighting,
                                                device=encoder_out.device)
            per_hyp = ctx.utterance_loss(encoder_out[index], encoder_out_lens[index], y, y_lens)  # (M,)
            seq = (w * per_hyp).sum() / n
            loss = loss + (1.0 - self.reference_weight) * seq
            logs["seq_kd"] = float(seq.detach())
        if self.kl_scale > 0:
            tokens = batch["tokens"]
            y_lens = torch.tensor([len(t) for t in tokens], dtype=torch.long, device=encoder_out.device)
            y = torch.zeros(n, max(1, int(y_lens.max())), dtype=torch.long, device=encoder_out.device)
            for i, t in enumerate(tokens):
                y[i, : len(t)] = torch.tensor(t, dtype=torch.long)
            with torch.no_grad():
                t_enc, t_lens, _ = self.teacher.encode(batch["features"], batch["feature_lens"])
                t_logits = self.teacher.decoder_logits(t_enc, t_lens, y, y_lens)  # (N, U+1, V)
            s_logits = ctx.model.decoder_logits(encoder_out, encoder_out_lens, y, y_lens)  # (N, U+1, V)
            kl = masked_kl(s_logits, t_logits, y_lens + 1, self.temperature)
            loss = loss + self.kl_scale * kl
            logs["token_kl"] = float(kl.detach())
        return loss, logs


def token_logprob(hyp: dict) -> float:
    """A hypothesis' teacher log-probability per token: ``score / (tokens + 1)`` (the end of sentence counted), the
    tokens being the teacher's own (``teacher_tokens`` when stored, e.g. Whisper's, else ``tokens``)."""
    return float(hyp["score"]) / (len(hyp.get("teacher_tokens", hyp["tokens"])) + 1)


def filter_nbest(cuts, max_wer: Optional[float], tokenizer=None, min_logprob: Optional[float] = None,
                 max_no_speech: Optional[float] = None):
    """Drop hypotheses whose WER against the cut's reference exceeds ``max_wer`` percent (distil-whisper's
    pseudo-label filter, Gandhi et al. 2023, sec. 4.1; a cut without a reference, e.g. from ``data.unlabelled``,
    is not WER-filtered), those whose :func:`token_logprob` is below ``min_logprob`` (reference-free: every cut),
    those with no text when any filter is on, every hypothesis of a cut whose teacher no-speech probability
    (``no_speech_prob``, e.g. Whisper's) exceeds ``max_no_speech``, and the cuts left with none.

    Args:
      cuts: CutSet whose cuts carry ``custom["nbest"]`` (each hypothesis has ``text`` and ``score``).
      max_wer: threshold in percent; None: no WER filter.
      min_logprob: threshold in nats per token (<= 0); None: no confidence filter.
      max_no_speech: threshold on the no-speech probability; None (or hypotheses without one): no such filter.

    Returns:
      ``(cuts, stats)`` with stats ``{"cuts_in", "cuts_out", "hyps_in", "hyps_out"}``.
    """
    from lhotse import CutSet
    from lhotse.utils import fastcopy

    from speechkd.eval.metrics import word_error_rate

    hyps_in = sum(len(c.custom[NBEST_KEY]) for c in cuts)
    if max_wer is None and min_logprob is None and max_no_speech is None:
        return cuts, {"cuts_in": len(cuts), "cuts_out": len(cuts), "hyps_in": hyps_in, "hyps_out": hyps_in}
    kept, hyps_out = [], 0
    for c in cuts:
        ref = " ".join(s.text for s in c.supervisions if s.text)
        good = [h for h in c.custom[NBEST_KEY] if h["text"]]
        if max_no_speech is not None:
            good = [h for h in good if h.get("no_speech_prob", 0.0) <= max_no_speech]
        if min_logprob is not None:
            good = [h for h in good if token_logprob(h) >= min_logprob]
        if max_wer is not None and ref:  # untranscribed cuts: nothing to measure the WER against
            good = [h for h in good if word_error_rate([ref], [h["text"]]).wer <= max_wer]
        if good:
            kept.append(fastcopy(c, custom={**c.custom, NBEST_KEY: good}))
            hyps_out += len(good)
    return CutSet.from_cuts(kept), {"cuts_in": len(cuts), "cuts_out": len(kept), "hyps_in": hyps_in, "hyps_out": hyps_out}


_LAYER = re.compile(r"^(.*\.layers)\.(\d+)\.(.*)$")


def spaced_layers(num_teacher: int, num_student: int) -> list[int]:
    """Maximally spaced teacher block indexes (0-based) for a student with fewer blocks.

    First and last teacher blocks are always taken when the student has >= 2 blocks (distil-whisper's
    choice); a 1-block student takes the last teacher block. A rounded linspace: 12 -> 3 gives [0, 6, 11].

    Raises:
      ValueError: num_student > num_teacher or < 1.
    """
    if not 1 <= num_student <= num_teacher:
        raise ValueError(f"a student with {num_student} blocks cannot take them from a teacher with {num_teacher}")
    if num_student == 1:
        return [num_teacher - 1]
    return [round(i * (num_teacher - 1) / (num_student - 1)) for i in range(num_student)]


def init_from_teacher(student: nn.Module, teacher: nn.Module) -> dict:
    """Copy the teacher's weights into the student, block ``i`` of each layer stack from the teacher's
    maximally spaced block :func:`spaced_layers` ``[i]``, every other tensor by name.

    Args:
      student, teacher: models of the same architecture whose widths match (only depths may differ).

    Returns:
      ``{student tensor name: teacher tensor name}`` of what was copied.

    Raises:
      ValueError: a student tensor with no teacher counterpart or a different shape (widths differ).
    """
    t_state, s_state = teacher.state_dict(), student.state_dict()
    depth: dict[str, int] = {}
    for name in t_state:
        m = _LAYER.match(name)
        if m:
            depth[m.group(1)] = max(depth.get(m.group(1), 0), int(m.group(2)) + 1)
    s_depth: dict[str, int] = {}
    for name in s_state:
        m = _LAYER.match(name)
        if m:
            s_depth[m.group(1)] = max(s_depth.get(m.group(1), 0), int(m.group(2)) + 1)
    mapping, bad = {}, []
    for name, value in s_state.items():
        src = name
        m = _LAYER.match(name)
        if m and m.group(1) in depth:
            idx = spaced_layers(depth[m.group(1)], s_depth[m.group(1)])[int(m.group(2))]
            src = f"{m.group(1)}.{idx}.{m.group(3)}"
        if src not in t_state or t_state[src].shape != value.shape:
            bad.append(f"{name} {tuple(value.shape)} <- {src} {tuple(t_state[src].shape) if src in t_state else 'missing'}")
            continue
        mapping[name] = src
    if bad:
        raise ValueError("init_from_teacher needs the teacher's architecture and widths (only depths may differ): "
                         + "; ".join(bad[:4]) + (f" (+{len(bad) - 4} more)" if len(bad) > 4 else ""))
    student.load_state_dict({name: t_state[src].clone() for name, src in mapping.items()})
    return mapping


class SeqKDConfig(KDSettings):
    """Sequence-level KD settings (``kd.method: seq``, Mun'im et al. 2019): train on the teacher's N-best from
    ``speechkd pseudo-label``.

    ``nbest``: teacher hypotheses used per utterance (the first ``nbest`` of the stored list; at most
    ``pseudo_label.nbest``).
    ``nbest_weights``: ``uniform`` (1/nbest each) or ``posterior`` (the teacher's sequence log-probs renormalised over
    the hypotheses used, a softmax).
    ``reference_weight``: lambda in ``lambda * L(reference) + (1 - lambda) * L(pseudo labels)``; 0 = pseudo labels in
    place of the references.
    ``max_wer``: drop hypotheses whose WER (percent) against the reference exceeds this, and utterances left with none
    (distil-whisper's filter); null keeps all.
    ``min_logprob``: the reference-free filter (also for untranscribed utterances): drop hypotheses whose teacher
    log-probability per token (end of sentence included) is below this (nats, <= 0), and utterances left with none;
    hypotheses that normalise to no text are always dropped when a filter is on. Null keeps all.
    ``max_no_speech``: drop utterances whose teacher gives a no-speech probability above this (Whisper's
    ``<|nocaptions|>``; a teacher without one never drops any): its text on silence is invented.
    ``kl_scale`` / ``temperature``: besides, token-level KL(teacher/T || student/T) on the reference prefixes, scaled
    by ``kl_scale * T^2`` (Hinton et al. 2015); the project's attention-decoder teacher and an AED student only.
    """

    method: Literal["seq"] = "seq"
    nbest: int = Field(1, ge=1)
    nbest_weights: Literal["uniform", "posterior"] = "uniform"
    reference_weight: float = Field(0.0, ge=0, le=1)
    max_wer: Optional[float] = Field(None, ge=0)
    min_logprob: Optional[float] = Field(None, le=0)
    max_no_speech: Optional[float] = Field(None, ge=0, le=1)
    kl_scale: float = Field(0.0, ge=0)
    temperature: float = Field(1.0, gt=0)

    def project_teacher_use(self) -> Optional[str]:
        if self.kl_scale > 0:
            return "token-level KL (kd.kl_scale > 0: the teacher's decoder distributions)"
        return super().project_teacher_use()

    def check_recipe(self, recipe, run) -> None:
        """Raises ValueError: more hypotheses than ``pseudo_label.nbest`` stores; KL without AED models."""
        if self.nbest > recipe.pseudo_label.nbest:
            raise ValueError(f"student '{run.name}' uses nbest={self.nbest} but pseudo_label.nbest="
                             f"{recipe.pseudo_label.nbest} hypotheses are stored")
        _check_kl_archs(self, recipe, run)


class WordKDConfig(KDSettings):
    """Word-level KD settings (``kd.method: word``, Kim & Rush 2016): the references plus token-level
    KL(teacher/T || student/T) to the project's attention-decoder teacher, scaled by ``kl_scale * T^2``."""

    method: Literal["word"] = "word"
    kl_scale: float = Field(1.0, gt=0)
    temperature: float = Field(1.0, gt=0)

    def check_recipe(self, recipe, run) -> None:
        """Raises ValueError: a teacher or student that is not an attention encoder-decoder."""
        _check_kl_archs(self, recipe, run)


def _check_kl_archs(cfg, recipe, run) -> None:
    if cfg.kl_scale > 0 and (recipe.teacher.model.arch != "aed" or recipe.student_model_of(run).arch != "aed"):
        raise ValueError(f"student '{run.name}': token-level KL (kl_scale > 0) needs an aed teacher and student")


def _project_teacher(exp, kd_cfg):
    """The project's teacher for the token-level KL term, or None when ``kd.kl_scale`` is 0."""
    from speechkd.models.build import load_model

    return load_model(exp.teacher_dir)[0] if kd_cfg.kl_scale > 0 else None


def build_seq(exp, run, seed: int = 0):
    """Sequence-level KD for a student run: the teacher's N-best (``pseudo-label`` stage; refused when written by
    another teacher or settings), filtered by ``kd.max_wer``, ``kd.min_logprob`` and ``kd.max_no_speech``
    (:func:`filter_nbest`). Returns ``(SequenceKD, CutSet with N-best lists)``.

    Raises:
      FileNotFoundError / ValueError: no N-best labels, or labels of another teacher or settings.
    """
    from speechkd.data.datamodule import load_cuts
    from speechkd.labels.stages import check_label_meta_nbest
    from speechkd.utils import log

    kd_cfg = run.kd
    teacher = _project_teacher(exp, kd_cfg)
    cuts = load_cuts(exp.nbest_cuts_path)
    check_label_meta_nbest(exp)
    cuts, stats = filter_nbest(cuts, kd_cfg.max_wer, min_logprob=kd_cfg.min_logprob,
                               max_no_speech=kd_cfg.max_no_speech)
    if stats["hyps_out"] != stats["hyps_in"] or kd_cfg.max_wer is not None:
        log(f"distill: {run.name}: filters (WER <= {kd_cfg.max_wer}%, log-prob per token >= {kd_cfg.min_logprob}, "
            f"no-speech <= {kd_cfg.max_no_speech}) kept {stats['cuts_out']}/{stats['cuts_in']} cuts, "
            f"{stats['hyps_out']}/{stats['hyps_in']} hypotheses")
    kd = SequenceKD(use_nbest=True, nbest=kd_cfg.nbest, weighting=kd_cfg.nbest_weights,
                    reference_weight=kd_cfg.reference_weight, teacher=teacher, kl_scale=kd_cfg.kl_scale,
                    temperature=kd_cfg.temperature)
    return kd, cuts


def build_word(exp, run, seed: int = 0):
    """Word-level KD (references plus token-level KL to the teacher's decoder, Kim & Rush 2016) for a student run.
    Returns ``(SequenceKD, training CutSet)``."""
    kd_cfg = run.kd
    kd = SequenceKD(use_nbest=False, teacher=_project_teacher(exp, kd_cfg), kl_scale=kd_cfg.kl_scale,
                    temperature=kd_cfg.temperature)
    return kd, exp.cuts("train")


register("seq", build_seq, SeqKDConfig, label_stages=("pseudo-label",),
         project_teacher="kd.method 'seq' (sequence-level KD on the teacher's N-best pseudo-labels)", nbest_teacher=True)
register("word", build_word, WordKDConfig,
         project_teacher="token-level KL (kd.method 'word' / kd.kl_scale > 0: the teacher's decoder distributions)")
