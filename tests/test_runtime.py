"""The recipe's runtime handed to Lightning, the schedule sized to the sampler's real batches, and frozen
teachers that move with their KD method."""

import pytest
import torch


def test_schedule_spans_the_batches_the_sampler_yields(corpora_dir, tmp_path):
    import json

    from speechkd.config import ModelConfig, Recipe, TrainConfig
    from speechkd.data.datamodule import AsrDataset, make_loader
    from speechkd.pipeline import Experiment, prepare
    from speechkd.training import count_batches, fit_model

    r = Recipe.model_validate({"name": "x", "exp_dir": str(tmp_path / "exp"), "data": {
        "corpus": "digits", "smoke": True, "num_train": 40, "num_dev": 4, "num_test": 4, "vocab_size": 32, "num_jobs": 1}})
    r.data.corpora_dir = str(corpora_dir)
    exp = Experiment(r, progress=False)
    prepare(exp)
    cfg = TrainConfig(epochs=1, max_duration=7.0, warmup_steps=1, num_threads=1, spec_augment=False)
    loader = make_loader(exp.cuts("train"), AsrDataset(exp.tokenizer), cfg.max_duration, shuffle=True, seed=0)
    n = count_batches(loader.sampler)
    assert n == len(list(loader))  # the count equals what the loader really yields in the epoch
    total = sum(c.duration for c in exp.cuts("train"))
    assert n > total / cfg.max_duration  # buckets are not filled to max_duration: the old estimate was short
    model = ModelConfig(dim=16, num_layers=1, num_heads=2, ff_dim=32, decoder_dim=16, joiner_dim=16)
    fit_model(tmp_path / "run", model, cfg, exp.tokenizer, exp.cuts("train"), exp.cuts("dev"), seed=0, progress=False,
              runtime=r.runtime)
    assert json.loads((tmp_path / "run" / "train_summary.json").read_text())["global_step"] == n


def test_runtime_defaults_and_ddp_for_several_processes():
    from pydantic import ValidationError

    from speechkd.config import Recipe

    r = Recipe.model_validate({"name": "x", "exp_dir": "e"})
    assert r.runtime.accelerator == "auto" and r.runtime.devices == 1
    assert r.runtime.trainer_kwargs()["strategy"] == "auto"
    two = Recipe.model_validate({"name": "x", "exp_dir": "e", "runtime": {"devices": 2, "accelerator": "cpu"}})
    assert two.runtime.world_size() == 2 and two.runtime.trainer_kwargs()["strategy"] == "ddp"
    with pytest.raises(ValidationError, match="devices"):
        Recipe.model_validate({"name": "x", "exp_dir": "e", "runtime": {"devices": 0}})
    # per-stage overrides: only the precision, only of the recipe's training stages
    staged = Recipe.model_validate({"name": "x", "exp_dir": "e", "runtime": {
        "devices": 2, "stages": {"teacher": {"precision": "bf16-mixed"}}}})
    assert staged.runtime.for_stage("teacher").precision == "bf16-mixed"
    assert staged.runtime.for_stage("teacher").devices == 2
    assert staged.runtime.for_stage("distill").precision == "32-true"
    with pytest.raises(ValidationError, match="not training stages"):
        Recipe.model_validate({"name": "x", "exp_dir": "e", "runtime": {"stages": {"finetune": {}}}})
    with pytest.raises(ValidationError, match="devices"):  # the process count is fixed at launch
        Recipe.model_validate({"name": "x", "exp_dir": "e", "runtime": {"stages": {"teacher": {"devices": 1}}}})


def test_frozen_teachers_move_with_their_kd_method():
    from speechkd.config import ModelConfig
    from speechkd.methods.codert import CodertKD
    from speechkd.methods.seq_kd import SequenceKD
    from speechkd.models.build import build_model

    aed = build_model(ModelConfig(arch="aed", dim=16, num_layers=1, num_heads=2, ff_dim=32, decoder_dim=16,
                                  decoder_layers=1, decoder_heads=2, decoder_ff_dim=32), vocab_size=10)
    kd = SequenceKD(use_nbest=False, teacher=aed, kl_scale=1.0)
    assert not list(kd.parameters())  # unregistered: not trained, not checkpointed
    kd.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in kd.teacher.parameters())
    rnnt = build_model(ModelConfig(dim=16, num_layers=1, num_heads=2, ff_dim=32, decoder_dim=16, joiner_dim=16), 10)
    codert = CodertKD("static", rnnt, scale=1.0, temperature=1.0, frame_ratio=1, ctc_weight=0.0, student_dim=16)
    codert.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in codert.frozen_teacher.parameters())
