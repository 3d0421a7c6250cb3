"""The Teacher interface of the ASR pipeline, and the registry that picks a recipe's teacher.

Every teacher the pipeline can distil from implements :class:`Teacher`: the teacher stage (train it, or check a
checkpoint), its layer outputs for a batch plan of cuts at its own frame shift (the frame-level labels), and whether
it can decode (an ASR head: evaluated for WER, N-best pseudo labels, token-level KL, CoDERT, block initialisation).
The pipeline asks :func:`teacher_of` and never branches on teacher kinds. Today's kinds:

- :class:`speechkd.teachers.project.ProjectTeacher`: the transducer / attention encoder-decoder trained by the
  teacher stage (fbank input, 10 ms x subsampling frames);
- :class:`speechkd.teachers.hf_ssl.HfSslTeacher`: a Hugging Face HuBERT / wav2vec 2.0 / WavLM directory
  (``teacher.hf_dir``; waveform input, its CNN's frame shift, no ASR head);
- :class:`speechkd.teachers.whisper.WhisperTeacher`: a Hugging Face Whisper directory (``teacher.whisper_dir``;
  log-mel input, 20 ms encoder frames; its beam search writes N-best lists for sequence-level KD and it transcribes
  for its own evaluation row).

The SSL pipeline (:mod:`speechkd.ssl_pipeline`) has its own, smaller interface for encoders that map waveforms to
per-layer hidden states: :class:`speechkd.teachers.hf.SSLTeacher` (HuBERT / wav2vec 2.0 / WavLM) and
:class:`speechkd.teachers.whisper.WhisperSSLEncoder` (Whisper's encoder), picked by
:func:`speechkd.teachers.hf.wrap_ssl_model` from the checkpoint's ``model_type``.

Adding a teacher: implement :class:`Teacher` in one module and add ``(predicate on the recipe's teacher section,
"module:Class")`` to :data:`TEACHER_KINDS` (before the project teacher, which takes everything else).
"""

from __future__ import annotations

import importlib
from typing import Callable, Iterator, Optional

import numpy as np

__all__ = ["TEACHER_KINDS", "Teacher", "teacher_class", "teacher_of"]


