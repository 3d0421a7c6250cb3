"""Data-parallel training throughput: a student fit in 1 vs 2 processes (DDP through Lightning), in one run.

The same fit (the recipe's student model, no KD, spec augment on, the same epochs over the same connected-word training
cuts) runs in several settings, each in a fresh run directory:

    1 process x T threads               (the plain fit)
    P processes x T/P threads (DDP)     (torchrun, gloo on CPU, nccl on a GPU; same seconds of audio per process
                                          batch, so a step of P processes sees P x the audio)

and the script prints seconds of training audio per wall-clock second (the epoch's cut durations over the fit's
wall time as logged in train_summary.json), the CPU seconds of all processes of the setting, and each setting's
throughput as a ratio to the first one measured in the same run. With ``--gpu`` (and a CUDA device) it adds GPU
step time against the CPU's and bf16-mixed against fp32.

    .venv/bin/python benchmarks/scale_bench.py                           # digits, 4000 utts, 1x1, 1x2, 2x1 on CPU
    .venv/bin/python benchmarks/scale_bench.py --settings 1x2 2x1 --epochs 1 --num-train 1000
    .venv/bin/python benchmarks/scale_bench.py --gpu                     # on a machine with a CUDA device
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default=str(REPO / "recipes" / "commands_mvq.yaml"),
                   help="recipe whose student_model and student_train are timed")
    p.add_argument("--corpus", default="digits", choices=["digits", "commands"], help="connected-word task to build")
    p.add_argument("--num-train", type=int, default=4000, help="training utterances")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--settings", nargs="+", default=["1x1", "1x2", "2x1"],
                   help="PROCESSESxTHREADS per setting, e.g. 1x1 1x2 2x1 (the first is the ratios' reference)")
    p.add_argument("--gpu", action="store_true", help="also time the GPU (fp32, bf16-mixed) when CUDA is present")
    p.add_argument("--work-dir", default=None, help="where data and runs go (default: a temporary directory)")
    p.add_argument("--corpora-dir", default=None, help="the shared corpora (default: ../shared/corpora)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one fit from a JSON config
    return p.parse_args(argv)


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def worker(config_path: str) -> None:
    """One fit (every rank of a torchrun launch runs this)."""
    from speechkd.config import ModelConfig, Recipe, RuntimeConfig, TrainConfig
    from speechkd.pipeline import Experiment
    from speechkd.training import fit_model

    cfg = json.loads(Path(config_path).read_text())
    exp = Experiment(Recipe.model_validate_json(cfg["recipe"]), progress=False)
    train = TrainConfig.model_validate(cfg["train"])
    fit_model(cfg["run_dir"], ModelConfig.model_validate(cfg["model"]), train, exp.tokenizer, exp.cuts("train"),
              exp.cuts("dev"), seed=0, progress=False, runtime=RuntimeConfig.model_validate(cfg["runtime"]))


def prepare(args, work: Path):
    """The bench's data (built once per work directory) and the recipe's student settings."""
    from speechkd.config import load_recipe
    from speechkd.pipeline import Experiment
    from speechkd.pipeline import prepare as prepare_stage

    recipe = load_recipe(args.recipe, {"exp_dir": str(work / "exp")})
    recipe.data.corpus = args.corpus
    recipe.data.num_train, recipe.data.num_dev, recipe.data.num_test = args.num_train, 20, 20
    if args.corpora_dir:
        recipe.data.corpora_dir = args.corpora_dir
    exp = Experiment(recipe, progress=False)
    prepare_stage(exp)
    return exp


def run_setting(exp, work: Path, name: str, processes: int, threads: int, epochs: int, accelerator: str = "cpu",
                precision: str = "32-true") -> dict:
    train = exp.recipe.student_train.model_copy(update={"epochs": epochs, "num_threads": threads,
                                                        "val_every_epochs": epochs + 1})
    run_dir = work / "runs" / name
    cfg = {"recipe": exp.recipe.model_dump_json(), "train": train.model_dump(), "run_dir": str(run_dir),
           "model": exp.recipe.student_model.model_dump(),
           "runtime": {"accelerator": accelerator, "devices": processes, "precision": precision}}
    path = work / "runs" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg))
    launcher = [] if processes == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cpu0 = _children_cpu()
    res = subprocess.run([sys.executable, *launcher, __file__, "--worker", str(path)], env=env, capture_output=True,
                         text=True)
    cpu = _children_cpu() - cpu0
    if res.returncode != 0:
        raise RuntimeError(f"setting {name} failed:\n{res.stderr[-3000:]}")
    summary = json.loads((run_dir / "train_summary.json").read_text())
    audio = sum(c.duration for c in exp.cuts("train")) * epochs
    return {"name": name, "wall_s": summary["train_seconds"], "cpu_s": cpu, "steps": summary["global_step"],
            "audio_per_s": audio / summary["train_seconds"]}


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args.worker)
        return
    import torch

    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="scale_bench-"))
    exp = prepare(args, work)
    n = len(exp.cuts("train"))
    hours = sum(c.duration for c in exp.cuts("train")) / 3600
    print(f"data: {args.corpus}, {n} training cuts ({hours:.2f} h), {args.epochs} epoch(s); student "
          f"{exp.recipe.student_model.dim}-dim x {exp.recipe.student_model.num_layers} layers; max_duration "
          f"{exp.recipe.student_train.max_duration} s per process batch; CPU: {os.cpu_count()} cores", flush=True)
    settings = []
    for s in args.settings:
        p, t = (int(v) for v in s.split("x"))
        settings.append((f"cpu-{p}proc-{t}thr", p, t, "cpu", "32-true"))
    if args.gpu and torch.cuda.is_available():
        settings += [("gpu-fp32", 1, 1, "gpu", "32-true"), ("gpu-bf16", 1, 1, "gpu", "bf16-mixed")]
    elif args.gpu:
        print("no CUDA device: GPU settings skipped", flush=True)
    rows = []
    for name, p, t, acc, prec in settings:
        r = run_setting(exp, work, name, p, t, args.epochs, acc, prec)
        rows.append(r)
        print(f"  {name:20s} wall {r['wall_s']:7.1f} s  CPU {r['cpu_s']:7.1f} s  steps {r['steps']:5d}  "
              f"{r['audio_per_s']:8.1f} audio s / s", flush=True)
    ref = rows[0]
    print(f"\nthroughput ratio to {ref['name']} (same run):")
    for r in rows:
        print(f"  {r['name']:20s} {r['audio_per_s'] / ref['audio_per_s']:.2f}x")


if __name__ == "__main__":
    main()
