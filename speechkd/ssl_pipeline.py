"""The SSL pipeline (``task: ssl``): SSL-model distillation, then multi-task fine-tuning for keyword spotting (KWS)
and speaker verification (SV).

The recipe of arXiv 2210.16611 after DistilHuBERT (Chang et al., ICASSP 2022, arXiv 2110.01900): a HuBERT teacher
(pre-trained here, first iteration, :mod:`speechkd.teachers.hubert_pretrain`, or loaded from a local Hugging Face
directory) is distilled into a small student (the teacher's CNN and K transformer layers, :mod:`speechkd.models.ssl`)
whose prediction heads learn teacher layers with L1 + log-sigmoid cosine. Then teacher and student are each
fine-tuned with SUPERB-style heads (:mod:`speechkd.models.heads`) in three modes:

* ``frozen``: the encoder is frozen; one run per task trains only that task's head;
* ``finetune``: the encoder is fine-tuned with the head; one run (one encoder copy) per task;
* ``multitask``: one encoder is fine-tuned for both tasks at once, ``L = L_KWS + beta * L_SV``.

KWS is 12-class Speech Commands (cross-entropy; accuracy on the test split), SV an x-vector head trained with
AM-softmax on the training speakers and scored by cosine similarity on held-out trial lists (EER, minDCF).

Stages, each reading the previous one's files from the experiment directory and writing its own atomically; each
skips outputs that are complete, and a stopped training resumes from its checkpoint:

    prepare   -> cuts/{pretrain,kws_train,sv_train,multitask_train,kws_test}.jsonl.gz, cuts/speakers.json,
                 cuts/trials/<corpus>-<list>.{tsv,jsonl.gz} (the trials kept and the utterances they use)
    hubert-targets -> labels/hubert_centroids.safetensors, labels/cuts_pretrain_targets.jsonl.gz +
                 labels/hubert_targets*.h5 (MFCC k-means cluster ids; sharded); nothing with ``teacher.dir``
    teacher   -> teacher/ (Hugging Face HuBERT directory; the fit and its checkpoint in teacher.fit/); nothing
                 with ``teacher.dir``
    distill   -> student/ (Hugging Face directory + distill_heads.safetensors + metrics.csv; the Lightning fit's
                 checkpoint and logs in student.fit/)
    finetune  -> finetune/<encoder>-<mode>[-<task>]/ (encoder/, heads.safetensors, downstream.json, metrics.csv;
                 the fit in finetune/<run>.fit/)
    evaluate  -> eval/<encoder>-<mode>.json: one per system (the runs that together serve both tasks)
    report    -> report.md, plots/ssl_tasks.png (:func:`speechkd.report.write_ssl_report`)

HuBERT pre-training (:mod:`speechkd.teachers.hubert_pretrain`), distillation (:mod:`speechkd.methods.ssl_kd`) and
fine-tuning (:mod:`speechkd.models.downstream`) train through Lightning (:func:`speechkd.training.fit_steps`),
step-exact on resume, data-parallel with ``runtime.devices``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import time
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Sequence

import numpy as np
import torch
from torch import nn

from speechkd.config import SslRecipe, dump_recipe
from speechkd.data.classification import IGNORE_INDEX, SAMPLE_RATE, waveform_batches
from speechkd.distributed import is_main, world_size
from speechkd.methods.ssl_kd import default_target_layers, distill_loss_fn
from speechkd.models.downstream import DOWNSTREAM_META, DownstreamModel, load_downstream, save_downstream, system_infer
from speechkd.training import fit_steps
from speechkd.utils import atomic_dir, atomic_path, log, set_thread_policy, write_json_atomic, write_text_atomic

__all__ = ["ALL_RANK_STAGES", "EXPERIMENT", "SSL_STAGES", "STAGES", "FinetuneRun", "SslExperiment", "needed_stages"]


class FinetuneRun(NamedTuple):
    """One fine-tuning run: an encoder (``teacher``/``student``), a mode, and the tasks it trains."""

    encoder: str
    mode: str
    tasks: tuple[str, ...]
    seed: Optional[int] = None  # None: the recipe's downstream.seed (names unsuffixed)

    @property
    def _suffix(self) -> str:
        return "" if self.seed is None else f"-seed{self.seed}"

    @property
    def name(self) -> str:
        """Directory name: ``<encoder>-<mode>-<task>`` (single task) or ``<encoder>-multitask``, plus ``-seed<k>`` for
        a run of ``downstream.more_seeds``."""
        base = f"{self.encoder}-{self.mode}" if self.mode == "multitask" else f"{self.encoder}-{self.mode}-{self.tasks[0]}"
        return base + self._suffix

    @property
    def system(self) -> str:
        """The system the run belongs to, ``<encoder>-<mode>[-seed<k>]`` (one eval JSON each)."""
        return f"{self.encoder}-{self.mode}{self._suffix}"

    def seed_of(self, cfg) -> int:
        """The fine-tuning seed: this run's, else the recipe's ``downstream.seed``."""
        return cfg.seed if self.seed is None else self.seed


class SslExperiment:
    """Paths of one SSL experiment directory (``task: ssl``).

    Args:
      recipe: the validated :class:`speechkd.config.SslRecipe`; ``recipe.exp_dir`` is the directory.
      progress: show progress bars.
    """

    def __init__(self, recipe: SslRecipe, progress: bool = True):
        self.recipe = recipe
        self.dir = Path(recipe.exp_dir)
        self.progress = progress
        if not progress:  # transformers' own bars (loading and writing weights)
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()

    def write_config(self) -> None:
        """Write the resolved recipe to ``config.yaml`` (every default spelled out)."""
        write_text_atomic(self.dir / "config.yaml", dump_recipe(self.recipe))

    # ---------------------------------------------------------------- paths
    def cuts_path(self, name: str) -> Path:
        return self.dir / "cuts" / f"{name}.jsonl.gz"

    def cuts(self, name: str):
        from speechkd.data.datamodule import load_cuts

        return load_cuts(self.cuts_path(name))

    @property
    def speakers_path(self) -> Path:
        return self.dir / "cuts" / "speakers.json"

    def trials_path(self, spec: str) -> Path:
        """The kept trials of list ``<corpus>/<list>`` (the shared corpora's TSV format)."""
        corpus, name = spec.split("/")
        return self.dir / "cuts" / "trials" / f"{corpus}-{name}.tsv"

    def trial_cuts_path(self, spec: str) -> Path:
        return self.trials_path(spec).with_suffix(".jsonl.gz")

    @property
    def teacher_dir(self) -> Path:
        """The teacher's Hugging Face directory: the recipe's ``teacher.dir``, else ``teacher/`` (pre-trained here)."""
        return Path(self.recipe.teacher.dir) if self.recipe.teacher.dir is not None else self.dir / "teacher"

    @property
    def student_dir(self) -> Path:
        return self.dir / "student"

    @property
    def student_distilled(self) -> bool:
        """Whether the distillation has written the student (weights and prediction heads)."""
        from speechkd.models.ssl import HEADS_FILE

        return (self.student_dir / HEADS_FILE).is_file() and (self.student_dir / "model.safetensors").is_file()

    @property
    def centroids_path(self) -> Path:
        """HuBERT's MFCC k-means centroids (``(K, 39)``, safetensors)."""
        return self.dir / "labels" / "hubert_centroids.safetensors"

    @property
    def targets_cuts_path(self) -> Path:
        """The pretrain cuts carrying their HuBERT targets (:func:`hubert_targets`)."""
        return self.dir / "labels" / "cuts_pretrain_targets.jsonl.gz"

    def encoder_dir(self, encoder: str) -> Path:
        return self.teacher_dir if encoder == "teacher" else self.student_dir

    def run_dir(self, run: FinetuneRun) -> Path:
        return self.dir / "finetune" / run.name

    def runs(self) -> list[FinetuneRun]:
        """Every fine-tuning run of the recipe, encoder by encoder, mode by mode."""
        d = self.recipe.downstream
        out = []
        for seed in [None, *d.more_seeds]:
            for encoder in d.encoders:
                for mode in d.modes:
                    if mode == "multitask":
                        out.append(FinetuneRun(encoder, mode, tuple(d.tasks), seed))
                    else:
                        out += [FinetuneRun(encoder, mode, (task,), seed) for task in d.tasks]
        return out

    def systems(self) -> dict[str, list[FinetuneRun]]:
        """System name -> its runs (the frozen and finetune systems have one run per task)."""
        out: dict[str, list[FinetuneRun]] = {}
        for run in self.runs():
            out.setdefault(run.system, []).append(run)
        return out


def _settings(cfg, *also_drop: str) -> dict:
    """A config section as a resume fingerprint: without the keys that do not change what a run computes
    (``num_threads``, ``ckpt_every``) and ``also_drop`` (which other runs a recipe lists)."""
    drop = {"num_threads", "ckpt_every", *also_drop}
    return {k: v for k, v in cfg.model_dump(mode="json").items() if k not in drop}


def _write_history(path: Path, history: list[dict]) -> None:
    """The logged steps as CSV (a column per key)."""
    columns = list(dict.fromkeys(k for row in history for k in row))
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns or ["step"])
        writer.writeheader()
        writer.writerows(history)


