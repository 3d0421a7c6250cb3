"""Training an ASR model (teacher, baseline student or distilled student) with Lightning.

One LightningModule serves every model: it computes the model's own loss (RNN-T or attention CE, plus CTC),
adds the loss term of an optional KD
method (:mod:`speechkd.methods`), validates by greedy decoding (WER on dev), and logs to CSV and
TensorBoard. :func:`fit_model` runs a resumable fit in a run directory and exports the model as
safetensors.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Sequence

import numpy as np
import torch

from speechkd.config import ModelConfig, RuntimeConfig, TrainConfig
from speechkd.utils import Pathlike, warmup_cosine, write_json_atomic


def _lightning():
    import lightning as L

    return L


class KDContext:
    """What a KD method may use besides the encoder outputs: the student model and its per-utterance loss.

    Attributes:
      model: the student (transducer or attention encoder-decoder).
      utterance_loss: ``(encoder_out (M, T, C), encoder_out_lens (M,), y (M, U), y_lens (M,)) -> (M,)`` the
        student's own training loss per utterance (RNN-T or label-smoothed CE, plus the weighted CTC term)
        for any label sequences, e.g. the teacher's N-best.
    """

    def __init__(self, model, utterance_loss):
        self.model = model
        self.utterance_loss = utterance_loss


class AsrTask(_lightning().LightningModule):
    """Lightning wrapper for any of our ASR models, teacher or student.

    Loss = ``reference_weight * L(references) + KD term``, the reference term averaged over the batch's transcribed
    utterances (``batch["has_text"]``: untranscribed ``data.unlabelled`` cuts learn from the KD term only), where L
    is the model's own per-utterance loss
    (RNN-T for a transducer, label-smoothed CE for an attention encoder-decoder) plus ``ctc_weight`` times the
    CTC loss of the optional CTC head, and ``reference_weight`` is 1 unless the KD method says otherwise
    (sequence-level KD trains on pseudo labels). AdamW with linear warm-up and cosine decay; dev WER by
    greedy decoding each validation epoch.

    Args:
      model: a :class:`speechkd.models.transducer.Transducer` or :class:`speechkd.models.aed.AttentionEncoderDecoder`.
      tokenizer: :class:`speechkd.data.tokenizer.Tokenizer` (decodes hypotheses for the dev WER).
      train_cfg: optimisation settings.
      steps_per_epoch: batches per epoch and process for the learning-rate schedule when the fit has no
        :class:`speechkd.data.datamodule.AsrDataModule` (which counts them on the rank's own sampler).
      kd: an optional :class:`speechkd.methods.base.KDMethod` whose head (if any) trains with the model.

    Under DDP every rank validates its own shard of the dev cuts; the word-error counts are summed over the ranks
    before the WER is taken (an average of per-rank WERs would weight the shards wrongly).
    """

    def __init__(self, model, tokenizer, train_cfg: TrainConfig, steps_per_epoch: Optional[int] = None, kd=None):
        super().__init__()
        self.model = model
        self.kd = kd
        self.tokenizer = tokenizer
        self.cfg = train_cfg
        self.steps_per_epoch = steps_per_epoch
        self._val = []
        self._main_name = "train_rnnt" if hasattr(model, "joiner") else "train_att"

    def _targets(self, tokens: list[list[int]]):
        y_lens = torch.tensor([len(t) for t in tokens], dtype=torch.long)
        y = torch.zeros(len(tokens), max(1, int(y_lens.max())), dtype=torch.long)
        for i, t in enumerate(tokens):
            y[i, : len(t)] = torch.tensor(t, dtype=torch.long)
        return y.to(self.device), y_lens.to(self.device)

    def _losses(self, enc, enc_lens, y, y_lens):
        """Per-utterance ``(main loss (M,), ctc loss (M,) or None)`` of label sequences y: (M, U), y_lens: (M,)."""
        smoothing = 0.0 if self._main_name == "train_rnnt" else self.cfg.label_smoothing  # aed only
        main = self.model.sequence_loss(enc, enc_lens, y, y_lens, label_smoothing=smoothing, reduction="none")
        ctc = None
        if self.cfg.ctc_weight > 0 and self.model.ctc_output is not None:
            ctc = self.model.ctc_loss(enc, enc_lens, y, y_lens, reduction="none")
        return main, ctc

    def utterance_loss(self, enc, enc_lens, y, y_lens):
        """The model's whole training loss per utterance, (M,) nats: main loss + ctc_weight * CTC."""
        main, ctc = self._losses(enc, enc_lens, y, y_lens)
        return main if ctc is None else main + self.cfg.ctc_weight * ctc

    def training_step(self, batch, batch_idx):
        enc, enc_lens, layers = self.model.encode(batch["features"], batch["feature_lens"])
        n = enc.shape[0]
        ref_weight = getattr(self.kd, "reference_weight", 1.0) if self.kd is not None else 1.0
        total = enc.new_zeros(())
        has_text = batch.get("has_text")
        rows = None if has_text is None or bool(has_text.all()) else has_text.nonzero().squeeze(1).tolist()
        if ref_weight > 0 and rows != []:  # the reference loss over the transcribed rows only
            tokens = batch["tokens"] if rows is None else [batch["tokens"][i] for i in rows]
            r_enc, r_lens = (enc, enc_lens) if rows is None else (enc[rows], enc_lens[rows])
            y, y_lens = self._targets(tokens)
            main, ctc = self._losses(r_enc, r_lens, y, y_lens)
            self.log(self._main_name, main.mean().detach(), prog_bar=True, batch_size=len(tokens))
            ref = main.mean()
            if ctc is not None:
                self.log("train_ctc", ctc.mean().detach(), prog_bar=True, batch_size=len(tokens))
                ref = ref + self.cfg.ctc_weight * ctc.mean()
            total = total + ref_weight * ref
        if self.kd is not None:
            kd_loss, logs = self.kd(batch, enc, enc_lens, layers, KDContext(self.model, self.utterance_loss))
            total = total + kd_loss
            for k, v in logs.items():
                self.log(f"train_{k}", v, prog_bar=True, batch_size=n)
        self.log("train_loss", total.detach(), batch_size=n)
        return total

    def validation_step(self, batch, batch_idx):
        from speechkd.decoding import greedy_search

        enc, enc_lens, _ = self.model.encode(batch["features"], batch["feature_lens"])
        hyps = self.tokenizer.decode(greedy_search(self.model, enc, enc_lens))
        from speechkd.eval.metrics import word_error_rate

        self._val.append(word_error_rate(batch["texts"], hyps))

    def on_validation_epoch_end(self):
        counts = torch.tensor([float(sum(s.errors for s in self._val)), float(sum(s.ref_words for s in self._val))],
                              dtype=torch.float64, device=self.device)  # (errors, reference words) of this rank
        self._val = []
        if self._trainer is not None and self.trainer.world_size > 1:
            counts = self.trainer.strategy.reduce(counts, reduce_op="sum")  # summed over the ranks' dev shards
        if counts[1] > 0:
            # the same value on every rank already; sync_dist only keeps Lightning from warning (a mean of equals)
            self.log("val_wer", float(100.0 * counts[0] / counts[1]), prog_bar=True, sync_dist=True)

    def optimizer_steps(self) -> int:
        """Optimiser steps of the whole fit: ``epochs x ceil(batches per epoch / accumulate_grad_batches)``, the
        batches counted on this rank's sampler by the fit's :class:`~speechkd.data.datamodule.AsrDataModule` (every
        rank yields the same number), else ``steps_per_epoch``.

        Raises:
          ValueError: neither a data module with a counted sampler nor ``steps_per_epoch``.
        """
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        batches = getattr(dm, "batches_per_epoch", None) or self.steps_per_epoch
        if not batches:
            raise ValueError("AsrTask: the schedule needs the batches per epoch (an AsrDataModule or steps_per_epoch)")
        return max(1, math.ceil(batches / self.cfg.accumulate_grad_batches) * self.cfg.epochs)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        """Clip each optimiser group's gradient norm on its own (a co-learned teacher's large gradients must not
        shrink the student's steps); with one group this is Lightning's own norm clipping."""
        if not gradient_clip_val:
            return
        if gradient_clip_algorithm not in (None, "norm"):
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        for group in optimizer.param_groups:
            torch.nn.utils.clip_grad_norm_(group["params"], gradient_clip_val)

    def configure_optimizers(self):
        extra = self.kd.extra_param_groups() if self.kd is not None else []
        taken = {id(p) for g in extra for p in g["params"]}
        params = list(self.model.parameters()) + (list(self.kd.parameters()) if self.kd is not None else [])
        params = [p for p in params if p.requires_grad and id(p) not in taken]
        groups = [{"params": params, "lr": self.cfg.lr}] + [{"params": list(g["params"]), "lr": g["lr"]} for g in extra]
        opt = torch.optim.AdamW(groups, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        total = self.optimizer_steps()
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: warmup_cosine(step, self.cfg.warmup_steps, total, self.cfg.final_lr_ratio))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def rng_state() -> dict:
    """The global random generators' states (Python, NumPy, torch CPU and every CUDA device) as tensors, ints and
    tuples only, so a checkpoint holding them loads with ``torch.load(weights_only=True)``."""
    import random

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss))}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned (CUDA states only where this process has the same devices)."""
    import random

    random.setstate(tuple(x if not isinstance(x, list) else tuple(x) for x in state["python"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _exact_resume_callback():
    """A Lightning callback that stores :func:`rng_state` in every checkpoint and restores it when a fit resumes, at
    the start of the first epoch it trains (after Lightning's own set-up, before that epoch's DataLoader draws its
    workers' seeds), so dropout, SpecAugment (run in the loader's worker, seeded from the main process's torch
    generator) and every other draw continue exactly as in an uninterrupted fit. Checkpoints are written at epoch
    ends, so a fit killed mid-epoch redoes that epoch from its start."""
    from lightning.pytorch.callbacks import Callback

    class ExactResume(Callback):
        def __init__(self):
            self.pending = None

        def on_save_checkpoint(self, trainer, pl_module, checkpoint):
            checkpoint["speechkd_rng"] = rng_state()

        def on_load_checkpoint(self, trainer, pl_module, checkpoint):
            self.pending = checkpoint.get("speechkd_rng")

        def on_train_epoch_start(self, trainer, pl_module):
            if self.pending is not None:
                set_rng_state(self.pending)
                self.pending = None

    return ExactResume()


class TrainClock:
    """Wall and CPU seconds a run has trained, summed over every fit of it (a fit killed before its checkpoint, a
    resumed one), kept in ``run_dir/ckpt/clock.json`` and rewritten atomically at most every ``every`` seconds of
    training and at the end, so a kill loses at most that much of the count.

    Use: ``start()`` at the start of a fit, ``tick()`` after each step, ``stop()`` -> ``(seconds, cpu_seconds)``
    totals. Only the writing process (global rank 0) should hold one.
    """

    def __init__(self, run_dir: Pathlike, every: float = 30.0):
        self.path = Path(run_dir) / "ckpt" / "clock.json"
        self.every = float(every)
        self.prev_s = self.prev_cpu = 0.0
        self._t0 = self._cpu0 = self._last = 0.0

    def start(self) -> None:
        if self.path.is_file():
            saved = json.loads(self.path.read_text())
            self.prev_s, self.prev_cpu = float(saved["seconds"]), float(saved["cpu_seconds"])
        self._t0, self._cpu0 = time.time(), cpu_seconds()
        self._last = self._t0

    def totals(self) -> tuple[float, float]:
        return self.prev_s + time.time() - self._t0, self.prev_cpu + cpu_seconds() - self._cpu0

    def tick(self) -> None:
        if time.time() - self._last >= self.every:
            self._write()

    def stop(self) -> tuple[float, float]:
        return self._write()

    def _write(self) -> tuple[float, float]:
        s, cpu = self.totals()
        write_json_atomic(self.path, {"seconds": s, "cpu_seconds": cpu})
        self._last = time.time()
        return s, cpu


def _clock_callback(clock: TrainClock):
    """Lightning hooks driving a :class:`TrainClock` (on global rank 0 only)."""
    from lightning.pytorch.callbacks import Callback

    class Clock(Callback):
        def on_train_start(self, trainer, pl_module):
            if trainer.is_global_zero:
                clock.start()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.is_global_zero:
                clock.tick()

    return Clock()


def fit_model(
    run_dir: Pathlike,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    tokenizer,
    train_cuts,
    dev_cuts,
    seed: int,
    kd=None,
    extra_meta: Optional[dict] = None,
    progress: bool = True,
    init_fn: Optional[Callable] = None,
    runtime: Optional[RuntimeConfig] = None,
) -> Path:
    """Train a transducer or attention encoder-decoder in ``run_dir`` (resuming from ``run_dir/ckpt/last.ckpt`` when present) and export it.

    Outputs in ``run_dir``: ``model.safetensors`` + ``model.json`` (the exported model, without any KD
    head; written last, so its presence marks the stage complete), ``metrics.csv`` (train loss per logged
    step and dev WER per epoch), ``tb/`` TensorBoard logs, ``ckpt/`` Lightning checkpoints for resuming.

    Args:
      run_dir: the run directory.
      model_cfg, train_cfg: model sizes and optimisation.
      tokenizer: the experiment's tokenizer.
      train_cuts, dev_cuts: lhotse CutSets with features (and the KD labels the method needs).
      seed: seeds weights, sampler and SpecAugment.
      kd: optional KD method (its ``label_keys`` are collated from ``train_cuts``).
      extra_meta: stored in ``model.json`` (e.g. the KD method, the teacher).
      init_fn: called with the freshly built model before training (e.g. initialisation from teacher
        layers); a resumed fit then restores the checkpoint over it.
      runtime: accelerator, devices, strategy and precision for Lightning (default :class:`RuntimeConfig`:
        ``auto``, one device, fp32).

    The learning-rate schedule spans ``epochs x`` the optimiser steps of the rank's training sampler in its first
    epoch (counted on a copy of it, divided by ``accumulate_grad_batches``), so the cosine reaches its floor at the
    end of the last epoch.

    With several processes (``runtime.devices`` x ``runtime.num_nodes``, launched by ``speechkd``, torchrun or
    SLURM; see docs/scale_out.md) every rank calls this function: each trains on its own share of the batches
    (:class:`~speechkd.data.datamodule.AsrDataModule`), DDP averages the gradients, rank 0 alone writes the logs,
    the summary and the export, and every rank returns once the export exists.

    Returns:
      the path of ``model.safetensors``.
    """
    L = _lightning()
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    from speechkd.data.datamodule import AsrDataModule, AsrDataset
    from speechkd.models.build import build_model, save_model
    from speechkd.utils import set_thread_policy
    from speechkd.workers import loader_workers

    runtime = runtime or RuntimeConfig()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    set_thread_policy(train_cfg.num_threads)
    L.seed_everything(seed, workers=True, verbose=False)  # DataLoader workers seeded per rank and worker
    model = build_model(model_cfg, tokenizer.vocab_size)
    if init_fn is not None:
        init_fn(model)
    label_keys = kd.label_keys if kd is not None else ()
    cache = int(train_cfg.in_memory_gib * 2**30)
    data = AsrDataModule(
        train_cuts, dev_cuts,
        AsrDataset(tokenizer, label_keys, spec_augment=train_cfg.spec_augment, seed=seed, cache_bytes=cache),
        AsrDataset(tokenizer, cache_bytes=cache), train_cfg.max_duration, seed=seed,
        num_workers=loader_workers(),
        num_buckets=train_cfg.num_buckets,
    )
    task = AsrTask(model, tokenizer, train_cfg, kd=kd)
    ckpt_dir = run_dir / "ckpt"
    last = ckpt_dir / "last.ckpt"
    n_fits = len(list(run_dir.glob("csv[0-9]*")))  # a resumed fit logs beside the earlier ones
    clock = TrainClock(run_dir)
    trainer = L.Trainer(
        max_epochs=train_cfg.epochs,
        **runtime.trainer_kwargs(),
        default_root_dir=run_dir,
        logger=[CSVLogger(run_dir, name="", version=f"csv{n_fits}"), TensorBoardLogger(run_dir, name="", version="tb")],
        # ckpt/last.ckpt rewritten after every epoch (Lightning 2.6 writes save_last only beside a top-k save, so
        # `save_last=True, save_top_k=0` left nothing to resume from until the fit had finished)
        callbacks=[ModelCheckpoint(dirpath=ckpt_dir, filename="last", save_top_k=1, every_n_epochs=1, save_on_train_epoch_end=True,
                                   enable_version_counter=False), _exact_resume_callback(), _clock_callback(clock)],
        gradient_clip_val=train_cfg.grad_clip,
        accumulate_grad_batches=train_cfg.accumulate_grad_batches,
        check_val_every_n_epoch=train_cfg.val_every_epochs,
        num_sanity_val_steps=0,
        log_every_n_steps=10,
        use_distributed_sampler=False,  # the lhotse samplers are built per rank by AsrDataModule
        enable_progress_bar=progress,
        enable_model_summary=False,
        deterministic=False,
    )
    trainer.fit(task, datamodule=data, ckpt_path=str(last) if last.is_file() else None, weights_only=True)
    out = run_dir / "model.safetensors"
    meta = {"seed": seed, "epochs": train_cfg.epochs, "global_step": trainer.global_step,
            "schedule_steps": task.optimizer_steps(), "world_size": trainer.world_size,
            "batches_per_epoch_per_process": data.batches_per_epoch, **(extra_meta or {})}
    if trainer.is_global_zero:  # one writer of logs, summary and export
        _merge_csv_logs(run_dir)
        seconds, cpu = clock.stop()  # every fit of this run, a killed one included (ckpt/clock.json)
        meta = {"train_seconds": seconds, "train_cpu_seconds": cpu, **meta}
        write_json_atomic(run_dir / "train_summary.json", meta)
        out = save_model(model, run_dir, model_cfg, tokenizer.vocab_size, extra=meta)
    trainer.strategy.barrier("speechkd-export")  # no rank goes on before the export exists
    return out


def cpu_seconds() -> float:
    """CPU seconds (user + system, all threads) used so far by this process and its reaped children (e.g. finished
    DataLoader workers), from ``getrusage``: beside wall time it shows whether a run had its cores to itself."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def count_batches(sampler) -> int:
    """Batches a lhotse sampler yields in one epoch, counted on a deep copy (the sampler itself is untouched).

    For a bucketing sampler this is the exact count of its current epoch; later epochs reshuffle and may differ by
    a batch or two (a fraction of a percent of the schedule).
    """
    import copy

    return sum(1 for _ in copy.deepcopy(sampler))


