"""A KWS head fine-tuned on a frozen SSL encoder with speechkd.training.fit_steps, for tests/test_ddp.py: one process
or under torchrun (not a test module itself).

    python tests/ddp_ssl_fit.py CONFIG.json
    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/ddp_ssl_fit.py CONFIG.json

CONFIG holds: exp_dir (an SSL experiment whose prepare and teacher stages ran; its recipe in recipe.json), run_dir,
devices, accumulate, steps, and optionally interleave (``W``: one process reads the batches of W ranks' samplers in
turn: the global batch stream of a W-process fit). The heads are written to ``run_dir/heads.safetensors``.
"""

import json
import os
import sys

import torch

from ddp_fit import Interleaved


def main(config_path: str) -> None:
    from safetensors.torch import save_file

    from speechkd.config import RuntimeConfig, SslRecipe
    from speechkd.data.datamodule import WaveformDataModule
    from speechkd.distributed import is_main
    from speechkd.ssl_pipeline import FinetuneRun, SslExperiment, build_downstream
    from speechkd.training import fit_steps

    cfg = json.loads(open(config_path).read())
    exp = SslExperiment(SslRecipe.model_validate_json(open(os.path.join(cfg["exp_dir"], "recipe.json")).read()),
                        progress=False)
    world = cfg.get("interleave")
    if world:
        make = WaveformDataModule._make

        def interleaved(self):
            base = make(self)  # world size 1 here: rebuild it as each of `world` ranks
            from speechkd.data.datamodule import make_sampler

            return Interleaved([make_sampler(self.cuts, self.batch_seconds, True, self.seed, world, r)
                                for r in range(world)]) if base.world_size == 1 else base

        WaveformDataModule._make = interleaved
    model = build_downstream(exp, FinetuneRun("teacher", "frozen", ("kws",)))
    fit_steps(cfg["run_dir"], model, [{"params": model.head_parameters(), "lr": 1e-2}], exp.cuts("kws_train"),
              lambda b: model.loss(b), steps=cfg["steps"], warmup_steps=1, final_lr_ratio=0.1, weight_decay=0.0,
              grad_clip=5.0, batch_seconds=2.0, seed=0, ckpt_every=100, fingerprint={}, target_keys=["kws_target"],
              progress=False, runtime=RuntimeConfig(accelerator="cpu", devices=cfg["devices"]),
              accumulate_grad_batches=cfg["accumulate"])
    if is_main():
        save_file({k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith("encoder.")},
                  os.path.join(cfg["run_dir"], "heads.safetensors"))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1])
