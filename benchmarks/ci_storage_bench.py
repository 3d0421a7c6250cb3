#!/usr/bin/env python3
"""How far below one byte per codebook index can stored CI go? Entropy bounds and a general-purpose coder.

Trains speechkd's quantizer on ``--train-frames`` teacher frames, encodes the next ``--frames`` consecutive frames
(in the file's order, i.e. utterance by utterance for an extract stage's output) into CI ``(T, M)`` uint8, and
prints, per codebook and on average, in bits per index:

- the empirical entropy of the indexes (the bound for a coder with one fixed distribution per codebook);
- an honest cross-entropy of two such coders, fitted on the first half of the frames and scored on the second
  half (add-one smoothed): ``marginal`` (one distribution per codebook) and ``previous`` (a distribution per
  codebook conditioned on the same codebook's index in the previous frame, i.e. a first-order Markov model);
- what zstandard (level 19) achieves on the raw bytes, time-major ``(T, M)`` and codebook-major ``(M, T)``;

with bytes per frame and the ratio to float32 frames (``4 * D`` bytes). Nothing is stored: this sizes what an
entropy-coded CI format would gain before one is built.

Example:
  python benchmarks/ci_storage_bench.py --embeddings exp/local/whisper_l2.npy --bytes-per-frame 16
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import sys
from pathlib import Path

import numpy as np


def entropy_bits(counts: np.ndarray) -> float:
    """Plug-in entropy (bits) of a histogram ``counts: (K,)``."""
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


def cross_entropy_marginal(fit: np.ndarray, test: np.ndarray, k: int) -> float:
    """Bits per index of ``test: (T,)`` under the add-one smoothed histogram of ``fit: (T',)``."""
    c = np.bincount(fit, minlength=k) + 1.0
    return float(-np.log2(c[test] / c.sum()).mean())


def cross_entropy_previous(fit: np.ndarray, test: np.ndarray, k: int) -> float:
    """Bits per index of ``test[1:]`` given ``test[:-1]`` under an add-one smoothed (K, K) table from ``fit``."""
    table = np.ones((k, k))
    np.add.at(table, (fit[:-1], fit[1:]), 1.0)
    table /= table.sum(1, keepdims=True)
    return float(-np.log2(table[test[:-1], test[1:]]).mean())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--embeddings", type=Path, required=True, help="(N, D) float .npy of teacher frames, in order")
    p.add_argument("--bytes-per-frame", type=int, default=16, help="codebooks of 256 entries (default 16)")
    p.add_argument("--train-frames", type=int, default=20000, help="frames to train the quantizer (default 20000)")
    p.add_argument("--frames", type=int, default=100000, help="consecutive frames to encode and measure")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    import torch
    import zstandard

    from speechkd.mvq.quantizer import train_quantizer

    torch.set_num_threads(args.threads)
    x = np.load(args.embeddings, mmap_mode="r")
    rng = np.random.default_rng(0)
    train = np.asarray(x[np.sort(rng.choice(x.shape[0], args.train_frames, replace=False))], dtype=np.float32)
    q = train_quantizer(torch.from_numpy(train), args.bytes_per_frame, progress=False)
    frames = np.asarray(x[: args.frames], dtype=np.float32)
    ci = q.encode(torch.from_numpy(frames)).numpy()  # (T, M) uint8
    t, m = ci.shape
    half = t // 2
    rows = []
    for j in range(m):
        col = ci[:, j].astype(np.int64)
        rows.append((entropy_bits(np.bincount(col, minlength=256)),
                     cross_entropy_marginal(col[:half], col[half:], 256),
                     cross_entropy_previous(col[:half], col[half:], 256),
                     float((col[1:] == col[:-1]).mean())))
    ent, ce_m, ce_p, rep = (np.array(c) for c in zip(*rows))
    z = zstandard.ZstdCompressor(level=19)
    zt = len(z.compress(np.ascontiguousarray(ci).tobytes())) * 8 / ci.size
    zc = len(z.compress(np.ascontiguousarray(ci.T).tobytes())) * 8 / ci.size
    f32 = 4 * x.shape[1]
    print(f"data: {args.embeddings}, D={x.shape[1]}, {t} frames encoded, quantizer {q.id} "
          f"({m} codebooks, held-in error {q.relative_error(torch.from_numpy(frames[:5000])):.4f})")
    print(f"{'codebook':>8s}{'entropy':>10s}{'marginal':>10s}{'previous':>10s}{'P(repeat)':>11s}")
    for j in range(m):
        print(f"{j:>8d}{ent[j]:>10.3f}{ce_m[j]:>10.3f}{ce_p[j]:>10.3f}{rep[j]:>11.3f}")
    print()
    print(f"{'coding':44s}{'bits/index':>11s}{'bytes/frame':>13s}{'vs float32':>12s}")
    for name, bits in (("raw uint8 (stored today)", 8.0),
                       ("entropy bound, one distribution per codebook", float(ent.mean())),
                       ("marginal coder (fit 1st half, score 2nd)", float(ce_m.mean())),
                       ("previous-frame coder (fit 1st half, score 2nd)", float(ce_p.mean())),
                       ("zstd -19, time-major bytes", zt), ("zstd -19, codebook-major bytes", zc)):
        bpf = bits * m / 8
        print(f"{name:44s}{bits:>11.3f}{bpf:>13.2f}{f32 / bpf:>11.0f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
