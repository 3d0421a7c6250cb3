#!/usr/bin/env python3
"""Benchmark speechkd's multi-codebook quantizer against faiss's quantizers and k2-fsa's multi_quantization.

Every quantizer gets the same training frames and the same bytes per frame (one byte per codebook of 256
entries); for each ``--bytes-per-frame`` value the table reports, on held-out frames, the relative
reconstruction error ``sum ||x - decode(encode(x))||^2 / sum ||x - mean(x)||^2`` (the mean-only baseline scores
1), the training wall time (seconds) and the encoding speed (frames per second), with ratios against the best
faiss result and against faiss's residual quantizer at beam 8 (the issue's bar: error no higher, encoding no
slower).

faiss (``faiss-cpu``, Johnson et al.; Douze et al. 2024, "The Faiss library") is measured with its standalone
quantizer objects: ``ProductQuantizer`` (PQ; frames zero-padded to a multiple of the codebook count),
``OPQMatrix`` + PQ (OPQ, Ge et al. CVPR 2013), ``ResidualQuantizer`` at beams 1, 8 and 32 (RQ, Babenko &
Lempitsky / Martinez et al.; beam 32 with its codebook cross-term tables, ``use_beam_LUT``) and
``LocalSearchQuantizer`` (LSQ++, Martinez et al. ECCV 2018), all with their default training settings, on
``--threads`` OpenMP threads.

multi_quantization (Guo et al., ICASSP 2023, arXiv 2211.00508) is trained with its own ``QuantizerTrainer``
(``phase_one_iters`` steps with 16-entry codebooks, then ``phase_two_iters`` with 256-entry ones, minibatches
of ``--mq-batch`` frames; its documented defaults are 10000 + 10000 steps at 600 frames: hours on a CPU, so it
is off unless ``--mq`` is given) and encodes with ``Quantizer.encode(x, refine_indexes_iters=5, as_bytes=True)``.
All quantizers see the same globally normalised frames ``(x - mean) / rms`` of the training split (an affine
map that leaves relative errors unchanged).

Examples:
  OMP_WAIT_POLICY=PASSIVE python benchmarks/quantizer_bench.py                  # synthetic data (noted)
  python benchmarks/quantizer_bench.py --embeddings teacher.npy --bytes-per-frame 8 16 --out results.json
  python benchmarks/quantizer_bench.py --embeddings exp/demo_whisper/labels/embeddings_train.h5 --mq --mq-iters 500
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its OpenMP runtime

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np

MQ_DEFAULT_ITERS = 10000  # QuantizerTrainer's default phase_one_iters and phase_two_iters
MQ_DEFAULT_BATCH = 600  # the minibatch size its defaults were tuned for (its docstring and test)

GOAL_SPEEDUP = 10.0  # against multi_quantization (the foundation issue's goals)
GOAL_TRAIN_RATIO = 0.25
#: faiss quantizers the benchmark knows: name -> (description, constructor key, beam)
FAISS_METHODS = ("pq", "opq", "rq1", "rq8", "rq32", "lsq")


def parse_args(argv=None) -> argparse.Namespace:
    from speechkd.mvq.quantizer import DEFAULT_BEAM, DEFAULT_REFINE_ITERS

    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] + "\n\n" + "\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("data")
    g.add_argument("--embeddings", type=Path, default=None,
                   help="teacher frames: a .npy (N, D) float array; an .h5/.hdf5 file whose datasets are (..., D) "
                        "arrays (all concatenated, e.g. lhotse NumpyHdf5Writer output); or a lhotse CutSet "
                        "(.jsonl/.jsonl.gz) with per-frame labels under --key. Omitted: synthetic low-rank data "
                        "(clearly marked as such in the output)")
    g.add_argument("--key", default="teacher_embeddings", help="cut custom field for a CutSet --embeddings")
    g.add_argument("--num-frames", type=int, default=20000, help="training frames (sampled if more; default 20000)")
    g.add_argument("--held-out", type=int, default=2000, help="held-out frames for error and speed (default 2000)")
    g.add_argument("--dim", type=int, default=256, help="synthetic data only: frame dimension (default 256)")
    g.add_argument("--synthetic-rank", type=int, default=64,
                   help="synthetic data only: rank of the signal (spectrum 1/i), plus 10%% isotropic noise")
    g = p.add_argument_group("common")
    g.add_argument("--bytes-per-frame", type=int, nargs="+", default=[16],
                   help="CI bytes per frame (= codebooks of 256 entries), one or more values, each measured for "
                        "every quantizer (default 16)")
    g.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--out", type=Path, default=None, help="also write all numbers as JSON here")
    g = p.add_argument_group("speechkd quantizer")
    g.add_argument("--beam", type=int, default=DEFAULT_BEAM, help=f"encoder beam (default {DEFAULT_BEAM})")
    g.add_argument("--refine-iters", type=int, default=DEFAULT_REFINE_ITERS,
                   help=f"encoder ICM passes (default {DEFAULT_REFINE_ITERS})")
    g.add_argument("--kmeans-iters", type=int, default=None, help="Lloyd iterations per stage (default: library's)")
    g.add_argument("--refine-rounds", type=int, default=None, help="joint refinement rounds (default: library's)")
    g.add_argument("--train-beam", type=int, default=None,
                   help="beam whose residuals the residual-VQ candidate's codebooks are fitted on (default: --beam; "
                        "1 = the greedy stage-wise training of speechkd before 2026-12-07)")
    g.add_argument("--structure", choices=["auto", "pq", "rvq"], default="auto",
                   help="initialisation: product quantizer, residual VQ, or auto (both; the better on validation "
                        "frames; default)")
    g = p.add_argument_group("faiss")
    g.add_argument("--faiss", default=",".join(FAISS_METHODS),
                   help=f"comma-separated faiss quantizers to measure, from {','.join(FAISS_METHODS)} (default all; "
                        "'' for none)")
    g = p.add_argument_group("multi_quantization")
    g.add_argument("--mq-iters", type=int, default=MQ_DEFAULT_ITERS,
                   help=f"phase_one_iters = phase_two_iters of its QuantizerTrainer (default {MQ_DEFAULT_ITERS}, its "
                        "own default; on a CPU each step takes seconds, so a smaller value is flagged in the output)")
    g.add_argument("--mq-batch", type=int, default=MQ_DEFAULT_BATCH, help="frames per training step (default 600)")
    g.add_argument("--mq-lr", type=float, default=0.005, help="its initial learning rate (default 0.005, its own)")
    g.add_argument("--mq-refine-iters", type=int, default=5, help="its encode refine_indexes_iters (default 5)")
    g.add_argument("--mq-device", default="cpu", help="device for multi_quantization (default cpu)")
    g.add_argument("--mq-eval-every", type=int, default=0,
                   help="also print its held-out error (first 500 held-out frames) every this many steps, to see "
                        "its learning curve (default 0: off; the time spent is excluded from its train time)")
    g.add_argument("--mq", action="store_true",
                   help="also train multi_quantization (hours at its defaults on a CPU; see --mq-iters)")
    g.add_argument("--mq-from", type=Path, default=None,
                   help="reuse the multi_quantization numbers of a previous --out JSON made with the same data "
                        "settings (data, frames, dim, bytes per frame, threads, seed) instead of training it again "
                        "(hours on a CPU); its encoding speed was then measured in that earlier run")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------------- data
def load_frames(args) -> tuple[np.ndarray, str]:
    """All candidate frames (N, D) float32 and a description of where they came from."""
    path = args.embeddings
    if path is None:
        rng = np.random.default_rng(args.seed + 12345)
        n, d, r = args.num_frames + args.held_out, args.dim, min(args.synthetic_rank, args.dim)
        spectrum = 1.0 / np.sqrt(np.arange(1, r + 1))  # (r,) std of each latent factor
        basis = np.linalg.qr(rng.standard_normal((d, r)))[0].T  # (r, D) orthonormal rows
        noise_sd = np.sqrt(0.1 / 0.9 * float((spectrum ** 2).sum()) / d)  # noise = 10% of the variance
        x = rng.standard_normal(d) + (rng.standard_normal((n, r)) * spectrum) @ basis  # (N, D)
        x += noise_sd * rng.standard_normal((n, d))
        return x.astype(np.float32), (f"SYNTHETIC low-rank data (rank {r}, spectrum 1/i, 10% isotropic noise), "
                                      f"N={n}, D={d}: not teacher embeddings")
    name = path.name.lower()
    if name.endswith(".npy"):
        x = np.load(path, mmap_mode="r")
        if x.ndim != 2:
            raise ValueError(f"{path}: expected an (N, D) array, got shape {x.shape}")
        src = f"{path} (.npy)"
    elif name.endswith((".h5", ".hdf5")):
        import h5py

        parts = []
        with h5py.File(path, "r") as f:
            for key in f.keys():
                a = np.asarray(f[key])
                parts.append(a.reshape(-1, a.shape[-1]))
        if not parts:
            raise ValueError(f"{path}: no datasets")
        dims = {a.shape[1] for a in parts}
        if len(dims) != 1:
            raise ValueError(f"{path}: datasets disagree on the last dimension: {sorted(dims)}")
        x = np.concatenate(parts)
        src = f"{path} (HDF5, {len(parts)} datasets)"
    elif name.endswith((".jsonl", ".jsonl.gz")):
        from lhotse import CutSet

        from speechkd.labels.store import load_frame_labels

        cuts = CutSet.from_file(path)
        x = np.concatenate([load_frame_labels(c, args.key) for c in cuts])
        src = f"{path} (CutSet, key {args.key!r})"
    else:
        raise ValueError(f"{path}: unsupported file type (use .npy, .h5/.hdf5 or a .jsonl(.gz) CutSet)")
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{path}: frames must be floating point, got {x.dtype}")
    return x, src


def split(x: np.ndarray, args) -> tuple[np.ndarray, np.ndarray]:
    """Random disjoint (train (N_t, D), held-out (N_h, D)) float32 splits."""
    rng = np.random.default_rng(args.seed)
    n = x.shape[0]
    need = args.num_frames + args.held_out
    if n < args.held_out + 256:
        raise ValueError(f"only {n} frames: need at least held-out ({args.held_out}) + 256")
    order = rng.permutation(n)[: min(n, need)]
    held = np.asarray(x[np.sort(order[: args.held_out])], dtype=np.float32)
    train = np.asarray(x[np.sort(order[args.held_out:])], dtype=np.float32)
    return train, held


def rel_error(x: np.ndarray, rec: np.ndarray) -> float:
    """sum ||x - rec||^2 / sum ||x - mean(x)||^2 in float64."""
    x = x.astype(np.float64)
    return float(((x - rec.astype(np.float64)) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())


def timed_encode(fn, x, warm: int = 64) -> tuple[object, float]:
    """(result of fn(x), frames per second), after a small warm-up call."""
    fn(x[:warm])
    t0 = time.perf_counter()
    out = fn(x)
    return out, x.shape[0] / (time.perf_counter() - t0)


# ------------------------------------------------------------------------------------------------------- runs
def run_ours(train, held, bpf: int, args) -> dict:
    """Train and score speechkd's quantizer at ``bpf`` bytes per frame."""
    import torch

    from speechkd.mvq.quantizer import train_quantizer

    kw = {}
    if args.kmeans_iters is not None:
        kw["kmeans_iters"] = args.kmeans_iters
    if args.refine_rounds is not None:
        kw["refine_rounds"] = args.refine_rounds
    if args.train_beam is not None:
        kw["train_beam"] = args.train_beam
    xt = torch.from_numpy(train)
    t0 = time.perf_counter()
    q = train_quantizer(xt, bpf, beam=args.beam, refine_iters=args.refine_iters, seed=args.seed,
                        structure=args.structure, progress=sys.stderr.isatty(), **kw)
    train_s = time.perf_counter() - t0
    xh = torch.from_numpy(held)
    ci, speed = timed_encode(q.encode, xh)
    rec = q.decode(ci).numpy()
    return {"rel_error": rel_error(held, rec), "rel_error_first500": rel_error(held[:500], rec[:500]),
            "train_s": train_s, "encode_fps": speed, "train_rel_error": q.relative_error(xt[:5000]), "id": q.id,
            "beam": q.beam, "refine_iters": q.refine_iters, "structure": args.structure,
            "subspace_dim": q.subspace_dim, "orthogonal_codebooks": q.orthogonal_codebooks, "ci_dtype": str(ci.dtype),
            "ci_shape": list(ci.shape), **kw}