class Teacher:
    """What the pipeline needs from a teacher. Subclasses set :attr:`can_decode` and implement the methods.

    Args:
      exp: the :class:`speechkd.pipeline.Experiment` (recipe, paths, tokenizer).
    """

    #: The teacher is the project's ASR model: it is evaluated (WER) and serves token-level KL, CoDERT and
    #: ``kd.init_from_teacher``.
    can_decode: bool = False
    #: The teacher writes N-best lists (:meth:`nbest_decoder`): sequence-level KD labels.
    has_nbest: bool = False
    #: A teacher that is not the project's ASR model but can transcribe (:meth:`transcriber`): evaluated on its own.
    can_transcribe: bool = False
    #: The ``pseudo_label.backend`` values :meth:`nbest_decoder` serves (``native``: the teacher's own beam search).
    nbest_backends: tuple[str, ...] = ("native",)

    def __init__(self, exp):
        self.exp = exp

    def describe(self) -> str:
        """One line naming the teacher for logs and reports."""
        raise NotImplementedError

    def prepare(self) -> None:
        """The teacher stage: train the teacher (resumably) or check the given checkpoint.

        Raises:
          ValueError / FileNotFoundError: a bad checkpoint or ``teacher.layer`` (naming them).
        """
        raise NotImplementedError

    def frame_shift(self) -> float:
        """Seconds per frame of the layer outputs."""
        raise NotImplementedError

    #: Seconds of audio per batch of :meth:`plan_batches` by default.
    plan_seconds: float = 200.0
    #: :meth:`plan_batches` orders the cuts by duration (little padding) rather than keeping the manifest order.
    plan_by_duration: bool = False

    def plan_batches(self, cuts, index: int = 0, count: int = 1, batch_seconds: Optional[float] = None) -> list:
        """Shard ``index`` of ``count`` of the teacher's fixed batch plan over ``cuts`` (lhotse CutSets), for
        :meth:`layer_outputs`: batches of at most ``batch_seconds`` (default :attr:`plan_seconds`) of audio, a longer
        cut alone, in manifest order or by duration (:attr:`plan_by_duration`); every cut lands in the same batch
        whatever the sharding."""
        from lhotse import CutSet
        from lhotse.dataset import SimpleCutSampler

        from speechkd.labels.shards import every_nth

        if self.plan_by_duration:
            cuts = CutSet.from_cuts(sorted(cuts, key=lambda c: c.duration))
        sampler = SimpleCutSampler(cuts, max_duration=batch_seconds or self.plan_seconds, shuffle=False, world_size=1,
                                   rank=0)
        return list(every_nth(sampler, index, count))

    def layer_outputs(self, batches: list, layer: int) -> Iterator[tuple[str, np.ndarray]]:
        """Yield ``(cut_id, (T, C) float32)`` outputs of layer ``layer`` (the recipe's ``teacher.layer``) for every
        cut of ``batches`` (from :meth:`plan_batches`), ``T`` its valid frames at :meth:`frame_shift`.

        Raises:
          ValueError: a cut the teacher cannot encode, or a layer out of range (naming them).
        """
        raise NotImplementedError

    def teacher_id(self) -> str:
        """A short content hash of the teacher's weights (N-best labels of another teacher are refused)."""
        raise NotImplementedError

    def nbest_decoder(self, beam: int, nbest: int, max_duration: float):
        """``(CutSet chunk) -> iterator of (cut_id, [{"tokens", "text", "score"}, ...])``: N-best lists by beam search,
        best first, ``tokens`` in the experiment's tokenizer, ``text`` normalised by its text rule, ``score`` the
        sequence log-probability (for :func:`speechkd.labels.nbest.write_nbest_parts`).

        Raises:
          ValueError: the teacher cannot write N-best lists (:attr:`has_nbest` False).
        """
        raise ValueError(f"{self.describe()} cannot write N-best lists")

    def transcriber(self):
        """``(model, transcribe)`` for the evaluate stage: ``transcribe(cuts) -> [normalised text, ...]`` in cut
        order (greedy), ``model`` the module whose parameters are counted.

        Raises:
          ValueError: the teacher cannot transcribe (:attr:`can_transcribe` False).
        """
        raise ValueError(f"{self.describe()} cannot transcribe")

    def label_meta(self, layer: int) -> dict[str, str]:
        """String metadata stored with the layer outputs: what made them (labels from another teacher or layer are
        refused)."""
        return {"teacher_layer": str(layer)}

    def report_note(self) -> Optional[str]:
        """A line for the report when the teacher has no row of its own (cannot decode), else None."""
        return None


#: ``(predicate on the recipe's teacher section, "module:Class")``, first match wins.
TEACHER_KINDS: list[tuple[Callable, str]] = [
    (lambda t: getattr(t, "hf_dir", None) is not None, "speechkd.teachers.hf_ssl:HfSslTeacher"),
    (lambda t: getattr(t, "whisper_dir", None) is not None, "speechkd.teachers.whisper:WhisperTeacher"),
    (lambda t: True, "speechkd.teachers.project:ProjectTeacher"),
]


def teacher_class(teacher_cfg) -> type:
    """The :class:`Teacher` subclass of a recipe's teacher section (:data:`TEACHER_KINDS`, first match)."""
    for matches, target in TEACHER_KINDS:
        if matches(teacher_cfg):
            module, name = target.split(":")
            return getattr(importlib.import_module(module), name)
    raise ValueError("no teacher kind matches the recipe's teacher section")


def teacher_of(exp) -> Teacher:
    """The :class:`Teacher` of an experiment's recipe (:func:`teacher_class`)."""
    return teacher_class(exp.recipe.teacher)(exp)
