"""Fbank extraction throughput of speechkd's chunked, resumable extractor: 1 vs N worker processes, in one run.

Each setting extracts the same cuts from scratch (real recordings from the shared corpora, FLAC decoding and
resampling included) into a fresh directory with :func:`speechkd.data.features.compute_fbank_chunks`, and the
script prints seconds of audio per wall-clock second, the CPU seconds used (this process and its workers), and
the ratio of each setting's throughput to the 1-job run measured in the same run.

    .venv/bin/python benchmarks/fbank_bench.py                       # librispeech_spk train (100 utts, ~17 min)
    .venv/bin/python benchmarks/fbank_bench.py --jobs 1 2 --repeats 3 --corpus an4 --split train
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default="librispeech_spk", help="a shared TSV corpus (name or folder)")
    p.add_argument("--split", default="train", help="its split list")
    p.add_argument("--corpora-dir", default=None, help="the shared corpora (default: ../shared/corpora)")
    p.add_argument("--jobs", type=int, nargs="+", default=[1, 2], help="worker process counts to compare")
    p.add_argument("--chunk-cuts", type=int, default=20, help="cuts per chunk")
    p.add_argument("--repeats", type=int, default=2, help="runs per setting (the best is reported)")
    return p.parse_args(argv)


def _cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def main(argv=None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    from speechkd.data.corpora import read_metadata, read_split, utterances_to_cuts
    from speechkd.data.features import compute_fbank_chunks
    from speechkd.data.sources import _corpus_path

    cdir = _corpus_path(args.corpus, args.corpora_dir)
    utts = read_split(cdir, args.split, read_metadata(cdir))
    cuts = utterances_to_cuts(utts, sampling_rate=utts[0].sample_rate)  # native rate: resampled while extracting
    audio = sum(c.duration for c in cuts)
    print(f"{args.corpus}/{args.split}: {len(cuts)} cuts, {audio:.0f} s of audio; chunks of {args.chunk_cuts} cuts; "
          f"{os.cpu_count()} CPUs; best of {args.repeats}")
    work = Path(tempfile.mkdtemp(prefix="fbank_bench."))
    raw = work / "raw.jsonl.gz"
    cuts.to_file(raw)
    results = {}
    try:
        for jobs in args.jobs:
            best = None
            for r in range(args.repeats):
                out = work / f"jobs{jobs}-{r}"
                t0, c0 = time.perf_counter(), _cpu_seconds()
                compute_fbank_chunks(raw, out, "bench", num_jobs=jobs, chunk_cuts=args.chunk_cuts, progress=False)
                wall, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
                shutil.rmtree(out)
                if best is None or wall < best[0]:
                    best = (wall, cpu)
            results[jobs] = best
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = audio / results[args.jobs[0]][0]
    print(f"\n| jobs | wall s | CPU s | audio s / wall s | vs {args.jobs[0]} job(s) |")
    print("|---|---|---|---|---|")
    for jobs, (wall, cpu) in results.items():
        speed = audio / wall
        print(f"| {jobs} | {wall:.2f} | {cpu:.2f} | {speed:.0f} | {speed / base:.2f}x |")


if __name__ == "__main__":
    main()
