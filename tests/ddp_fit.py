"""A tiny transducer fit for tests/test_ddp.py, run as one process or under torchrun (not a test module itself).

    python tests/ddp_fit.py CONFIG.json            # one process
    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/ddp_fit.py CONFIG.json

CONFIG holds: exp_dir (a prepared smoke experiment), run_dir, devices, accumulate, epochs, max_duration, and
optionally interleave (``W``: a one-process fit reads the batches of W ranks' samplers in turn, rank 0's batch k,
rank 1's batch k, ...: the global batch stream of a W-process fit, to be accumulated W at a time) and kill_at
(``[epoch, batch]``: rank 0 SIGKILLs itself at that training batch, as a crash would); ``random: true`` trains with
dropout 0.1 and SpecAugment through the pipeline's own loader (a worker process; no id recording), and
``no_rng_restore: true`` disables the checkpoint's RNG restore (to show what it changes).
Each rank appends the ids of the cuts of every training batch it collates to ``run_dir/ids-rank<r>-epoch<e>.txt``.
"""

import json
import os
import signal
import sys

import torch


class RecordingDataset(torch.utils.data.Dataset):
    """Wraps the training AsrDataset; writes each batch's cut ids (rank and epoch from the sampler's info)."""

    def __init__(self, inner, out_dir, sampler):
        self.inner, self.out_dir, self.sampler = inner, out_dir, sampler

    def __getitem__(self, item):
        cuts = item[1] if isinstance(item, tuple) else item  # (epoch, CutSet) from the pipeline's EpochTagged sampler
        rank = int(os.environ.get("RANK", "0"))
        with open(os.path.join(self.out_dir, f"ids-rank{rank}-epoch{self.sampler.epoch}.txt"), "a") as fh:
            fh.write("\n".join(c.id for c in cuts) + "\n")
        return self.inner[item]


class Interleaved:
    """The batches of several samplers in turn (rank 0's batch k, rank 1's batch k, ...); set_epoch reaches all."""

    def __init__(self, samplers):
        self.samplers = samplers

    def set_epoch(self, epoch):
        for s in self.samplers:
            s.set_epoch(epoch)

    @property
    def epoch(self):
        return self.samplers[0].epoch

    def __iter__(self):
        for batches in zip(*self.samplers):
            yield from batches


def main(config_path: str) -> None:
    from speechkd.config import Recipe, RuntimeConfig
    from speechkd.data.datamodule import AsrDataModule
    from speechkd.pipeline import Experiment
    from speechkd.training import AsrTask, fit_model

    cfg = json.loads(open(config_path).read())
    recipe = Recipe.model_validate_json(open(os.path.join(cfg["exp_dir"], "recipe.json")).read())
    exp = Experiment(recipe, progress=False)
    train_cfg = recipe.student_train.model_copy(update={
        "epochs": cfg["epochs"], "max_duration": cfg["max_duration"], "accumulate_grad_batches": cfg["accumulate"],
        "spec_augment": bool(cfg.get("random")), "num_threads": 1, "warmup_steps": 2})
    model_cfg = recipe.student_model.model_copy(update={"dropout": 0.1 if cfg.get("random") else 0.0})
    if cfg.get("no_rng_restore"):
        import speechkd.training as tr

        tr.set_rng_state = lambda state: None
    os.makedirs(cfg["run_dir"], exist_ok=True)
    world = cfg.get("interleave")
    if world:
        import speechkd.data.datamodule as dm

        make_sampler = dm.make_sampler

        def interleaved(cuts, max_duration, shuffle, seed=0, world_size=1, rank=0, **kwargs):
            if not shuffle:
                return make_sampler(cuts, max_duration, shuffle, seed, world_size, rank, **kwargs)
            return Interleaved([make_sampler(cuts, max_duration, True, seed, world, r, **kwargs)
                                for r in range(world)])

        dm.make_sampler = interleaved
    original = AsrDataModule.train_dataloader

    def train_dataloader(self):  # in the main process (no worker), so the sampler's epoch is the one set by Lightning
        dl = original(self)
        return torch.utils.data.DataLoader(RecordingDataset(dl.dataset, cfg["run_dir"], dl.sampler),
                                           sampler=dl.sampler, batch_size=None, num_workers=0)

    if not cfg.get("random"):
        AsrDataModule.train_dataloader = train_dataloader

    kill_at = cfg.get("kill_at")
    if kill_at:
        def on_train_batch_start(self, batch, batch_idx):
            if self.trainer.global_rank == 0 and [self.current_epoch, batch_idx] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
        AsrTask.on_train_batch_start = on_train_batch_start

    runtime = RuntimeConfig(accelerator="cpu", devices=cfg["devices"])
    fit_model(cfg["run_dir"], model_cfg, train_cfg, exp.tokenizer, exp.cuts("train"), exp.cuts("dev"), seed=0,
              progress=False, runtime=runtime)


if __name__ == "__main__":
    main(sys.argv[1])
