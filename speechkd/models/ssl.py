"""DistilHuBERT-style SSL students: a shallow copy of the teacher's own ``transformers`` model, plus prediction heads.

DistilHuBERT (Chang et al., ICASSP 2022, arXiv 2110.01900, sec. 2; s3prl ``pretrain/distiller``) distils a
HuBERT Base teacher into a student made of the teacher's CNN feature encoder, feature projection, convolutional
positional embedding and only K = 2 transformer layers, all initialised from the teacher (its first K layers).
Separate prediction heads on the student's last layer regress the teacher's hidden states of layers 4, 8 and 12
(L1 + cosine loss, :func:`speechkd.losses.distill.prediction_loss`); after distillation the heads are dropped and
the student encoder is fine-tuned (multi-task, arXiv 2210.16611) like any SSL model.

Here the student encoder *is* a ``transformers`` model of the teacher's class (``HubertModel``, ``Wav2Vec2Model``
or ``WavLMModel``) with ``num_hidden_layers = K`` (:func:`student_config`), so the CNN / projection / positional
convolution / transformer code is ``transformers``' own; :func:`init_from_teacher` copies the teacher's tensors
into it. Differences from s3prl's ``DistillerModel`` (all following from reusing the teacher's class): the student
keeps the teacher's LayerNorm before the feature projection and copies the encoder LayerNorm (s3prl has no
former and leaves the latter at its default initialisation).

The student saves as a ``save_pretrained`` directory (``config.json`` + ``model.safetensors``, which
:func:`speechkd.teachers.hf.load_ssl_model` / ``load_ssl_teacher`` load for the next stage) plus the heads in
``distill_heads.safetensors`` (:meth:`SSLStudent.save_pretrained`, :func:`load_ssl_student`).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Sequence, Union

import torch
from torch import nn

from speechkd.losses.distill import prediction_loss
from speechkd.teachers.hf import SSLOutput, SSLTeacher, load_ssl_model, read_normalize, wrap_ssl_model

__all__ = [
    "DISTILHUBERT_TARGET_LAYERS",
    "HEADS_FILE",
    "HEAD_TYPES",
    "SSLStudent",
    "build_ssl_student",
    "init_from_teacher",
    "load_ssl_student",
    "student_config",
]

DISTILHUBERT_TARGET_LAYERS = (4, 8, 12)
"""Teacher layers DistilHuBERT predicts from a 12-layer HuBERT Base (Chang et al. 2022, sec. 2)."""

HEADS_FILE = "distill_heads.safetensors"
"""File of the prediction heads (and, in its metadata, their settings) in a saved student directory."""

HEAD_TYPES = ("mlp", "linear")
"""``mlp``: Linear(C, H) -> GELU -> Linear(H, D), s3prl's ``out_layer_type: expand-last``; ``linear``: Linear(C, D)."""

_HEADS_META_KEY = "speechkd_ssl_student"
_OPTIONAL_KEYS = ("masked_spec_embed",)
# WavLM: only transformer layer 0 holds the relative position embedding (its bias is passed on to later layers).
_LAYER0_ONLY_SUFFIXES = ("attention.rel_attn_embed.weight",)

PathLike = Union[str, os.PathLike]


def _hf_model(model: nn.Module) -> nn.Module:
    """The ``transformers`` model inside an :class:`SSLTeacher` / :class:`SSLStudent`, or ``model`` itself."""
    return model.model if isinstance(model, (SSLTeacher, SSLStudent)) else model


def student_config(teacher_config, num_layers: int = 2, **overrides):
    """The ``transformers`` config of a DistilHuBERT-style student of a teacher: the teacher's, with K layers.

    Everything (CNN, widths, heads, norms, dropouts) is the teacher's except ``num_hidden_layers = num_layers`` and,
    as in DistilHuBERT's s3prl config (``encoder_layerdrop: 0``, no masking), ``layerdrop = 0``,
    ``mask_time_prob = 0`` and ``mask_feature_prob = 0`` (so the model has no ``masked_spec_embed``); ``overrides``
    then set any other config attribute (e.g. ``hidden_dropout=0.1``; DistilHuBERT uses dropout 0.1 everywhere).

    Args:
        teacher_config: the teacher's ``HubertConfig`` / ``Wav2Vec2Config`` / ``WavLMConfig`` (not modified).
        num_layers: K >= 1 student transformer layers (DistilHuBERT: 2).
        **overrides: config attributes to set; each must already exist in the config.

    Returns:
        A new config of the teacher's config class.

    Raises:
        ValueError: ``num_layers`` < 1, or an override that is not an attribute of the config (likely a typo).
    """
    if int(num_layers) < 1:
        raise ValueError(f"the student needs at least one transformer layer, got num_layers={num_layers}")
    config = copy.deepcopy(teacher_config)
    known = config.to_dict()
    unknown = sorted(k for k in overrides if k not in known)
    if unknown:
        raise ValueError(f"unknown {type(config).__name__} attribute(s) {unknown}")
    settings = {"num_hidden_layers": int(num_layers), "layerdrop": 0.0, "mask_time_prob": 0.0, "mask_feature_prob": 0.0}
    if "encoder_layerdrop" in known:  # Whisper's name for it
        settings["encoder_layerdrop"] = 0.0
    for key, value in {**settings, **overrides}.items():
        setattr(config, key, value)
    return config


