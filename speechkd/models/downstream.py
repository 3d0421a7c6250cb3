"""The SSL recipe's downstream model: an SSL encoder with SUPERB-style keyword-spotting (KWS) and speaker-verification
(SV) heads, its files, and a system's inference (arXiv 2210.16611; heads in :mod:`speechkd.models.heads`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from speechkd.config import DownstreamConfig
from speechkd.data.classification import IGNORE_INDEX
from speechkd.utils import write_json_atomic

__all__ = ["DOWNSTREAM_META", "HEADS_WEIGHTS", "DownstreamModel", "load_downstream", "save_downstream", "system_infer"]

DOWNSTREAM_META = "downstream.json"
"""Marker (written last) and settings of a fine-tuned run directory."""
HEADS_WEIGHTS = "heads.safetensors"
"""Downstream heads (and the AM-softmax speaker weights) of a fine-tuned run directory."""


class DownstreamModel(nn.Module):
    """An SSL encoder with a KWS head and/or an SV head (SUPERB style), for one fine-tuning run.

    Args:
      encoder: a :class:`speechkd.teachers.hf.SSLTeacher` returning every layer (0..L); ``frozen=True`` for the
        frozen mode (no gradient, always in eval mode), ``False`` to fine-tune it.
      tasks: ``("kws",)``, ``("sv",)`` or both.
      cfg: the recipe's :class:`speechkd.config.DownstreamConfig` (head sizes, AM-softmax s and m).
      num_speakers: training speakers of the SV head's AM-softmax classifier (needed with ``sv``).

    Heads: ``kws`` a :class:`~speechkd.models.heads.KwsHead` (12 classes), ``sv`` an
    :class:`~speechkd.models.heads.XVectorHead` and ``am`` its :class:`~speechkd.models.heads.AMSoftmaxLoss` (used
    in training only; not counted in the deployed system's parameters).

    Shapes: ``infer(wavs (N, S), lens (N,) samples) -> {"kws_logits": (N, 12), "sv_embeddings": (N, D)}``.
    """

    def __init__(self, encoder: nn.Module, tasks: Sequence[str], cfg: DownstreamConfig, num_speakers: int = 0):
        super().__init__()
        from speechkd.models.heads import KWS_NUM_CLASSES, AMSoftmaxLoss, KwsHead, XVectorHead

        self.encoder = encoder
        self.tasks = tuple(tasks)
        layers, dim = encoder.num_layers + 1, encoder.hidden_size
        self.kws = KwsHead(layers, dim, KWS_NUM_CLASSES, proj_dim=cfg.kws_proj_dim, layer_norm=cfg.layer_norm) \
            if "kws" in self.tasks else None
        self.sv = self.am = None
        if "sv" in self.tasks:
            if num_speakers < 1:
                raise ValueError("the sv task needs num_speakers >= 1")
            self.sv = XVectorHead(layers, dim, proj_dim=cfg.sv_proj_dim, stats_dim=cfg.sv_stats_dim,
                                  embed_dim=cfg.sv_embed_dim, layer_norm=cfg.layer_norm, padding=cfg.sv_padding)
            self.am = AMSoftmaxLoss(cfg.sv_embed_dim, num_speakers, s=cfg.am_s, m=cfg.am_m, ignore_index=IGNORE_INDEX)

    def head_parameters(self) -> list[nn.Parameter]:
        """Every trainable parameter outside the encoder (heads, AM-softmax weights)."""
        return [p for name, p in self.named_parameters() if not name.startswith("encoder.")]

    def inference_modules(self) -> list[nn.Module]:
        """What serves the tasks after training: the encoder and the heads (not the AM-softmax weights)."""
        return [m for m in (self.encoder, self.kws, self.sv) if m is not None]

    def loss(self, batch: dict, beta: float = 1.0) -> tuple[torch.Tensor, dict]:
        """``L_KWS + beta * L_SV`` (a single-task model has one term) over the utterances labelled for each task.

        Args:
          batch: a :class:`~speechkd.data.classification.WaveformDataset` batch with ``kws_target`` / ``spk_target``
            (:data:`~speechkd.data.classification.IGNORE_INDEX` where an utterance has no such label).
          beta: weight of the SV loss when the model has both heads.

        Returns:
          ``(loss, logs)``: scalar loss; logs ``kws_loss``, ``kws_acc`` (batch accuracy), ``sv_loss``.
        """
        out = self.encoder(batch["wavs"], batch["lens"])
        hs, lens = out.hidden_states, out.lens
        total, logs = None, {}
        if self.kws is not None:
            y = batch["kws_target"]
            keep = y != IGNORE_INDEX
            if bool(keep.any()):
                logits = self.kws([h[keep] for h in hs], lens[keep])  # (M, 12)
                loss = F.cross_entropy(logits, y[keep])
                logs.update(kws_loss=float(loss.detach()), kws_acc=float((logits.argmax(-1) == y[keep]).float().mean()))
                total = loss
        if self.sv is not None:
            y = batch["spk_target"]
            keep = y != IGNORE_INDEX
            if bool(keep.any()):
                emb = self.sv([h[keep] for h in hs], lens[keep])  # (M, D)
                loss = self.am(emb, y[keep])
                logs["sv_loss"] = float(loss.detach())
                loss = beta * loss if self.kws is not None else loss
                total = loss if total is None else total + loss
        if total is None:  # no utterance of the batch is labelled for this model's tasks
            total = hs[-1].sum() * 0.0
        return total, logs

    def forward(self, wavs: torch.Tensor, lens: torch.Tensor, encoded=None) -> dict:
        """Every head's output for a batch of waveforms (what :meth:`infer` runs without gradients, and what
        :func:`speechkd.export.export_ssl` traces).

        Args:
          wavs: ``(N, S)`` 16 kHz samples; lens: ``(N,)`` valid samples.
          encoded: the encoder's output for these waveforms (an :class:`~speechkd.teachers.hf.SSLOutput` of every
            layer), when already computed (a frozen encoder shared by several heads); the encoder is then not run.

        Returns:
          ``{"kws_logits": (N, 12)}`` and / or ``{"sv_embeddings": (N, D)}``.
        """
        out = self.encoder(wavs, lens) if encoded is None else encoded
        res = {}
        if self.kws is not None:
            res["kws_logits"] = self.kws(out.hidden_states, out.lens)
        if self.sv is not None:
            res["sv_embeddings"] = self.sv(out.hidden_states, out.lens)
        return res

    @torch.inference_mode()
    def infer(self, wavs: torch.Tensor, lens: torch.Tensor, encoded=None) -> dict:
        """:meth:`forward` in inference mode (call it on a model in eval mode); same arguments and outputs."""
        return self(wavs, lens, encoded=encoded)


def save_downstream(model: DownstreamModel, out_dir: Path, meta: dict) -> None:
    """Write a fine-tuned model: ``encoder/`` (a Hugging Face directory that
    :func:`speechkd.teachers.hf.load_ssl_teacher` loads), :data:`HEADS_WEIGHTS` and :data:`DOWNSTREAM_META`
    (``meta`` plus the tasks; written last). Not atomic by itself: write into :func:`speechkd.utils.atomic_dir`."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    enc = out_dir / "encoder"
    model.encoder.save_pretrained(enc)
    heads = {k: v.detach().contiguous() for k, v in model.state_dict().items() if not k.startswith("encoder.")}
    save_file(heads, out_dir / HEADS_WEIGHTS)
    write_json_atomic(out_dir / DOWNSTREAM_META, {"tasks": list(model.tasks), **meta})


