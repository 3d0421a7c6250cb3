"""Stateless transducer: any encoder + stateless predictor (decoder) + additive joiner.

The predictor follows the "stateless" design of Ghodsi et al. (2020), "RNN-Transducer with
Stateless Prediction Network" (ICASSP 2020): an embedding of the last ``context_size`` labels,
mixed by a depthwise 1-D convolution, instead of an LSTM (as in icefall's
pruned_transducer_stateless recipes). The joiner is the additive joint network of Graves (2012),
"Sequence Transduction with Recurrent Neural Networks", Sec. 2.1, with a tanh non-linearity.

Models here know nothing about knowledge distillation; they expose the tensors a KD method needs
(encoder output, per-layer outputs, joiner logits, CoDERT encoder logits).
"""

from __future__ import annotations

from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from speechkd.losses.rnnt import rnnt_loss
from speechkd.models.conformer import tracing

__all__ = ["Decoder", "Joiner", "Transducer", "ctc_loss_from_head"]


def ctc_loss_from_head(head: nn.Module, encoder_out: Tensor, encoder_out_lens: Tensor, y: Tensor, y_lens: Tensor,
                       blank_id: int = 0, reduction: str = "mean") -> Tensor:
    """CTC loss (Graves et al. 2006) of labels ``y`` under a linear CTC head on the encoder output, in nats.

    Args:
        head: maps (N, T, C) -> (N, T, V) logits.
        encoder_out: (N, T, C); encoder_out_lens: (N,) valid frames.
        y: (N, U) int64 labels padded with any value; y_lens: (N,) valid labels.
        reduction: "mean" (sum over utterances / N), "sum" or "none" ((N,)); impossible alignments give 0.

    Raises:
        ValueError: unknown reduction.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    log_probs = head(encoder_out).float().log_softmax(-1).transpose(0, 1)  # (T, N, V)
    loss = nn.functional.ctc_loss(
        log_probs, y, encoder_out_lens.long(), y_lens.long(), blank=blank_id,
        reduction="none" if reduction == "none" else "sum", zero_infinity=True,
    )
    return loss / y.shape[0] if reduction == "mean" else loss


class Decoder(nn.Module):
    """Stateless predictor (a.k.a. decoder / prediction network) of a transducer.

    ``out[:, u] = relu(depthwise_conv(embed(y[:, u-context_size+1 : u+1])))``: the output at
    position u depends only on the last ``context_size`` tokens up to and including ``y[:, u]``.
    With ``context_size == 1`` there is no convolution (embedding + ReLU).
    For a transducer lattice one feeds ``[blank] + y`` so that output u summarises ``y[:, :u]``
    (the labels emitted before lattice node u).

    Args:
        vocab_size: V, number of output symbols including blank.
        decoder_dim: D, embedding / output dimension.
        blank_id: id of the blank symbol; also used as left padding when ``need_pad=True``.
        context_size: number of previous tokens the predictor sees (>= 1).

    Raises:
        ValueError: if vocab_size < 2, decoder_dim < 1, context_size < 1 or blank_id out of range.
    """

    def __init__(self, vocab_size: int, decoder_dim: int, blank_id: int = 0, context_size: int = 2) -> None:
        super().__init__()
        if vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2 (blank + at least one label), got {vocab_size}")
        if decoder_dim < 1:
            raise ValueError(f"decoder_dim must be >= 1, got {decoder_dim}")
        if context_size < 1:
            raise ValueError(f"context_size must be >= 1, got {context_size}")
        if not 0 <= blank_id < vocab_size:
            raise ValueError(f"blank_id={blank_id} out of range for vocab_size={vocab_size}")
        self.vocab_size = vocab_size
        self.decoder_dim = decoder_dim
        self.blank_id = blank_id
        self.context_size = context_size
        self.embedding = nn.Embedding(vocab_size, decoder_dim)
        if context_size > 1:
            self.conv = nn.Conv1d(
                decoder_dim, decoder_dim, kernel_size=context_size, groups=decoder_dim, bias=False
            )
        else:
            self.conv = None

    def forward(self, y: Tensor, need_pad: bool = True) -> Tensor:
        """Predictor output for every position of a token sequence.

        Args:
            y: (N, U) int64 token ids in [0, V).
            need_pad: if True, left-pad ``y`` with ``context_size - 1`` blanks so that the output has
                U positions and position u sees ``y[:, max(0, u-context_size+1) : u+1]``. If False,
                ``y`` must already hold the context: U >= context_size, and the output has
                ``U - context_size + 1`` positions (1 when decoding with exactly ``context_size``
                tokens).

        Returns:
            (N, U, D) predictor output if ``need_pad`` else (N, U - context_size + 1, D).

        Raises:
            ValueError: if y is not 2-D integer, contains ids outside [0, V), or (need_pad=False)
                is shorter than context_size.
        """
        if y.dim() != 2 or y.is_floating_point():
            raise ValueError(f"y must be a 2-D integer tensor (N, U), got shape {tuple(y.shape)} dtype {y.dtype}")
        if not tracing() and y.numel() > 0 and (bool((y < 0).any()) or bool((y >= self.vocab_size).any())):
            raise ValueError(f"y contains token ids outside [0, {self.vocab_size})")
        y = y.long()
        c = self.context_size
        if need_pad and c > 1:
            pad = y.new_full((y.shape[0], c - 1), self.blank_id)
            y = torch.cat([pad, y], dim=1)  # (N, c-1+U)
        elif not need_pad and y.shape[1] < c:
            raise ValueError(f"with need_pad=False, y needs at least context_size={c} tokens, got {y.shape[1]}")
        emb = self.embedding(y)  # (N, U', D)
        if self.conv is not None:
            emb = self.conv(emb.transpose(1, 2)).transpose(1, 2)  # (N, U'-c+1, D)
        return F.relu(emb)


class Joiner(nn.Module):
    """Additive joiner (joint network): ``output_linear(tanh(encoder_proj(enc) + decoder_proj(dec)))``.

    Graves (2012), Sec. 2.1; the ``tanh`` joint of Graves et al. (2013), "Speech recognition with
    deep recurrent neural networks", eq. (8)-(9).

    Args:
        encoder_dim: C, encoder output dimension.
        decoder_dim: D, predictor output dimension.
        joiner_dim: J, hidden dimension of the joint network.
        vocab_size: V, number of output symbols including blank.
    """

    def __init__(self, encoder_dim: int, decoder_dim: int, joiner_dim: int, vocab_size: int) -> None:
        super().__init__()
        for name, val in (("encoder_dim", encoder_dim), ("decoder_dim", decoder_dim),
                          ("joiner_dim", joiner_dim), ("vocab_size", vocab_size)):
            if val < 1:
                raise ValueError(f"{name} must be >= 1, got {val}")
        self.encoder_dim = encoder_dim
        self.decoder_dim = decoder_dim
        self.joiner_dim = joiner_dim
        self.vocab_size = vocab_size
        self.encoder_proj = nn.Linear(encoder_dim, joiner_dim)
        self.decoder_proj = nn.Linear(decoder_dim, joiner_dim)
        self.output_linear = nn.Linear(joiner_dim, vocab_size)

    def forward(self, encoder_out: Tensor, decoder_out: Tensor, project_input: bool = True) -> Tensor:
        """Joint logits, broadcasting the leading dimensions of the two inputs.

        Args:
            encoder_out: (..., C) encoder frames, e.g. (N, T, 1, C) for the full lattice.
            decoder_out: (..., D) predictor outputs, e.g. (N, 1, U+1, D).
            project_input: if False, both inputs are already projected to (..., J) by
                ``encoder_proj`` / ``decoder_proj`` (used by decoding to project each frame once).

        Returns:
            (..., V) unnormalised logits, leading dims broadcast, e.g. (N, T, U+1, V).

        Raises:
            ValueError: if the last dimensions do not match the expected sizes.
        """
        exp_e, exp_d = (self.encoder_dim, self.decoder_dim) if project_input else (self.joiner_dim,) * 2
        if encoder_out.shape[-1] != exp_e or decoder_out.shape[-1] != exp_d:
            raise ValueError(
                f"expected encoder_out (..., {exp_e}) and decoder_out (..., {exp_d}), got "
                f"{tuple(encoder_out.shape)} and {tuple(decoder_out.shape)}"
            )
        if project_input:
            encoder_out = self.encoder_proj(encoder_out)  # (..., J)
            decoder_out = self.decoder_proj(decoder_out)  # (..., J)
        return self.output_linear(torch.tanh(encoder_out + decoder_out))  # (..., V)

    def encoder_logits(self, encoder_out: Tensor) -> Tensor:
        """CoDERT "encoder logits": the joiner applied with the predictor branch left out.

        ``output_linear(tanh(encoder_proj(encoder_out)))`` (Swaminathan et al. 2021, "CoDERT:
        Distilling Encoder Representations with Co-learning for Transducer-based Speech
        Recognition", Sec. 2). Equals ``forward`` with a zero predictor contribution.

        Args:
            encoder_out: (N, T, C) encoder frames (any leading dims allowed).

        Returns:
            (N, T, V) unnormalised logits.

        Raises:
            ValueError: if the last dimension is not encoder_dim.
        """
        if encoder_out.shape[-1] != self.encoder_dim:
            raise ValueError(f"expected encoder_out (..., {self.encoder_dim}), got {tuple(encoder_out.shape)}")
        return self.output_linear(torch.tanh(self.encoder_proj(encoder_out)))  # (N, T, V)


class Transducer(nn.Module):
    """Transducer = encoder + stateless predictor (:class:`Decoder`) + :class:`Joiner`.

    The encoder is any ``nn.Module`` with an int attribute ``output_dim`` and
    ``forward(x: (N, T, F), x_lens: (N,)) -> (encoder_out: (N, T', C), encoder_out_lens: (N,),
    layer_outputs: list of (N, T', C_l))``.

    Args:
        encoder: the acoustic encoder described above.
        decoder: stateless predictor; its ``blank_id`` must equal ``blank_id``.
        joiner: joint network with ``encoder_dim == encoder.output_dim`` and
            ``decoder_dim == decoder.decoder_dim`` and the decoder's vocabulary size.
        blank_id: id of the blank symbol.

    Raises:
        ValueError: if the encoder has no ``output_dim`` or the component sizes/blank ids disagree.
    """

    def __init__(self, encoder: nn.Module, decoder: Decoder, joiner: Joiner, blank_id: int = 0, ctc_head: bool = False) -> None:
        super().__init__()
        if not hasattr(encoder, "output_dim"):
            raise ValueError("encoder must have an attribute `output_dim`")
        if joiner.encoder_dim != encoder.output_dim:
            raise ValueError(f"joiner.encoder_dim={joiner.encoder_dim} != encoder.output_dim={encoder.output_dim}")
        if joiner.decoder_dim != decoder.decoder_dim:
            raise ValueError(f"joiner.decoder_dim={joiner.decoder_dim} != decoder.decoder_dim={decoder.decoder_dim}")
        if joiner.vocab_size != decoder.vocab_size:
            raise ValueError(f"joiner.vocab_size={joiner.vocab_size} != decoder.vocab_size={decoder.vocab_size}")
        if decoder.blank_id != blank_id:
            raise ValueError(f"decoder.blank_id={decoder.blank_id} != blank_id={blank_id}")
        self.encoder = encoder
        self.decoder = decoder
        self.joiner = joiner
        self.blank_id = blank_id
        # Optional CTC head on the encoder output: an auxiliary loss that gets a small transducer out of its
        # all-blank phase sooner (measured: 71% vs 100% dev WER after 600 steps on connected commands).
        self.ctc_output = nn.Linear(encoder.output_dim, joiner.vocab_size) if ctc_head else None

    def ctc_loss(self, encoder_out: Tensor, encoder_out_lens: Tensor, y: Tensor, y_lens: Tensor,
                 reduction: str = "mean") -> Tensor:
        """Auxiliary CTC loss (Graves et al. 2006) of the labels from the CTC head, in nats.

        Args:
            encoder_out: (N, T, C) encoder frames; encoder_out_lens: (N,) valid frames.
            y: (N, U) int64 labels padded with any value; y_lens: (N,) valid labels.
            reduction: "mean" (sum over utterances / N), "sum" or "none" ((N,) per utterance).

        Raises:
            ValueError: when the model was built without ``ctc_head``.
        """
        if self.ctc_output is None:
            raise ValueError("this model has no CTC head (build it with ctc_head=True)")
        return ctc_loss_from_head(self.ctc_output, encoder_out, encoder_out_lens, y, y_lens, self.blank_id, reduction)

    def sequence_loss(self, encoder_out: Tensor, encoder_out_lens: Tensor, y: Tensor, y_lens: Tensor,
                      label_smoothing: float = 0.0, reduction: str = "none") -> Tensor:
        """-log P(y | x) under the transducer (the RNN-T loss), per utterance by default, in nats.

        The same interface as the attention model's ``sequence_loss``, so that sequence-level KD and the
        trainer treat both alike. Args as :meth:`transducer_loss`.

        Raises:
            ValueError: label_smoothing != 0 (not defined for the transducer loss).
        """
        if label_smoothing:
            raise ValueError("label smoothing is not defined for the transducer (set train.label_smoothing: 0)")
        return self.transducer_loss(encoder_out, encoder_out_lens, y, y_lens, reduction=reduction)

    @property
    def vocab_size(self) -> int:
        """V, number of output symbols including blank."""
        return self.joiner.vocab_size

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
        if encoder_out.dim() != 3 or encoder_out.shape[-1] != self.joiner.encoder_dim:
            raise ValueError(
                f"encoder_out must be (N, T', {self.joiner.encoder_dim}), got {tuple(encoder_out.shape)}"
            )
        return encoder_out, encoder_out_lens, list(layer_outputs)

    def encoder_logits(self, encoder_out: Tensor) -> Tensor:
        """CoDERT "encoder logits" of the encoder frames: the joiner with the predictor branch left out.

        ``joiner.output_linear(tanh(joiner.encoder_proj(encoder_out)))`` (Swaminathan et al. 2021, "CoDERT:
        Distilling Encoder Representations with Co-learning for Transducer-based Speech Recognition", Sec. 2);
        see :meth:`Joiner.encoder_logits`.

        Args:
            encoder_out: (N, T, C) encoder frames, C = ``joiner.encoder_dim``.

        Returns:
            (N, T, V) unnormalised logits, one distribution over the V output symbols per frame.

        Raises:
            ValueError: if the last dimension is not the joiner's encoder_dim.
        """
        return self.joiner.encoder_logits(encoder_out)

    def decoder_input(self, y: Tensor, y_lens: Tensor) -> Tensor:
        """Blank-prefixed, blank-padded predictor input ``[blank] + y``.

        Args:
            y: (N, U) int64 labels, padded with any value beyond ``y_lens``.
            y_lens: (N,) number of valid labels.

        Returns:
            (N, U+1) int64: column 0 is blank, entries beyond ``y_lens`` are blank.
        """
        N, U = y.shape
        valid = torch.arange(U, device=y.device)[None, :] < y_lens.to(y.device)[:, None]  # (N, U)
        y = torch.where(valid, y.long(), torch.full_like(y, self.blank_id, dtype=torch.long))
        return torch.cat([y.new_full((N, 1), self.blank_id), y], dim=1)  # (N, U+1)

    def joint_logits(self, encoder_out: Tensor, y: Tensor, y_lens: Tensor) -> Tensor:
        """Full-lattice joiner output.

        Args:
            encoder_out: (N, T, C) encoder frames.
            y: (N, U) int64 labels padded with any value; y_lens: (N,) valid labels.

        Returns:
            (N, T, U+1, V) unnormalised logits; node (t, u) conditions on frame t and ``y[:, :u]``.
        """
        decoder_out = self.decoder(self.decoder_input(y, y_lens))  # (N, U+1, D)
        return self.joiner(encoder_out.unsqueeze(2), decoder_out.unsqueeze(1))  # (N, T, U+1, V)

    def transducer_loss(
        self,
        encoder_out: Tensor,
        encoder_out_lens: Tensor,
        y: Tensor,
        y_lens: Tensor,
        reduction: str = "mean",
    ) -> Tensor:
        """RNN-T loss (Graves 2012) of the labels given encoder output, in nats.

        Only the first ``max(encoder_out_lens)`` frames and ``max(y_lens)`` labels are used.

        Args:
            encoder_out: (N, T, C) encoder frames.
            encoder_out_lens: (N,) valid frames, 1 <= T_n <= T.
            y: (N, U) int64 labels (no blank within ``y_lens``), padded with any value.
            y_lens: (N,) number of valid labels.
            reduction: "mean" (over utterances), "sum" or "none" ((N,)); see :func:`rnnt_loss`.

        Returns:
            Scalar loss, or (N,) for reduction="none".

        Raises:
            ValueError: on shape mismatches or invalid lengths/labels (from :func:`rnnt_loss`).
        """
        if y.dim() != 2 or y_lens.dim() != 1 or y.shape[0] != encoder_out.shape[0] or y_lens.shape[0] != y.shape[0]:
            raise ValueError(
                f"expected y (N, U) and y_lens (N,) with N={encoder_out.shape[0]}, got "
                f"{tuple(y.shape)} and {tuple(y_lens.shape)}"
            )
        if encoder_out_lens.numel() > 0:
            T_max = int(encoder_out_lens.max())
            if 1 <= T_max <= encoder_out.shape[1]:
                encoder_out = encoder_out[:, :T_max]
        if y_lens.numel() > 0:
            U_max = int(y_lens.max())
            if 0 <= U_max <= y.shape[1]:
                y = y[:, :U_max]
        logits = self.joint_logits(encoder_out, y, y_lens)  # (N, T, U+1, V)
        targets = self.decoder_input(y, y_lens)[:, 1:]  # (N, U), blank beyond y_lens
        return rnnt_loss(logits, targets, encoder_out_lens, y_lens, blank=self.blank_id, reduction=reduction)

    def forward(
        self, x: Tensor, x_lens: Tensor, y: Tensor, y_lens: Tensor
    ) -> Tuple[Tensor, Tensor, Tensor, List[Tensor]]:
        """Encode and compute the mean RNN-T loss.

        Args:
            x: (N, T, F) features; x_lens: (N,) valid frames.
            y: (N, U) int64 labels padded with any value; y_lens: (N,) valid labels.

        Returns:
            loss: scalar mean RNN-T loss over utterances (nats); encoder_out: (N, T', C);
            encoder_out_lens: (N,); layer_outputs: list of (N, T', C_l).
        """
        encoder_out, encoder_out_lens, layer_outputs = self.encode(x, x_lens)
        loss = self.transducer_loss(encoder_out, encoder_out_lens, y, y_lens)
        return loss, encoder_out, encoder_out_lens, layer_outputs
