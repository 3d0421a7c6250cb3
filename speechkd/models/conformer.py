"""Conformer encoder (Gulati et al., Interspeech 2020, arXiv 2005.08100) for fbank input.

Conv1d subsampling (2x per stride-2 layer, see :class:`ConvSubsampling` for why not Conv2d), then blocks of: half-step feed-forward, multi-head
self-attention, convolution module, half-step feed-forward, final LayerNorm (the "macaron" block of the
paper's Fig. 1). Positions are given by sinusoidal absolute encodings added after subsampling (the paper's
relative encoding is left out for simplicity and speed on CPU). Every block's output is returned, so a KD
method can read any middle layer; the model itself knows nothing of KD.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def tracing() -> bool:
    """True while a model is being traced or exported (``torch.export`` / the ONNX exporters, TorchScript tracing):
    forward methods skip their data-dependent input checks then (a check on a tensor's value cannot be traced);
    the exported graph's inputs are checked by its caller instead."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def make_pad_mask(lens: torch.Tensor, max_len: int | None = None) -> torch.Tensor:
    """``(N, T)`` bool mask, True at padded frames.

    Args:
      lens: ``(N,)`` valid lengths in frames.
      max_len: T (default ``lens.max()``).
    """
    max_len = int(lens.max()) if max_len is None else max_len
    return torch.arange(max_len, device=lens.device)[None, :] >= lens[:, None]


def subsampled_lens(lens: torch.Tensor, subsampling: int) -> torch.Tensor:
    """Frame counts after :class:`ConvSubsampling`: each stride-2 layer (kernel 3, no padding) maps
    ``T -> (T - 1) // 2``.

    Args:
      lens: ``(N,)`` input frames.
      subsampling: 1, 2, 4 or 8.
    """
    out = lens
    for _ in range(int(math.log2(subsampling))):
        out = (out - 1) // 2
    return out


class ConvSubsampling(nn.Module):
    """Stride-2 Conv1d layers over time (kernel 3, no padding, ReLU), then a linear projection.

    The Conformer paper uses Conv2d layers over (time, frequency); on a 2-core CPU their backward pass took
    about 350 ms per batch of 35 x 2.8 s against 75 ms for these time-only convolutions, so speechkd uses
    Conv1d. Each layer maps ``T -> (T - 1) // 2`` frames.

    Args:
      in_dim: feature dim F (e.g. 80 fbank bins).
      out_dim: model dim C.
      subsampling: time reduction, a power of two in {1, 2, 4, 8}.

    Shapes: ``x: (N, T, F) -> (N, T', C)`` with ``T'`` from :func:`subsampled_lens`.

    Raises:
      ValueError: unsupported ``subsampling``.
    """

    def __init__(self, in_dim: int, out_dim: int, subsampling: int = 4):
        super().__init__()
        if subsampling not in (1, 2, 4, 8):
            raise ValueError(f"subsampling must be 1, 2, 4 or 8, got {subsampling}")
        self.subsampling = subsampling
        layers: list[nn.Module] = []
        c_in = in_dim
        for _ in range(int(math.log2(subsampling))):
            layers += [nn.Conv1d(c_in, out_dim, kernel_size=3, stride=2), nn.ReLU()]
            c_in = out_dim
        self.conv = nn.Sequential(*layers)
        self.out = nn.Linear(c_in, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x.transpose(1, 2))  # x: (N, C, T')
        return self.out(x.transpose(1, 2))  # (N, T', C)


class FeedForward(nn.Module):
    """LayerNorm -> Linear -> SiLU -> Linear -> dropout; ``(N, T, C) -> (N, T, C)``.

    Dropout is applied to the output only: on CPU, dropout on the wide hidden layer cost about a sixth of a
    training step.
    """

    def __init__(self, dim: int, ff_dim: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(dim), nn.Linear(dim, ff_dim), nn.SiLU(), nn.Linear(ff_dim, dim), nn.Dropout(dropout)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ConvModule(nn.Module):
    """Conformer convolution module: pointwise conv + GLU, depthwise conv, LayerNorm, SiLU, pointwise conv.

    Padded frames are zeroed before the depthwise conv so they do not leak into valid frames.
    Shapes: ``x: (N, T, C)``, ``pad_mask: (N, T)`` True at padding -> ``(N, T, C)``.
    """

    def __init__(self, dim: int, kernel_size: int, dropout: float):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"conv kernel_size must be odd, got {kernel_size}")
        self.norm = nn.LayerNorm(dim)
        self.pw1 = nn.Linear(dim, 2 * dim)
        self.dw = nn.Conv1d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.norm2 = nn.LayerNorm(dim)
        self.pw2 = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
        x = nn.functional.glu(self.pw1(self.norm(x)), dim=-1)  # (N, T, C)
        x = x.masked_fill(pad_mask.unsqueeze(-1), 0.0)
        x = self.dw(x.transpose(1, 2)).transpose(1, 2)  # (N, T, C)
        x = self.pw2(nn.functional.silu(self.norm2(x)))
        return self.dropout(x)


class ConformerBlock(nn.Module):
    """One Conformer block (Gulati et al. 2020, eq. 1): x + FF/2, + MHSA, + Conv, + FF/2, LayerNorm.

    Shapes: ``x: (N, T, C)``, ``pad_mask: (N, T)`` -> ``(N, T, C)``.
    """

    def __init__(self, dim: int, num_heads: int, ff_dim: int, conv_kernel: int, dropout: float):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"model dim {dim} is not divisible by num_heads {num_heads}")
        self.ff1 = FeedForward(dim, ff_dim, dropout)
        self.attn_norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.attn_dropout = nn.Dropout(dropout)
        self.conv = ConvModule(dim, conv_kernel, dropout)
        self.ff2 = FeedForward(dim, ff_dim, dropout)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
        x = x + 0.5 * self.ff1(x)
        y = self.attn_norm(x)
        y, _ = self.attn(y, y, y, key_padding_mask=pad_mask, need_weights=False)
        x = x + self.attn_dropout(y)
        x = x + self.conv(x, pad_mask)
        x = x + 0.5 * self.ff2(x)
        return self.norm(x)