def load_downstream(run_dir: Path) -> DownstreamModel:
    """Load a model written by :func:`save_downstream`, encoder frozen, in eval mode.

    Raises:
      FileNotFoundError: the directory lacks :data:`DOWNSTREAM_META` (the run has not finished).
      ValueError: the heads do not fit the settings.
    """
    from safetensors.torch import load_file

    from speechkd.teachers.hf import load_ssl_teacher

    run_dir = Path(run_dir)
    meta_path = run_dir / DOWNSTREAM_META
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} not found: run `speechkd finetune` first")
    meta = json.loads(meta_path.read_text())
    encoder = load_ssl_teacher(run_dir / "encoder", frozen=True)
    model = DownstreamModel(encoder, meta["tasks"], DownstreamConfig.model_validate(meta["downstream"]),
                            num_speakers=meta.get("num_speakers", 0))
    missing, unexpected = model.load_state_dict(load_file(run_dir / HEADS_WEIGHTS), strict=False)
    missing = [k for k in missing if not k.startswith("encoder.")]
    if missing or unexpected:
        raise ValueError(f"{run_dir / HEADS_WEIGHTS} does not fit {meta_path}: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    return model.eval()


def system_infer(models: Sequence[DownstreamModel], mode: str, wavs: torch.Tensor, lens: torch.Tensor) -> list[dict]:
    """One system's outputs for a batch, as it would be deployed: in ``frozen`` mode the runs share one unchanged
    encoder, so it runs once and every run's heads read its output; otherwise each run's own encoder runs.

    Args:
      models: the system's runs (one per task, or one multi-task model); mode: ``frozen``, ``finetune`` or
        ``multitask``; wavs: ``(N, S)`` 16 kHz samples; lens: ``(N,)`` valid samples.

    Returns:
      Each model's :meth:`DownstreamModel.infer` output, in order.
    """
    if mode == "frozen" and len(models) > 1:
        encoded = models[0].encoder(wavs, lens)
        return [m.infer(wavs, lens, encoded=encoded) for m in models]
    return [m.infer(wavs, lens) for m in models]
