"""Recipe schema: pydantic models read from YAML. An unknown or misspelt key is an error, not a default."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Optional, Union

import yaml
from pydantic import (BaseModel, ConfigDict, Discriminator, Field, SerializeAsAny, Tag, ValidationError, field_validator,
                      model_validator)

from speechkd.data.sources import LHOTSE_RECIPES
from speechkd.utils import Pathlike


class Strict(BaseModel):
    """Base of every config section: unknown keys are refused."""

    model_config = ConfigDict(extra="forbid")


class TextConfig(Strict):
    """How transcripts are normalised, the same way for tokenizer training, training targets and WER scoring
    (:func:`speechkd.data.text.normalize_text`): Unicode NFKC, format characters (zero-width spaces, BOMs)
    removed, ``lowercase``, with ``strip_punctuation`` every character that is not a letter, digit, apostrophe
    inside a word or space becomes a space, runs of spaces collapse.

    ``alphabet``: the characters a normalised transcript may hold besides the space, as the body of a regular
    expression character class (default ``a-z0-9'``: English letters, digits, apostrophes); a transcript with any
    other character (an accent, a symbol) is bad input (see ``on_bad_input``). Null accepts every character.
    ``spell_digits``: write each digit as its word ("7 5" and "75" -> "seven five"): for connected-digit tasks whose
    teacher (e.g. Whisper) writes numbers as digits.
    """

    lowercase: bool = True
    strip_punctuation: bool = True
    alphabet: Optional[str] = "a-z0-9'"
    spell_digits: bool = False

    @model_validator(mode="after")
    def _check_alphabet(self):
        import re

        if self.alphabet is not None:
            try:
                re.compile(f"[{self.alphabet}]")
            except re.error as e:
                raise ValueError(f"text.alphabet {self.alphabet!r} is not a regular-expression character class "
                                 f"body: {e}") from None
        return self


class UnlabelledSet(Strict):
    """An untranscribed training set the teacher labels (MVQ / L1 / L2 frame labels, sequence-level KD N-best);
    exactly one of:

    ``cuts``: a lhotse CutSet manifest (any transcripts in it are ignored);
    ``audio_dir``: a folder searched recursively for ``.flac`` / ``.wav`` / ``.mp3`` / ``.ogg`` / ``.opus`` files
    (cut id: the path relative to the folder, without suffix, ``/`` replaced by ``-``);
    ``tsv``: a corpus in the shared TSV layout (a name of the shared corpora or a folder) and its ``split``.
    """

    cuts: Optional[str] = None
    audio_dir: Optional[str] = None
    tsv: Optional[str] = None
    split: str = "train"

    @model_validator(mode="after")
    def _one(self):
        given = [k for k in ("cuts", "audio_dir", "tsv") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(f"data.unlabelled: give exactly one of cuts, audio_dir, tsv per entry (got {given or 'none'})")
        return self


class DataBase(Strict):
    """Settings shared by every data source (``data.source``).

    ``corpora_dir``: the shared corpora (TSV names are looked up there; see
    :func:`speechkd.data.corpora.resolve_corpora_dir`).
    ``vocab_size`` / ``token_type``: the sentencepiece vocabulary requested (blank and unk included) and its
    model (``unigram`` or ``bpe``), trained on the normalised training transcripts.
    ``text``: transcript normalisation (:class:`TextConfig`).
    ``max_cut_duration``: seconds; longer training (and unlabelled) cuts are dropped, counted in the log and listed
    in ``cuts/skipped.jsonl``; dev and test keep every cut. Null keeps all.
    ``on_bad_input``: ``error`` stops at the first damaged row (missing or unreadable audio, NaN samples, an empty
    recording, a duration that disagrees with the file, an empty or out-of-alphabet transcript, a duplicate id, a
    cut in two splits) with a message naming the row and the problem; ``skip`` leaves it out, lists it in
    ``cuts/skipped.jsonl`` (id, file, reason) and prints the count.
    ``duration_tolerance``: seconds a row's declared duration may differ from its audio file's.
    ``num_jobs``: processes for fbank extraction; ``fbank_chunk_cuts``: cuts per fbank chunk (the unit of
    parallel work and of resuming).
    ``unlabelled``: untranscribed training sets (:class:`UnlabelledSet`), labelled by the teacher.
    """

    corpora_dir: Optional[str] = None
    vocab_size: int = Field(64, ge=4)
    token_type: Literal["unigram", "bpe"] = "unigram"
    text: TextConfig = TextConfig()
    max_cut_duration: Optional[float] = Field(None, gt=0, description="seconds; longer training cuts are dropped")
    on_bad_input: Literal["error", "skip"] = "error"
    duration_tolerance: float = Field(0.1, ge=0, description="seconds a declared duration may differ from the audio")
    seed: int = 0
    num_jobs: int = Field(2, ge=1)
    fbank_chunk_cuts: int = Field(500, ge=1, description="cuts per fbank chunk (unit of parallel work and resuming)")
    unlabelled: list[UnlabelledSet] = []


class DataConfig(DataBase):
    """``source: connected_words`` (the default): the connected-word ASR task built from a shared corpus of isolated
    words (see speechkd.data.sequences).

    ``corpus``: ``commands`` (Speech Commands words) or ``digits`` (FSDD digit strings).
    ``num_train/num_dev/num_test``: utterances built per split (from that split's speakers only).
    ``smoke``: build every split from the corpus's tiny ``smoke`` list (for tests; not speaker-disjoint).
    ``min_words/max_words``: words per utterance. ``min_gap/max_gap``: seconds of silence between words.
    ``trim_db``: edge silence of each source recording is trimmed at this many dB below its peak.
    """

    source: Literal["connected_words"] = "connected_words"
    corpus: Literal["commands", "digits"] = "commands"
    num_train: int = Field(4000, ge=1)
    num_dev: int = Field(400, ge=1)
    num_test: int = Field(400, ge=1)
    smoke: bool = False
    min_words: int = Field(1, ge=1)
    max_words: int = Field(4, ge=1)
    min_gap: float = Field(0.05, ge=0)
    max_gap: float = Field(0.25, ge=0)
    trim_db: Optional[float] = Field(35.0, gt=0, description="trim source recordings' edge silence (dB); null keeps them whole")

    @model_validator(mode="after")
    def _check_words(self):
        if self.min_words > self.max_words:
            raise ValueError(f"data.min_words ({self.min_words}) exceeds data.max_words ({self.max_words})")
        return self


class TsvData(DataBase):
    """``source: tsv``: corpora in the shared TSV layout (``metadata.tsv`` with columns ``id path speaker text
    label duration sample_rate`` + ``splits/<split>.txt``; see :mod:`speechkd.data.corpora`), e.g. ``an4_mini``,
    ``ljspeech_mini`` or a user's own folder.

    ``corpora``: names of the shared corpora (``an4``, ``ljspeech_mini``, ...) or folders; with more than one, cut
    ids are prefixed with the corpus folder's name. ``train_split/dev_split/test_split``: the split lists used
    (they must not share recordings: a cut in two splits is bad input).
    """

    source: Literal["tsv"]
    corpora: list[str] = Field(min_length=1)
    train_split: str = "train"
    dev_split: str = "dev"
    test_split: str = "test"


class ManifestPair(Strict):
    """A lhotse ``RecordingSet`` and ``SupervisionSet`` manifest pair (joined into one cut per recording)."""

    recordings: str
    supervisions: str


class LhotseData(DataBase):
    """``source: lhotse``: the user's own lhotse manifests per split: a CutSet path, or a
    ``{recordings: ..., supervisions: ...}`` pair. Any sampling rate (resampled to 16 kHz); cuts with several
    channels are downmixed; fbank is computed when a cut has none, reused when its features match the recipe's
    (80-dim kaldi fbank, 10 ms frame shift, 16 kHz).
    """

    source: Literal["lhotse"]
    train: Union[str, ManifestPair]
    dev: Union[str, ManifestPair]
    test: Union[str, ManifestPair]


class LhotseRecipeData(DataBase):
    """A local corpus prepared by one of lhotse's own recipes, no download (``source``: a name registered in
    :data:`speechkd.data.sources.LHOTSE_RECIPES`, e.g. ``librispeech`` with ``lhotse.recipes.prepare_librispeech``,
    or ``mini_librispeech``). ``corpus_dir``: the corpus folder (e.g. ``.../LibriSpeech``); ``train/dev/test``: the
    parts of each split (several parts are joined).
    """

    source: Literal[tuple(LHOTSE_RECIPES)]  # type: ignore[valid-type]
    corpus_dir: str
    train: list[str] = Field(["train-clean-100"], min_length=1)
    dev: list[str] = Field(["dev-clean"], min_length=1)
    test: list[str] = Field(["test-clean"], min_length=1)


def _data_source(v) -> str:
    return v.get("source", "connected_words") if isinstance(v, dict) else getattr(v, "source", "connected_words")


#: ``data`` of an ASR recipe: one member per ``data.source`` (default ``connected_words``).
AnyData = Annotated[
    Union[
        Annotated[DataConfig, Tag("connected_words")],
        Annotated[TsvData, Tag("tsv")],
        Annotated[LhotseData, Tag("lhotse")],
        *[Annotated[LhotseRecipeData, Tag(name)] for name in LHOTSE_RECIPES],
    ],
    Discriminator(_data_source),
]


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
    """Optimisation: AdamW, linear warm-up then cosine decay to ``final_lr_ratio * lr``, by epochs.

    ``max_duration`` is per process: with W data-parallel processes and ``accumulate_grad_batches`` A, one optimiser
    step sees about ``W x A x max_duration`` seconds of audio.
    """

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
    accumulate_grad_batches: int = Field(1, ge=1, description="batches whose gradients make one optimiser step")
    num_buckets: int = Field(20, ge=1, description="duration buckets of the training sampler (more: less padding)")
    in_memory_gib: float = Field(
        2.0, ge=0, description="hold up to this many GiB of the training features and labels in the loader's memory "
        "after their first read (later epochs read nothing from disk); 0 = read every batch from disk")


class QuantizerConfig(Strict):
    """Multi-codebook vector quantizer for MVQ-KD labels (``num_codebooks`` bytes per frame)."""

    num_codebooks: int = Field(8, ge=1)
    train_frames: int = Field(50000, ge=256, description="teacher frames sampled to train the quantizer")
    beam: Optional[int] = None
    refine_iters: Optional[int] = None
    storage: Literal["range", "hdf5"] = Field(
        "range", description="how the CI are stored: 'range' = range-coded losslessly with a per-codebook model "
        "(labels/codebook_indexes.ci, about 14% smaller on Whisper frames), 'hdf5' = one uncompressed byte per index")


class KDSettings(Strict):
    """A student run's ``kd:`` section: the base of every KD method's settings.

    ``method`` names the method (``none`` = the baseline, ``mvq``, ``l1``, ``l2``, ``seq``, ``word``, ``codert`` as
    registered in :mod:`speechkd.methods`) and picks the class the rest of the section is validated against: each
    method module declares its own settings class (a subclass of this one, registered with the method), so the
    section is a union discriminated by ``method`` and a key of another method is an error naming it. Their fields:
    :class:`speechkd.methods.baseline.NoKDConfig`, :class:`speechkd.methods.mvq_kd.FrameKDConfig` (mvq, l1, l2),
    :class:`speechkd.methods.seq_kd.SeqKDConfig`, :class:`speechkd.methods.seq_kd.WordKDConfig`,
    :class:`speechkd.methods.codert.CodertKDConfig`.

    Common to every method:
    ``init_from_teacher``: initialise the student from maximally spaced teacher blocks (widths must match; the
    project's own teacher).
    """

    method: str = "none"
    init_from_teacher: bool = False

    def project_teacher_use(self) -> Optional[str]:
        """What in these settings, beyond the method itself (its registered ``project_teacher``), needs the project's
        own transducer / AED teacher, in words for an error message; None when nothing does."""
        if self.init_from_teacher:
            return "kd.init_from_teacher (copying Conformer blocks of the teacher)"
        return None

    def check_recipe(self, recipe: "Recipe", run: "StudentRun") -> None:
        """Check these settings against the rest of the recipe (e.g. N-best sizes, architectures); nothing here.

        Raises:
            ValueError: naming the student run and the settings that disagree.
        """


def kd_settings(**fields) -> KDSettings:
    """A ``kd:`` section validated by its method's registered settings class, e.g.
    ``kd_settings(method="mvq", student_layer=1)``; ``kd_settings()`` is the baseline's.

    Raises:
        ValueError / pydantic.ValidationError: an unregistered method (listing the registered ones) or settings its
            class refuses (e.g. a key of another method).
    """
    from speechkd.methods import method_spec

    return method_spec(fields.get("method", "none")).config.model_validate(fields)


class StudentRun(Strict):
    """One student row of the experiment: a name, a KD method and the seeds it is trained with."""

    name: str
    kd: SerializeAsAny[KDSettings] = Field(default_factory=kd_settings, description="the KD method and its settings "
                                           "(validated by the method's own settings class)")
    seeds: list[int] = [0]
    model: Optional[ModelConfig] = Field(None, description="this run's student model (default: the recipe's student_model)")

    @field_validator("kd", mode="before")
    @classmethod
    def _kd_by_method(cls, value):
        if isinstance(value, KDSettings) or value is None:
            return kd_settings() if value is None else value
        if not isinstance(value, dict):
            raise ValueError(f"kd must be a mapping with a method, got {value!r}")
        from speechkd.methods import method_spec

        return method_spec(value.get("method", "none")).config.model_validate(value)

    @model_validator(mode="after")
    def _check_name(self):
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ValueError(f"bad student name '{self.name}' (used as a directory name)")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds) or min(self.seeds) < 0:
            raise ValueError(f"students['{self.name}'].seeds {self.seeds}: give distinct seeds >= 0 (each is a run)")
        return self


class TeacherConfig(Strict):
    """The teacher: the project's transducer (its model and training) or a Hugging Face SSL encoder, and which
    layer's output is the KD embedding.

    ``hf_dir``: a local Hugging Face HuBERT / wav2vec 2.0 / WavLM checkpoint directory (``config.json`` +
    ``model.safetensors``; see :mod:`speechkd.teachers.hf`; a relative path is read from the working directory).
    With it the ``teacher`` stage trains nothing (it only checks the directory), ``extract`` stores the model's
    hidden states at its own frame shift (``prod(conv_stride)`` / 16 kHz: 20 ms for the standard CNN), and
    ``model``, ``train`` and ``seed`` are unused. Only frame-level KD students (``mvq``, ``l1``, ``l2``) and
    baselines can use it: sequence-level KD, word-level KL, ``init_from_teacher`` and CoDERT need the project's
    transducer / AED teacher.
    ``whisper_dir``: a local Hugging Face Whisper directory (:mod:`speechkd.teachers.whisper`; make one with
    ``speechkd import-whisper``): its encoder's layers, on log-mel windows fitted to each batch (not the 30 s pad),
    at 20 ms frames; like ``hf_dir`` it serves frame-level KD students and baselines.
    ``model_dir``: a transducer / AED trained by speechkd in another experiment on the same data (its directory:
    ``model.json`` + ``model.safetensors``, e.g. ``<exp>/students/<run>-seed0``, a large MVQ-KD student of Whisper),
    used as the project's teacher as is: the ``teacher`` stage copies it into ``<exp>/teacher`` after checking that
    its model equals ``teacher.model`` and that its experiment's tokenizer (``<its exp>/lang/tokens.model``) has this
    one's vocabulary; ``teacher.train`` is then unused. Every method that needs the project's teacher can use it.
    ``layer``: without ``hf_dir`` / ``whisper_dir``, the 1-based Conformer block whose output is distilled (-1 =
    last). With either, the index into ``transformers``' ``output_hidden_states``: i = 1..L is the output of
    transformer layer i (1-based; Whisper's last one after its final LayerNorm), 0 the input of the first
    transformer layer, -1 the last layer (L).
    """

    model: ModelConfig = ModelConfig(dim=256, num_layers=4, ff_dim=1024)
    train: TrainConfig = TrainConfig()
    seed: int = 0
    layer: int = Field(-1, description="distilled layer: 1-based Conformer block, or with hf_dir the hidden-state "
                                       "index (i = output of transformer layer i, 0 = its input); -1 = last")
    hf_dir: Optional[str] = Field(None, description="local Hugging Face HuBERT / wav2vec 2.0 / WavLM directory "
                                                    "used as the teacher instead of the transducer")
    whisper_dir: Optional[str] = Field(None, description="local Hugging Face Whisper directory (e.g. from "
                                                         "`speechkd import-whisper`) whose encoder is the teacher")
    model_dir: Optional[str] = Field(None, description="a transducer / AED trained by speechkd on the same data "
                                                       "(model.json + model.safetensors), used as the project's "
                                                       "teacher instead of training one")

    @model_validator(mode="after")
    def _check_layer(self):
        if self.hf_dir is not None and self.whisper_dir is not None:
            raise ValueError("teacher: give hf_dir or whisper_dir, not both")
        if self.model_dir is not None and self.external_dir() is not None:
            raise ValueError("teacher.model_dir is a project teacher: it cannot be given with hf_dir or whisper_dir")
        external = self.hf_dir if self.hf_dir is not None else self.whisper_dir
        if external is not None and (not external.strip() or self.layer < -1):
            key = "hf_dir" if self.hf_dir is not None else "whisper_dir"
            raise ValueError(f"teacher.{key} {external!r} / teacher.layer {self.layer}: with {key}, layer is a "
                             "hidden-state index >= 0 or -1 (the last), and the directory a path")
        return self

    def external_dir(self) -> Optional[str]:
        """The directory of a pretrained teacher used as is (``hf_dir`` or ``whisper_dir``), else None."""
        return self.hf_dir if self.hf_dir is not None else self.whisper_dir


class PseudoLabelConfig(Strict):
    """``speechkd pseudo-label``: the teacher's beam search writes an N-best list per training utterance.

    ``beam``: beam width; ``nbest``: hypotheses stored per utterance (<= beam); ``max_duration``: seconds
    of audio per decoding batch; ``chunk_cuts``: utterances per part file (the unit of resuming).
    ``backend``: ``native`` (the teacher's own beam search: ``transformers`` for Whisper) or ``ctranslate2`` (a
    Whisper teacher's CTranslate2 model, ``ctranslate2_dir``, at ``ctranslate2_compute_type``; labels record the
    backend, and labels of the other backend are refused).
    """

    beam: int = Field(8, ge=1)
    nbest: int = Field(8, ge=1)
    max_duration: float = Field(200.0, gt=0)
    chunk_cuts: int = Field(500, ge=1)
    backend: Literal["native", "ctranslate2"] = Field(
        "native", description="the teacher's own beam search, or (Whisper teachers) the ctranslate2 runtime")
    ctranslate2_dir: Optional[str] = Field(
        None, description="backend ctranslate2: the CTranslate2 model of the same Whisper (default: the source "
                          "`speechkd import-whisper` recorded in the teacher's directory)")
    ctranslate2_compute_type: str = Field("float32", description="backend ctranslate2: float32, int8, int8_float32, ...")
    ctc_weight: float = Field(
        0.0, ge=0, le=1, description="a project attention encoder-decoder teacher: the weight of joint CTC/attention "
        "beam search (Watanabe et al. 2017; needs its CTC head), which ends hypotheses where the speech ends; 0 = "
        "attention alone")

    @model_validator(mode="after")
    def _check(self):
        if self.nbest > self.beam:
            raise ValueError(f"pseudo_label.nbest={self.nbest} exceeds beam={self.beam}")
        return self


class EvalConfig(Strict):
    """Evaluation: decoding method and the real-time-factor measurement."""

    decoding: Literal["greedy", "beam"] = "greedy"
    beam: int = Field(4, ge=1)
    ctc_weight: float = Field(0.0, ge=0, le=1, description="decoding: beam, attention encoder-decoders: the weight of "
                              "joint CTC/attention beam search (0 = attention alone; transducers ignore it)")
    rtf_utts: int = Field(50, ge=1, description="test utterances decoded one at a time for the RTF")
    rtf_threads: int = Field(1, ge=1)
    deployed: bool = Field(False, description="also measure every model as deployed: its ONNX export in fp32 and int8 "
                                              "(made in EXP/export/<run> unless there) with file sizes, onnxruntime "
                                              "RTF on rtf_threads threads and greedy test WER; the report's 'As "
                                              "deployed' block")


class StageRuntime(Strict):
    """What one training stage may change in the recipe's runtime (``runtime.stages.<stage>``): the precision. The
    process count is fixed when the processes are launched, so it is the same for every stage."""

    precision: Optional[Literal["32-true", "bf16-mixed", "16-mixed"]] = None


class RuntimeConfig(Strict):
    """Where the fits run, handed to every Lightning ``Trainer`` (teacher and students).

    ``accelerator``: ``auto`` (a GPU when one is present, else the CPU), ``cpu`` or ``gpu``.
    ``devices``: processes per node, one per device (``auto``: every GPU of the node, or one CPU process);
    ``num_nodes``: nodes. With more than one process in all, ``speechkd run`` / ``train`` / ``distill`` start the
    processes on one node with ``torch.distributed.run`` (torchrun); on several nodes launch them yourself with
    torchrun or SLURM (docs/scale_out.md). Every process runs the pipeline: fits train data-parallel (DDP, each rank
    on its own batches), labelling stages split the cuts by rank, the other stages run on rank 0 while the rest wait.
    ``strategy``: Lightning's strategy (``auto``: DDP when there are several processes).
    ``precision``: ``32-true``, ``bf16-mixed`` (CPU or recent GPUs) or ``16-mixed`` (GPU only).
    ``stages``: per training stage overrides (:class:`StageRuntime`), e.g. ``{teacher: {precision: bf16-mixed}}``;
    the stage names are the recipe's training stages (ASR: teacher, distill; SSL: teacher, distill, finetune).
    The CPU thread count of a process stays ``train.num_threads``.
    """

    accelerator: Literal["auto", "cpu", "gpu"] = "auto"
    devices: Union[int, Literal["auto"]] = 1
    num_nodes: int = Field(1, ge=1)
    strategy: Literal["auto", "ddp"] = "auto"
    precision: Literal["32-true", "bf16-mixed", "16-mixed"] = "32-true"
    stages: dict[str, StageRuntime] = {}

    @field_validator("devices")
    @classmethod
    def _positive_devices(cls, v):
        if isinstance(v, int) and v < 1:
            raise ValueError(f"devices must be >= 1 or 'auto', got {v}")
        return v

    def uses_gpu(self) -> bool:
        """The fits run on GPUs: ``accelerator: gpu``, or ``auto`` with a CUDA device present."""
        if self.accelerator == "gpu":
            return True
        if self.accelerator == "cpu":
            return False
        import torch

        return torch.cuda.is_available()

    def processes_per_node(self) -> int:
        """Processes (one per device) on each node: ``devices``, or for ``auto`` the node's GPUs (1 on a CPU)."""
        if self.devices != "auto":
            return int(self.devices)
        if self.uses_gpu():
            import torch

            return max(1, torch.cuda.device_count())
        return 1

    def world_size(self) -> int:
        """Processes in all: :meth:`processes_per_node` x ``num_nodes``."""
        return self.processes_per_node() * self.num_nodes

    def for_stage(self, stage: str) -> "RuntimeConfig":
        """This runtime with the overrides of ``stages[stage]`` applied (the same runtime when it has none)."""
        over = self.stages.get(stage)
        if over is None:
            return self
        return self.model_copy(update={k: v for k, v in over.model_dump().items() if v is not None})

    def check_stages(self, allowed: tuple[str, ...]) -> None:
        """Raise ValueError naming ``runtime.stages`` keys that are not training stages of the recipe."""
        bad = sorted(set(self.stages) - set(allowed))
        if bad:
            raise ValueError(f"runtime.stages: {bad} are not training stages of this recipe (have {list(allowed)})")

    def trainer_kwargs(self) -> dict:
        """Keyword arguments of ``lightning.Trainer``: accelerator, devices, num_nodes, strategy, precision (DDP
        when the fit has several processes and the strategy is ``auto``)."""
        strategy = self.strategy
        if strategy == "auto" and self.world_size() > 1:
            strategy = "ddp"
        return {"accelerator": self.accelerator, "devices": self.processes_per_node(), "num_nodes": self.num_nodes,
                "strategy": strategy, "precision": self.precision}


def needs_project_teacher(kd: KDSettings, teacher_has_nbest: bool = False) -> Optional[str]:
    """What in ``kd`` needs the project's own (transducer / AED) teacher rather than a pretrained one
    (``teacher.hf_dir`` / ``whisper_dir``), in words for an error message: the method itself (its registered
    :attr:`speechkd.methods.MethodSpec.project_teacher`, unless the teacher writes N-best lists and the method takes
    any such teacher, ``teacher_has_nbest``), else what its settings use (:meth:`KDSettings.project_teacher_use`:
    token-level KL, ``init_from_teacher``); None when nothing does (mvq, l1, l2, none; seq with an N-best teacher)."""
    from speechkd.methods import method_spec

    spec = method_spec(kd.method)
    if spec.project_teacher and not (spec.nbest_teacher and teacher_has_nbest):
        return spec.project_teacher
    return kd.project_teacher_use()


class Recipe(Strict):
    """A whole experiment: data, teacher, student architecture, quantizer, the student runs, evaluation.

    ``parallel_runs``: how many student runs ``distill`` trains at once (worker processes, one thread each).
    ``runtime``: accelerator, devices and precision of every fit (:class:`RuntimeConfig`).
    """

    task: Literal["asr"] = "asr"
    name: str
    exp_dir: str
    data: AnyData = DataConfig()
    teacher: TeacherConfig = TeacherConfig()
    student_model: ModelConfig = ModelConfig()
    student_train: TrainConfig = TrainConfig()
    quantizer: QuantizerConfig = QuantizerConfig()
    students: list[StudentRun] = [StudentRun(name="baseline")]
    pseudo_label: PseudoLabelConfig = PseudoLabelConfig()
    eval: EvalConfig = EvalConfig()
    parallel_runs: int = Field(1, ge=1, description="student runs trained at once (one thread each) by `distill`")
    runtime: RuntimeConfig = RuntimeConfig()

    @model_validator(mode="after")
    def _unique_students(self):
        self.runtime.check_stages(("teacher", "distill"))
        n = self.teacher.model.num_layers
        if self.teacher.external_dir() is None and self.teacher.layer != -1 and not 1 <= self.teacher.layer <= n:
            raise ValueError(f"teacher.layer {self.teacher.layer}: the teacher has {n} Conformer blocks "
                             f"(teacher.model.num_layers): give 1..{n} or -1 (the last)")
        names = [s.name for s in self.students]
        if len(set(names)) != len(names):
            raise ValueError(f"student names must be unique, got {names}")
        for run in self.students:
            if self.teacher.external_dir() is not None:
                from speechkd.teachers.base import teacher_class

                key = "hf_dir" if self.teacher.hf_dir is not None else "whisper_dir"
                needs = needs_project_teacher(run.kd, teacher_class(self.teacher).has_nbest)
                if needs:
                    raise ValueError(
                        f"teacher.{key} is set (a pretrained teacher, {self.teacher.external_dir()}), but student "
                        f"'{run.name}' uses {needs}, which needs the project's transducer/AED teacher trained by the "
                        f"teacher stage: remove teacher.{key} or that student (it serves kd.method mvq, l1, l2 and "
                        "none)")
            run.kd.check_recipe(self, run)
        return self

    def student_model_of(self, run: "StudentRun") -> ModelConfig:
        """The model config of a student run (its own ``model``, else the recipe's ``student_model``)."""
        return run.model if run.model is not None else self.student_model


# ------------------------------------------------------------------------------------------------ SSL recipes
class SslDataConfig(Strict):
    """Where the SSL recipe's audio comes from (the shared corpora; see :mod:`speechkd.data.classification`).

    ``pretrain_corpora``: corpora whose ``train_split`` the teacher is pre-trained and the student distilled on
    (every utterance, no labels needed). ``sv_corpora``: corpora whose ``train_split`` speakers the SV heads learn.
    KWS always uses Speech Commands (``speech_commands_v2_test``): its ``train_split`` to train, its ``test_split``
    to score accuracy on the 12 classes.
    ``trials``: speaker-verification trial lists scored for EER / minDCF, each ``<corpus>/<list>`` (a file
    ``<corpus>/trials/<list>.tsv``; trial speakers are held out from every ``train`` split).
    ``max_trials``: keep at most this many trials per list (the first half of them target trials, the rest
    non-target ones, in file order); null keeps every trial.
    ``max_segment`` / ``min_segment``: training utterances longer than ``max_segment`` seconds (LibriSpeech: up to
    23 s) are cut into windows of that length; a last window under ``min_segment`` seconds is dropped.
    ``smoke``: read every split from the corpora's tiny ``smoke`` lists (for tests: train and test overlap).
    """

    corpora_dir: Optional[str] = None
    pretrain_corpora: list[str] = Field(["commands", "librispeech_spk"], min_length=1)
    sv_corpora: list[str] = Field(["commands", "librispeech_spk"], min_length=1)
    train_split: str = "train"
    test_split: str = "test"
    trials: list[str] = ["commands/sv_test", "librispeech_spk/sv_test"]
    max_trials: Optional[int] = Field(None, ge=2)
    max_segment: float = Field(6.0, gt=0, description="seconds; longer training utterances are cut into windows")
    min_segment: float = Field(1.0, gt=0)
    smoke: bool = False

    @model_validator(mode="after")
    def _check(self):
        for t in self.trials:
            parts = t.split("/")
            if len(parts) != 2 or not all(parts):
                raise ValueError(f"trial list {t!r} must be written <corpus>/<list>, e.g. commands/sv_test")
        if len(set(self.trials)) != len(self.trials):
            raise ValueError(f"trial lists repeat: {self.trials}")
        if self.min_segment > self.max_segment:
            raise ValueError(f"min_segment {self.min_segment} exceeds max_segment {self.max_segment}")
        return self


class HubertPretrainConfig(Strict):
    """A small HuBERT teacher pre-trained here (first iteration: masked prediction of MFCC k-means clusters,
    :func:`speechkd.teachers.hubert_pretrain.pretrain_hubert`).

    Sizes: ``hidden_size`` x ``num_layers`` transformer layers (``num_heads`` heads, feed-forward
    ``intermediate_size``, default 4 x hidden), a CNN of ``conv_dim`` channels with HuBERT's kernels and strides
    (20 ms frames) unless ``conv_kernel`` / ``conv_stride`` say otherwise, a positional convolution of
    ``pos_conv_kernel`` taps in ``pos_conv_groups`` groups. HuBERT Base is 768 x 12, CNN 512, 100 clusters.
    Training: ``steps`` AdamW steps at peak ``lr`` (8% warm-up unless ``warmup_steps``), batches of at most
    ``batch_seconds`` of audio cropped to at most ``max_seconds``; a checkpoint every ``ckpt_every`` steps.
    """

    hidden_size: int = Field(256, ge=8)
    num_layers: int = Field(6, ge=1)
    num_heads: int = Field(4, ge=1)
    intermediate_size: Optional[int] = Field(None, ge=8)
    conv_dim: int = Field(256, ge=1)
    conv_kernel: Optional[list[int]] = None
    conv_stride: Optional[list[int]] = None
    pos_conv_kernel: int = Field(128, ge=2)
    pos_conv_groups: int = Field(16, ge=1)
    num_clusters: int = Field(100, ge=2)
    final_dim: int = Field(256, ge=1)
    mask_prob: float = Field(0.8, ge=0, le=1)
    mask_length: int = Field(10, ge=1)
    steps: int = Field(4000, ge=1)
    lr: float = Field(5e-4, gt=0)
    warmup_steps: Optional[int] = Field(None, ge=0)
    batch_seconds: float = Field(64.0, gt=0)
    max_seconds: float = Field(6.0, gt=0)
    kmeans_iters: int = Field(30, ge=0)
    max_kmeans_frames: Optional[int] = Field(500_000, ge=1)
    ckpt_every: int = Field(200, ge=1)
    seed: int = 0
    num_threads: int = Field(2, ge=1)

    @model_validator(mode="after")
    def _check(self):
        if self.hidden_size % self.num_heads or self.hidden_size % self.pos_conv_groups:
            raise ValueError(f"num_heads ({self.num_heads}) and pos_conv_groups ({self.pos_conv_groups}) must divide "
                             f"hidden_size ({self.hidden_size})")
        if (self.conv_kernel is None) != (self.conv_stride is None) or (
                self.conv_kernel is not None and (len(self.conv_kernel) != len(self.conv_stride) or not self.conv_kernel)):
            raise ValueError("give conv_kernel and conv_stride together, one entry per CNN layer")
        return self


class SslTeacherConfig(Strict):
    """The SSL teacher: ``dir`` of an existing Hugging Face HuBERT / wav2vec 2.0 / WavLM checkpoint
    (``config.json`` + ``model.safetensors``) or Whisper directory (its encoder, on log-mel of the waveform:
    :class:`speechkd.teachers.whisper.WhisperSSLEncoder`; e.g. from ``speechkd import-whisper``), or ``pretrain``
    settings to pre-train a HuBERT here (the default when neither is given). The student copies the teacher's
    front end (CNN, or Whisper's two convolutions and positions) and its first transformer layers."""

    dir: Optional[str] = None
    pretrain: Optional[HubertPretrainConfig] = None

    @model_validator(mode="after")
    def _one_source(self):
        if self.dir is not None and self.pretrain is not None:
            raise ValueError("teacher: give either dir (an existing checkpoint) or pretrain (train one here), not both")
        if self.dir is None and self.pretrain is None:
            self.pretrain = HubertPretrainConfig()
        return self


class SslStudentConfig(Strict):
    """The DistilHuBERT student (:func:`speechkd.models.ssl.build_ssl_student`) and its distillation.

    ``num_layers``: K student transformer layers (DistilHuBERT: 2), initialised from teacher layers ``layer_map``
    (default 1..K) and the teacher's CNN. ``target_layers``: teacher layers the prediction heads learn (default:
    three evenly spaced ones, L/3, 2L/3, L: DistilHuBERT's 4, 8, 12 of 12; in ``layer_to_layer`` mode the
    ``layer_map``, one per student layer). Loss per target layer: ``l1_weight * L1 + l2_weight * L2 + cos_weight *
    -log sigmoid(cos)`` (``cos_type``), averaged (``layer_reduction: mean``) or summed over the layers.
    Training: ``steps`` AdamW steps at peak ``lr`` (linear warm-up, cosine decay to ``final_lr_ratio * lr``),
    batches of ``batch_seconds`` of audio; the CNN's gradient is scaled by ``feature_grad_mult``.
    """

    num_layers: int = Field(2, ge=1)
    target_layers: Optional[list[int]] = None
    layer_map: Optional[list[int]] = None
    layer_to_layer: bool = False
    head_type: Literal["mlp", "linear"] = "mlp"
    l1_weight: float = Field(1.0, ge=0)
    l2_weight: float = Field(0.0, ge=0)
    cos_weight: float = Field(1.0, ge=0)
    cos_type: Literal["logsigmoid", "cosine"] = "logsigmoid"
    layer_reduction: Literal["mean", "sum"] = "mean"
    feature_grad_mult: float = Field(0.1, ge=0)
    steps: int = Field(2000, ge=1)
    lr: float = Field(5e-4, gt=0, description="DistilHuBERT: 2e-4 over 200k steps; higher for a short CPU run")
    warmup_steps: int = Field(100, ge=0)
    final_lr_ratio: float = Field(0.05, ge=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(10.0, gt=0)
    batch_seconds: float = Field(32.0, gt=0)
    ckpt_every: int = Field(200, ge=1)
    seed: int = 0
    num_threads: int = Field(2, ge=1)

    @model_validator(mode="after")
    def _check(self):
        if self.l1_weight + self.l2_weight + self.cos_weight <= 0:
            raise ValueError("student: at least one of l1_weight, l2_weight, cos_weight must be > 0")
        if self.layer_map is not None and len(self.layer_map) != self.num_layers:
            raise ValueError(f"student.layer_map names {len(self.layer_map)} teacher layers for "
                             f"{self.num_layers} student layers")
        if self.target_layers is not None and (not self.target_layers or len(set(self.target_layers)) != len(self.target_layers)):
            raise ValueError(f"student.target_layers must be distinct teacher layers, got {self.target_layers}")
        if self.layer_to_layer and self.target_layers is not None and len(self.target_layers) != self.num_layers:
            raise ValueError("layer_to_layer needs one target layer per student layer")
        return self


class DownstreamConfig(Strict):
    """Fine-tuning each encoder (``encoders``: the teacher, the distilled student) for the tasks, in each mode.

    ``modes``: ``frozen`` (encoder frozen, one run per task training only its head), ``finetune`` (encoder
    fine-tuned, one run per task) and ``multitask`` (one encoder fine-tuned for both tasks at once with
    ``L = L_KWS + beta * L_SV``; arXiv 2210.16611). ``tasks``: ``kws`` (12-class Speech Commands, SUPERB KS head,
    cross-entropy) and ``sv`` (x-vector head, AM-softmax with scale ``am_s`` and margin ``am_m``).
    Heads read a learnt softmax-weighted sum of all encoder layers (SUPERB). KWS head: projection
    ``kws_proj_dim``; SV head: projection / TDNN width ``sv_proj_dim``, pooled width ``sv_stats_dim``, embedding
    ``sv_embed_dim``, TDNN ``sv_padding`` (``valid``: SUPERB / Kaldi; needs 15 frames).
    ``seed``: the heads' initialisation and batch order; ``more_seeds``: further fine-tuning seeds, each training
    every run again (runs and systems named ``<name>-seed<k>``; the report gives mean ± sd over the seeds).
    Training: ``steps`` AdamW steps per run; heads at peak ``lr``, a fine-tuned encoder at ``encoder_lr``
    (linear warm-up, cosine decay to ``final_lr_ratio``); batches of ``batch_seconds`` of audio. A fine-tuned
    encoder keeps its CNN frozen (``freeze_cnn``), runs with ``encoder_layerdrop`` and, when ``spec_augment``, its
    own time masking (the checkpoint's ``mask_time_prob``).
    """

    encoders: list[Literal["teacher", "student"]] = ["teacher", "student"]
    modes: list[Literal["frozen", "finetune", "multitask"]] = ["frozen", "finetune", "multitask"]
    tasks: list[Literal["kws", "sv"]] = ["kws", "sv"]
    steps: int = Field(1000, ge=1)
    lr: float = Field(1e-3, gt=0)
    encoder_lr: float = Field(5e-5, gt=0)
    warmup_steps: int = Field(100, ge=0)
    final_lr_ratio: float = Field(0.05, ge=0, le=1)
    weight_decay: float = Field(1e-3, ge=0)
    grad_clip: float = Field(5.0, gt=0)
    batch_seconds: float = Field(32.0, gt=0)
    beta: float = Field(1.0, ge=0, description="weight of the SV loss in multitask mode")
    am_s: float = Field(30.0, gt=0)
    am_m: float = Field(0.4, ge=0)
    kws_proj_dim: int = Field(256, ge=1)
    sv_proj_dim: int = Field(256, ge=1)
    sv_stats_dim: int = Field(750, ge=1)
    sv_embed_dim: int = Field(256, ge=1)
    sv_padding: Literal["valid", "same"] = "valid"
    layer_norm: bool = Field(False, description="layer-normalise each encoder layer before the weighted sum")
    freeze_cnn: bool = True
    encoder_layerdrop: float = Field(0.0, ge=0, lt=1)
    spec_augment: bool = False
    ckpt_every: int = Field(200, ge=1)
    seed: int = 0
    more_seeds: list[int] = Field(default_factory=list, description="further fine-tuning seeds: every run is trained "
                                  "again with each (runs and systems named ...-seed<k>)")
    num_threads: int = Field(2, ge=1)

    def all_seeds(self) -> list[int]:
        """``[seed, *more_seeds]``: the fine-tuning seeds, the first one's runs unsuffixed."""
        return [self.seed, *self.more_seeds]

    @model_validator(mode="after")
    def _check(self):
        seeds = self.all_seeds()
        if len(set(seeds)) != len(seeds) or min(seeds) < 0:
            raise ValueError(f"downstream.seed and more_seeds must be distinct and >= 0, got {seeds}")
        for key in ("encoders", "modes", "tasks"):
            values = getattr(self, key)
            if not values or len(set(values)) != len(values):
                raise ValueError(f"downstream.{key} must be a non-empty list without repeats, got {values}")
        if "multitask" in self.modes and set(self.tasks) != {"kws", "sv"}:
            raise ValueError("downstream mode 'multitask' needs both tasks (tasks: [kws, sv])")
        return self


class SslEvalConfig(Strict):
    """Evaluation of every fine-tuned system: KWS accuracy on the Speech Commands test split, SV EER and minDCF
    (prior ``p_target``, unit costs) on each trial list by cosine scoring, parameters, and the CPU real-time factor
    of the whole system (every task's encoder and head) on ``rtf_utts`` test clips run one at a time with
    ``rtf_threads`` threads."""

    batch_seconds: float = Field(60.0, gt=0)
    p_target: float = Field(0.01, gt=0, lt=1)
    rtf_utts: int = Field(50, ge=1)
    rtf_threads: int = Field(1, ge=1)
    num_threads: int = Field(2, ge=1)
    deployed: bool = Field(False, description="also measure every system as deployed: each run's ONNX export in fp32 "
                                              "and int8 (made in EXP/export/<run> unless there) with file sizes, KWS "
                                              "accuracy, EER and onnxruntime RTF; the report's 'As deployed' block")


class SslRecipe(Strict):
    """An SSL-distillation experiment (arXiv 2210.16611 after DistilHuBERT): a HuBERT teacher (pre-trained here or
    loaded), a DistilHuBERT student distilled from it, both fine-tuned for keyword spotting and speaker verification
    (frozen / fine-tuned / multi-task), evaluated and reported. Selected by ``task: ssl`` at the top of the YAML.
    ``runtime``: as for ASR recipes; HuBERT pre-training, distillation and fine-tuning train data-parallel with
    several processes. ``parallel_runs``: how many fine-tuning runs ``finetune`` trains at once (worker processes,
    one thread each, :mod:`speechkd.workers`)."""

    task: Literal["ssl"]
    name: str
    exp_dir: str
    data: SslDataConfig = SslDataConfig()
    teacher: SslTeacherConfig = SslTeacherConfig()
    student: SslStudentConfig = SslStudentConfig()
    downstream: DownstreamConfig = DownstreamConfig()
    eval: SslEvalConfig = SslEvalConfig()
    parallel_runs: int = Field(1, ge=1, description="fine-tuning runs trained at once (one thread each) by `finetune`")
    runtime: RuntimeConfig = RuntimeConfig()

    @model_validator(mode="after")
    def _check_layers(self):
        self.runtime.check_stages(("teacher", "distill", "finetune"))
        pre = self.teacher.pretrain
        if pre is not None:
            layers = pre.num_layers
            for key, lo in (("target_layers", 0), ("layer_map", 1)):
                bad = [i for i in getattr(self.student, key) or [] if not lo <= i <= layers]
                if bad:
                    raise ValueError(f"student.{key} {bad} out of range {lo}..{layers} (the teacher's layers)")
        return self


AnyRecipe = Union[Recipe, SslRecipe]


class RecipeError(ValueError):
    """A recipe file could not be read or does not fit the schema (the message names the file and key)."""


def load_recipe(path: Pathlike, overrides: Optional[dict] = None) -> AnyRecipe:
    """Read and validate a recipe YAML: an ASR recipe (:class:`Recipe`), or an SSL one (:class:`SslRecipe`) when
    its top level says ``task: ssl``.

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
    task = raw.get("task", "asr")
    if task not in ("asr", "ssl"):
        raise RecipeError(f"{path}: task must be 'ssl' (an SSL-distillation recipe) or 'asr' (an ASR recipe, the "
                          f"default when absent), got {task!r}")
    try:
        return (SslRecipe if task == "ssl" else Recipe).model_validate(raw)
    except ValidationError as e:
        raise RecipeError(f"{path}: {e}") from e


def project_teacher_dir(exp_dir: Pathlike) -> Path:
    """The ASR teacher stage's output directory, ``<exp_dir>/teacher`` (``model.json``, ``model.safetensors``)."""
    return Path(exp_dir) / "teacher"


def project_teacher_trained(exp_dir: Pathlike) -> bool:
    """Whether the ASR teacher stage's output, ``<exp_dir>/teacher/model.safetensors`` (trained here or copied from
    ``teacher.model_dir``), exists: the teacher stage then skips, and ``teacher.model_dir`` is no longer read."""
    return (project_teacher_dir(exp_dir) / "model.safetensors").is_file()


def missing_paths(recipe: AnyRecipe, stage: Optional[str] = None) -> list[tuple[str, str]]:
    """``(key, path)`` of each file or directory a recipe names that must exist before its first stage and does not:
    a pretrained teacher (``teacher.hf_dir`` / ``teacher.whisper_dir`` / the SSL ``teacher.dir``), lhotse manifests
    (``data.train`` ...), a lhotse recipe's ``data.corpus_dir``, ``data.unlabelled`` inputs. Checked by the CLI when it
    loads a recipe (not by the schema, so a recipe validates before, e.g., ``speechkd import-whisper`` made its
    teacher). Relative paths are read from the working directory.

    ``stage``: the stage the command runs (None: every stage, as ``speechkd run``). ``teacher.model_dir`` is read only
    by the ``teacher`` stage (it copies it into ``<exp>/teacher``), so it is checked for that stage and for a whole
    run only, and not once the copy exists: the stages that do not need the teacher (``prepare``, ``distill
    --student baseline``) run before the model it names is trained."""
    out: list[tuple[str, str]] = []

    def need(key: str, path: Optional[str]) -> None:
        if path and not Path(path).exists():
            out.append((key, path))

    t = recipe.teacher
    for key in ("hf_dir", "whisper_dir", "dir"):
        need(f"teacher.{key}", getattr(t, key, None))
    if stage in (None, "teacher") and not project_teacher_trained(recipe.exp_dir):
        need("teacher.model_dir", getattr(t, "model_dir", None))
    d = recipe.data
    if isinstance(d, LhotseData):
        for split in ("train", "dev", "test"):
            spec = getattr(d, split)
            if isinstance(spec, str):
                need(f"data.{split}", spec)
            else:
                need(f"data.{split}.recordings", spec.recordings)
                need(f"data.{split}.supervisions", spec.supervisions)
    if isinstance(d, LhotseRecipeData):
        need("data.corpus_dir", d.corpus_dir)
    for i, u in enumerate(getattr(d, "unlabelled", None) or []):
        need(f"data.unlabelled[{i}].cuts", u.cuts)
        need(f"data.unlabelled[{i}].audio_dir", u.audio_dir)
    return out


def dump_recipe(recipe: AnyRecipe) -> str:
    """The resolved recipe as YAML (every default written out)."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
