"""Whisper N-best labelling throughput: transformers' beam search (speechkd's native backend) against the ctranslate2
runtime at the same beam and N-best, in one run on the same utterances and threads.

For each backend the script decodes the same cuts (real recordings of a shared corpus, 30 s log-mel inputs, batches of
``--batch``) with beam ``--beam`` and ``--nbest`` hypotheses, and prints utterances per wall-clock second, CPU seconds,
the ratio of its throughput to transformers', and how its hypotheses compare with transformers' (1-best token ids
equal; mean absolute difference of the 1-best scores, which differ by definition: transformers' sum the log-softmax
over the whole vocabulary, ctranslate2's are renormalised over the tokens it does not suppress).

    .venv/bin/speechkd import-whisper tiny.en exp/whisper-tiny.en
    .venv/bin/python benchmarks/whisper_nbest_bench.py --whisper-dir exp/whisper-tiny.en --cuts 64 --threads 2
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--whisper-dir", default=str(REPO / "exp" / "whisper-tiny.en"),
                   help="Hugging Face Whisper directory made by `speechkd import-whisper` (its CTranslate2 source is "
                        "read from it)")
    p.add_argument("--ctranslate2-dir", default=None, help="CTranslate2 model of the same Whisper (default: the source "
                                                           "recorded by import-whisper)")
    p.add_argument("--corpus", default="speech_commands_v2_test", help="shared corpus whose utterances are decoded")
    p.add_argument("--split", default="dev")
    p.add_argument("--corpora-dir", default=None, help="folder of the shared corpora (default ../shared/corpora)")
    p.add_argument("--cuts", type=int, default=64, help="utterances decoded by each backend")
    p.add_argument("--batch", type=int, default=8, help="utterances per batch")
    p.add_argument("--beam", type=int, default=4)
    p.add_argument("--nbest", type=int, default=4)
    p.add_argument("--threads", type=int, default=2, help="intra-op threads of both runtimes")
    p.add_argument("--compute-types", nargs="+", default=["float32", "int8"],
                   help="ctranslate2 compute types to time")
    return p.parse_args(argv)


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main(argv=None) -> None:
    args = parse_args(argv)
    import ctranslate2
    import numpy as np
    import torch
    import transformers

    from speechkd.data.corpora import read_metadata, read_split, resolve_corpora_dir, utterances_to_cuts
    from speechkd.teachers.whisper import ct2_model_dir, ct2_nbest, whisper_nbest, whisper_prompt

    torch.set_num_threads(args.threads)
    cdir = resolve_corpora_dir(args.corpora_dir) / args.corpus
    utts = read_split(cdir, args.split, read_metadata(cdir))[: args.cuts]
    cuts = utterances_to_cuts(utts, 16000)
    model = transformers.WhisperForConditionalGeneration.from_pretrained(args.whisper_dir).eval()
    fe = transformers.WhisperFeatureExtractor.from_pretrained(args.whisper_dir)
    wavs = [c.load_audio()[0] for c in cuts]
    audio = sum(len(w) for w in wavs) / 16000
    batches = [fe(wavs[i:i + args.batch], sampling_rate=16000, return_tensors="pt").input_features.float()
               for i in range(0, len(wavs), args.batch)]
    prompt = whisper_prompt(model.generation_config, model.config.vocab_size)
    ct_dir = ct2_model_dir(args.whisper_dir, args.ctranslate2_dir)
    print(f"{len(cuts)} cuts of {args.corpus}/{args.split} ({audio:.1f} s of audio), beam {args.beam}, "
          f"{args.nbest}-best, batches of {args.batch}, {args.threads} thread(s); ctranslate2 {ctranslate2.__version__} "
          f"from {ct_dir}")

    def run(decode):
        t0, c0 = time.perf_counter(), _cpu()
        lists = [h for feats in batches for h in decode(feats)]
        return lists, time.perf_counter() - t0, _cpu() - c0

    rows = []
    ref, wall, cpu = run(lambda f: whisper_nbest(model, f, beam=args.beam, nbest=args.nbest))
    rows.append(("transformers (native)", wall, cpu, None, None))
    for ctype in args.compute_types:
        ct = ctranslate2.models.Whisper(str(ct_dir), device="cpu", compute_type=ctype, intra_threads=args.threads)
        lists, wall, cpu = run(lambda f: ct2_nbest(ct, f.numpy(), prompt, beam=args.beam, nbest=args.nbest))
        same = np.mean([a[0]["tokens"] == b[0]["tokens"] for a, b in zip(ref, lists)])
        diff = np.mean([abs(a[0]["score"] - b[0]["score"]) for a, b in zip(ref, lists)])
        rows.append((f"ctranslate2 {ctype}", wall, cpu, same, diff))
        del ct
    base = len(cuts) / rows[0][1]
    print(f"\n| backend | cuts/s | wall s | CPU s | throughput vs transformers | 1-best ids = transformers' | "
          f"mean abs 1-best score diff |")
    print("|---|---|---|---|---|---|---|")
    for name, wall, cpu, same, diff in rows:
        rate = len(cuts) / wall
        print(f"| {name} | {rate:.2f} | {wall:.1f} | {cpu:.1f} | {rate / base:.2f}x | "
              f"{'-' if same is None else f'{100 * same:.1f}%'} | {'-' if diff is None else f'{diff:.3f}'} |")


if __name__ == "__main__":
    main()
