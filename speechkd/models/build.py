"""Build a Conformer transducer or attention encoder-decoder from a :class:`speechkd.config.ModelConfig`,
and save/load it as safetensors.

A saved model is two files in one directory: ``model.safetensors`` (weights) and ``model.json``
(``{"model": ModelConfig fields, "vocab_size": int, ...extra}``); loading never unpickles anything.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch

from speechkd.config import ModelConfig
from speechkd.utils import Pathlike, atomic_path, write_json_atomic


def build_model(cfg: ModelConfig, vocab_size: int, input_dim: int = 80):
    """The model ``cfg.arch`` names: a transducer or an attention encoder-decoder, both on a Conformer encoder.

    Args:
      cfg: encoder and decoder sizes.
      vocab_size: tokens including blank (id 0).
      input_dim: feature dim (80 fbank bins).
    """
    if cfg.arch == "aed":
        return build_aed(cfg, vocab_size, input_dim)
    return build_transducer(cfg, vocab_size, input_dim)


def _encoder(cfg: ModelConfig, input_dim: int):
    from speechkd.models.conformer import ConformerEncoder

    return ConformerEncoder(
        input_dim=input_dim, dim=cfg.dim, num_layers=cfg.num_layers, num_heads=cfg.num_heads, ff_dim=cfg.ff_dim,
        conv_kernel=cfg.conv_kernel, subsampling=cfg.subsampling, dropout=cfg.dropout,
    )


def build_aed(cfg: ModelConfig, vocab_size: int, input_dim: int = 80):
    """An :class:`speechkd.models.aed.AttentionEncoderDecoder`: Conformer encoder + Transformer decoder
    (``decoder_dim`` wide, ``decoder_layers`` blocks) + optional CTC head. Args as :func:`build_model`."""
    from speechkd.models.aed import AttentionDecoder, AttentionEncoderDecoder

    encoder = _encoder(cfg, input_dim)
    decoder = AttentionDecoder(vocab_size, encoder_dim=cfg.dim, decoder_dim=cfg.decoder_dim, num_layers=cfg.decoder_layers,
                               num_heads=cfg.decoder_heads, ff_dim=cfg.decoder_ff_dim, dropout=cfg.dropout)
    return AttentionEncoderDecoder(encoder, decoder, ctc_head=cfg.ctc_head)


def build_transducer(cfg: ModelConfig, vocab_size: int, input_dim: int = 80):
    """A :class:`speechkd.models.transducer.Transducer` with a :class:`ConformerEncoder`.

    Args:
      cfg: encoder and predictor/joiner sizes.
      vocab_size: tokens including blank (id 0).
      input_dim: feature dim (80 fbank bins).
    """
    from speechkd.models.transducer import Decoder, Joiner, Transducer

    encoder = _encoder(cfg, input_dim)
    decoder = Decoder(vocab_size, cfg.decoder_dim, blank_id=0, context_size=cfg.context_size)
    joiner = Joiner(cfg.dim, cfg.decoder_dim, cfg.joiner_dim, vocab_size)
    return Transducer(encoder, decoder, joiner, blank_id=0, ctc_head=cfg.ctc_head)


def save_model(model: torch.nn.Module, out_dir: Pathlike, cfg: ModelConfig, vocab_size: int, extra: Optional[dict] = None) -> Path:
    """Write ``model.json`` then ``model.safetensors`` atomically into ``out_dir``.

    The weights file is written last, so its presence marks a complete model.
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    meta = {"model": cfg.model_dump(), "vocab_size": vocab_size, **(extra or {})}
    write_json_atomic(out_dir / "model.json", meta)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(out_dir / "model.safetensors") as tmp:
        save_file(state, str(tmp))
    return out_dir / "model.safetensors"


def load_model(model_dir: Pathlike) -> tuple[Any, dict]:
    """Load a model written by :func:`save_model` (safetensors: nothing is unpickled).

    Returns:
      ``(model in eval mode, meta dict from model.json)``.

    Raises:
      FileNotFoundError: a missing file (named).
      ValueError: weights that do not fit the config (names the directory and the keys).
    """
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    for name in ("model.json", "model.safetensors"):
        if not (model_dir / name).is_file():
            raise FileNotFoundError(f"{model_dir / name} not found (train the model first)")
    meta = json.loads((model_dir / "model.json").read_text())
    cfg = ModelConfig.model_validate(meta["model"])
    model = build_model(cfg, meta["vocab_size"])
    state = load_file(str(model_dir / "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{model_dir}: weights do not match model.json (missing {missing[:5]}, unexpected {unexpected[:5]})")
    return model.eval(), meta
