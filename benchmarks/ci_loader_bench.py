#!/usr/bin/env python3
"""Stored codebook indexes (CI): range-coded against uncompressed HDF5, in bytes and in training-loader speed.

Reads the CI of every cut of a quantize stage's manifest (``labels/cuts_train_ci.jsonl.gz``), writes them again
into a temporary directory both ways (``quantizer.storage: hdf5`` and ``range``, through
:func:`speechkd.labels.store.write_frame_labels`), checks that every cut reads back bit-exactly, and prints:

- bytes per frame on disk of each file (headers included), the ratio to the float32 teacher frames they stand for
  (``4 * D`` bytes), and the bound of a coder with one fixed distribution per codebook (the empirical entropy of
  all the stored indexes, per codebook, summed);
- the time to read every cut's CI alone (``cut.load_custom``), and the training loader's batches per second over
  one epoch (speechkd's ``AsrDataset`` + ``make_loader``: fbank features and CI collated, the MVQ recipes'
  ``max_duration``, shuffled, no worker processes), each storage measured ``--repeats`` times alternately in the
  same run (best kept), with the ratio range / hdf5.

Example (after `speechkd quantize recipes/demo_whisper.yaml`):
  python benchmarks/ci_loader_bench.py --cuts exp/demo_whisper/labels/cuts_train_ci.jsonl.gz
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # ci_storage_bench's entropy_bits
KEY = "codebook_indexes"


def entropy_bound(ci: np.ndarray) -> float:
    """Sum over codebooks of the plug-in entropy (bits) of ``ci: (T, M)`` uint8: the bound per frame."""
    from ci_storage_bench import entropy_bits  # beside this script

    return sum(entropy_bits(np.bincount(ci[:, j], minlength=256)) for j in range(ci.shape[1]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--cuts", type=Path, required=True, help="a quantize stage's cuts_train_ci.jsonl.gz")
    p.add_argument("--max-duration", type=float, default=50.0, help="seconds of audio per batch (default 50)")
    p.add_argument("--repeats", type=int, default=2, help="epochs per storage, alternating (default 2)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None, help="also write the numbers as JSON here")
    args = p.parse_args(argv)

    import torch
    from lhotse import CutSet

    from speechkd.data.datamodule import AsrDataset, load_cuts, make_loader
    from speechkd.labels.store import label_file_bytes, load_frame_labels, write_frame_labels

    torch.set_num_threads(args.threads)
    cuts = load_cuts(args.cuts, lazy=False)
    ci = {c.id: load_frame_labels(c, KEY) for c in cuts}
    frames = sum(a.shape[0] for a in ci.values())
    m = next(iter(ci.values())).shape[1]
    emb = (cuts[0].custom or {}).get("teacher_embeddings")
    dim = int(emb.shape[1]) if emb is not None else None
    shift = float(cuts[0].custom[KEY].frame_shift)
    bound = entropy_bound(np.concatenate(list(ci.values())))
    results = {"cuts": str(args.cuts), "num_cuts": len(cuts), "frames": frames, "num_codebooks": m, "dim": dim,
               "entropy_bound_bits_per_frame": bound, "storage": {}}
    with tempfile.TemporaryDirectory() as tmp:
        stored = {}
        for codec in ("hdf5", "range"):
            t0 = time.perf_counter()
            stored[codec] = write_frame_labels(cuts, ci, Path(tmp) / codec, KEY, shift, extra=dict(cuts[0].custom.get(
                f"{KEY}_meta") or {}), codec=codec)
            write_s = time.perf_counter() - t0
            size = label_file_bytes(stored[codec], KEY)
            results["storage"][codec] = {"write_s": write_s, "file_bytes": size, "bytes_per_frame": size / frames,
                                         "read_s": [], "batches_per_s": []}
        for c in stored["range"]:  # bit-exact read-back
            if not np.array_equal(load_frame_labels(c, KEY), ci[c.id]):
                raise SystemExit(f"cut '{c.id}': range-coded CI differ from the originals")
        for _ in range(args.repeats):
            for codec in ("hdf5", "range"):
                r = results["storage"][codec]
                t0 = time.perf_counter()
                for c in stored[codec]:
                    c.load_custom(KEY)
                r["read_s"].append(time.perf_counter() - t0)
                loader = make_loader(CutSet.from_cuts(stored[codec]), AsrDataset(None, label_keys=[KEY]),
                                     args.max_duration, shuffle=True, seed=0)
                t0, n = time.perf_counter(), 0
                for _batch in loader:
                    n += 1
                r["batches_per_s"].append(n / (time.perf_counter() - t0))
    h, rg = results["storage"]["hdf5"], results["storage"]["range"]
    print(f"{args.cuts}: {len(cuts)} cuts, {frames} frames of {m} codebooks"
          + (f", teacher dim {dim}" if dim else "") + "; every range-coded cut read back bit-exactly")
    print(f"{'storage':34s}{'bytes/frame':>12s}{'vs float32':>11s}{'read all s':>11s}{'batches/s':>11s}")
    rows = [("hdf5, one byte per index", h), ("range-coded (speechkd default)", rg)]
    for name, r in rows:
        vs = f"{4 * dim / r['bytes_per_frame']:.0f}x" if dim else "-"
        print(f"{name:34s}{r['bytes_per_frame']:>12.2f}{vs:>11s}{min(r['read_s']):>11.2f}{max(r['batches_per_s']):>11.1f}")
    vs = f"{4 * dim / (bound / 8):.0f}x" if dim else "-"
    print(f"{'entropy bound (per codebook)':34s}{bound / 8:>12.2f}{vs:>11s}")
    print(f"range / hdf5: size {rg['file_bytes'] / h['file_bytes']:.3f}, size vs bound "
          f"{rg['bytes_per_frame'] / (bound / 8):.3f}, read-all time {min(rg['read_s']) / min(h['read_s']):.2f}x, "
          f"loader batches/s {max(rg['batches_per_s']) / max(h['batches_per_s']):.3f}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
