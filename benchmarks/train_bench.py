#!/usr/bin/env python3
"""Student training speed before and after the exact speed-ups of issue 18, baseline and MVQ-KD, in one run.

"Before" is the training path as it was: 5 duration buckets, an RNN-T forward recursion looped over the frames, the
MVQ-KD head applied to every (padded) frame, every batch read from disk. "After" is today's default: 20 buckets
(``train.num_buckets``), the recursion looped over the label positions (``rnnt_loss(loop="auto")``), the head on
the valid frames only, features and labels held in the loader's memory (``train.in_memory_gib``). Every change is
exact: the same loss up to float rounding (tests/test_rnnt.py, test_kd_losses.py, test_train_speed.py).

Measured in one process, one thread (``--threads``), on one epoch of a recipe's training cuts with its CI:

1. padding: batches per epoch and padded frames (% of the collated frames) with 5 and 20 buckets;
2. loader: CPU ms per collated batch (fbank + CI, SpecAugment as in training), from disk and from memory (the
   second pass of a cached dataset), ratio;
3. step: one optimiser step (forward, backward, AdamW) of the baseline and the MVQ student on the same batches,
   RNN-T loop by frames vs by labels, MVQ head on every frame vs valid frames; ``--repeats`` rounds alternating the
   variants, the fastest round kept; ratios before / after and MVQ / baseline;
4. epoch: the model time of one whole epoch before (5 buckets, old loss paths) and after (20 buckets, new paths)
   for both students, plus the loader's CPU, with the before / after ratio.

Wall and CPU seconds are both printed; with another process on the same core they differ, so run it alone.

Example (after `speechkd run recipes/whisper_mvq_ci4.yaml` has written its CI):
  python benchmarks/train_bench.py --recipe recipes/whisper_mvq_ci4.yaml --student mvq
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import copy
import functools
import json
import sys
import time
from pathlib import Path


def _timed(fn):
    """``(result, wall seconds, CPU seconds of this process)`` of ``fn()``."""
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def _epoch_batches(cuts, max_duration, num_buckets, seed=0):
    from speechkd.data.datamodule import make_sampler

    sampler = make_sampler(cuts, max_duration, shuffle=True, seed=seed, num_buckets=num_buckets)
    sampler.set_epoch(0)
    return list(sampler)


def padding(batches) -> tuple[int, float]:
    """``(batches, padded frames / collated frames)`` of a list of CutSets."""
    padded = real = 0
    for b in batches:
        n = [c.num_frames for c in b]
        padded += max(n) * len(n)
        real += sum(n)
    return len(batches), 1.0 - real / padded


class AllFramesMvqKD:
    """The MVQ-KD forward as it was: the head on every frame of ``(N, T_s, C)``, padded frames masked out of the
    cross-entropy (the same loss as :class:`speechkd.methods.mvq_kd.MvqKD`, which runs the head on valid frames)."""

    def __init__(self, kd):
        self.kd = kd

    def __call__(self, batch, encoder_out, encoder_out_lens, layer_outputs, ctx=None):
        import torch

        from speechkd.losses.distill import codebook_ce_loss
        from speechkd.methods.base import align_teacher_frames, pick_layer
        from speechkd.methods.mvq_kd import CI_KEY

        kd = self.kd
        x = pick_layer(layer_outputs, kd.layer)  # (N, T_s, C)
        indexes, lens = batch["labels"][CI_KEY]
        indexes, lens = align_teacher_frames(indexes, lens, x.shape[1], kd.frame_ratio, kd.mode)
        lens = torch.minimum(lens, encoder_out_lens)
        mask = torch.arange(x.shape[1])[None, :] >= lens[:, None]
        indexes = indexes.masked_fill(mask[..., None], -100)
        logits = kd.head(x).reshape(x.shape[0], x.shape[1], kd.num_out, kd.codebook_size)
        return kd.scale * codebook_ce_loss(logits, indexes), {}


class Student:
    """A student (model + optional MVQ head) and its AdamW, stepping on collated batches with a chosen RNN-T loop
    and head variant."""

    def __init__(self, model, kd, train_cfg, tokenizer):
        import torch

        from speechkd.training import AsrTask

        self.task = AsrTask(copy.deepcopy(model), tokenizer, train_cfg, steps_per_epoch=1,
                            kd=copy.deepcopy(kd) if kd is not None else None)
        self.task.train()
        self.opt = torch.optim.AdamW(self.task.parameters(), lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)

    def step(self, batch, loop: str, all_frames_head: bool) -> float:
        import torch

        import speechkd.models.transducer as tr
        from speechkd.losses.rnnt import rnnt_loss

        tr.rnnt_loss = functools.partial(rnnt_loss, loop=loop)
        try:
            task = self.task
            enc, enc_lens, layers = task.model.encode(batch["features"], batch["feature_lens"])
            y, y_lens = task._targets(batch["tokens"])
            loss = task.utterance_loss(enc, enc_lens, y, y_lens).mean()
            if task.kd is not None:
                kd = AllFramesMvqKD(task.kd) if all_frames_head else task.kd
                loss = loss + kd(batch, enc, enc_lens, layers)[0]
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.task.parameters(), 5.0)
            self.opt.step()
            return float(loss.detach())
        finally:
            tr.rnnt_loss = rnnt_loss


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--recipe", type=Path, required=True, help="an MVQ-KD recipe whose quantize stage has run")
    p.add_argument("--exp-dir", type=Path, help="its experiment directory (default: the recipe's exp_dir)")
    p.add_argument("--student", default="mvq", help="the recipe's MVQ-KD student run (default mvq)")
    p.add_argument("--step-batches", type=int, default=40, help="batches of part 3 (default 40)")
    p.add_argument("--repeats", type=int, default=3, help="rounds of part 3, fastest kept (default 3)")
    p.add_argument("--no-epoch", action="store_true", help="skip part 4 (whole epochs, a few minutes)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--json", type=Path, help="also write the numbers here")
    a = p.parse_args(argv)

    import torch

    torch.set_num_threads(a.threads)
    from speechkd.config import load_recipe
    from speechkd.data.datamodule import AsrDataset
    from speechkd.methods.mvq_kd import build_mvq
    from speechkd.models.build import build_model
    from speechkd.pipeline import Experiment

    overrides = {"exp_dir": str(a.exp_dir)} if a.exp_dir else None
    recipe = load_recipe(a.recipe, overrides)
    exp = Experiment(recipe, progress=False)
    run = next((r for r in recipe.students if r.name == a.student), None)
    if run is None or run.kd.method != "mvq":
        p.error(f"{a.recipe} has no MVQ-KD student named {a.student!r}")
    train_cfg = recipe.student_train
    torch.manual_seed(0)
    kd, cuts = build_mvq(exp, run)
    cuts = cuts.to_eager()
    model = build_model(recipe.student_model_of(run), exp.tokenizer.vocab_size)
    out: dict = {"recipe": str(a.recipe), "threads": a.threads, "max_duration": train_cfg.max_duration,
                 "cuts": len(cuts), "student_params": sum(p.numel() for p in model.parameters()),
                 "mvq_head_params": sum(p.numel() for p in kd.parameters())}
    print(f"{a.recipe}: {len(cuts)} training cuts, max_duration {train_cfg.max_duration} s, student "
          f"{out['student_params'] / 1e6:.3f} M parameters, MVQ head {out['mvq_head_params'] / 1e6:.3f} M, "
          f"{a.threads} thread(s)\n")

    # 1. padding
    epochs = {nb: _epoch_batches(cuts, train_cfg.max_duration, nb) for nb in (5, 20)}
    print("1. padding (epoch 0)        batches   padded frames")
    for nb, batches in epochs.items():
        n, pad = padding(batches)
        out[f"batches_{nb}_buckets"], out[f"padding_{nb}_buckets"] = n, pad
        print(f"   {nb:2d} buckets               {n:7d}   {100 * pad:12.1f} %")

    # 2. loader CPU per batch
    keys = kd.label_keys
    disk = AsrDataset(exp.tokenizer, keys, spec_augment=train_cfg.spec_augment, seed=0)
    mem = AsrDataset(exp.tokenizer, keys, spec_augment=train_cfg.spec_augment, seed=0,
                     cache_bytes=int(train_cfg.in_memory_gib * 2**30))
    batches20 = epochs[20]
    _, _, cpu_fill = _timed(lambda: [mem[(0, b)] for b in batches20])  # the first pass fills the cache
    collated_disk, w_disk, cpu_disk = _timed(lambda: [disk[(0, b)] for b in batches20])
    collated_mem, w_mem, cpu_mem = _timed(lambda: [mem[(0, b)] for b in batches20])
    assert all(torch.equal(x["features"], y["features"]) for x, y in zip(collated_disk, collated_mem))
    nb = len(batches20)
    out.update(loader_cpu_ms_disk=1e3 * cpu_disk / nb, loader_cpu_ms_memory=1e3 * cpu_mem / nb,
               loader_cpu_ms_first_pass=1e3 * cpu_fill / nb, loader_ratio=cpu_disk / cpu_mem)
    print(f"\n2. loader, CPU ms per batch  disk {1e3 * cpu_disk / nb:.2f}  memory {1e3 * cpu_mem / nb:.2f}  "
          f"(first pass {1e3 * cpu_fill / nb:.2f})  ratio {cpu_disk / cpu_mem:.2f}x")

    # 3. step time on the same batches
    step_batches = [disk[(0, b)] for b in epochs[5][: a.step_batches]]
    variants = {  # name: (student with MVQ head?, rnnt loop, head on every frame?)
        "baseline, RNN-T loop over frames": (False, "frames", False),
        "baseline, RNN-T loop over labels": (False, "auto", False),
        "mvq, frames loop, head on every frame": (True, "frames", True),
        "mvq, frames loop, head on valid frames": (True, "frames", False),
        "mvq, labels loop, head on valid frames": (True, "auto", False),
    }
    best = {k: (float("inf"), float("inf")) for k in variants}
    for _ in range(a.repeats):
        for name, (with_kd, loop, all_frames) in variants.items():
            s = Student(model, kd if with_kd else None, train_cfg, exp.tokenizer)
            _, w, c = _timed(lambda: [s.step(b, loop, all_frames) for b in step_batches])
            best[name] = min(best[name], (w, c))
    n = len(step_batches)
    print(f"\n3. one optimiser step ({n} batches of the 5-bucket epoch, best of {a.repeats})  wall ms   CPU ms")
    for name, (w, c) in best.items():
        print(f"   {name:40s} {1e3 * w / n:8.1f} {1e3 * c / n:8.1f}")
        out[f"step_ms[{name}]"] = 1e3 * w / n
    b0, b1 = best["baseline, RNN-T loop over frames"][0], best["baseline, RNN-T loop over labels"][0]
    m0, m1 = best["mvq, frames loop, head on every frame"][0], best["mvq, labels loop, head on valid frames"][0]
    mh = best["mvq, frames loop, head on valid frames"][0]
    ratios = {"baseline before/after": b0 / b1, "mvq before/after": m0 / m1, "mvq head on valid frames": m0 / mh,
              "mvq/baseline before": m0 / b0, "mvq/baseline after": m1 / b1}
    out["step_ratios"] = ratios
    print("   ratios: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))

    # 4. whole epochs
    if not a.no_epoch:
        print("\n4. one epoch (model steps; loader CPU beside)   wall s   CPU s   loader CPU s")
        old_batches = [disk[(0, b)] for b in epochs[5]]
        new_batches = collated_mem
        loader_old, loader_new = cpu_disk * len(epochs[5]) / nb, cpu_mem
        for student in ("baseline", "mvq"):
            with_kd = student == "mvq"
            res = {}
            for tag, batches, loop, all_frames, loader in (("before", old_batches, "frames", with_kd, loader_old),
                                                           ("after", new_batches, "auto", False, loader_new)):
                s = Student(model, kd if with_kd else None, train_cfg, exp.tokenizer)
                _, w, c = _timed(lambda: [s.step(b, loop, all_frames) for b in batches])
                res[tag] = (w, c, loader)
                print(f"   {student:8s} {tag:6s} ({len(batches):3d} batches)          {w:8.1f} {c:7.1f} {loader:9.1f}")
            (w0, c0, l0), (w1, c1, l1) = res["before"], res["after"]
            out[f"epoch_{student}"] = {"before": res["before"], "after": res["after"],
                                       "ratio_model": w0 / w1, "ratio_with_loader_cpu": (c0 + l0) / (c1 + l1)}
            print(f"   {student:8s} before/after: model {w0 / w1:.2f}x, model + loader CPU {(c0 + l0) / (c1 + l1):.2f}x")
        e0, e1 = out["epoch_baseline"]["after"][0], out["epoch_mvq"]["after"][0]
        print(f"   mvq/baseline epoch after: {e1 / e0:.2f}x")
        out["epoch_mvq_over_baseline_after"] = e1 / e0
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
