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
    """Conformer encoder + stateless transducer sizes."""

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


class QuantizerConfig(Strict):
    """Multi-codebook vector quantizer for MVQ-KD labels (``num_codebooks`` bytes per frame)."""

    num_codebooks: int = Field(8, ge=1)
    train_frames: int = Field(50000, ge=256, description="teacher frames sampled to train the quantizer")
    beam: Optional[int] = None
    refine_iters: Optional[int] = None


class KDConfig(Strict):
    """Which KD method a student trains with and its settings.

    ``method``: ``none`` (baseline), ``mvq`` (predict the teacher's codebook indexes, Guo et al. 2023),
    ``l1`` / ``l2`` (regress the stored float embeddings: the paper's comparison).
    ``student_layer``: 1-based Conformer block whose output feeds the KD head (-1 = last).
    ``scale``: weight of the KD loss added to the RNN-T loss.
    ``frame_ratio_mode``: when the teacher has 2x the student's frame rate: ``concat`` successive frames'
    labels or ``truncate`` (keep every other).
    """

    method: Literal["none", "mvq", "l1", "l2"] = "none"
    student_layer: int = -1
    scale: float = Field(1.0, ge=0)
    frame_ratio_mode: Literal["concat", "truncate"] = "concat"


class StudentRun(Strict):
    """One student row of the experiment: a name, a KD method and the seeds it is trained with."""

    name: str
    kd: KDConfig = KDConfig()
    seeds: list[int] = [0]

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
    eval: EvalConfig = EvalConfig()
    parallel_runs: int = Field(1, ge=1, description="student runs trained at once (one thread each) by `distill`")

    @model_validator(mode="after")
    def _unique_students(self):
        names = [s.name for s in self.students]
        if len(set(names)) != len(names):
            raise ValueError(f"student names must be unique, got {names}")
        return self


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