# ---------------------------------------------------------------------------------------------- prepare
def _split(exp: SslExperiment, split: str) -> str:
    return "smoke" if exp.recipe.data.smoke else split


def _keep_trials(trials, max_trials: Optional[int]):
    """The first ``max_trials // 2`` target and the first ``max_trials - max_trials // 2`` non-target trials, in
    file order (all trials when ``max_trials`` is None)."""
    from speechkd.eval.verification import Trials

    if max_trials is None or len(trials) <= max_trials:
        return trials
    quota = {1: max_trials // 2, 0: max_trials - max_trials // 2}
    keep = []
    for i, label in enumerate(trials.labels.tolist()):
        if quota[label] > 0:
            keep.append(i)
            quota[label] -= 1
    return Trials(labels=trials.labels[keep], enroll_ids=[trials.enroll_ids[i] for i in keep],
                  test_ids=[trials.test_ids[i] for i in keep])


def _write_trials(path: Path, trials) -> None:
    from speechkd.eval.verification import TRIALS_HEADER

    lines = ["\t".join(TRIALS_HEADER)] + [f"{int(y)}\t{e}\t{t}" for y, e, t in
                                          zip(trials.labels, trials.enroll_ids, trials.test_ids)]
    write_text_atomic(path, "\n".join(lines) + "\n")


def prepare(exp: SslExperiment) -> None:
    """Waveform cuts of every task (nothing is copied: the cuts point at the corpora's audio) and the trial lists."""
    from lhotse import CutSet

    from speechkd.data.classification import kws_cuts, sv_train_cuts, sv_trial_cuts
    from speechkd.data.datamodule import save_cuts

    d = exp.recipe.data
    train, test = _split(exp, d.train_split), _split(exp, d.test_split)
    window = dict(max_segment=d.max_segment, min_segment=d.min_segment, corpora_dir=d.corpora_dir)

    def done(name: str) -> bool:
        if exp.cuts_path(name).is_file():
            log(f"prepare: {exp.cuts_path(name)} exists, skipped")
            return True
        return False

    def save(name: str, cuts) -> None:
        save_cuts(cuts, exp.cuts_path(name))
        hours = sum(c.duration for c in cuts) / 3600
        log(f"prepare: {name}: {len(cuts)} cuts, {hours:.2f} h -> {exp.cuts_path(name)}")

    if not done("pretrain"):
        save("pretrain", sv_train_cuts(train, d.pretrain_corpora, keep_no_speaker=True, **window)[0])
    if not done("kws_train"):
        save("kws_train", kws_cuts(train, d.corpora_dir))
    if not done("kws_test"):
        save("kws_test", kws_cuts(test, d.corpora_dir))
    if not (exp.speakers_path.is_file() and exp.cuts_path("sv_train").is_file()):
        sv, speakers = sv_train_cuts(train, d.sv_corpora, **window)
        write_json_atomic(exp.speakers_path, speakers)
        save("sv_train", sv)
    if not done("multitask_train"):
        # the SV cuts (Speech Commands clips among them keep their KWS class) + the KWS clips they lack
        sv = exp.cuts("sv_train")
        index = {s: i for i, s in enumerate(json.loads(exp.speakers_path.read_text()))}
        have = {c.id for c in sv}
        extra = []
        for c in kws_cuts(train, d.corpora_dir):
            if c.id not in have:
                c.custom["spk_target"] = index.get(c.custom["speaker"], IGNORE_INDEX)
                extra.append(c)
        save("multitask_train", CutSet.from_cuts(list(sv) + extra))
    for spec in d.trials:
        path = exp.trial_cuts_path(spec)
        if path.is_file() and exp.trials_path(spec).is_file():
            log(f"prepare: {path} exists, skipped")
            continue
        corpus, name = spec.split("/")
        cuts, trials = sv_trial_cuts(corpus, name, d.corpora_dir)
        trials = _keep_trials(trials, d.max_trials)
        used = set(trials.utterance_ids())
        cuts = cuts.filter(lambda c: c.id in used).to_eager()
        _write_trials(exp.trials_path(spec), trials)
        save_cuts(cuts, path)
        log(f"prepare: trials {spec}: {len(trials)} trials ({int(trials.labels.sum())} target) over {len(cuts)} "
            f"utterances -> {exp.trials_path(spec)}")


# ---------------------------------------------------------------------------------------------- teacher
#: Cut field of the HuBERT first-iteration targets (cluster ids, ``(T, 1)`` per utterance at the model's frame rate).
TARGETS_KEY = "hubert_targets"


def _hubert_config(exp: SslExperiment):
    from speechkd.teachers.hubert_pretrain import HUBERT_BASE_CONV, hubert_config

    p = exp.recipe.teacher.pretrain
    return hubert_config(
        hidden_size=p.hidden_size, num_layers=p.num_layers, num_heads=p.num_heads, intermediate_size=p.intermediate_size,
        conv_dim=p.conv_dim, conv_kernel=p.conv_kernel or HUBERT_BASE_CONV[0], conv_stride=p.conv_stride or HUBERT_BASE_CONV[1],
        num_conv_pos_embeddings=p.pos_conv_kernel, num_conv_pos_embedding_groups=p.pos_conv_groups,
    )


def hubert_targets(exp: SslExperiment, shard: Optional[str] = None) -> None:
    """HuBERT first-iteration targets of the pretrain cuts (nothing with ``teacher.dir``):

    1. k-means centroids of their MFCC frames (:func:`speechkd.teachers.hubert_pretrain.mfcc_centroids`), fitted
       once (in a multi-process run by rank 0) -> ``labels/hubert_centroids.safetensors``;
    2. every cut's cluster ids (:func:`~speechkd.teachers.hubert_pretrain.assign_mfcc_targets`), sharded like every
       labelling stage (``--shard i/n``, or by rank; :mod:`speechkd.labels.stages`) ->
       ``labels/hubert_targets*.h5`` and, merged, ``labels/cuts_pretrain_targets.jsonl.gz``.

    A cut's ids depend on it alone, so any sharding gives the same targets.

    Raises:
      ValueError: a malformed shard; parts written with other centroids; as :func:`mfcc_targets`.
    """
    from safetensors.torch import load_file, save_file

    from speechkd.distributed import barrier
    from speechkd.labels.shards import every_nth, stage_shard
    from speechkd.labels.stages import finish_frame_labels, write_frame_label_part
    from speechkd.teachers.hf import _samples_per_frame
    from speechkd.teachers.hubert_pretrain import assign_mfcc_targets, mfcc_centroids

    if exp.recipe.teacher.dir is not None:
        log("hubert-targets: the recipe's teacher.dir is used, no targets needed")
        return
    if exp.targets_cuts_path.is_file():
        log(f"hubert-targets: {exp.targets_cuts_path} exists, skipped")
        return
    index, count = stage_shard(shard)
    p = exp.recipe.teacher.pretrain
    config = _hubert_config(exp)
    cuts = exp.cuts("pretrain")
    path = exp.centroids_path
    if not path.is_file() and (world_size() == 1 or is_main()):
        centroids = mfcc_centroids(cuts, config, p.num_clusters, p.kmeans_iters, p.max_kmeans_frames, seed=p.seed,
                                   progress=exp.progress)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            save_file({"centroids": centroids.contiguous()}, str(tmp))
        log(f"hubert-targets: {centroids.shape[0]} MFCC k-means centroids -> {path}")
    barrier()
    centroids = load_file(str(path))["centroids"]
    extra = {"centroids_id": hashlib.sha256(centroids.numpy().tobytes()).hexdigest()[:16]}
    shard_cuts = list(every_nth(cuts, index, count))

    def outputs():
        for uid, ids in assign_mfcc_targets(shard_cuts, config, centroids, progress=exp.progress):
            yield uid, ids.numpy()[:, None]  # (T, 1)

    frame_shift = _samples_per_frame(config.conv_stride) / SAMPLE_RATE
    write_frame_label_part(exp, TARGETS_KEY, index, count, shard_cuts, outputs, frame_shift, extra)
    if finish_frame_labels(exp, cuts, TARGETS_KEY, count, extra, exp.targets_cuts_path):
        log(f"hubert-targets: cluster ids of {len(cuts)} cuts ({count} shard(s)) -> {exp.targets_cuts_path}")


def train_teacher(exp: SslExperiment) -> None:
    """Pre-train the HuBERT teacher (first iteration) on the pretrain cuts with the targets of
    :func:`hubert_targets`, or check the recipe's ``teacher.dir``."""
    from safetensors.torch import load_file

    from speechkd.data.datamodule import load_cuts
    from speechkd.labels.store import load_frame_labels
    from speechkd.teachers.hf import _check_model_dir
    from speechkd.teachers.hubert_pretrain import SUMMARY_FILE, MfccTargets, pretrain_hubert

    t = exp.recipe.teacher
    if t.dir is not None:
        _check_model_dir(exp.teacher_dir)
        log(f"teacher: using the checkpoint in {exp.teacher_dir}")
        return
    if (exp.teacher_dir / SUMMARY_FILE).is_file() and (exp.teacher_dir / "model.safetensors").is_file():
        log(f"teacher: {exp.teacher_dir} exists, skipped")
        return
    if not exp.targets_cuts_path.is_file():
        raise FileNotFoundError(f"{exp.targets_cuts_path} not found: run `speechkd hubert-targets` first")
    p = t.pretrain
    cuts = load_cuts(exp.targets_cuts_path)
    targets = MfccTargets(labels={c.id: torch.from_numpy(load_frame_labels(c, TARGETS_KEY)[:, 0]) for c in cuts},
                          centroids=load_file(str(exp.centroids_path))["centroids"])
    t0 = time.time()
    res = pretrain_hubert(
        cuts, exp.teacher_dir, steps=p.steps, config=_hubert_config(exp), num_clusters=p.num_clusters,
        final_dim=p.final_dim, mask_prob=p.mask_prob, mask_length=p.mask_length, lr=p.lr, warmup_steps=p.warmup_steps,
        max_samples=int(p.max_seconds * SAMPLE_RATE), max_batch_samples=int(p.batch_seconds * SAMPLE_RATE), seed=p.seed,
        ckpt_every=p.ckpt_every, kmeans_iters=p.kmeans_iters, max_kmeans_frames=p.max_kmeans_frames,
        num_threads=p.num_threads, progress=exp.progress, runtime=exp.recipe.runtime.for_stage("teacher"),
        targets=targets,
    )
    last = res.history[-1] if res.history else {}
    log(f"teacher: HuBERT pre-trained {res.step} steps (from {res.resumed_from}; masked accuracy "
        f"{last.get('acc_m', float('nan')):.3f}) in {time.time() - t0:.0f} s -> {res.model_dir}")


# ---------------------------------------------------------------------------------------------- distill
def distill(exp: SslExperiment) -> None:
    """Distil the teacher into the DistilHuBERT student on the pretrain cuts (resumable)."""
    from speechkd.models.ssl import build_ssl_student
    from speechkd.teachers.hf import load_ssl_teacher

    out = exp.student_dir
    if exp.student_distilled:
        log(f"distill: {out} exists, skipped")
        return
    s = exp.recipe.student
    set_thread_policy(s.num_threads)
    teacher = load_ssl_teacher(exp.teacher_dir)
    targets = s.target_layers
    if targets is None and not s.layer_to_layer:
        targets = default_target_layers(teacher.num_layers)
    torch.manual_seed(s.seed)
    student = build_ssl_student(teacher, num_layers=s.num_layers, target_layers=targets, layer_map=s.layer_map,
                                layer_to_layer=s.layer_to_layer, head_type=s.head_type,
                                feature_grad_mult=s.feature_grad_mult)
    step = distill_loss_fn(teacher, student, s)
    cuts = exp.cuts("pretrain")
    fingerprint = {"student": _settings(s), "teacher": [teacher.num_layers, teacher.hidden_size],
                   "targets": student.target_layers, "cuts": len(cuts)}
    summary = fit_steps(
        out.with_name(out.name + ".fit"), student, [{"params": [p for p in student.parameters() if p.requires_grad],
                                                     "lr": s.lr}],
        cuts, step, steps=s.steps, warmup_steps=s.warmup_steps, final_lr_ratio=s.final_lr_ratio,
        weight_decay=s.weight_decay, grad_clip=s.grad_clip, batch_seconds=s.batch_seconds, seed=s.seed,
        ckpt_every=s.ckpt_every, fingerprint=fingerprint, progress=exp.progress, desc="distill",
        frozen=[teacher], runtime=exp.recipe.runtime.for_stage("distill"),
    )
    if is_main():  # one writer in a multi-process run
        with atomic_dir(out) as tmp:
            student.save_pretrained(tmp)
            _write_history(tmp / "metrics.csv", summary.history)
            write_json_atomic(tmp / "train_summary.json", {
                "steps": summary.steps, "train_seconds": summary.seconds, "train_cpu_seconds": summary.cpu_seconds, "target_layers": student.target_layers,
                "teacher": str(exp.teacher_dir), "final": summary.history[-1] if summary.history else None,
                "world_size": world_size()})
    last = summary.history[-1] if summary.history else {}
    log(f"distill: student with {s.num_layers} layers, targets {student.target_layers}: {summary.steps} steps "
        f"(loss {last.get('loss', float('nan')):.3f}, cos {last.get('cos_sim', float('nan')):.3f}) in "
        f"{summary.seconds:.0f} s -> {out}")


# ---------------------------------------------------------------------------------------------- finetune
def build_downstream(exp: SslExperiment, run: FinetuneRun) -> DownstreamModel:
    """The model of a fine-tuning run before training: its encoder (frozen in ``frozen`` mode; else with the CNN
    frozen when ``freeze_cnn``, the recipe's layerdrop and time masking) and freshly initialised heads (torch seed
    ``downstream.seed``)."""
    from speechkd.teachers.hf import load_ssl_teacher

    c = exp.recipe.downstream
    frozen = run.mode == "frozen"
    encoder = load_ssl_teacher(exp.encoder_dir(run.encoder), frozen=frozen)
    if not frozen:
        config = encoder.model.config  # read by the model at every forward
        config.layerdrop = c.encoder_layerdrop
        config.apply_spec_augment = c.spec_augment
        if c.freeze_cnn:
            encoder.freeze_front_end()
    speakers = json.loads(exp.speakers_path.read_text()) if "sv" in run.tasks else []
    torch.manual_seed(run.seed_of(c))
    return DownstreamModel(encoder, run.tasks, c, num_speakers=len(speakers))


def _finetune_run(exp: SslExperiment, run: FinetuneRun) -> None:
    c = exp.recipe.downstream
    out = exp.run_dir(run)
    set_thread_policy(c.num_threads)
    model = build_downstream(exp, run)
    groups = [{"params": model.head_parameters(), "lr": c.lr}]
    enc_params = [p for p in model.encoder.parameters() if p.requires_grad]
    if run.mode != "frozen" and enc_params:
        groups.append({"params": enc_params, "lr": c.encoder_lr})
    cuts_name = "multitask_train" if len(run.tasks) > 1 else f"{run.tasks[0]}_train"
    cuts = exp.cuts(cuts_name)
    keys = [{"kws": "kws_target", "sv": "spk_target"}[t] for t in run.tasks]
    fingerprint = {"downstream": _settings(c, "encoders", "modes", "tasks", "more_seeds"), "run": run.name, "cuts": len(cuts),
                   "encoder": [model.encoder.num_layers, model.encoder.hidden_size]}
    summary = fit_steps(
        out.with_name(out.name + ".fit"), model, groups, cuts, lambda b: model.loss(b, c.beta), steps=c.steps,
        warmup_steps=c.warmup_steps, final_lr_ratio=c.final_lr_ratio, weight_decay=c.weight_decay,
        grad_clip=c.grad_clip, batch_seconds=c.batch_seconds, seed=run.seed_of(c), ckpt_every=c.ckpt_every,
        fingerprint=fingerprint, target_keys=keys, progress=exp.progress, desc=f"finetune {run.name}",
        runtime=exp.recipe.runtime.for_stage("finetune"),
    )
    meta = {"encoder": run.encoder, "mode": run.mode, "source": str(exp.encoder_dir(run.encoder)),
            "num_speakers": model.am.num_classes if model.am is not None else 0, "steps": summary.steps,
            "train_seconds": summary.seconds, "train_cpu_seconds": summary.cpu_seconds, "world_size": world_size(), "downstream": c.model_dump(mode="json")}
    if is_main():  # one writer in a multi-process run
        with atomic_dir(out) as tmp:
            _write_history(tmp / "metrics.csv", summary.history)
            save_downstream(model, tmp, meta)
    last = summary.history[-1] if summary.history else {}
    log(f"finetune: {run.name}: {summary.steps} steps in {summary.seconds:.0f} s "
        f"({', '.join(f'{k} {v:.3f}' for k, v in last.items() if k not in ('step', 'lr'))}) -> {out}")


def finetune(exp: SslExperiment, runs: Optional[Sequence[str]] = None) -> None:
    """Fine-tune every (encoder, mode, task) run of the recipe; resumes stopped runs, skips finished ones. With
    ``recipe.parallel_runs > 1`` that many runs train at once in worker processes, one thread each
    (:func:`speechkd.workers.run_jobs`).

    Args:
      runs: only these runs (names as :attr:`FinetuneRun.name`, e.g. ``teacher-frozen-kws``,
        ``student-multitask``); runs of one recipe may train in parallel processes, each given its own runs.

    Raises:
      ValueError: a name in ``runs`` that is not a run of the recipe (the error lists the recipe's runs).
      FileNotFoundError: a student run is to train and the student is not distilled yet (``student/`` incomplete;
        teacher runs can train beside ``speechkd distill``).
    """
    todo = exp.runs()
    if runs:
        names = [r.name for r in todo]
        unknown = [r for r in runs if r not in names]
        if unknown:
            raise ValueError(f"no fine-tuning run {unknown} in this recipe; its runs: {', '.join(names)}")
        todo = [r for r in todo if r.name in set(runs)]
    for r in [r for r in todo if (exp.run_dir(r) / DOWNSTREAM_META).is_file()]:
        log(f"finetune: {exp.run_dir(r)} exists, skipped")
        todo.remove(r)
    waiting = [r.name for r in todo if r.encoder == "student"]
    if waiting and not exp.student_distilled:
        raise FileNotFoundError(f"fine-tuning run(s) {', '.join(waiting)} need the distilled student in "
                                f"{exp.student_dir}, "
                                f"which is not there yet: run `speechkd distill` first (teacher runs can train "
                                f"beside it: `speechkd finetune RECIPE --run teacher-...`)")
    from speechkd.distributed import world_size

    jobs = min(exp.recipe.parallel_runs, len(todo))
    if jobs <= 1 or world_size() > 1:  # a multi-process run trains each run with every process (DDP)
        for run in todo:
            _finetune_run(exp, run)
        return
    from speechkd.workers import Job, run_jobs

    recipe_json = exp.recipe.model_dump_json()
    run_jobs([Job(r.name, _finetune_process, (recipe_json, r.name)) for r in todo], jobs, what="fine-tuning runs")


def _finetune_process(recipe_json: str, name: str) -> None:
    """A worker process's job (:mod:`speechkd.workers`): rebuild the experiment and train one fine-tuning run on
    one thread."""
    recipe = SslRecipe.model_validate_json(recipe_json)
    recipe = recipe.model_copy(update={"downstream": recipe.downstream.model_copy(update={"num_threads": 1})})
    exp = SslExperiment(recipe, progress=False)
    _finetune_run(exp, next(r for r in exp.runs() if r.name == name))


# ---------------------------------------------------------------------------------------------- evaluate
def kws_correct(model: DownstreamModel, cuts, batch_seconds: float, progress: bool = False) -> np.ndarray:
    """``(U,)`` int8, 1 where the model's KWS head classifies the labelled cut right, in the order of ``cuts``
    (what a paired comparison of two systems on the same clips needs: :func:`~speechkd.eval.metrics.
    bootstrap_accuracy_interval`)."""
    from tqdm.auto import tqdm

    preds, labels = [], []
    for batch in tqdm(waveform_batches(cuts, batch_seconds, ("kws_target",)), desc="KWS test", disable=not progress):
        preds += model.infer(batch["wavs"], batch["lens"])["kws_logits"].argmax(-1).tolist()
        labels += batch["kws_target"].tolist()
    return (np.asarray(preds) == np.asarray(labels)).astype(np.int8)


def kws_accuracy(model: DownstreamModel, cuts, batch_seconds: float, progress: bool = False) -> float:
    """Accuracy (fraction) of the model's KWS head on labelled cuts (:func:`kws_correct` averaged).

    Raises:
      ValueError: no cuts.
    """
    from speechkd.eval.metrics import accuracy

    right = kws_correct(model, cuts, batch_seconds, progress)
    return accuracy(right, np.ones_like(right))


def sv_scores(model: DownstreamModel, cuts, trials, batch_seconds: float, progress: bool = False) -> np.ndarray:
    """Cosine scores of the trials from the model's SV embeddings of the trial utterances (``cuts``)."""
    from tqdm.auto import tqdm

    from speechkd.eval.verification import cosine_scores

    emb = {}
    for batch in tqdm(waveform_batches(cuts, batch_seconds), desc="SV embeddings", disable=not progress):
        e = model.infer(batch["wavs"], batch["lens"])["sv_embeddings"]
        emb.update(zip(batch["cut_ids"], e))
    missing = [u for u in trials.utterance_ids() if u not in emb]
    if missing:
        raise ValueError(f"no trial utterance '{missing[0]}' among the trial cuts ({len(missing)} missing)")
    a = torch.stack([emb[u] for u in trials.enroll_ids])
    b = torch.stack([emb[u] for u in trials.test_ids])
    return cosine_scores(a, b).double().cpu().numpy()


def _params(modules: Sequence[nn.Module]) -> int:
    from speechkd.eval.speed import count_parameters

    return sum(count_parameters(m) for m in modules)


def evaluate(exp: SslExperiment) -> None:
    """Every system (encoder x mode): KWS accuracy, SV EER and minDCF per trial list, parameters, CPU RTF."""
    from lhotse import CutSet

    from speechkd.data.classification import WaveformDataset
    from speechkd.data.datamodule import load_cuts
    from speechkd.eval.metrics import bootstrap_eer_interval, equal_error_rate, min_dcf, wilson_interval
    from speechkd.eval.speed import real_time_factor
    from speechkd.eval.verification import read_trials

    e = exp.recipe.eval
    kws_test = exp.cuts("kws_test")
    trial_sets = {spec: (load_cuts(exp.trial_cuts_path(spec)), read_trials(exp.trials_path(spec)))
                  for spec in exp.recipe.data.trials}
    for system, runs in exp.systems().items():
        out = exp.dir / "eval" / f"{system}.json"
        done = json.loads(out.read_text()) if out.is_file() else None
        if done is not None and (not e.deployed or "deployed" in done):
            log(f"evaluate: {out} exists, skipped")
            continue
        missing = [r.name for r in runs if not (exp.run_dir(r) / DOWNSTREAM_META).is_file()]
        if missing:
            log(f"evaluate: {system}: runs {missing} not trained yet, skipped")
            continue
        set_thread_policy(e.num_threads)
        models = [load_downstream(exp.run_dir(r)) for r in runs]
        first = runs[0]
        rtf_cuts = kws_test.subset(first=min(e.rtf_utts, len(kws_test)))
        if done is not None:  # evaluated before eval.deployed was switched on: add the deployed block only
            done["deployed"] = _evaluate_deployed(exp, system, runs, models, kws_test, trial_sets, rtf_cuts)
            write_json_atomic(out, done)
            continue
        encoder_params = _params([models[0].encoder])
        result = {
            "name": system, "encoder": first.encoder, "mode": first.mode, "tasks": list(exp.recipe.downstream.tasks),
            "finetune_seed": first.seed_of(exp.recipe.downstream),
            "runs": [r.name for r in runs], "encoder_params": encoder_params,
            # parameters that serve every task: one shared frozen encoder, or each run's own fine-tuned one
            "params": _params([models[0].encoder] if first.mode == "frozen" else [m.encoder for m in models])
            + sum(_params([h for h in (m.kws, m.sv) if h is not None]) for m in models),
            "kws_accuracy": None, "sv": {}, "sv_eer": None, "sv_min_dcf": None,
        }
        t0 = time.time()
        for m in models:
            if m.kws is not None:
                right = kws_correct(m, kws_test, e.batch_seconds, exp.progress)  # (U,) in kws_test's order
                result["kws_accuracy"] = 100.0 * float(right.mean())
                result["kws_test_utts"] = len(kws_test)
                result["kws_interval"] = [100.0 * x for x in wilson_interval(int(right.sum()), len(kws_test))]
                result["kws_correct"] = right.tolist()  # for paired comparisons (report: "Paired differences")
            if m.sv is not None:
                for spec, (trial_cuts, trials) in trial_sets.items():
                    scores = sv_scores(m, trial_cuts, trials, e.batch_seconds, exp.progress)
                    eer, threshold = equal_error_rate(scores, trials.labels)
                    result["sv"][spec] = {"eer": 100.0 * eer, "min_dcf": min_dcf(scores, trials.labels, p_target=e.p_target),
                                          "threshold": threshold, "trials": len(trials),
                                          "eer_interval": [100.0 * x for x in bootstrap_eer_interval(scores, trials.labels)],
                                          # (trials,) in the list's order, for paired comparisons
                                          "scores": [round(float(x), 6) for x in scores],
                                          "labels": [int(x) for x in trials.labels]}
        if result["sv"]:
            result["sv_eer"] = float(np.mean([v["eer"] for v in result["sv"].values()]))
            result["sv_min_dcf"] = float(np.mean([v["min_dcf"] for v in result["sv"].values()]))
        eval_seconds = time.time() - t0
        set_thread_policy(e.rtf_threads)
        batches = [WaveformDataset(())[CutSet.from_cuts([c])] for c in rtf_cuts]  # one utterance at a time
        result["rtf"] = real_time_factor(lambda b: system_infer(models, first.mode, b["wavs"], b["lens"]), batches,
                                         audio_seconds=sum(c.duration for c in rtf_cuts))
        result.update(rtf_utts=len(rtf_cuts), rtf_threads=e.rtf_threads, p_target=e.p_target,
                      train_seconds=sum(json.loads((exp.run_dir(r) / DOWNSTREAM_META).read_text())["train_seconds"]
                                        for r in runs),
                      eval_seconds=eval_seconds)
        set_thread_policy(e.num_threads)
        if e.deployed:
            result["deployed"] = _evaluate_deployed(exp, system, runs, models, kws_test, trial_sets, rtf_cuts)
        write_json_atomic(out, result)
        kws = "-" if result["kws_accuracy"] is None else f"{result['kws_accuracy']:.2f}%"
        sv = "-" if result["sv_eer"] is None else f"{result['sv_eer']:.2f}% (minDCF {result['sv_min_dcf']:.3f})"
        log(f"evaluate: {system}: params {result['params'] / 1e6:.2f} M, KWS accuracy {kws}, SV EER {sv}, "
            f"RTF {result['rtf']:.4f}")


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.2f}%"


