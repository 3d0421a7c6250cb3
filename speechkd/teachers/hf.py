"""Self-supervised speech teachers (HuBERT, wav2vec 2.0, WavLM) from Hugging Face ``transformers``.

The models are the ones of wav2vec 2.0 (Baevski et al., NeurIPS 2020, arXiv 2006.11477), HuBERT (Hsu et al.,
IEEE/ACM TASLP 2021, arXiv 2106.07447) and WavLM (Chen et al., IEEE JSTSP 2022, arXiv 2110.13900): a CNN feature
encoder over the raw 16 kHz waveform, a feature projection, a convolutional positional embedding and a stack of
transformer layers. Layer-wise distillation of such a teacher (e.g. DistilHuBERT, Chang et al., ICASSP 2022,
arXiv 2110.01900, which predicts HuBERT layers 4, 8 and 12) needs its hidden states per layer, per valid frame;
:class:`SSLTeacher` gives exactly that, from a checkpoint in a local directory (:func:`load_ssl_teacher`).

Checkpoints are read from a local directory only (``config.json`` + ``model.safetensors``, as written by
``save_pretrained``); nothing is downloaded and pickled ``pytorch_model.bin`` files are never loaded.

``transformers`` is imported on first use, so importing this module is cheap.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import NamedTuple, Sequence, Union

import torch
from torch import nn

from speechkd.models.conformer import tracing

__all__ = [
    "SAMPLE_RATE",
    "SUPPORTED_MODEL_TYPES",
    "SSLConfigInfo",
    "SSLOutput",
    "SSLTeacher",
    "check_ssl_dir",
    "load_ssl_model",
    "load_ssl_teacher",
    "read_normalize",
    "resolve_layer",
    "wrap_ssl_model",
    "write_preprocessor_config",
]

SAMPLE_RATE = 16000
"""Sample rate (Hz) the supported SSL models were trained on; inputs must be at this rate."""

SUPPORTED_MODEL_TYPES = {"hubert": "HubertModel", "wav2vec2": "Wav2Vec2Model", "wavlm": "WavLMModel"}
"""``config.json`` ``model_type`` -> the ``transformers`` class that is built for it."""

# Parameters a checkpoint may lack without harm: the learned mask embedding is only used by SpecAugment-style
# time masking in training mode (it is absent from checkpoints saved with mask_time_prob == mask_feature_prob == 0).
_OPTIONAL_KEYS = ("masked_spec_embed",)

PathLike = Union[str, os.PathLike]


class SSLOutput(NamedTuple):
    """What :meth:`SSLTeacher.forward` returns (a tuple: ``hiddens, lens = teacher(wavs, lens)`` works).

    Attributes:
        hidden_states: one ``(N, T, C)`` float tensor per requested layer, in the requested order; frames at and
            after ``lens[n]`` are zero.
        lens: ``(N,)`` int64 valid frame counts (``T == lens.max()``).
    """

    hidden_states: list[torch.Tensor]
    lens: torch.Tensor


def _check_model_dir(model_dir: Path) -> str:
    """Validate a checkpoint directory; return its ``model_type``. Raises FileNotFoundError / ValueError."""
    if not model_dir.exists():
        raise FileNotFoundError(f"SSL model directory {model_dir} does not exist")
    if not model_dir.is_dir():
        raise NotADirectoryError(f"SSL model path {model_dir} is not a directory")
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"SSL model directory {model_dir} has no config.json")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{config_path} is not valid JSON: {e}") from e
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in SUPPORTED_MODEL_TYPES and model_type != "whisper":
        raise ValueError(
            f"{config_path}: unsupported model_type {model_type!r}; supported: "
            f"{sorted(SUPPORTED_MODEL_TYPES) + ['whisper']}"
        )
    if not (model_dir / "model.safetensors").is_file():
        found = sorted(p.name for p in model_dir.iterdir() if p.suffix in (".bin", ".safetensors", ".json", ".pt"))
        raise FileNotFoundError(
            f"SSL model directory {model_dir} has no model.safetensors (found: {', '.join(found) or 'nothing'}). "
            "Only safetensors weights are loaded: pickled pytorch_model.bin / .pt files are refused, since "
            "unpickling can run arbitrary code. Convert them once in a trusted environment "
            "(model.save_pretrained(dir, safe_serialization=True)). Sharded checkpoints are not supported."
        )
    return model_type


class SSLConfigInfo(NamedTuple):
    """What :func:`check_ssl_dir` reads from a checkpoint's ``config.json`` (no weights are loaded).

    Attributes:
        model_type: ``hubert``, ``wav2vec2`` or ``wavlm``.
        num_layers: number L of transformer layers (hidden-state indices ``0..L``).
        hidden_size: width C of every hidden state.
        samples_per_frame: ``prod(conv_stride)``, samples between frames (320 for the standard CNN).
        frame_shift: seconds between frames at 16 kHz, ``samples_per_frame / 16000`` (0.02 as standard).
    """

    model_type: str
    num_layers: int
    hidden_size: int
    samples_per_frame: int
    frame_shift: float


def check_ssl_dir(model_dir: PathLike) -> SSLConfigInfo:
    """Check a local HuBERT / wav2vec 2.0 / WavLM checkpoint directory and read its sizes, without loading weights.

    The config is read with the ``transformers`` config class of its ``model_type`` (so settings that
    ``config.json`` leaves out take that class's defaults, as when the model is built).

    Args:
        model_dir: directory holding ``config.json`` and ``model.safetensors``.

    Returns:
        :class:`SSLConfigInfo` (layers, width, frame shift in samples and seconds).

    Raises:
        FileNotFoundError / NotADirectoryError / ValueError: as :func:`load_ssl_model` for the directory and its
            ``config.json`` (the message names the directory or file).
    """
    model_dir = Path(model_dir)
    model_type = _check_model_dir(model_dir)
    import transformers

    if model_type == "whisper":
        from speechkd.teachers.whisper import check_whisper_dir

        config = check_whisper_dir(model_dir)
        return SSLConfigInfo("whisper", int(config.encoder_layers), int(config.d_model), 320, 320 / SAMPLE_RATE)
    cls = getattr(transformers, SUPPORTED_MODEL_TYPES[model_type].replace("Model", "Config"))
    config = cls.from_pretrained(str(model_dir), local_files_only=True)
    samples = _samples_per_frame(config.conv_stride)
    return SSLConfigInfo(model_type, int(config.num_hidden_layers), int(config.hidden_size), samples,
                         samples / SAMPLE_RATE)


def resolve_layer(layer: int, num_layers: int, what: str = "layer") -> int:
    """A hidden-state index from a layer setting: ``-1`` -> ``num_layers`` (the last), else ``layer`` itself.

    Indices follow ``output_hidden_states``: 0 is the input of the first transformer layer, i (1..L) the output of
    transformer layer i.

    Args:
        layer: the setting (-1, or 0..num_layers).
        num_layers: L, the teacher's transformer layers.
        what: the setting's name for the error message (e.g. ``"teacher.layer"``).

    Returns:
        An index in ``[0, num_layers]``.

    Raises:
        ValueError: ``layer`` outside ``-1, 0..num_layers`` (the message names ``what`` and the valid range).
    """
    layer = int(layer)
    if layer == -1:
        return int(num_layers)
    if not 0 <= layer <= num_layers:
        raise ValueError(f"{what} = {layer} is out of range for a teacher with {num_layers} transformer layers: "
                         f"use 1..{num_layers} (output of transformer layer i), 0 (its input) or -1 (the last)")
    return layer


PREPROCESSOR_FILE = "preprocessor_config.json"
"""The Hugging Face feature-extractor settings beside a checkpoint; :func:`load_ssl_teacher` reads ``do_normalize``."""


def write_preprocessor_config(model_dir: PathLike, normalize: bool) -> Path:
    """Write :data:`PREPROCESSOR_FILE` into ``model_dir`` (a ``Wav2Vec2FeatureExtractor`` at 16 kHz, mono).

    Args:
        model_dir: an existing checkpoint directory (it is not made atomic here: write into a temporary
            directory, e.g. :func:`speechkd.utils.atomic_dir`, when that matters).
        normalize: ``do_normalize``: per-utterance zero-mean unit-variance waveforms (wav2vec 2.0 Large, WavLM)
            or not (HuBERT Base).

    Returns:
        The file's path.
    """
    cfg = {"feature_extractor_type": "Wav2Vec2FeatureExtractor", "do_normalize": bool(normalize),
           "sampling_rate": SAMPLE_RATE, "feature_size": 1, "padding_value": 0.0, "return_attention_mask": True}
    path = Path(model_dir) / PREPROCESSOR_FILE
    path.write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    return path


def read_normalize(model_dir: PathLike) -> bool:
    """``do_normalize`` from ``model_dir``'s :data:`PREPROCESSOR_FILE`; False when the directory has none.

    Raises:
        ValueError: the file is not a JSON object (names the file).
    """
    pre = Path(model_dir) / PREPROCESSOR_FILE
    if not pre.is_file():
        return False
    try:
        return bool(json.loads(pre.read_text(encoding="utf-8")).get("do_normalize", False))
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise ValueError(f"{pre} is not a valid JSON object: {e}") from e


def load_ssl_model(model_dir: PathLike) -> nn.Module:
    """Load a HuBERT / wav2vec 2.0 / WavLM base model (no task head) from a local directory, in eval mode.

    The class is chosen by ``config.json``'s ``model_type`` (see :data:`SUPPORTED_MODEL_TYPES`); the weights come
    from ``model.safetensors`` through ``from_pretrained(model_dir, use_safetensors=True, local_files_only=True)``,
    in float32. A checkpoint of a model with a head (e.g. ``HubertForCTC``) loads too: the head's weights are
    ignored.

    Args:
        model_dir: directory holding ``config.json`` and ``model.safetensors``.

    Returns:
        The ``transformers`` model (``HubertModel``, ``Wav2Vec2Model`` or ``WavLMModel``), in eval mode.

    Raises:
        FileNotFoundError: the directory, its ``config.json`` or its ``model.safetensors`` is missing (the message
            names the directory and the weight files it does hold).
        NotADirectoryError: ``model_dir`` is a file.
        ValueError: ``config.json`` is not JSON or has an unsupported ``model_type``; or the checkpoint lacks
            weights of the model (they would otherwise be silently initialised at random) or has them with other
            shapes.
    """
    model_dir = Path(model_dir)
    model_type = _check_model_dir(model_dir)
    if model_type == "whisper":
        from speechkd.teachers.whisper import load_whisper_encoder

        return load_whisper_encoder(model_dir)
    import transformers

    cls = getattr(transformers, SUPPORTED_MODEL_TYPES[model_type])
    model, info = cls.from_pretrained(
        str(model_dir),
        use_safetensors=True,
        local_files_only=True,
        dtype=torch.float32,
        output_loading_info=True,
    )
    missing = sorted(k for k in info["missing_keys"] if not any(k.endswith(o) for o in _OPTIONAL_KEYS))
    mismatched = sorted(info["mismatched_keys"])
    if missing or mismatched:
        raise ValueError(
            f"{model_dir / 'model.safetensors'} does not fit {cls.__name__} built from its config.json: "
            f"missing weights {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
            f"shape mismatches {mismatched[:5]}{' ...' if len(mismatched) > 5 else ''}"
        )
    return model.eval()


def _samples_per_frame(strides: Sequence[int]) -> int:
    """Samples between output frames of a stack of strided 1-D convolutions, ``prod(strides)`` (320 = 20 ms at
    16 kHz for the standard CNN)."""
    return math.prod(int(s) for s in strides)


def _receptive_field(kernels: Sequence[int], strides: Sequence[int]) -> int:
    """Samples seen by one output frame of a stack of 1-D convolutions (no padding, no dilation)."""
    r = 1
    for k, s in zip(reversed(list(kernels)), reversed(list(strides))):
        r = (r - 1) * s + k
    return r


class SSLTeacher(nn.Module):
    """Frozen SSL teacher that maps padded 16 kHz waveforms to per-layer hidden states and frame counts.

    Layer numbering follows ``output_hidden_states`` of ``transformers`` (5.x): layer 0 is the input of the
    first transformer layer (CNN features -> feature projection -> + convolutional positional embedding, then
    the encoder LayerNorm for post-LN "Base" models; no LayerNorm for pre-LN models, ``do_stable_layer_norm``),
    layer i (1..L) is the output of transformer layer i. For pre-LN ("Large") models, layer L is taken *before*
    the encoder's final LayerNorm, as ``transformers`` 5 returns it (``last_hidden_state`` is after it).

    Frame rate: one frame per ``prod(conv_stride)`` samples, i.e. 320 samples = 20 ms (50 Hz) for the standard
    CNN (strides 5,2,2,2,2,2,2, kernels 10,3,3,3,3,2,2), with a receptive field of 400 samples = 25 ms
    (wav2vec 2.0 paper, Sec. 4.2). An utterance of S samples has ``_get_feat_extract_output_lengths(S)`` frames
    (``floor((S - 400) / 320) + 1`` for that CNN).

    Padding: the attention mask built from ``lens`` keeps padded samples out of the transformer, and with a
    LayerNorm feature encoder (``feat_extract_norm == "layer"``, e.g. HuBERT/WavLM Large) a padded utterance gives
    the same frames as alone. A GroupNorm feature encoder (``"group"``: HuBERT Base, wav2vec 2.0 Base, WavLM Base
    and Base+) normalises each first-layer channel over the whole padded length, so padding changes every frame;
    with ``exact_padding=True`` (default) such a batch is run as one sub-batch per distinct length, without
    padding, which gives exactly the per-utterance outputs; with ``False`` it is run padded, as fairseq and
    s3prl do (faster, not padding-invariant).

    Args:
        model: a ``HubertModel``, ``Wav2Vec2Model`` or ``WavLMModel`` (see :func:`load_ssl_model`).
        layers: default layers to return, each in ``[0, num_layers]`` (default: all, ``0..num_layers``).
        normalize: normalise each waveform to zero mean and unit variance over its valid samples
            (``(x - mean) / sqrt(var + 1e-7)``, as ``Wav2Vec2FeatureExtractor`` with ``do_normalize=True``).
            Must match how the teacher was trained (True for e.g. wav2vec2-large-lv60 and WavLM Large, False for
            HuBERT Base/Large); :func:`load_ssl_teacher` reads it from ``preprocessor_config.json``.
        exact_padding: see Padding above (only matters for GroupNorm feature encoders).
        frozen: freeze the parameters, run the forward under ``torch.no_grad()`` and keep the model in eval mode
            even after ``.train()`` (so no dropout, LayerDrop or time masking). With ``False`` the model is a
            trainable submodule and ``.train()`` turns those on.

    Shapes:
        ``forward(wavs: (N, S) float, lens: (N,) int samples) -> SSLOutput(hidden_states=[(N, T, C), ...],
        lens=(N,) frames)``, with ``C == hidden_size``.

    Raises:
        ValueError: a layer outside ``[0, num_layers]``, or an empty ``layers``.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[int] | None = None,
        normalize: bool = False,
        exact_padding: bool = True,
        frozen: bool = True,
    ):
        super().__init__()
        self.model = model
        self.normalize = bool(normalize)
        self.exact_padding = bool(exact_padding)
        self.frozen = bool(frozen)
        config = model.config
        self._group_norm = getattr(config, "feat_extract_norm", "group") == "group"
        self.layers = self._check_layers(range(self.num_layers + 1) if layers is None else layers)
        if self.frozen:
            for p in self.model.parameters():
                p.requires_grad_(False)
        self.train(False)

    @property
    def num_layers(self) -> int:
        """Number L of transformer layers; valid layer indices are ``0..L``."""
        return int(self.model.config.num_hidden_layers)

    @property
    def hidden_size(self) -> int:
        """Width C of every hidden state."""
        return int(self.model.config.hidden_size)

    @property
    def min_samples(self) -> int:
        """Shortest input in samples that gives one frame: the CNN's receptive field (400 = 25 ms as standard)."""
        return _receptive_field(self.model.config.conv_kernel, self.model.config.conv_stride)

    @property
    def samples_per_frame(self) -> int:
        """Frame shift in samples, ``prod(conv_stride)`` (320 for the standard CNN)."""
        return _samples_per_frame(self.model.config.conv_stride)

    @property
    def frame_shift(self) -> float:
        """Frame shift in seconds at 16 kHz (0.02 for the standard CNN)."""
        return self.samples_per_frame / SAMPLE_RATE

    @property
    def front_end(self) -> nn.Module:
        """The CNN feature encoder (its output is the front end's: DistilHuBERT scales its gradient)."""
        return self.model.feature_extractor

    def freeze_front_end(self) -> None:
        """Stop training the CNN feature encoder (``transformers``' own freeze where the model has one)."""
        fe = self.model.feature_extractor
        if hasattr(fe, "_freeze_parameters"):
            fe._freeze_parameters()  # also stops transformers asking for a gradient of the input
        else:
            fe.requires_grad_(False)

    def save_pretrained(self, out_dir: PathLike) -> Path:
        """Write the model (``save_pretrained``: ``config.json`` + ``model.safetensors``) and
        :data:`PREPROCESSOR_FILE` (its ``do_normalize``) into ``out_dir``, which :func:`load_ssl_teacher` loads."""
        out_dir = Path(out_dir)
        self.model.save_pretrained(out_dir)
        write_preprocessor_config(out_dir, self.normalize)
        return out_dir

    def train(self, mode: bool = True) -> "SSLTeacher":
        """As :meth:`nn.Module.train`, except that a frozen teacher always stays in eval mode."""
        return super().train(False if self.frozen else mode)

    def frame_lens(self, lens: torch.Tensor) -> torch.Tensor:
        """Valid frame counts ``(N,)`` int64 for ``lens: (N,)`` samples (the model's
        ``_get_feat_extract_output_lengths``; <= 0 for inputs shorter than :attr:`min_samples`)."""
        return self.model._get_feat_extract_output_lengths(lens.to(torch.long)).to(torch.long)

    def _check_layers(self, layers: Sequence[int]) -> list[int]:
        layers = [int(i) for i in layers]
        if not layers:
            raise ValueError("layers must name at least one layer")
        bad = [i for i in layers if not 0 <= i <= self.num_layers]
        if bad:
            raise ValueError(
                f"layer(s) {bad} out of range: valid layers are 0..{self.num_layers} "
                f"(0 = input of the first transformer layer, i = output of transformer layer i)"
            )
        return layers

    def _check_inputs(self, wavs: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
        if not isinstance(wavs, torch.Tensor) or wavs.dim() != 2 or not wavs.is_floating_point():
            desc = f"{tuple(wavs.shape)} {wavs.dtype}" if isinstance(wavs, torch.Tensor) else type(wavs).__name__
            raise ValueError(f"wavs must be a float tensor of shape (N, S), got {desc}")
        if not isinstance(lens, torch.Tensor) or lens.shape != (wavs.shape[0],):
            desc = tuple(lens.shape) if isinstance(lens, torch.Tensor) else type(lens).__name__
            raise ValueError(f"lens must be a (N,) = ({wavs.shape[0]},) tensor of sample counts, got {desc}")
        if lens.is_floating_point() or lens.is_complex() or lens.dtype == torch.bool:
            raise ValueError(f"lens must hold integer sample counts, got dtype {lens.dtype}")
        if wavs.shape[0] == 0:
            raise ValueError("empty batch (N == 0)")
        lens = lens.to(device=wavs.device, dtype=torch.long)
        if int(lens.max()) > wavs.shape[1]:
            raise ValueError(f"lens.max() = {int(lens.max())} exceeds the padded length S = {wavs.shape[1]}")
        if int(lens.min()) < self.min_samples:
            raise ValueError(
                f"utterance of {int(lens.min())} samples is shorter than the CNN's receptive field "
                f"({self.min_samples} samples = {1000 * self.min_samples / SAMPLE_RATE:g} ms): it has no frame"
            )
        return lens

    def _normalize(self, wavs: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
        valid = torch.arange(wavs.shape[1], device=wavs.device)[None, :] < lens[:, None]  # (N, S)
        n = lens.to(wavs.dtype)[:, None]
        mean = (wavs * valid).sum(1, keepdim=True) / n
        var = (((wavs - mean) * valid) ** 2).sum(1, keepdim=True) / n  # population variance, as numpy's var()
        return ((wavs - mean) / torch.sqrt(var + 1e-7)) * valid

    def _run(self, wavs: torch.Tensor, mask: torch.Tensor | None, layers: list[int]) -> list[torch.Tensor]:
        out = self.model(wavs, attention_mask=mask, output_hidden_states=True, return_dict=True)
        return [out.hidden_states[i] for i in layers]

    def forward(
        self, wavs: torch.Tensor, lens: torch.Tensor, layers: Sequence[int] | None = None
    ) -> SSLOutput:
        """Hidden states of the requested layers for a batch of right-padded waveforms.

        Args:
            wavs: ``(N, S)`` float waveforms at 16 kHz, right-padded (values beyond ``lens`` are ignored).
            lens: ``(N,)`` integer valid lengths in samples, each in ``[min_samples, S]``.
            layers: layers to return (default: those given at construction), each in ``[0, num_layers]``.

        Returns:
            :class:`SSLOutput`: ``hidden_states``, one ``(N, T, C)`` tensor per layer in the order asked for,
            with ``T`` the frame count of ``lens.max()`` and padded frames zeroed; ``lens``, ``(N,)`` int64
            valid frames (20 ms each for the standard CNN).

        Raises:
            ValueError: bad shapes or dtypes, an empty batch, ``lens`` above S or below :attr:`min_samples`,
                or a layer out of range (the message names the valid range).
        """
        layers = self.layers if layers is None else self._check_layers(layers)
        dtype = next(self.model.parameters()).dtype
        if tracing():  # an exported graph takes unpadded batches (one length); its caller checks the inputs
            lens, padded = lens.to(torch.long), False
        else:
            lens = self._check_inputs(wavs, lens)
            wavs = wavs[:, : int(lens.max())]
            padded = bool((lens < wavs.shape[1]).any())
        wavs = wavs.to(dtype)
        frames = self.frame_lens(lens)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            if self.normalize:
                wavs = self._normalize(wavs, lens)
            if not padded:
                hiddens = self._run(wavs, None, layers)
            elif self._group_norm and self.exact_padding:
                hiddens = self._forward_by_length(wavs, lens, frames, layers)
            else:
                mask = (torch.arange(wavs.shape[1], device=wavs.device)[None, :] < lens[:, None]).long()
                hiddens = self._run(wavs, mask, layers)
            pad = torch.arange(hiddens[0].shape[1], device=wavs.device)[None, :, None] >= frames[:, None, None]
            hiddens = [h.masked_fill(pad, 0.0) for h in hiddens]
        return SSLOutput(hidden_states=hiddens, lens=frames)

    def _forward_by_length(
        self, wavs: torch.Tensor, lens: torch.Tensor, frames: torch.Tensor, layers: list[int]
    ) -> list[torch.Tensor]:
        """One unpadded sub-batch per distinct length, scattered into zero-padded ``(N, T, C)`` outputs."""
        n, t = wavs.shape[0], int(frames.max())
        outs: list[torch.Tensor] | None = None
        for length in torch.unique(lens).tolist():
            idx = torch.nonzero(lens == length).squeeze(1)
            part = self._run(wavs[idx, :length], None, layers)
            if outs is None:
                outs = [h.new_zeros(n, t, h.shape[-1]) for h in part]
            for o, h in zip(outs, part):
                o[idx, : h.shape[1]] = h
        assert outs is not None
        return outs


def load_ssl_teacher(
    model_dir: PathLike,
    layers: Sequence[int] | None = None,
    normalize: bool | None = None,
    exact_padding: bool = True,
    frozen: bool = True,
) -> SSLTeacher:
    """Load a local checkpoint (:func:`load_ssl_model`) and wrap it in a frozen :class:`SSLTeacher`.

    Args:
        model_dir: directory with ``config.json`` and ``model.safetensors`` (and optionally
            ``preprocessor_config.json``).
        layers, exact_padding, frozen: as for :class:`SSLTeacher`.
        normalize: per-utterance waveform normalisation; ``None`` (default) takes ``do_normalize`` from
            ``preprocessor_config.json`` when the directory has one, else False.

    Returns:
        The teacher, in eval mode.

    Raises:
        As :func:`load_ssl_model`; ValueError for a bad layer or an unreadable ``preprocessor_config.json``.
    """
    model = load_ssl_model(model_dir)
    if normalize is None:
        normalize = read_normalize(model_dir)
    return wrap_ssl_model(model, layers=layers, normalize=normalize, exact_padding=exact_padding, frozen=frozen)


def wrap_ssl_model(model: nn.Module, **kwargs) -> "SSLTeacher":
    """The SSL encoder interface around a model: :class:`SSLTeacher` for HuBERT / wav2vec 2.0 / WavLM,
    :class:`speechkd.teachers.whisper.WhisperSSLEncoder` for Whisper's encoder (``config.model_type == "whisper"``).

    Args:
        model: the ``transformers`` model (see :func:`load_ssl_model`).
        **kwargs: ``layers``, ``normalize``, ``exact_padding``, ``frozen`` as for :class:`SSLTeacher`.

    Raises:
        ValueError: as the wrapper's constructor.
    """
    if getattr(model.config, "model_type", None) == "whisper":
        from speechkd.teachers.whisper import WhisperSSLEncoder

        return WhisperSSLEncoder(model, **kwargs)
    return SSLTeacher(model, **kwargs)