def _merge_csv_logs(run_dir: Path) -> None:
    """Concatenate the CSV logs of every fit of a run (first fit, then each resume) into ``metrics.csv``."""
    import csv

    rows, columns = [], []
    for d in sorted(run_dir.glob("csv[0-9]*"), key=lambda p: int(p.name[3:])):
        f = d / "metrics.csv"
        if not f.is_file():
            continue
        with open(f, newline="") as fh:
            reader = csv.DictReader(fh)
            columns += [c for c in reader.fieldnames or [] if c not in columns]
            rows += list(reader)
    if not rows:
        return
    from speechkd.utils import atomic_path

    with atomic_path(run_dir / "metrics.csv") as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


# ---------------------------------------------------------------------------------------------- step-based fits
class TrainSummary(NamedTuple):
    """What :func:`fit_steps` returns: total optimiser ``steps``, training ``seconds`` over every resumed fit, the
    logged ``history`` (one dict per logged step: ``step``, ``lr`` and the loss function's logs), the step this
    fit ``resumed_from`` (0 for a fresh one) and the CPU seconds of the process (:func:`cpu_seconds`) over every
    resumed fit."""

    steps: int
    seconds: float
    history: list[dict]
    resumed_from: int
    cpu_seconds: float = 0.0


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """The torch seed of optimiser step ``step`` on ``rank`` (dropout, masking): a function of the three, so a
    resumed fit draws what an unstopped one would have."""
    key = [int(seed), int(step), 7] if rank == 0 else [int(seed), int(step), 7, int(rank)]
    return int(np.random.default_rng(key).integers(2**62))


