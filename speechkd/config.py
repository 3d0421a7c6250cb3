"""Recipe schema: pydantic models read from YAML. An unknown or misspelt key is an error, not a default."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from speechkd.utils import Pathlike


class Strict(BaseModel):
    """Base of every config section: unknown keys are refused."""

    model_config = ConfigDict(extra="forbid")


class DataConfig(Strict):
    """The connected-word ASR task built from a shared corpus (see speechkd.data.sequences).

    ``corpus``: ``commands`` (Speech Commands words) or ``digits`` (FSDD digit strings).
    ``num_train/num_dev/num_test``: utterances built per split (from that split's speakers only).
    ``smoke``: build every split from the corpus's tiny ``smoke`` list (for tests; not speaker-disjoint).
    ``min_words/max_words``: words per utterance. ``min_gap/max_gap``: seconds of silence between words.
    ``trim_db``: edge silence of each source recording is trimmed at this many dB below its peak.
    ``vocab_size``: sentencepiece vocabulary requested (blank and unk included).
    ``num_jobs``: processes for fbank extraction.
    """

    corpus: Literal["commands", "digits"] = "commands"
    corpora_dir: Optional[str] = None
    num_train: int = Field(4000, ge=1)
    num_dev: int = Field(400, ge=1)
    num_test: int = Field(400, ge=1)
    smoke: bool = False
    min_words: int = Field(1, ge=1)
    max_words: int = Field(4, ge=1)
    min_gap: float = Field(0.05, ge=0)
    max_gap: float = Field(0.25, ge=0)
    trim_db: Optional[float] = Field(35.0, gt=0, description="trim source recordings' edge silence (dB); null keeps them whole")
    vocab_size: int = Field(64, ge=4)
    seed: int = 0
    num_jobs: int = Field(2, ge=1)


class ModelConfig(Strict):
    """Conformer encoder + a transducer head (stateless predictor + joiner) or an attention decoder.

    ``arch``: ``transducer`` (RNN-T) or ``aed`` (attention encoder-decoder: a Transformer decoder over the
    encoder, Vaswani et al. 2017, with the optional CTC head as the hybrid CTC/attention branch).
    ``decoder_dim``: the predictor's width (transducer) or the attention decoder's width (aed).
    ``joiner_dim`` / ``context_size``: transducer only. ``decoder_layers`` / ``decoder_heads`` /
    ``decoder_ff_dim``: aed only.
    """

    arch: Literal["transducer", "aed"] = "transducer"
    dim: int = Field(144, ge=8)
    num_layers: int = Field(2, ge=1)
    num_heads: int = Field(4, ge=1)
    ff_dim: int = Field(576, ge=8)
    conv_kernel: int = Field(15, ge=1)
    subsampling: Literal[1, 2, 4, 8] = 4
    dropout: float = Field(0.1, ge=0, lt=1)
    decoder_dim: int = Field(128, ge=8)
    joiner_dim: int = Field(128, ge=8)
    context_size: int = Field(2, ge=1)
    ctc_head: bool = Field(True, description="auxiliary CTC head on the encoder (training aid, see TrainConfig.ctc_weight)")
    decoder_layers: int = Field(2, ge=1, description="attention decoder blocks (aed only)")
    decoder_heads: int = Field(4, ge=1, description="attention decoder heads (aed only)")
    decoder_ff_dim: int = Field(256, ge=8, description="attention decoder feed-forward width (aed only)")


class TrainConfig(Strict):
    """Optimisation: AdamW, linear warm-up then cosine decay to ``final_lr_ratio * lr``, by epochs."""

    epochs: int = Field(10, ge=1)
    lr: float = Field(1e-3, gt=0)
    warmup_steps: int = Field(200, ge=0)
    final_lr_ratio: float = Field(0.05, ge=0, le=1)
    weight_decay: float = Field(1e-3, ge=0)
    max_duration: float = Field(100.0, gt=0, description="seconds of audio per batch")
    grad_clip: float = Field(5.0, gt=0)
    spec_augment: bool = True
    num_threads: int = Field(2, ge=1)
    val_every_epochs: int = Field(1, ge=1)
    ctc_weight: float = Field(1.0, ge=0, description="weight of the auxiliary CTC loss (needs model.ctc_head)")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="label smoothing of the attention decoder's CE (aed only)")


class QuantizerConfig(Strict):
    """Multi-codebook vector quantizer for MVQ-KD labels (``num_codebooks`` bytes per frame)."""

    num_codebooks: int = Field(8, ge=1)
    train_frames: int = Field(50000, ge=256, description="teacher frames sampled to train the quantizer")
    beam: Optional[int] = None
    refine_iters: Optional[int] = None


class KDConfig(Strict):
    """Which KD method a student trains with and its settings.

    ``method``: ``none`` (baseline), ``mvq`` (predict the teacher's codebook indexes, Guo et al. 2023),
    ``l1`` / ``l2`` (regress the stored float embeddings: the paper's comparison), ``seq`` (sequence-level
    KD: train on the teacher's N-best from ``speechkd pseudo-label``, Mun'im et al. 2019), ``word``
    (references plus token-level KL to the teacher's attention-decoder distributions, Kim & Rush 2016).

    Frame-level methods (mvq, l1, l2):
    ``student_layer``: 1-based Conformer block whose output feeds the KD head (-1 = last).
    ``scale``: weight of the KD loss added to the student's own loss.
    ``frame_ratio_mode``: when the teacher has 2x the student's frame rate: ``concat`` successive frames'
    labels or ``truncate`` (keep every other).

    Sequence-level KD (seq; ``kl_scale`` also for word):
    ``nbest``: teacher hypotheses used per utterance (the first ``nbest`` of the stored list).
    ``nbest_weights``: ``uniform`` (1/nbest each) or ``posterior`` (the teacher's sequence log-probs
    renormalised over the hypotheses used, a softmax).
    ``reference_weight``: lambda in ``lambda * L(reference) + (1 - lambda) * L(pseudo labels)``; 0 = pseudo
    labels in place of the references.
    ``max_wer``: drop hypotheses whose WER (percent) against the reference exceeds this, and utterances left
    with none (distil-whisper's filter); null keeps all.
    ``kl_scale`` / ``temperature``: token-level KL(teacher/T || student/T) on the reference prefixes, scaled
    by ``kl_scale * T^2`` (Hinton et al. 2015); attention-decoder teacher and student only.
    ``init_from_teacher``: initialise the student from maximally spaced teacher blocks (widths must match).

    CoDERT (``codert``, Swaminathan et al. 2021; transducer teacher and student): the student's encoder logits
    (its joiner without the predictor) learn the teacher's through ``scale * T^2 * KL(teacher/T || student/T)``
    over the valid frames, so ``scale`` is the paper's alpha and ``temperature`` its tau.
    ``codert_mode``: ``static`` (the trained teacher of the ``teacher`` stage, frozen), ``tandem`` (a teacher
    of the recipe's ``teacher.model`` trained from scratch with the student in the same run, on its own RNN-T
    (+ CTC) loss) or ``shared`` (tandem, the two encoders sharing the student's predictor and joiner). When the
    teacher has 2x the student's frame rate, each student frame's target is the mean of the teacher's
    distributions over its frames (``frame_ratio_mode`` does not apply).
    ``teacher_lr``: tandem/shared: peak lr of the co-learned teacher, an optimiser group of its own with its own
    gradient clipping; null: the ``teacher`` stage's ``train.lr`` (the lr its model is tuned for).
    """

    method: Literal["none", "mvq", "l1", "l2", "seq", "word", "codert"] = "none"
    student_layer: int = -1
    scale: float = Field(1.0, ge=0)
    frame_ratio_mode: Literal["concat", "truncate"] = "concat"
    nbest: int = Field(1, ge=1)
    nbest_weights: Literal["uniform", "posterior"] = "uniform"
    reference_weight: float = Field(0.0, ge=0, le=1)
    max_wer: Optional[float] = Field(None, ge=0)
    kl_scale: float = Field(0.0, ge=0)
    temperature: float = Field(1.0, gt=0)
    init_from_teacher: bool = False
    codert_mode: Literal["static", "tandem", "shared"] = "static"
    teacher_lr: Optional[float] = Field(None, gt=0)

    @model_validator(mode="after")
    def _check_method(self):
        if self.method == "word" and self.kl_scale <= 0:
            raise ValueError("method 'word' needs kl_scale > 0")
        return self


class StudentRun(Strict):
    """One student row of the experiment: a name, a KD method and the seeds it is trained with."""

    name: str
    kd: KDConfig = KDConfig()
    seeds: list[int] = [0]
    model: Optional[ModelConfig] = Field(None, description="this run's student model (default: the recipe's student_model)")

    @model_validator(mode="after")
    def _check_name(self):
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ValueError(f"bad student name '{self.name}' (used as a directory name)")
        return self


class TeacherConfig(Strict):
    """The teacher transducer: its model and training, and which block's output is the KD embedding."""

    model: ModelConfig = ModelConfig(dim=256, num_layers=4, ff_dim=1024)
    train: TrainConfig = TrainConfig()
    seed: int = 0
    layer: int = Field(-1, description="1-based Conformer block whose output is distilled (-1 = last)")


class PseudoLabelConfig(Strict):
    """``speechkd pseudo-label``: the teacher's beam search writes an N-best list per training utterance.

    ``beam``: beam width; ``nbest``: hypotheses stored per utterance (<= beam); ``max_duration``: seconds
    of audio per decoding batch; ``chunk_cuts``: utterances per part file (the unit of resuming).
    """

    beam: int = Field(8, ge=1)
    nbest: int = Field(8, ge=1)
    max_duration: float = Field(200.0, gt=0)
    chunk_cuts: int = Field(500, ge=1)

    @model_validator(mode="after")
    def _check(self):
        if self.nbest > self.beam:
            raise ValueError(f"pseudo_label.nbest={self.nbest} exceeds beam={self.beam}")
        return self


class EvalConfig(Strict):
    """Evaluation: decoding method and the real-time-factor measurement."""

    decoding: Literal["greedy", "beam"] = "greedy"
    beam: int = Field(4, ge=1)
    rtf_utts: int = Field(50, ge=1, description="test utterances decoded one at a time for the RTF")
    rtf_threads: int = Field(1, ge=1)


class Recipe(Strict):
    """A whole experiment: data, teacher, student architecture, quantizer, the student runs, evaluation.

    ``parallel_runs``: how many student runs ``distill`` trains at once (worker processes, one thread each).
    """

    name: str
    exp_dir: str
    data: DataConfig = DataConfig()
    teacher: TeacherConfig = TeacherConfig()
    student_model: ModelConfig = ModelConfig()
    student_train: TrainConfig = TrainConfig()
    quantizer: QuantizerConfig = QuantizerConfig()
    students: list[StudentRun] = [StudentRun(name="baseline")]
    pseudo_label: PseudoLabelConfig = PseudoLabelConfig()
    eval: EvalConfig = EvalConfig()
    parallel_runs: int = Field(1, ge=1, description="student runs trained at once (one thread each) by `distill`")

    @model_validator(mode="after")
    def _unique_students(self):
        names = [s.name for s in self.students]
        if len(set(names)) != len(names):
            raise ValueError(f"student names must be unique, got {names}")
        for run in self.students:
            if run.kd.method == "seq" and run.kd.nbest > self.pseudo_label.nbest:
                raise ValueError(f"student '{run.name}' uses nbest={run.kd.nbest} but pseudo_label.nbest="
                                 f"{self.pseudo_label.nbest} hypotheses are stored")
            if run.kd.kl_scale > 0 and (self.teacher.model.arch != "aed" or self.student_model_of(run).arch != "aed"):
                raise ValueError(f"student '{run.name}': token-level KL (kl_scale > 0) needs an aed teacher and student")
        return self

    def student_model_of(self, run: "StudentRun") -> ModelConfig:
        """The model config of a student run (its own ``model``, else the recipe's ``student_model``)."""
        return run.model if run.model is not None else self.student_model


class RecipeError(ValueError):
    """A recipe file could not be read or does not fit the schema (the message names the file and key)."""


def load_recipe(path: Pathlike, overrides: Optional[dict] = None) -> Recipe:
    """Read and validate a recipe YAML.

    Args:
      path: the YAML file.
      overrides: top-level keys replaced after reading (e.g. ``{"exp_dir": ...}``).

    Raises:
      RecipeError: missing file, bad YAML, or a schema violation (unknown key, wrong type), naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: expected a mapping at the top level")
    raw.update(overrides or {})
    try:
        return Recipe.model_validate(raw)
    except ValidationError as e:
        raise RecipeError(f"{path}: {e}") from e


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML (every default written out)."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