def run_faiss(method: str, train, held, bpf: int, args) -> dict:
    """Train and score one faiss quantizer (``method`` in FAISS_METHODS) at ``bpf`` bytes per frame.

    Codes are ``bpf`` codebooks of 8 bits (``code_size == bpf`` bytes, checked); frames are float32 (N, D).
    PQ and OPQ need D divisible by ``bpf``: frames are zero-padded to the next multiple (the padding
    reconstructs exactly, so it changes no error).
    """
    import faiss

    faiss.omp_set_num_threads(args.threads)
    d = train.shape[1]
    info: dict = {"method": method}
    if method in ("pq", "opq"):
        dp = -(-d // bpf) * bpf
        pad = lambda a: np.ascontiguousarray(np.pad(a, ((0, 0), (0, dp - d)))) if dp > d else np.ascontiguousarray(a)
        pq = faiss.ProductQuantizer(dp, bpf, 8)
        opq = faiss.OPQMatrix(dp, bpf) if method == "opq" else None
        t0 = time.perf_counter()
        xt = pad(train)
        if opq is not None:
            opq.train(xt)
            xt = opq.apply(xt)
        pq.train(xt)
        train_s = time.perf_counter() - t0

        def enc(x):
            x = pad(x)
            return pq.compute_codes(opq.apply(x) if opq is not None else x)

        def dec(codes):
            y = pq.decode(codes)
            return (opq.reverse_transform(y) if opq is not None else y)[:, :d]

        code_size = pq.code_size
        info["padded_dim"] = dp
    elif method.startswith("rq") or method == "lsq":
        if method == "lsq":
            q = faiss.LocalSearchQuantizer(d, bpf, 8)
        else:
            q = faiss.ResidualQuantizer(d, bpf, 8)
            beam = int(method[2:])
            q.max_beam_size = beam
            q.use_beam_LUT = 1 if beam >= 32 else 0
            info.update(beam=beam, use_beam_LUT=int(q.use_beam_LUT), train_type=int(q.train_type))
        t0 = time.perf_counter()
        q.train(np.ascontiguousarray(train))
        train_s = time.perf_counter() - t0
        enc = lambda x: q.compute_codes(np.ascontiguousarray(x))
        dec = q.decode
        code_size = q.code_size
    else:
        raise ValueError(f"unknown faiss method {method!r} (known: {', '.join(FAISS_METHODS)})")
    if code_size != bpf:
        raise RuntimeError(f"faiss {method}: code size {code_size} bytes, expected {bpf}")
    codes, speed = timed_encode(enc, held)
    rec = dec(codes)
    return {"rel_error": rel_error(held, rec), "train_s": train_s, "encode_fps": speed, "code_size": int(code_size),
            **info}


def run_mq(train, held, bpf: int, args) -> dict:
    """Train and score multi_quantization at ``bpf`` bytes per frame."""
    import torch
    import multi_quantization as mq

    device = torch.device(args.mq_device)
    random.seed(args.seed)  # its trainer draws 1 or 2 refinement iterations with Python's random
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    xt = torch.from_numpy(train)
    n = xt.shape[0]
    total = 2 * args.mq_iters
    t0 = time.perf_counter()
    trainer = mq.QuantizerTrainer(dim=train.shape[1], bytes_per_frame=bpf, device=device,
                                  phase_one_iters=args.mq_iters, phase_two_iters=args.mq_iters, lr=args.mq_lr)
    step = 0
    report_every = max(1, total // 20)
    eval_s = 0.0
    curve = []
    probe = torch.from_numpy(held[:500]).to(device)
    while not trainer.done():
        batch = xt[torch.randint(n, (args.mq_batch,), generator=gen)].to(device)  # (B, D)
        trainer.step(batch)
        step += 1
        if step % report_every == 0:
            el = time.perf_counter() - t0 - eval_s
            left = el / step * (total + 1 - step)
            print(f"  [multi_quantization] step {step}/{total + 1}  {el:.0f} s  (~{left:.0f} s left)", file=sys.stderr,
                  flush=True)
        if args.mq_eval_every and step % args.mq_eval_every == 0:
            te = time.perf_counter()
            with torch.no_grad():
                rec = trainer.quantizer.decode(trainer.quantizer.encode(
                    probe, refine_indexes_iters=args.mq_refine_iters, as_bytes=True)).float().cpu().numpy()
            curve.append((step, rel_error(held[:500], rec)))
            print(f"  [multi_quantization] step {step}: held-out error (500 frames) {curve[-1][1]:.4f}", flush=True)
            eval_s += time.perf_counter() - te
    train_s = time.perf_counter() - t0 - eval_s
    q = trainer.get_quantizer()
    q.eval()
    xh = torch.from_numpy(held).to(device)

    def enc(x):
        with torch.no_grad():
            return q.encode(x, refine_indexes_iters=args.mq_refine_iters, as_bytes=True)

    ci, speed = timed_encode(enc, xh)
    with torch.no_grad():
        rec = q.decode(ci).float().cpu().numpy()
    per_step = train_s / step
    return {"rel_error": rel_error(held, rec), "train_s": train_s, "encode_fps": speed, "id": q.get_id(),
            "phase_one_iters": args.mq_iters, "phase_two_iters": args.mq_iters, "steps": step,
            "batch": args.mq_batch, "lr": args.mq_lr, "refine_indexes_iters": args.mq_refine_iters,
            "device": str(device), "s_per_step": per_step, "learning_curve_500": curve,
            "projected_train_s_at_defaults": per_step * (2 * MQ_DEFAULT_ITERS + 1) * args.mq_batch / MQ_DEFAULT_BATCH,
            "ci_dtype": str(ci.dtype), "ci_shape": list(ci.shape)}


def reuse_mq(path: Path, current: dict, bpf: int) -> dict:
    """The multi_quantization entry at ``bpf`` bytes of a previous results JSON, after checking the data settings."""
    try:
        old = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read a results JSON ({e})") from e
    entry = (old.get("runs", {}).get(str(bpf), {}).get("multi_quantization")
             or (old.get("multi_quantization") if old.get("bytes_per_frame") == bpf else None))
    if entry is None:
        raise ValueError(f"{path}: has no multi_quantization results at {bpf} bytes per frame")
    keys = ("data", "train_frames", "held_out_frames", "dim", "threads", "seed")
    diff = {k: (old[k], current[k]) for k in keys if k in old and old[k] != current[k]}
    if diff:
        raise ValueError(f"{path}: made with other data settings: " + ", ".join(f"{k}: {a!r} there, {b!r} here"
                                                                          for k, (a, b) in diff.items()))
    return dict(entry, reused_from=str(path))


# ------------------------------------------------------------------------------------------------------- main
def measure(train, held, bpf: int, args, result: dict) -> dict:
    """Every requested quantizer at ``bpf`` bytes per frame; prints the table and returns the run's numbers."""
    print(f"\n=== {bpf} bytes per frame ({bpf} codebooks x 256 entries) ===", flush=True)
    rows: dict[str, dict] = {}
    ours = run_ours(train, held, bpf, args)
    rows["speechkd"] = ours
    print(f"speechkd: relative error {ours['rel_error']:.4f} (train {ours['train_rel_error']:.4f}), "
          f"train {ours['train_s']:.1f} s, encode {ours['encode_fps']:.0f} frames/s; codewords span "
          f"{ours['subspace_dim']} of {train.shape[1]} dims, "
          f"{'orthogonal codebooks (exact encoding)' if ours['orthogonal_codebooks'] else 'beam search'}", flush=True)
    methods = [m for m in args.faiss.split(",") if m]
    for m in methods:
        r = run_faiss(m, train, held, bpf, args)
        rows[f"faiss-{m}"] = r
        print(f"faiss {m}: relative error {r['rel_error']:.4f}, train {r['train_s']:.1f} s, "
              f"encode {r['encode_fps']:.0f} frames/s", flush=True)
    run = {"bytes_per_frame": bpf, "speechkd": ours, "faiss": {m: rows[f"faiss-{m}"] for m in methods}}
    if args.mq:
        if args.mq_from is not None:
            theirs = reuse_mq(args.mq_from, result, bpf)
            print(f"multi_quantization: numbers reused from {args.mq_from}", flush=True)
        else:
            print(f"multi_quantization: training {args.mq_iters} + {args.mq_iters} steps of {args.mq_batch} frames "
                  f"on {args.mq_device} (its defaults: {MQ_DEFAULT_ITERS} + {MQ_DEFAULT_ITERS} of "
                  f"{MQ_DEFAULT_BATCH})", flush=True)
            theirs = run_mq(train, held, bpf, args)
        rows["multi_quantization"] = theirs
        run["multi_quantization"] = theirs
        run["mq_below_defaults"] = theirs.get("phase_one_iters", 0) < MQ_DEFAULT_ITERS or \
            theirs.get("batch", 0) < MQ_DEFAULT_BATCH

    faiss_rows = {k: v for k, v in rows.items() if k.startswith("faiss-")}
    best = min(faiss_rows, key=lambda k: faiss_rows[k]["rel_error"]) if faiss_rows else None
    ref = "faiss-rq8" if "faiss-rq8" in rows else None
    print()
    refs = [(r, e, v) for r, e, v in ((best, "err / best faiss", "speed / best"), (ref, "err / RQ b8", "speed / RQ b8"))
            if r]  # the rows every quantizer is compared with: (row name, error column, speed column)
    hdr = f"{'quantizer':22s}{'held-out error':>16s}{'train s':>10s}{'encode fr/s':>13s}"
    hdr += "".join(f"{e:>{len(e) + 2}s}{v:>{len(v) + 2}s}" for _, e, v in refs)
    print(hdr)
    for name, r in rows.items():
        line = f"{name:22s}{r['rel_error']:>16.4f}{r['train_s']:>10.1f}{r['encode_fps']:>13.0f}"
        for other, e, v in refs:
            line += (f"{r['rel_error'] / rows[other]['rel_error']:>{len(e) + 2}.3f}"
                     f"{r['encode_fps'] / rows[other]['encode_fps']:>{len(v) + 2}.2f}")
        print(line)
    if best:
        run["best_faiss"] = best[len("faiss-"):]
    goals = {}
    if ref:
        e, v = ours["rel_error"] / rows[ref]["rel_error"], ours["encode_fps"] / rows[ref]["encode_fps"]
        goals["error_vs_faiss_rq8"] = {"value": e, "goal": "<= 1", "pass": e <= 1.0}
        goals["encode_speed_vs_faiss_rq8"] = {"value": v, "goal": ">= 1", "pass": v >= 1.0}
    if "multi_quantization" in rows:
        theirs = rows["multi_quantization"]
        sp, tr = ours["encode_fps"] / theirs["encode_fps"], ours["train_s"] / theirs["train_s"]
        er = ours["rel_error"] / theirs["rel_error"]
        goals["encode_speedup_vs_mq"] = {"value": sp, "goal": f">= {GOAL_SPEEDUP:g}", "pass": sp >= GOAL_SPEEDUP}
        goals["train_time_ratio_vs_mq"] = {"value": tr, "goal": f"<= {GOAL_TRAIN_RATIO:g}", "pass": tr <= GOAL_TRAIN_RATIO}
        goals["error_ratio_vs_mq"] = {"value": er, "goal": "<= 1", "pass": er <= 1.0}
    if goals:
        print()
        for name, g in goals.items():
            print(f"{name:28s}{g['value']:>10.3f}   goal {g['goal']:<7s} {'PASS' if g['pass'] else 'FAIL'}")
    run["goals"] = goals
    print(f"\nspeechkd settings: structure {ours['structure']}, beam {ours['beam']}, refine_iters "
          f"{ours['refine_iters']}")
    if "multi_quantization" in rows and run.get("mq_below_defaults"):
        theirs = rows["multi_quantization"]
        print(f"NOTE: multi_quantization was trained for fewer steps than its defaults ({MQ_DEFAULT_ITERS} + "
              f"{MQ_DEFAULT_ITERS} of {MQ_DEFAULT_BATCH} frames); its error may be pessimistic. At its defaults its "
              f"training would take ~{theirs.get('projected_train_s_at_defaults', float('nan')):.0f} s.")
    return run


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    x, source = load_frames(args)
    train, held = split(x, args)
    # the same global normalisation for all (relative errors are invariant to it)
    mean = train.mean(0, dtype=np.float64)
    rms = float(np.sqrt(((train - mean) ** 2).mean(dtype=np.float64)))
    rms = rms if rms > 0 else 1.0
    train = ((train - mean) / rms).astype(np.float32)
    held = ((held - mean) / rms).astype(np.float32)
    print(f"data: {source}", flush=True)
    print(f"train frames {train.shape[0]}, held-out frames {held.shape[0]}, dim {train.shape[1]}, "
          f"bytes/frame {args.bytes_per_frame}, threads {args.threads}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}", flush=True)
    result = {"data": source, "synthetic": args.embeddings is None, "train_frames": int(train.shape[0]),
              "held_out_frames": int(held.shape[0]), "dim": int(train.shape[1]), "threads": args.threads,
              "seed": args.seed, "runs": {}}
    for bpf in args.bytes_per_frame:
        result["runs"][str(bpf)] = measure(train, held, bpf, args, result)
    if args.embeddings is None:
        print("NOTE: these numbers are on SYNTHETIC data; rerun with --embeddings for teacher embeddings.")
    if args.out is not None:
        from speechkd.utils import write_json_atomic

        write_json_atomic(args.out, result)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