def _check_layer_map(layer_map: Sequence[int] | None, num_student: int, num_teacher: int) -> list[int]:
    layer_map = list(range(1, num_student + 1)) if layer_map is None else [int(i) for i in layer_map]
    if len(layer_map) != num_student:
        raise ValueError(f"layer_map names {len(layer_map)} teacher layers for {num_student} student layers")
    bad = [i for i in layer_map if not 1 <= i <= num_teacher]
    if bad:
        raise ValueError(f"layer_map: teacher layer(s) {bad} out of range 1..{num_teacher}")
    return layer_map


@torch.no_grad()
def init_from_teacher(student: nn.Module, teacher: nn.Module, layer_map: Sequence[int] | None = None) -> list[str]:
    """Copy a teacher's tensors into a student of the same class built by :func:`student_config`.

    DistilHuBERT (Chang et al. 2022, sec. 2; s3prl ``init_teacher_conv_layers`` / ``init_teacher_encoder_layers``)
    initialises the student from the teacher: CNN feature encoder, feature projection, positional convolution and
    the teacher's *first* K transformer layers. Here every student tensor is copied: ``feature_extractor.*``,
    ``feature_projection.*`` (LayerNorm and Linear), ``encoder.pos_conv_embed.*``, ``encoder.layer_norm.*``,
    ``masked_spec_embed`` (when both have it), and student transformer layer i (1-based) from teacher layer
    ``layer_map[i - 1]``. WavLM keeps its relative position embedding in transformer layer 0 only: student layer 1
    takes it from teacher layer 1 whatever teacher layer the rest of it comes from.

    Args:
        student: the student ``transformers`` model (or an :class:`SSLStudent`), modified in place.
        teacher: the teacher ``transformers`` model of the same class (or an :class:`SSLTeacher`), only read.
        layer_map: for each student layer i = 1..K, the teacher layer (1..L, numbered as
            :class:`~speechkd.teachers.hf.SSLTeacher` does: layer j is the output of transformer layer j) it is
            copied from; default ``[1, ..., K]`` (DistilHuBERT).

    Returns:
        The student state-dict keys that were copied (all of them, except a ``masked_spec_embed`` the teacher lacks).

    Raises:
        TypeError: student and teacher are of different classes.
        ValueError: a bad ``layer_map`` (wrong length, layer outside 1..L); a student tensor the teacher lacks or holds
            with another shape (the configs differ in more than the number of layers).
    """
    student, teacher = _hf_model(student), _hf_model(teacher)
    if type(student) is not type(teacher):
        raise TypeError(f"student {type(student).__name__} and teacher {type(teacher).__name__} differ in class")
    num_student, num_teacher = int(student.config.num_hidden_layers), int(teacher.config.num_hidden_layers)
    layer_map = _check_layer_map(layer_map, num_student, num_teacher)
    src = teacher.state_dict()
    # transformer layers: encoder.layers.<i>.* (HuBERT / wav2vec 2.0 / WavLM), layers.<i>.* (Whisper's encoder)
    prefix = "encoder.layers." if any(k.startswith("encoder.layers.") for k in src) else "layers."
    copied: list[str] = []
    for key, tensor in student.state_dict().items():
        src_key = key
        if key.startswith(prefix):
            index, rest = key[len(prefix) :].split(".", 1)
            src_key = f"{prefix}{layer_map[int(index)] - 1}.{rest}"
            if src_key not in src and rest in _LAYER0_ONLY_SUFFIXES:
                src_key = f"{prefix}0.{rest}"
        if src_key not in src:
            if any(key.endswith(o) for o in _OPTIONAL_KEYS):
                continue
            raise ValueError(f"the teacher has no {src_key!r} for student tensor {key!r}: configs differ")
        if src[src_key].shape != tensor.shape:
            raise ValueError(
                f"student {key!r} {tuple(tensor.shape)} != teacher {src_key!r} {tuple(src[src_key].shape)}: "
                "the configs differ in more than the number of layers"
            )
        tensor.copy_(src[src_key])
        copied.append(key)
    return copied