class StepTask(_lightning().LightningModule):
    """A module trained for a fixed number of optimiser steps on ``loss_fn(batch) -> (loss, logs)``: the SSL stages
    (DistilHuBERT distillation, KWS/SV fine-tuning).

    AdamW over ``param_groups`` (each ``{"params", "lr"}``: its peak learning rate), linear warm-up then cosine decay
    to ``final_lr_ratio`` x each peak at ``steps`` (:func:`speechkd.utils.warmup_cosine`); gradient-norm clipping by
    the Trainer. Before every step torch is seeded with :func:`step_seed` (seed, step, rank). A checkpoint holds
    ``fingerprint``; resuming from one made with other settings is refused.

    Args:
      module: everything that trains (registered here, so checkpointed and moved to the device with the task).
      param_groups: AdamW groups, ``{"params": [...], "lr": peak lr}``.
      loss_fn: ``batch -> (scalar loss, {name: float})``; the batch of
        :class:`~speechkd.data.classification.WaveformDataset` (``wavs (N, S)``, ``lens (N,)`` samples, targets).
      steps, warmup_steps, final_lr_ratio, weight_decay, seed: as named.
      fingerprint: JSON-serialisable settings stored in the checkpoint.
      desc: names the fit in errors.
      frozen: modules ``loss_fn`` reads but does not train; moved to the fit's device at its start.
      lr_factor: ``step -> factor`` of each group's peak learning rate (default the warm-up + cosine above).
      optimizer_kwargs: more AdamW arguments (e.g. ``betas``, ``eps``).
      callback: ``(step, logs)`` after every optimiser step (e.g. to watch or stop a fit by raising).
    """

    def __init__(self, module, param_groups: list[dict], loss_fn: Callable, *, steps: int, warmup_steps: int,
                 final_lr_ratio: float, weight_decay: float, seed: int, fingerprint: dict, desc: str = "train",
                 frozen: Sequence = (), lr_factor: Optional[Callable[[int], float]] = None,
                 optimizer_kwargs: Optional[dict] = None, callback: Optional[Callable[[int, dict], None]] = None):
        super().__init__()
        self.module = module
        self._frozen = list(frozen)  # not registered: not checkpointed, not wrapped by DDP
        self._lr_factor, self._optimizer_kwargs, self._callback = lr_factor, dict(optimizer_kwargs or {}), callback
        self._groups = param_groups
        self._loss_fn = loss_fn
        self.steps, self.warmup_steps, self.final_lr_ratio = steps, warmup_steps, final_lr_ratio
        self.weight_decay, self.seed, self.desc = weight_decay, seed, desc
        self.fingerprint = json.dumps(fingerprint, sort_keys=True)
        self.last_logs: dict = {}
        self.resumed_from = 0
        self.previous_seconds = 0.0
        self.previous_cpu_seconds = 0.0

    def train(self, mode: bool = True):
        super().train(mode)
        self.module.train(mode)  # a module's own train() rules (a frozen encoder stays in eval mode)
        return self

    def on_train_batch_start(self, batch, batch_idx):
        torch.manual_seed(step_seed(self.seed, self.global_step, self.global_rank))

    def training_step(self, batch, batch_idx):
        loss, logs = self._loss_fn(batch)
        if not torch.isfinite(loss):
            raise RuntimeError(f"{self.desc}: loss is {float(loss)} at step {self.global_step} "
                               f"(batch {batch['cut_ids'][:3]} ...)")
        n = len(batch["cut_ids"])
        self.log("lr", self.optimizers().param_groups[0]["lr"], batch_size=n)
        for k, v in logs.items():
            self.log(k, float(v), prog_bar=True, batch_size=n)
        self.last_logs = {k: float(v) for k, v in logs.items()}
        return loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW([{"params": list(g["params"]), "lr": g["lr"]} for g in self._groups],
                                weight_decay=self.weight_decay, **self._optimizer_kwargs)
        factor = self._lr_factor or (lambda step: warmup_cosine(step, self.warmup_steps, self.steps,
                                                                  self.final_lr_ratio))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["speechkd"] = {"fingerprint": self.fingerprint,
                                  "seconds": self.previous_seconds + time.time() - self._t0,
                                  "cpu_seconds": self.previous_cpu_seconds + cpu_seconds() - self._cpu0}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get("speechkd", {})
        if saved.get("fingerprint") != self.fingerprint:
            raise ValueError(f"{self.desc}: the checkpoint was made with other settings than this recipe's: delete "
                             "it to start over")
        self.previous_seconds = float(saved.get("seconds", 0.0))
        self.previous_cpu_seconds = float(saved.get("cpu_seconds", 0.0))
        self.resumed_from = int(checkpoint.get("global_step", 0))

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self._callback is not None:
            self._callback(self.global_step, dict(self.last_logs))

    def on_fit_start(self):
        self._t0, self._cpu0 = time.time(), cpu_seconds()
        for m in self._frozen:
            m.to(self.device)

    def on_fit_end(self):
        for m in self._frozen:
            m.cpu()


