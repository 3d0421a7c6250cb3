"""Deployed speed and accuracy: one-thread CPU RTF and test WER of a teacher and a student in PyTorch, and of the
student's ONNX export in fp32 and int8, in one run on the same utterances.

Each system decodes the test cuts of an experiment one utterance at a time (speechkd's fbank is computed beforehand
and not timed; greedy search) and the script prints RTF (decoding seconds / audio seconds), test WER, and the ratio of
each system's RTF to the PyTorch teacher's and the PyTorch student's, plus the int8 export's relative WER change
against fp32. The teacher is the experiment's own transducer (``teacher/``), or with ``--teacher-run`` any run
folder, or with ``--whisper-dir`` a Whisper directory (greedy, 30 s inputs, its log-mel computed inside the timed
part since it is part of the model).

    .venv/bin/speechkd export recipes/whisper_mvq.yaml --student mvq --int8
    .venv/bin/python benchmarks/deploy_bench.py --exp exp/whisper_commands --student mvq-seed0 \\
        --whisper-dir exp/whisper-tiny.en --utts 200
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--exp", required=True, help="experiment directory (cuts/test.jsonl.gz, lang/, students/)")
    p.add_argument("--student", required=True, help="student run folder name, e.g. mvq-seed0")
    p.add_argument("--export", default=None, help="its export (default EXP/export/<student>; made by speechkd export "
                                                  "--int8)")
    p.add_argument("--teacher-run", default=None, help="a run folder used as the teacher (default EXP/teacher)")
    p.add_argument("--whisper-dir", default=None, help="a Whisper directory as the teacher instead")
    p.add_argument("--utts", type=int, default=200, help="test utterances")
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch

    from speechkd.api import load
    from speechkd.data.datamodule import load_cuts
    from speechkd.data.text import TextNormalizer
    from speechkd.eval.metrics import word_error_rate

    torch.set_num_threads(args.threads)
    exp = Path(args.exp)
    cuts = list(load_cuts(exp / "cuts" / "test.jsonl.gz"))[: args.utts]
    refs = [" ".join(s.text for s in c.supervisions if s.text) for c in cuts]
    feats = [c.load_features() for c in cuts]
    audio = sum(c.duration for c in cuts)
    export = Path(args.export) if args.export else exp / "export" / args.student
    systems = {}
    if args.whisper_dir:
        import numpy as np
        import transformers

        from speechkd.teachers.whisper import whisper_nbest

        wmodel = transformers.WhisperForConditionalGeneration.from_pretrained(args.whisper_dir).eval()
        fe = transformers.WhisperFeatureExtractor.from_pretrained(args.whisper_dir)
        wtok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(Path(args.whisper_dir) / "tokenizer.json"))
        norm = TextNormalizer(spell_digits=True)
        wavs = [c.load_audio()[0].astype(np.float32) for c in cuts]

        def whisper(i):
            x = fe(wavs[i], sampling_rate=16000, return_tensors="pt").input_features
            with torch.inference_mode():
                ids = whisper_nbest(wmodel, x, beam=1, nbest=1)[0][0]["tokens"]
            return norm(wtok.decode([t for t in ids if t < 50256]))

        systems["teacher (Whisper, PyTorch)"] = whisper
    else:
        teacher = load(args.teacher_run or exp / "teacher", onnx=False, num_threads=args.threads)
        systems["teacher (PyTorch)"] = lambda i: _text(teacher, feats[i])
    student = load(exp / "students" / args.student, onnx=False, num_threads=args.threads)
    systems["student (PyTorch)"] = lambda i: _text(student, feats[i])
    fp32 = load(export, onnx=True, num_threads=args.threads)
    systems["student (ONNX fp32)"] = lambda i: _text(fp32, feats[i])
    int8 = load(export, onnx=True, int8=True, num_threads=args.threads)
    systems["student (ONNX int8)"] = lambda i: _text(int8, feats[i])
    rows = []
    for name, fn in systems.items():
        fn(0)  # warm-up
        hyps, t0 = [], time.perf_counter()
        for i in range(len(cuts)):
            hyps.append(fn(i))
        rows.append((name, (time.perf_counter() - t0) / audio, word_error_rate(refs, hyps).wer))
    print(f"{len(cuts)} test utterances of {exp} ({audio:.0f} s), {args.threads} thread(s), one utterance at a time")
    t_rtf, s_rtf = rows[0][1], rows[1][1]
    print("\n| system | RTF | test WER % | speed-up vs teacher | speed-up vs PyTorch student |")
    print("|---|---|---|---|---|")
    for name, rtf, wer in rows:
        print(f"| {name} | {rtf:.4f} | {wer:.2f} | {t_rtf / rtf:.2f}x | {s_rtf / rtf:.2f}x |")
    f32, i8 = rows[-2][2], rows[-1][2]
    print(f"\nint8 vs fp32: relative WER change {100 * (i8 - f32) / f32:+.1f}%" if f32 else "")


def _text(transcriber, feat) -> str:
    from speechkd.api import _pieces_to_text

    ids = transcriber._decode([feat])[0]
    return _pieces_to_text([transcriber.pieces[i] for i in ids])


if __name__ == "__main__":
    main()
