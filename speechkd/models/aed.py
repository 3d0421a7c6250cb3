"""Attention encoder-decoder (AED): any encoder + Transformer decoder + optional CTC head.

The decoder is the Transformer decoder of Vaswani et al. (2017), "Attention Is All You Need"
(NeurIPS 2017), Sec. 3.1-3.5: token embedding scaled by sqrt(D) plus sinusoidal positions, then
blocks of causal self-attention, cross-attention over the encoder frames and a feed-forward
layer (here pre-norm, ``norm_first=True``, with a final LayerNorm), then a linear layer to the
vocabulary. The optional CTC head on the encoder output is the CTC branch of hybrid CTC/attention
training (Watanabe et al. 2017, "Hybrid CTC/Attention Architecture for End-to-End Speech
Recognition", IEEE JSTSP 11(8)); the interpolation of the two losses is left to the trainer.

Token ids: id 0 is ``<blk>``, the CTC blank, and it is *also* the attention decoder's
start-of-sequence (sos) and end-of-sequence (eos) symbol. This is safe because blank never occurs
inside a label sequence (sentencepiece models here have ``<blk>=0``, ``<unk>=1``, real pieces
after), so an emitted 0 can only mean "end". Labels passed to the losses must lie in [1, V).

Like :class:`~speechkd.models.transducer.Transducer`, models here know nothing of knowledge
distillation; they expose encoder output, per-layer outputs and decoder logits.
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from speechkd.models.conformer import make_pad_mask, sinusoidal_positions, tracing
from speechkd.models.transducer import ctc_loss_from_head

__all__ = ["AttentionDecoder", "AttentionEncoderDecoder"]


class AttentionDecoder(nn.Module):
    """Transformer decoder (Vaswani et al. 2017) over encoder frames, pre-norm.

    ``logits[:, u]`` depends on ``ys_in[:, : u + 1]`` (causal self-attention) and on the valid
    encoder frames ``encoder_out[n, : encoder_out_lens[n]]`` (cross-attention with a key padding
    mask), never on padded frames or later tokens.

    Args:
        vocab_size: V, number of output symbols including blank/sos/eos (id 0).
        encoder_dim: C, encoder output dimension; frames are projected to ``decoder_dim`` by a
            Linear layer when C != D (identity otherwise).
        decoder_dim: D, model dimension of the decoder.
        num_layers: number of decoder blocks (>= 1).
        num_heads: attention heads; must divide ``decoder_dim``.
        ff_dim: feed-forward inner dimension.
        dropout: dropout probability (embedding, attention, feed-forward, residuals).

    Raises:
        ValueError: if vocab_size < 2, any size < 1, decoder_dim not divisible by num_heads or
            dropout outside [0, 1).
    """

    def __init__(
        self,
        vocab_size: int,
        encoder_dim: int,
        decoder_dim: int = 128,
        num_layers: int = 2,
        num_heads: int = 4,
        ff_dim: int = 256,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2 (sos/eos/blank + at least one label), got {vocab_size}")
        for name, val in (("encoder_dim", encoder_dim), ("decoder_dim", decoder_dim), ("num_layers", num_layers),
                          ("num_heads", num_heads), ("ff_dim", ff_dim)):
            if val < 1:
                raise ValueError(f"{name} must be >= 1, got {val}")
        if decoder_dim % num_heads != 0:
            raise ValueError(f"decoder_dim {decoder_dim} is not divisible by num_heads {num_heads}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        self.vocab_size = vocab_size
        self.encoder_dim = encoder_dim
        self.decoder_dim = decoder_dim
        self.embedding = nn.Embedding(vocab_size, decoder_dim)
        self.embed_scale = math.sqrt(decoder_dim)  # Vaswani et al. 2017, Sec. 3.4
        self.dropout = nn.Dropout(dropout)
        self.encoder_proj = nn.Linear(encoder_dim, decoder_dim) if encoder_dim != decoder_dim else nn.Identity()
        layer = nn.TransformerDecoderLayer(
            decoder_dim, num_heads, dim_feedforward=ff_dim, dropout=dropout, batch_first=True, norm_first=True
        )
        self.decoder = nn.TransformerDecoder(layer, num_layers, norm=nn.LayerNorm(decoder_dim))
        self.output_linear = nn.Linear(decoder_dim, vocab_size)

    def forward(self, encoder_out: Tensor, encoder_out_lens: Tensor, ys_in: Tensor, ys_in_lens: Tensor) -> Tensor:
        """Decoder logits for every input position (teacher forcing).

        Args:
            encoder_out: (N, T, C) encoder frames.
            encoder_out_lens: (N,) valid frames per utterance, 1 <= T_n <= T.
            ys_in: (N, U) int64 decoder input tokens (typically ``[sos] + y``), padded beyond
                ``ys_in_lens`` with any value (padding is replaced by id 0 before embedding; by
                causality it cannot affect valid positions).
            ys_in_lens: (N,) valid input tokens per utterance, 0 <= U_n <= U.

        Returns:
            (N, U, V) unnormalised logits; ``logits[:, u]`` predicts the token after ``ys_in[:, u]``.

        Raises:
            ValueError: on shape mismatches, encoder_out_lens outside [1, T], ys_in_lens outside
                [0, U], or valid tokens outside [0, V).
        """
        if encoder_out.dim() != 3 or encoder_out.shape[-1] != self.encoder_dim:
            raise ValueError(f"encoder_out must be (N, T, {self.encoder_dim}), got {tuple(encoder_out.shape)}")
        N, T, _ = encoder_out.shape
        if encoder_out_lens.shape != (N,):
            raise ValueError(f"encoder_out_lens must be (N={N},), got {tuple(encoder_out_lens.shape)}")
        if not tracing() and N and (bool((encoder_out_lens < 1).any()) or bool((encoder_out_lens > T).any())):
            raise ValueError(f"encoder_out_lens must lie in [1, T={T}], got {encoder_out_lens.tolist()}")
        if ys_in.dim() != 2 or ys_in.is_floating_point() or ys_in.shape[0] != N:
            raise ValueError(f"ys_in must be an integer (N={N}, U) tensor, got {tuple(ys_in.shape)} {ys_in.dtype}")
        U = ys_in.shape[1]
        if ys_in_lens.shape != (N,):
            raise ValueError(f"ys_in_lens must be (N={N},), got {tuple(ys_in_lens.shape)}")
        if not tracing() and N and (bool((ys_in_lens < 0).any()) or bool((ys_in_lens > U).any())):
            raise ValueError(f"ys_in_lens must lie in [0, U={U}], got {ys_in_lens.tolist()}")
        device = encoder_out.device
        valid = ~make_pad_mask(ys_in_lens.to(device), U)  # (N, U) True at valid tokens
        ys_in = torch.where(valid, ys_in.long().to(device), torch.zeros((), dtype=torch.long, device=device))
        if not tracing() and ys_in.numel() and (bool((ys_in < 0).any()) or bool((ys_in >= self.vocab_size).any())):
            raise ValueError(f"ys_in contains token ids outside [0, {self.vocab_size}) within ys_in_lens")

        x = self.embedding(ys_in) * self.embed_scale  # (N, U, D)
        x = self.dropout(x + sinusoidal_positions(U, self.decoder_dim, device).to(x.dtype))
        memory = self.encoder_proj(encoder_out)  # (N, T, D)
        memory_pad = make_pad_mask(encoder_out_lens.to(device), T)  # (N, T) True at padded frames
        causal = torch.ones(U, U, dtype=torch.bool, device=device).triu(1)  # (U, U) True = not allowed
        # tgt_is_causal while exporting: torch's check that the mask is causal reads its values (not traceable)
        x = self.decoder(x, memory, tgt_mask=causal, memory_key_padding_mask=memory_pad,
                         tgt_is_causal=True if tracing() else None)  # (N, U, D)
        return self.output_linear(x)  # (N, U, V)


class AttentionEncoderDecoder(nn.Module):
    """AED model: encoder + :class:`AttentionDecoder` + optional CTC head (hybrid CTC/attention).

    The encoder is any ``nn.Module`` with an int attribute ``output_dim`` and
    ``forward(x: (N, T, F), x_lens: (N,)) -> (encoder_out: (N, T', C), encoder_out_lens: (N,),
    layer_outputs: list of (N, T', C_l))`` (e.g. :class:`~speechkd.models.conformer.ConformerEncoder`).

    Token id 0 is the CTC blank *and* the decoder's sos and eos (``blank_id == sos_id == eos_id ==
    0``): blank never occurs inside a label sequence, and sentencepiece ids start with ``<blk>=0``,
    ``<unk>=1``. Labels must therefore lie in [1, V).

    Args:
        encoder: the acoustic encoder described above.
        decoder: attention decoder with ``decoder.encoder_dim == encoder.output_dim``.
        ctc_head: if True, add ``ctc_output = nn.Linear(encoder.output_dim, V)`` for the CTC branch
            (Watanabe et al. 2017); else ``ctc_output`` is None.

    Raises:
        ValueError: if the encoder has no ``output_dim`` or it differs from ``decoder.encoder_dim``.
    """

    blank_id: int = 0
    sos_id: int = 0
    eos_id: int = 0

    def __init__(self, encoder: nn.Module, decoder: AttentionDecoder, ctc_head: bool = False) -> None:
        super().__init__()
        if not hasattr(encoder, "output_dim"):
            raise ValueError("encoder must have an attribute `output_dim`")
        if decoder.encoder_dim != encoder.output_dim:
            raise ValueError(f"decoder.encoder_dim={decoder.encoder_dim} != encoder.output_dim={encoder.output_dim}")
        self.encoder = encoder
        self.decoder = decoder
        self.ctc_output: Optional[nn.Linear] = (
            nn.Linear(encoder.output_dim, decoder.vocab_size) if ctc_head else None
        )

    @property
    def vocab_size(self) -> int:
        """V, number of output symbols including blank/sos/eos (id 0)."""
        return self.decoder.vocab_size

    def encode(self, x: Tensor, x_lens: Tensor) -> Tuple[Tensor, Tensor, List[Tensor]]:
        """Run the encoder.

        Args:
            x: (N, T, F) input features.
            x_lens: (N,) number of valid frames per utterance.

        Returns:
            encoder_out: (N, T', C); encoder_out_lens: (N,); layer_outputs: list of (N, T', C_l).

        Raises:
            ValueError: if the encoder does not return a 3-tuple or its output dim is not output_dim.
        """
        out = self.encoder(x, x_lens)
        if not isinstance(out, (tuple, list)) or len(out) != 3:
            raise ValueError("encoder must return (encoder_out, encoder_out_lens, layer_outputs)")
        encoder_out, encoder_out_lens, layer_outputs = out
        if encoder_out.dim() != 3 or encoder_out.shape[-1] != self.decoder.encoder_dim:
            raise ValueError(
                f"encoder_out must be (N, T', {self.decoder.encoder_dim}), got {tuple(encoder_out.shape)}"
            )
        return encoder_out, encoder_out_lens, list(layer_outputs)

    def _check_labels(self, y: Tensor, y_lens: Tensor, N: int) -> Tensor:
        """Validate labels; return (N, U) bool mask, True at valid label positions."""
        if y.dim() != 2 or y.is_floating_point() or y.shape[0] != N:
            raise ValueError(f"y must be an integer (N={N}, U) tensor, got {tuple(y.shape)} {y.dtype}")
        if y_lens.shape != (N,):
            raise ValueError(f"y_lens must be (N={N},), got {tuple(y_lens.shape)}")
        U = y.shape[1]
        if N and (bool((y_lens < 0).any()) or bool((y_lens > U).any())):
            raise ValueError(f"y_lens must lie in [0, U={U}], got {y_lens.tolist()}")
        valid = ~make_pad_mask(y_lens.to(y.device), U)  # (N, U)
        bad = valid & ((y <= self.eos_id) | (y >= self.vocab_size))
        if bool(bad.any()):
            raise ValueError(
                f"labels within y_lens must lie in [1, {self.vocab_size}) (id 0 is blank/sos/eos and may not occur "
                "inside a label sequence)"
            )
        return valid

    def decoder_logits(self, encoder_out: Tensor, encoder_out_lens: Tensor, y: Tensor, y_lens: Tensor) -> Tensor:
        """Teacher-forced decoder logits on the input ``[sos] + y``.

        Args:
            encoder_out: (N, T, C) encoder frames.
            encoder_out_lens: (N,) valid frames, 1 <= T_n <= T.
            y: (N, U) int64 labels in [1, V), padded beyond ``y_lens`` with any value.
            y_lens: (N,) number of valid labels, 0 <= U_n <= U.

        Returns:
            (N, U+1, V) unnormalised logits: position u < U_n predicts ``y[:, u]``, position U_n
            predicts eos; positions beyond U_n are padding (finite, but meaningless).

        Raises:
            ValueError: on shape mismatches, invalid lengths, or labels outside [1, V).
        """
        if encoder_out.dim() != 3:
            raise ValueError(f"encoder_out must be (N, T, C), got {tuple(encoder_out.shape)}")
        N = encoder_out.shape[0]
        valid = self._check_labels(y, y_lens, N)
        y = torch.where(valid, y.long(), torch.full_like(y, self.eos_id, dtype=torch.long))
        ys_in = torch.cat([y.new_full((N, 1), self.sos_id), y], dim=1)  # (N, U+1)
        return self.decoder(encoder_out, encoder_out_lens, ys_in, y_lens + 1)  # (N, U+1, V)

    def sequence_loss(
        self,
        encoder_out: Tensor,
        encoder_out_lens: Tensor,
        y: Tensor,
        y_lens: Tensor,
        label_smoothing: float = 0.0,
        reduction: str = "none",
    ) -> Tensor:
        """Per-utterance sum of the decoder's (label-smoothed) cross-entropy, in nats.

        For utterance n the targets are ``y[n, :U_n]`` followed by eos (U_n + 1 positions); the
        loss is the sum over them of ``(1 - eps) * (-log p(target)) + eps * mean_k(-log p(k))``
        (``torch.nn.functional.cross_entropy`` with ``label_smoothing=eps``, the mean over all V
        classes). With ``eps = 0`` it is exactly ``-log P(y, eos | x)``. Padded positions contribute 0.

        Args:
            encoder_out: (N, T, C) encoder frames.
            encoder_out_lens: (N,) valid frames, 1 <= T_n <= T.
            y: (N, U) int64 labels in [1, V), padded beyond ``y_lens`` with any value.
            y_lens: (N,) number of valid labels.
            label_smoothing: eps in [0, 1).
            reduction: "none" ((N,) per utterance), "mean" (over utterances) or "sum".

        Returns:
            (N,) float32 losses for "none", else a scalar.

        Raises:
            ValueError: unknown reduction, label_smoothing outside [0, 1), or invalid inputs (see
                :meth:`decoder_logits`).
        """
        if reduction not in ("none", "mean", "sum"):
            raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must lie in [0, 1), got {label_smoothing}")
        logits = self.decoder_logits(encoder_out, encoder_out_lens, y, y_lens).float()  # (N, U+1, V)
        U1 = logits.shape[1]
        pos = torch.arange(U1, device=logits.device)[None, :]  # (1, U+1)
        lens = y_lens.to(logits.device).long()[:, None]  # (N, 1)
        y_full = F.pad(y.long().to(logits.device), (0, 1), value=self.eos_id)  # (N, U+1)
        targets = torch.where(pos < lens, y_full, torch.full_like(y_full, self.eos_id))  # labels, then eos
        targets = targets.masked_fill(pos > lens, -100)  # padding ignored
        ce = F.cross_entropy(
            logits.transpose(1, 2), targets, ignore_index=-100, label_smoothing=label_smoothing, reduction="none"
        )  # (N, U+1), 0 at ignored positions
        loss = ce.sum(dim=1)  # (N,)
        if reduction == "mean":
            return loss.mean()
        if reduction == "sum":
            return loss.sum()
        return loss

    def ctc_loss(self, encoder_out: Tensor, encoder_out_lens: Tensor, y: Tensor, y_lens: Tensor,
                 reduction: str = "mean") -> Tensor:
        """CTC loss (Graves et al. 2006) of the labels from the CTC head, in nats.

        The CTC branch of hybrid CTC/attention (Watanabe et al. 2017); same semantics as
        :meth:`Transducer.ctc_loss <speechkd.models.transducer.Transducer.ctc_loss>` (impossible
        alignments give 0, ``zero_infinity=True``).

        Args:
            encoder_out: (N, T, C) encoder frames; encoder_out_lens: (N,) valid frames.
            y: (N, U) int64 labels padded with any value; y_lens: (N,) valid labels.
            reduction: "mean" (sum over utterances / N), "sum" or "none" ((N,) per utterance).

        Returns:
            Scalar loss, or (N,) for reduction="none".

        Raises:
            ValueError: when the model was built without ``ctc_head``, or an unknown reduction.
        """
        if self.ctc_output is None:
            raise ValueError("this model has no CTC head (build it with ctc_head=True)")
        return ctc_loss_from_head(self.ctc_output, encoder_out, encoder_out_lens, y, y_lens, self.blank_id, reduction)

    def forward(
        self, x: Tensor, x_lens: Tensor, y: Tensor, y_lens: Tensor, label_smoothing: float = 0.0
    ) -> Tuple[Tensor, Tensor, Tensor, List[Tensor]]:
        """Encode and compute the mean attention-decoder loss.

        Args:
            x: (N, T, F) features; x_lens: (N,) valid frames.
            y: (N, U) int64 labels in [1, V) padded with any value; y_lens: (N,) valid labels.
            label_smoothing: eps in [0, 1) for :meth:`sequence_loss`.

        Returns:
            loss: scalar, :meth:`sequence_loss` with reduction="mean" (nats per utterance);
            encoder_out: (N, T', C); encoder_out_lens: (N,); layer_outputs: list of (N, T', C_l).

        Raises:
            ValueError: on invalid inputs (see :meth:`encode` and :meth:`sequence_loss`).
        """
        encoder_out, encoder_out_lens, layer_outputs = self.encode(x, x_lens)
        loss = self.sequence_loss(
            encoder_out, encoder_out_lens, y, y_lens, label_smoothing=label_smoothing, reduction="mean"
        )
        return loss, encoder_out, encoder_out_lens, layer_outputs