class _GradScale(torch.autograd.Function):
    """Identity forward, gradient times ``scale`` backward (fairseq / s3prl ``GradMultiply``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:  # noqa: D102
        ctx.scale = scale
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: D102
        return grad * ctx.scale, None


def _make_head(hidden: int, out: int, head_type: str, head_dim: int) -> nn.Module:
    if head_type == "linear":
        return nn.Linear(hidden, out)
    return nn.Sequential(nn.Linear(hidden, head_dim), nn.GELU(), nn.Linear(head_dim, out))


class SSLStudent(nn.Module):
    """Trainable SSL encoder plus DistilHuBERT prediction heads.

    The encoder is a trainable :class:`~speechkd.teachers.hf.SSLTeacher` (``frozen=False``) around the
    ``transformers`` model, so inputs, padding, normalisation, frame counts and layer numbering are the teacher's
    (layer 0 = input of the first transformer layer, layer i = output of transformer layer i, i = 1..K).

    Heads (:attr:`prediction_heads`, one per entry of ``target_layers``):

    - default (DistilHuBERT): every head reads the last student layer K; head j predicts teacher layer
      ``target_layers[j]``.
    - ``layer_to_layer=True``: head i reads student layer i + 1 (i = 0..K-1) and predicts teacher layer
      ``target_layers[i]``, so ``len(target_layers) == K`` (a layer-to-layer variant; s3prl's
      ``task_emb_type: self-hidden`` compares student and teacher layers likewise, but without heads).

    A head is s3prl's ``expand-last`` output layer for one target, Linear(C, H) -> GELU -> Linear(H, D) with
    H = ``head_dim`` (default C) (``head_type="mlp"``), or one Linear(C, D) (``"linear"``); D = ``teacher_dim``.

    Args:
        model: the student ``transformers`` model (see :func:`build_ssl_student`).
        target_layers: teacher layers the heads predict (default :data:`DISTILHUBERT_TARGET_LAYERS`, or in
            layer-to-layer mode ``1..K``); distinct, >= 0.
        teacher_dim: width D of the teacher's hidden states (default: the student's width C).
        layer_to_layer: see above.
        head_type: ``"mlp"`` or ``"linear"``.
        head_dim: H, the MLP heads' inner width (default C); ignored by linear heads.
        normalize, exact_padding: as for :class:`~speechkd.teachers.hf.SSLTeacher` (``normalize`` must match the
            teacher's, since both see the same waveforms).
        feature_grad_mult: gradient scale into the CNN feature encoder (DistilHuBERT: 0.1, as fairseq's
            ``feature_grad_mult``); 1 leaves it, 0 stops it.

    Shapes:
        ``forward(wavs: (N, S) float, lens: (N,) int samples) -> SSLOutput(hidden_states=[(N, T, C)] * (K + 1),
        lens=(N,) frames)``; ``predict(out) -> [(N, T, D)] * len(target_layers)``.

    Raises:
        ValueError: empty, negative or repeated ``target_layers``; in layer-to-layer mode ``len(target_layers) != K``;
            an unknown ``head_type``; a negative ``feature_grad_mult``.
    """

    def __init__(
        self,
        model: nn.Module,
        target_layers: Sequence[int] | None = None,
        teacher_dim: int | None = None,
        layer_to_layer: bool = False,
        head_type: str = "mlp",
        head_dim: int | None = None,
        normalize: bool = False,
        exact_padding: bool = True,
        feature_grad_mult: float = 0.1,
    ):
        super().__init__()
        self.encoder = wrap_ssl_model(model, normalize=normalize, exact_padding=exact_padding, frozen=False)
        num_layers, hidden = self.encoder.num_layers, self.encoder.hidden_size
        if target_layers is None:
            target_layers = range(1, num_layers + 1) if layer_to_layer else DISTILHUBERT_TARGET_LAYERS
        self.target_layers = [int(i) for i in target_layers]
        if not self.target_layers or min(self.target_layers) < 0 or len(set(self.target_layers)) != len(
            self.target_layers
        ):
            raise ValueError(f"target_layers must be distinct teacher layers >= 0, got {self.target_layers}")
        self.layer_to_layer = bool(layer_to_layer)
        if self.layer_to_layer and len(self.target_layers) != num_layers:
            raise ValueError(
                f"layer-to-layer mode needs one target per student layer: {num_layers} layers, "
                f"{len(self.target_layers)} targets {self.target_layers}"
            )
        if head_type not in HEAD_TYPES:
            raise ValueError(f"head_type must be one of {HEAD_TYPES}, got {head_type!r}")
        if feature_grad_mult < 0:
            raise ValueError(f"feature_grad_mult must be >= 0, got {feature_grad_mult}")
        self.head_type = head_type
        self.teacher_dim = int(teacher_dim or hidden)
        self.head_dim = int(head_dim or hidden)
        self.feature_grad_mult = float(feature_grad_mult)
        self.prediction_heads = nn.ModuleList(
            _make_head(hidden, self.teacher_dim, head_type, self.head_dim) for _ in self.target_layers
        )
        self.encoder.front_end.register_forward_hook(self._scale_feature_grad)

    def _scale_feature_grad(self, module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        """Forward hook on the CNN feature encoder: its ``(N, C_cnn, T)`` output, gradient scaled."""
        if self.feature_grad_mult == 1.0:
            return output
        if self.feature_grad_mult == 0.0:
            return output.detach()
        if not output.requires_grad:
            return output
        return _GradScale.apply(output, self.feature_grad_mult)

    @property
    def model(self) -> nn.Module:
        """The student ``transformers`` model (``HubertModel``, ``Wav2Vec2Model`` or ``WavLMModel``)."""
        return self.encoder.model

    @property
    def num_layers(self) -> int:
        """Number K of student transformer layers; its layers are ``0..K``."""
        return self.encoder.num_layers

    @property
    def hidden_size(self) -> int:
        """Width C of the student's hidden states."""
        return self.encoder.hidden_size

    def frame_lens(self, lens: torch.Tensor) -> torch.Tensor:
        """Valid frame counts ``(N,)`` for ``lens: (N,)`` samples (:meth:`SSLTeacher.frame_lens`)."""
        return self.encoder.frame_lens(lens)

    def forward(self, wavs: torch.Tensor, lens: torch.Tensor, layers: Sequence[int] | None = None) -> SSLOutput:
        """Student hidden states, as :meth:`SSLTeacher.forward` (default: all layers ``0..K``).

        Args:
            wavs: ``(N, S)`` float 16 kHz waveforms, right-padded.
            lens: ``(N,)`` integer valid lengths in samples.
            layers: student layers to return, each in ``[0, K]`` (default all, in order).

        Returns:
            :class:`~speechkd.teachers.hf.SSLOutput`: ``(N, T, C)`` per layer (padded frames zero) and ``(N,)``
            valid frame counts.

        Raises:
            ValueError: as :meth:`SSLTeacher.forward`.
        """
        return self.encoder(wavs, lens, layers=layers)

    def predict(self, student_out: SSLOutput) -> list[torch.Tensor]:
        """Apply the prediction heads.

        Args:
            student_out: :meth:`forward`'s output with all layers ``0..K`` (the default).

        Returns:
            One ``(N, T, D)`` prediction per target layer, in ``target_layers`` order.

        Raises:
            ValueError: ``student_out`` does not hold the K + 1 layers.
        """
        hiddens = student_out.hidden_states
        if len(hiddens) != self.num_layers + 1:
            raise ValueError(
                f"predict needs all {self.num_layers + 1} student layers (forward with layers=None), got {len(hiddens)}"
            )
        if self.layer_to_layer:
            return [head(h) for head, h in zip(self.prediction_heads, hiddens[1:])]
        return [head(hiddens[-1]) for head in self.prediction_heads]

    def distill_loss(
        self,
        student_out: SSLOutput,
        teacher_hiddens: Sequence[torch.Tensor] | SSLOutput,
        lens: torch.Tensor | None = None,
        l1_weight: float = 1.0,
        l2_weight: float = 0.0,
        cos_weight: float = 1.0,
        cos_type: str = "logsigmoid",
        layer_reduction: str = "mean",
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """DistilHuBERT loss of the heads' predictions against the teacher's target layers.

        Per target layer l, :func:`~speechkd.losses.distill.prediction_loss` (eq. 1 of Chang et al. 2022: L1 +
        lambda * -log sigmoid(cos), lambda = ``cos_weight``); the layers' losses are then averaged
        (``layer_reduction="mean"``, as s3prl's ``rec_loss.mean()`` over the layer axis) or summed (``"sum"``, as
        the paper writes it); the two differ by the factor ``len(target_layers)``.

        Args:
            student_out: :meth:`forward`'s output (all layers).
            teacher_hiddens: the teacher's ``(N, T, D)`` hidden states of ``target_layers``, in that order (a list or
                the teacher's :class:`~speechkd.teachers.hf.SSLOutput` for ``layers=target_layers``).
            lens: ``(N,)`` valid frames (default: ``student_out.lens``; the teacher's are the same, as the CNN is).
            l1_weight, l2_weight, cos_weight, cos_type: as for :func:`~speechkd.losses.distill.prediction_loss`.
            layer_reduction: ``"mean"`` or ``"sum"`` over target layers.

        Returns:
            ``(loss, logs)``: scalar loss, and detached scalars ``"{term}_l{layer}"`` (term ``l1``, ``l2``, ``cos``,
            ``cos_sim``, ``loss``) per target layer.

        Raises:
            ValueError: not one teacher tensor per target layer, teacher and student frames or widths that differ,
                an unknown ``layer_reduction``, or as :func:`~speechkd.losses.distill.prediction_loss`.
        """
        if layer_reduction not in ("mean", "sum"):
            raise ValueError(f"layer_reduction must be 'mean' or 'sum', got {layer_reduction!r}")
        if isinstance(teacher_hiddens, SSLOutput):
            teacher_hiddens = teacher_hiddens.hidden_states
        teacher_hiddens = list(teacher_hiddens)
        if len(teacher_hiddens) != len(self.target_layers):
            raise ValueError(
                f"{len(teacher_hiddens)} teacher hidden states for {len(self.target_layers)} target layers "
                f"{self.target_layers}"
            )
        preds = self.predict(student_out)
        lens = student_out.lens if lens is None else lens
        total = None
        logs: dict[str, torch.Tensor] = {}
        for layer, pred, target in zip(self.target_layers, preds, teacher_hiddens):
            if target.shape != pred.shape:
                raise ValueError(
                    f"teacher layer {layer} is {tuple(target.shape)}, the student predicts {tuple(pred.shape)} "
                    "(N, T, D): frame counts or teacher_dim differ"
                )
            loss, terms = prediction_loss(
                pred, target.to(pred.dtype), lens, l1_weight=l1_weight, l2_weight=l2_weight, cos_weight=cos_weight,
                cos_type=cos_type,
            )
            total = loss if total is None else total + loss
            logs.update({f"{k}_l{layer}": v for k, v in terms.items()})
            logs[f"loss_l{layer}"] = loss.detach()
        assert total is not None
        if layer_reduction == "mean":
            total = total / len(self.target_layers)
        return total, logs

    def heads_config(self) -> dict:
        """The settings :func:`load_ssl_student` needs to rebuild the heads (JSON-serialisable)."""
        return {
            "target_layers": self.target_layers,
            "teacher_dim": self.teacher_dim,
            "layer_to_layer": self.layer_to_layer,
            "head_type": self.head_type,
            "head_dim": self.head_dim,
            "feature_grad_mult": self.feature_grad_mult,
        }

    def save_pretrained(self, out_dir: PathLike) -> Path:
        """Write the student to a directory.

        ``config.json`` + ``model.safetensors`` (the encoder, ``save_pretrained``, loadable alone by
        :func:`speechkd.teachers.hf.load_ssl_model` / ``load_ssl_teacher``), ``preprocessor_config.json`` (its
        ``do_normalize`` is read by ``load_ssl_teacher``) and :data:`HEADS_FILE` (the heads' weights, their settings
        in the safetensors metadata).

        Args:
            out_dir: directory, created if missing; files of the same names are overwritten.

        Returns:
            The directory.
        """
        from safetensors.torch import save_file

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.encoder.save_pretrained(out_dir)
        heads = {k: v.detach().contiguous() for k, v in self.prediction_heads.state_dict().items()}
        meta = {"format": "pt", _HEADS_META_KEY: json.dumps(self.heads_config())}
        save_file(heads, out_dir / HEADS_FILE, metadata=meta)
        return out_dir


def build_ssl_student(
    teacher: nn.Module,
    num_layers: int = 2,
    target_layers: Sequence[int] | None = None,
    layer_map: Sequence[int] | None = None,
    layer_to_layer: bool = False,
    head_type: str = "mlp",
    head_dim: int | None = None,
    normalize: bool | None = None,
    exact_padding: bool = True,
    feature_grad_mult: float = 0.1,
    **config_overrides,
) -> SSLStudent:
    """A DistilHuBERT student of a teacher: :func:`student_config`, :func:`init_from_teacher`, :class:`SSLStudent`.

    Args:
        teacher: the teacher, an :class:`~speechkd.teachers.hf.SSLTeacher` or its ``transformers`` model (only read).
        num_layers: K student transformer layers (DistilHuBERT: 2).
        target_layers: teacher layers to predict, each in 0..L (default: ``(4, 8, 12)``, DistilHuBERT's for a
            12-layer teacher; in layer-to-layer mode ``layer_map``, i.e. student layer i predicts the teacher layer
            it was initialised from).
        layer_map: teacher layer (1..L) each student layer is initialised from (default ``1..K``).
        layer_to_layer, head_type, head_dim, exact_padding, feature_grad_mult: as for :class:`SSLStudent`.
        normalize: waveform normalisation (default: the teacher's when it is an ``SSLTeacher``, else False).
        **config_overrides: passed to :func:`student_config`.

    Returns:
        The student, in eval mode (call ``.train()`` to train it), with ``teacher_dim`` the teacher's width.

    Raises:
        ValueError: a target layer outside ``0..L``, or as :func:`student_config`, :func:`init_from_teacher` and
            :class:`SSLStudent`.
    """
    hf_teacher = _hf_model(teacher)
    if normalize is None:
        normalize = teacher.normalize if isinstance(teacher, SSLTeacher) else False
    num_teacher = int(hf_teacher.config.num_hidden_layers)
    layer_map = _check_layer_map(layer_map, int(num_layers), num_teacher)
    if target_layers is None:
        target_layers = layer_map if layer_to_layer else DISTILHUBERT_TARGET_LAYERS
    bad = [int(i) for i in target_layers if not 0 <= int(i) <= num_teacher]
    if bad:
        raise ValueError(f"target layer(s) {bad} out of range: the teacher has layers 0..{num_teacher}")
    config = student_config(hf_teacher.config, num_layers, **config_overrides)
    model = type(hf_teacher)(config)
    init_from_teacher(model, hf_teacher, layer_map)
    return SSLStudent(
        model,
        target_layers=target_layers,
        teacher_dim=int(hf_teacher.config.hidden_size),
        layer_to_layer=layer_to_layer,
        head_type=head_type,
        head_dim=head_dim,
        normalize=normalize,
        exact_padding=exact_padding,
        feature_grad_mult=feature_grad_mult,
    )


def load_ssl_student(model_dir: PathLike, exact_padding: bool = True) -> SSLStudent:
    """Load a student written by :meth:`SSLStudent.save_pretrained`, heads included, in eval mode.

    Args:
        model_dir: the directory (``config.json``, ``model.safetensors``, :data:`HEADS_FILE`, optionally
            ``preprocessor_config.json``).
        exact_padding: as for :class:`SSLStudent`.

    Returns:
        The student (encoder via :func:`speechkd.teachers.hf.load_ssl_model`, heads from :data:`HEADS_FILE`).

    Raises:
        FileNotFoundError: :data:`HEADS_FILE` is missing (the encoder alone loads with ``load_ssl_model``), or as
            :func:`~speechkd.teachers.hf.load_ssl_model`.
        ValueError: the heads file lacks its settings or does not fit them, or as ``load_ssl_model``.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    model = load_ssl_model(model_dir)
    heads_path = model_dir / HEADS_FILE
    if not heads_path.is_file():
        raise FileNotFoundError(f"{model_dir} has no {HEADS_FILE}: load the encoder alone with load_ssl_model")
    with safe_open(str(heads_path), framework="pt") as f:
        meta = (f.metadata() or {}).get(_HEADS_META_KEY)
    if meta is None:
        raise ValueError(f"{heads_path} has no {_HEADS_META_KEY!r} metadata (not written by SSLStudent)")
    settings = json.loads(meta)
    student = SSLStudent(model, normalize=read_normalize(model_dir), exact_padding=exact_padding, **settings)
    state = load_file(heads_path)
    try:
        student.prediction_heads.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{heads_path} does not fit its settings {settings}: {e}") from e
    return student.eval()