class _OnnxRun:
    """An exported run (:class:`speechkd.export.OnnxSsl`) behind :class:`DownstreamModel`'s inference call, so that
    :func:`kws_accuracy` and :func:`sv_scores` score an export exactly as they score the PyTorch model.

    ``infer(wavs (N, S), lens (N,))`` -> ``{"kws_logits": (N, K)}`` and / or ``{"sv_embeddings": (N, D)}`` torch
    tensors, each utterance cut to its ``lens`` samples (the graph takes unpadded inputs)."""

    def __init__(self, onnx_model):
        self.onnx = onnx_model
        self.kws = True if "kws" in onnx_model.tasks else None
        self.sv = True if "sv" in onnx_model.tasks else None

    def infer(self, wavs: torch.Tensor, lens: torch.Tensor) -> dict:
        out = self.onnx.infer([w[: int(n)].numpy() for w, n in zip(wavs, lens)])
        return {k: torch.from_numpy(v) for k, v in out.items()}


def _evaluate_deployed(exp: SslExperiment, system: str, runs, models: Sequence[DownstreamModel], kws_test,
                       trial_sets: dict, rtf_cuts) -> dict:
    """The "as deployed" block of ``eval/<system>.json`` (``eval.deployed``): each run's ONNX export
    (:func:`speechkd.export.export_ssl`, fp32 and int8, in ``EXP/export/<run>``, written unless it holds both), and
    per precision: graph bytes of the system's runs, KWS accuracy (percent), EER per trial list and their mean
    (percent), and the system's onnxruntime RTF (every run's graph on each clip, one clip at a time, on
    ``eval.rtf_threads`` threads; a frozen system's two graphs each hold the shared encoder, so it runs twice)."""
    from lhotse import CutSet

    from speechkd.data.classification import WaveformDataset
    from speechkd.eval.metrics import equal_error_rate
    from speechkd.eval.speed import real_time_factor
    from speechkd.export import OnnxSsl, export_ssl, graph_bytes

    e = exp.recipe.eval
    dirs = []
    for run, model in zip(runs, models):
        dst = exp.dir / "export" / run.name
        if not ((dst / "model.onnx").is_file() and (dst / "model.int8.onnx").is_file()):
            export_ssl(model, dst, int8=True, comment=f"{exp.recipe.name}: {run.name}", overwrite=dst.exists())
        dirs.append(dst)
    res = {"export_dirs": [str(d) for d in dirs]}
    batches = [WaveformDataset(())[CutSet.from_cuts([c])] for c in rtf_cuts]
    for name, q in (("fp32", False), ("int8", True)):
        onnx_runs = [_OnnxRun(OnnxSsl(d, int8=q, num_threads=e.num_threads)) for d in dirs]
        block = {"bytes": sum(graph_bytes(d, int8=q) for d in dirs), "kws_accuracy": None, "sv": {}, "sv_eer": None}
        for m in onnx_runs:
            if m.kws is not None:
                block["kws_accuracy"] = 100.0 * kws_accuracy(m, kws_test, e.batch_seconds, exp.progress)
            if m.sv is not None:
                for spec, (trial_cuts, trials) in trial_sets.items():
                    eer, _ = equal_error_rate(sv_scores(m, trial_cuts, trials, e.batch_seconds, exp.progress),
                                              trials.labels)
                    block["sv"][spec] = {"eer": 100.0 * eer}
        if block["sv"]:
            block["sv_eer"] = float(np.mean([v["eer"] for v in block["sv"].values()]))
        timed = [_OnnxRun(OnnxSsl(d, int8=q, num_threads=e.rtf_threads)) for d in dirs]
        block["rtf"] = real_time_factor(lambda b: [m.infer(b["wavs"], b["lens"]) for m in timed], batches,
                                        audio_seconds=sum(c.duration for c in rtf_cuts))
        res[name] = block
    f32, i8 = res["fp32"], res["int8"]
    log(f"evaluate: {system} as deployed: KWS accuracy fp32 {_pct(f32['kws_accuracy'])} / int8 "
        f"{_pct(i8['kws_accuracy'])}, EER fp32 {_pct(f32['sv_eer'])} / int8 {_pct(i8['sv_eer'])}, RTF fp32 {res['fp32']['rtf']:.4f} / int8 "
        f"{res['int8']['rtf']:.4f}, {res['fp32']['bytes'] / 1e6:.2f} / {res['int8']['bytes'] / 1e6:.2f} MB")
    return res