def fit_steps(
    run_dir: Pathlike,
    module,
    param_groups: list[dict],
    cuts,
    loss_fn: Callable,
    *,
    steps: int,
    warmup_steps: int,
    final_lr_ratio: float,
    weight_decay: float,
    grad_clip: float,
    batch_seconds: float,
    seed: int,
    ckpt_every: int,
    fingerprint: dict,
    target_keys: Sequence[str] = (),
    progress: bool = True,
    desc: str = "train",
    log_every: int = 10,
    runtime: Optional[RuntimeConfig] = None,
    frozen: Sequence = (),
    accumulate_grad_batches: int = 1,
    dataset=None,
    lr_factor: Optional[Callable[[int], float]] = None,
    optimizer_kwargs: Optional[dict] = None,
    callback: Optional[Callable[[int, dict], None]] = None,
) -> TrainSummary:
    """Train ``module`` for ``steps`` optimiser steps with Lightning (:class:`StepTask`) on waveform batches of
    ``cuts``, resumably, and return its summary. ``module`` holds the trained weights afterwards (on the CPU, in
    eval mode).

    Batches: lhotse's ``DynamicBucketingSampler`` (:data:`~speechkd.data.datamodule.NUM_BUCKETS` buckets, ``batch_seconds`` of audio per process, shuffled with
    ``seed`` and the epoch), built per rank (:class:`speechkd.data.datamodule.WaveformDataModule`), epoch after
    epoch until ``steps``. Outputs in ``run_dir``: ``ckpt/last.ckpt`` (every ``ckpt_every`` steps and at the end; a
    later call resumes from it, exactly: the interrupted epoch's consumed batches are skipped and every step is
    seeded by :func:`step_seed`; a larger ``steps`` continues training), ``csv<k>/metrics.csv`` (one per fit, merged
    into ``metrics.csv``) and ``tb/``.

    Args:
      run_dir: the fit's directory (checkpoints and logs; the caller exports the model elsewhere).
      module, param_groups, loss_fn, steps, warmup_steps, final_lr_ratio, weight_decay, seed, fingerprint, desc:
        as :class:`StepTask`.
      cuts: training CutSet of waveform cuts (:mod:`speechkd.data.classification`).
      grad_clip: gradient-norm clipping over all parameters.
      batch_seconds: seconds of audio per batch and process.
      ckpt_every: steps between checkpoints.
      target_keys: integer cut fields collated into the batch (``kws_target``, ``spk_target``).
      log_every: steps between logged rows.
      runtime: accelerator, devices (DDP with unused parameters allowed: a batch may train one head only), precision.
      frozen: modules ``loss_fn`` uses without training them (e.g. the distillation teacher): moved to the fit's
        device at its start, neither checkpointed nor synchronised.
      accumulate_grad_batches: batches whose gradients make one step (``steps`` counts optimiser steps).
      dataset: collates the sampler's CutSets (default :class:`~speechkd.data.classification.WaveformDataset` of
        ``target_keys``), e.g. HuBERT's cropping dataset.
      lr_factor, optimizer_kwargs, callback: as :class:`StepTask`.

    Returns:
      :class:`TrainSummary`.

    Raises:
      ValueError: a checkpoint made with other settings, or no training batch.
      RuntimeError: a non-finite loss (naming the step and batch).
    """
    import csv

    L = _lightning()
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    from speechkd.data.datamodule import WaveformDataModule
    from speechkd.workers import loader_workers

    runtime = runtime or RuntimeConfig()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    task = StepTask(module, param_groups, loss_fn, steps=steps, warmup_steps=warmup_steps,
                    final_lr_ratio=final_lr_ratio, weight_decay=weight_decay, seed=seed, fingerprint=fingerprint,
                    desc=desc, frozen=frozen, lr_factor=lr_factor, optimizer_kwargs=optimizer_kwargs, callback=callback)
    data = WaveformDataModule(cuts, target_keys, batch_seconds, seed=seed, dataset=dataset,
                              num_workers=loader_workers())
    last = run_dir / "ckpt" / "last.ckpt"
    n_fits = len(list(run_dir.glob("csv[0-9]*")))
    clock = TrainClock(run_dir)  # every fit of this run, a killed one included
    kwargs = runtime.trainer_kwargs()
    if kwargs["strategy"] == "ddp":
        kwargs["strategy"] = "ddp_find_unused_parameters_true"  # e.g. a multitask batch without SV labels
    trainer = L.Trainer(
        max_steps=steps, max_epochs=-1, **kwargs, default_root_dir=run_dir,
        logger=[CSVLogger(run_dir, name="", version=f"csv{n_fits}"), TensorBoardLogger(run_dir, name="", version="tb")],
        callbacks=[ModelCheckpoint(dirpath=run_dir / "ckpt", filename="last", every_n_train_steps=ckpt_every,
                                   save_top_k=1, enable_version_counter=False), _clock_callback(clock)],
        gradient_clip_val=grad_clip, accumulate_grad_batches=accumulate_grad_batches, limit_val_batches=0, num_sanity_val_steps=0, log_every_n_steps=log_every,
        use_distributed_sampler=False, enable_progress_bar=progress, enable_model_summary=False,
    )
    t0, cpu0 = time.time(), cpu_seconds()
    trainer.fit(task, datamodule=data, ckpt_path=str(last) if last.is_file() else None, weights_only=True)
    if trainer.global_step % ckpt_every:  # the end is a checkpoint too: a later call with more steps continues it
        trainer.save_checkpoint(last)
    seconds = task.previous_seconds + time.time() - t0
    cpu = task.previous_cpu_seconds + cpu_seconds() - cpu0
    if trainer.is_global_zero:
        # the clock also counts a killed fit's steps after its last checkpoint; the checkpoint's count is the
        # fallback for a run begun before ckpt/clock.json existed
        s_clock, cpu_clock = clock.stop()
        seconds, cpu = max(seconds, s_clock), max(cpu, cpu_clock)
        _merge_csv_logs(run_dir)
    trainer.strategy.barrier("speechkd-fit-steps")
    history = []
    if (run_dir / "metrics.csv").is_file():
        with open(run_dir / "metrics.csv", newline="") as fh:
            for row in csv.DictReader(fh):
                values = {k: float(v) for k, v in row.items() if v not in ("", None) and k not in ("step", "epoch")}
                if values:
                    history.append({"step": int(row["step"]) + 1, **values})
    if task.last_logs and (not history or history[-1]["step"] != trainer.global_step):
        history.append({"step": trainer.global_step, **task.last_logs})  # the last step, as the logger may skip it
    module.cpu().eval()
    return TrainSummary(trainer.global_step, seconds, history, task.resumed_from, cpu)