def sinusoidal_positions(length: int, dim: int, device=None) -> torch.Tensor:
    """``(length, dim)`` sinusoidal position encodings (Vaswani et al. 2017, sec. 3.5)."""
    pos = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(length, dim, device=device)
    pe[:, 0::2] = torch.sin(pos * div)
    pe[:, 1::2] = torch.cos(pos * div[: dim // 2])
    return pe


class ConformerEncoder(nn.Module):
    """Conformer encoder: fbank ``(N, T, F)`` -> ``(N, T', C)`` plus every block's output.

    Args:
      input_dim: feature dim F (80).
      dim: model dim C.
      num_layers: number of Conformer blocks.
      num_heads: attention heads.
      ff_dim: feed-forward inner dim.
      conv_kernel: depthwise conv kernel size (odd).
      subsampling: time reduction of the front end (1, 2, 4 or 8); with 10 ms fbank, 4 gives 40 ms frames.
      dropout: dropout probability.

    ``forward(x, x_lens)`` returns ``(encoder_out (N, T', C), encoder_out_lens (N,), layer_outputs)``, where
    ``layer_outputs[i]`` is block ``i``'s output ``(N, T', C)`` (so ``layer_outputs[-1] is encoder_out``).

    Raises:
      ValueError: an input shorter than the subsampling front end can handle (names its length).
    """

    def __init__(
        self,
        input_dim: int = 80,
        dim: int = 144,
        num_layers: int = 2,
        num_heads: int = 4,
        ff_dim: int = 576,
        conv_kernel: int = 15,
        subsampling: int = 4,
        dropout: float = 0.1,
    ):
        super().__init__()
        self.output_dim = dim
        self.num_layers = num_layers
        self.subsampling = subsampling
        self.embed = ConvSubsampling(input_dim, dim, subsampling)
        self.embed_norm = nn.LayerNorm(dim)  # puts the front end's output on the scale of the positions
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList(ConformerBlock(dim, num_heads, ff_dim, conv_kernel, dropout) for _ in range(num_layers))

    def forward(self, x: torch.Tensor, x_lens: torch.Tensor):
        out_lens = subsampled_lens(x_lens, self.subsampling)
        if not tracing() and int(out_lens.min()) < 1:
            raise ValueError(f"input of {int(x_lens.min())} frames is too short for {self.subsampling}x subsampling")
        x = self.embed(x)  # (N, T', C)
        x = self.embed_norm(x) + sinusoidal_positions(x.shape[1], self.output_dim, x.device)
        x = self.dropout(x)
        pad_mask = make_pad_mask(out_lens, x.shape[1])  # (N, T')
        layer_outputs = []
        for layer in self.layers:
            x = layer(x, pad_mask)
            layer_outputs.append(x)
        return x, out_lens, layer_outputs