# ---------------------------------------------------------------------------------------------- report
def report(exp: SslExperiment) -> Path:
    """Write ``report.md`` and ``plots/ssl_tasks.png`` from ``eval/*.json``."""
    from speechkd.report import write_ssl_report

    path = write_ssl_report(exp.dir, title=f"speechkd SSL experiment '{exp.recipe.name}'")
    log(f"report: {path}")
    return path


SSL_STAGES: dict[str, Callable] = {
    "prepare": prepare,
    "hubert-targets": hubert_targets,
    "teacher": train_teacher,
    "distill": distill,
    "finetune": finetune,
    "evaluate": evaluate,
    "report": report,
}
"""The SSL recipe's stages, in the order ``speechkd run`` runs them."""


def needed_stages(recipe: SslRecipe) -> list[str]:
    """The SSL recipe's stages in order (:data:`SSL_STAGES`); ``distill`` only when a student is fine-tuned."""
    needed = list(SSL_STAGES)
    if "student" not in recipe.downstream.encoders:
        needed.remove("distill")
    if recipe.teacher.dir is not None:
        needed.remove("hubert-targets")
    return needed


ALL_RANK_STAGES = frozenset({"hubert-targets", "teacher", "distill", "finetune"})
"""SSL stages every process of a multi-process run executes together (their fits train with DDP; the targets are
sharded by rank, the k-means fitted by rank 0); the others (prepare, evaluate, report) run on rank 0
while the rest wait."""

def export_run(exp: SslExperiment, student: Optional[str] = None, seed: int = 0, out: Optional[Path] = None,
               int8: bool = False, overwrite: bool = False, check_utts: int = 50, sherpa: bool = False) -> list[str]:
    """``speechkd export`` for SSL recipes: a fine-tuning run (``student``, e.g. ``student-multitask``) to ONNX
    (:func:`speechkd.export.export_ssl`: 16 kHz waveform -> KWS logits and / or speaker embedding, into ``out`` or
    ``EXP/export/<run>``), then checked against PyTorch on the first ``check_utts`` KWS test clips (fp32, and int8
    with ``int8``). ``seed`` and ``sherpa`` do not apply (sherpa-onnx has no layout for these models).

    Returns:
      the lines to print.

    Raises:
      LookupError: no run given, or none of that name in the recipe.
      FileNotFoundError: the run has not finished; FileExistsError, ValueError: as :func:`~speechkd.export.export_ssl`.
    """
    from speechkd.export import check_ssl_export, export_ssl

    names = [r.name for r in exp.runs()]
    if student not in names:
        raise LookupError(f"{'no' if student is None else f'no fine-tuning run {student!r}'} given: an SSL recipe "
                          f"exports one fine-tuning run, --student one of {', '.join(names)}")
    src = exp.run_dir(next(r for r in exp.runs() if r.name == student))
    model = load_downstream(src)
    dst = Path(out) if out is not None else exp.dir / "export" / student
    export_ssl(model, dst, int8=int8, comment=f"{exp.recipe.name}: {student}", overwrite=overwrite)
    lines = [f"exported {src} -> {dst}"]
    if sherpa:
        lines.append("--sherpa: sherpa-onnx has no layout for SSL downstream models; not checked")
    if check_utts > 0:
        wavs = [c.load_audio()[0].astype(np.float32) for c in list(exp.cuts("kws_test"))[:check_utts]]
        for q in ([False, True] if int8 else [False]):
            res = check_ssl_export(model, dst, wavs, int8=q)
            parts = []
            if res["kws_max_abs"] is not None:
                parts.append(f"KWS class equal to PyTorch's on {res['same_class']}/{res['utterances']} test clips, "
                             f"logits within {res['kws_max_abs']:.2e}")
            if res["sv_max_abs"] is not None:
                parts.append(f"speaker embeddings within {res['sv_max_abs']:.2e} (cosine to PyTorch's >= "
                             f"{res['sv_min_cosine']:.6f})")
            lines.append(f"check ({'int8' if q else 'fp32'}): " + "; ".join(parts))
    return lines


STAGES = SSL_STAGES
EXPERIMENT = SslExperiment
