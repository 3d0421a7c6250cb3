"""Data-parallel fits on CPU (gloo): the samplers split the cuts by rank, and a 2-process DDP fit equals a 1-process
fit with the same global batch (2 batches accumulated per step), also after a rank is killed mid-epoch and the fit
resumed."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO

SCRIPT = REPO / "tests" / "ddp_fit.py"
MAX_DURATION = 4.0  # seconds per batch and process: 15 batches per epoch on these 30 cuts


@pytest.fixture(scope="module")
def digits_exp(corpora_dir, tmp_path_factory):
    from speechkd.config import Recipe
    from speechkd.pipeline import Experiment, prepare

    d = tmp_path_factory.mktemp("ddp") / "exp"
    r = Recipe.model_validate({
        "name": "ddp", "exp_dir": str(d),
        "data": {"corpus": "digits", "smoke": True, "num_train": 30, "num_dev": 6, "num_test": 4, "vocab_size": 32,
                 "num_jobs": 1, "corpora_dir": str(corpora_dir)},
        "student_model": {"dim": 16, "num_layers": 1, "num_heads": 2, "ff_dim": 32, "subsampling": 4,
                          "decoder_dim": 16, "joiner_dim": 16},
    })
    exp = Experiment(r, progress=False)
    prepare(exp)
    (d / "recipe.json").write_text(r.model_dump_json())
    return exp


def _batches(exp, max_duration, epoch, world_size=1, rank=0):
    from speechkd.data.datamodule import make_sampler

    s = make_sampler(exp.cuts("train"), max_duration, shuffle=True, seed=0, world_size=world_size, rank=rank)
    s.set_epoch(epoch)
    return [[c.id for c in b] for b in s]


def test_ranks_get_disjoint_cuts_covering_the_epoch(digits_exp):
    one = _batches(digits_exp, 4.0, epoch=1)
    r0, r1 = (_batches(digits_exp, 4.0, epoch=1, world_size=2, rank=r) for r in (0, 1))
    assert len(r0) == len(r1)  # equal step counts: no rank waits forever in the all-reduce
    ids0, ids1 = ({i for b in r for i in b if "_dup" not in i} for r in (r0, r1))  # lhotse marks copies "_dup"
    assert ids0 and ids1 and not ids0 & ids1
    assert ids0 | ids1 == {i for b in one for i in b} == {c.id for c in digits_exp.cuts("train")}


def _fit(exp, run_dir, devices, accumulate, max_duration=MAX_DURATION, epochs=2, kill_at=None, interleave=None,
         **extra):
    cfg = {"exp_dir": str(exp.dir), "run_dir": str(run_dir), "devices": devices, "accumulate": accumulate,
           "epochs": epochs, "max_duration": max_duration, "kill_at": kill_at, "interleave": interleave, **extra}
    path = run_dir.parent / f"{run_dir.name}.json"
    path.write_text(json.dumps(cfg))
    launcher = [] if devices == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={devices}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "tests")}
    return subprocess.run([sys.executable, *launcher, str(SCRIPT), str(path)], env=env, capture_output=True, text=True,
                          timeout=600)


def _params(run_dir):
    """The exported weights, without the key part of each attention's input-projection bias: softmax is invariant
    to it, so its true gradient is 0 and AdamW turns the rounding noise there (~1e-12, which differs with the
    summation order of DDP's all-reduce) into full-size steps; every other weight is compared."""
    params = load_file(str(run_dir / "model.safetensors"))
    for k, v in params.items():
        if k.endswith("attn.in_proj_bias"):
            third = v.shape[0] // 3
            params[k] = torch.cat([v[:third], v[2 * third:]])  # query and value biases
    return params


def _max_diff(a, b):
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def test_two_process_fit_equals_one_process_with_the_same_global_batch(digits_exp, tmp_path):
    """The reference: one process reading both ranks' batch streams in turn and accumulating 2 batches per step
    (DDP averages the 2 ranks' gradients; Lightning divides each accumulated loss by 2: the same step)."""
    one, ddp, plain = tmp_path / "one", tmp_path / "ddp", tmp_path / "plain"
    for run, devices, acc, inter in ((one, 1, 2, 2), (ddp, 2, 1, None), (plain, 1, 1, None)):
        res = _fit(digits_exp, run, devices, acc, interleave=inter)
        assert res.returncode == 0, res.stderr[-3000:]
    s1 = json.loads((one / "train_summary.json").read_text())
    s2 = json.loads((ddp / "train_summary.json").read_text())
    assert s2["world_size"] == 2 and s1["world_size"] == 1
    assert s2["global_step"] == s1["global_step"] == s1["schedule_steps"] == s2["schedule_steps"]
    # each rank trained on its own half of every epoch's batches, the same cuts as the single process
    for epoch in (0, 1):
        ids = [set((ddp / f"ids-rank{r}-epoch{epoch}.txt").read_text().split()) for r in (0, 1)]
        assert ids[0] and ids[1] and not ids[0] & ids[1]
        assert ids[0] | ids[1] == set((one / f"ids-rank0-epoch{epoch}.txt").read_text().split())
        assert {i for i in ids[0] | ids[1] if "_dup" not in i} == {c.id for c in digits_exp.cuts("train")}
    diff = _max_diff(_params(one), _params(ddp))
    assert diff < 1e-6, diff  # float summation order only
    assert _max_diff(_params(plain), _params(ddp)) > 100 * max(diff, 1e-7)  # a different batch gives other weights
    assert not (tmp_path / "ddp" / "ckpt" / "last.ckpt.tmp").exists()


def test_ddp_fit_killed_mid_epoch_resumes_to_the_same_weights(digits_exp, tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert _fit(digits_exp, full, 2, 1).returncode == 0
    res = _fit(digits_exp, killed, 2, 1, kill_at=[1, 1])  # rank 0 dies at batch 1 of epoch 2
    assert res.returncode != 0 and not (killed / "model.safetensors").exists()
    assert (killed / "ckpt" / "last.ckpt").is_file()  # epoch 1's checkpoint
    res = _fit(digits_exp, killed, 2, 1)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((killed / "train_summary.json").read_text())
    assert summary["global_step"] == json.loads((full / "train_summary.json").read_text())["global_step"]
    assert _max_diff(_params(full), _params(killed)) < 1e-6


def _run_with_two_processes(recipe_name, corpora_dir, tmp_path):
    """`speechkd run` on a recipe of recipes/ with runtime {accelerator: cpu, devices: 2} and exp_dir tmp_path/exp;
    returns (the recipe as a dict, the finished process)."""
    import yaml

    recipe = yaml.safe_load((REPO / "recipes" / recipe_name).read_text())
    recipe.update(exp_dir=str(tmp_path / "exp"), runtime={"accelerator": "cpu", "devices": 2})
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SPEECHKD_CORPORA": str(corpora_dir)}
    res = subprocess.run([sys.executable, "-m", "speechkd.cli", "run", str(path), "--no-progress"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return recipe, res


def test_speechkd_run_with_two_processes(corpora_dir, tmp_path):
    """`speechkd run` on the smoke recipe with runtime.devices 2 starts 2 processes (torchrun): the fits train with
    DDP, extract and quantize label one shard per rank, rank 0 prepares, evaluates and reports; one log line each."""
    recipe, res = _run_with_two_processes("smoke.yaml", corpora_dir, tmp_path)
    assert "starting 2 processes" in res.stderr
    exp = tmp_path / "exp"
    summary = json.loads((exp / "teacher" / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_step"] == summary["schedule_steps"]
    for key, suffix in (("teacher_embeddings", "h5"), ("codebook_indexes", "ci")):  # CI range-coded by default
        assert len(list((exp / "labels").glob(f"{key}.part-*-of-2.{suffix}"))) == 2
    for name in ("baseline", "mvq", "l1"):
        assert json.loads((exp / "students" / f"{name}-seed0" / "train_summary.json").read_text())["world_size"] == 2
    assert (exp / "report.md").is_file()
    assert res.stdout.count("stage teacher done") == 1  # logged by rank 0 only


@pytest.fixture(scope="module")
def ssl_exp(corpora_dir, tmp_path_factory):
    from speechkd.config import load_recipe
    from speechkd.ssl_pipeline import SslExperiment, hubert_targets, prepare, train_teacher

    d = tmp_path_factory.mktemp("ddp_ssl") / "exp"
    r = load_recipe(REPO / "recipes" / "smoke_ssl.yaml", {"exp_dir": str(d)})
    r.data.corpora_dir = str(corpora_dir)
    exp = SslExperiment(r, progress=False)
    prepare(exp)
    hubert_targets(exp)
    train_teacher(exp)
    (d / "recipe.json").write_text(r.model_dump_json())
    return exp


def test_two_process_ssl_fit_equals_one_process_with_the_same_global_batch(ssl_exp, tmp_path):
    """fit_steps (the SSL stages' fit): a KWS head on the frozen teacher trained by 2 DDP processes equals one process
    reading both ranks' batches in turn with 2 batches accumulated per step."""
    runs = {}
    for name, devices, acc, inter in (("one", 1, 2, 2), ("ddp", 2, 1, None), ("plain", 1, 1, None)):
        run = tmp_path / name
        cfg = {"exp_dir": str(ssl_exp.dir), "run_dir": str(run), "devices": devices, "accumulate": acc, "steps": 6,
               "interleave": inter}
        (tmp_path / f"{name}.json").write_text(json.dumps(cfg))
        launcher = [] if devices == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={devices}"]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "tests")}
        res = subprocess.run([sys.executable, *launcher, str(REPO / "tests" / "ddp_ssl_fit.py"),
                              str(tmp_path / f"{name}.json")], env=env, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        runs[name] = {k: v for k, v in load_file(str(run / "heads.safetensors")).items() if "running_" not in k
                      and "num_batches" not in k}
    diff = _max_diff(runs["one"], runs["ddp"])
    assert diff < 1e-6, diff
    assert _max_diff(runs["plain"], runs["ddp"]) > 100 * max(diff, 1e-7)


def test_speechkd_run_ssl_recipe_with_two_processes(corpora_dir, tmp_path):
    """`speechkd run recipes/smoke_ssl.yaml` with runtime.devices 2: HuBERT pre-training on rank 0, distillation and
    every fine-tuning run with DDP, evaluation on rank 0 (its samplers not split by rank)."""
    recipe, _ = _run_with_two_processes("smoke_ssl.yaml", corpora_dir, tmp_path)
    exp = tmp_path / "exp"
    assert json.loads((exp / "student" / "train_summary.json").read_text())["world_size"] == 2
    meta = json.loads((exp / "finetune" / "student-multitask" / "downstream.json").read_text())
    assert meta["world_size"] == 2 and meta["steps"] == recipe["downstream"]["steps"]
    results = [json.loads(p.read_text()) for p in (exp / "eval").glob("*.json")]
    assert len(results) == 6
    for r in results:  # every test clip and trial scored once (rank 0 alone, on all of them)
        assert r["kws_test_utts"] == len(list(__import__("lhotse").CutSet.from_file(exp / "cuts" / "kws_test.jsonl.gz")))
        assert all(v["trials"] == recipe["data"]["max_trials"] for v in r["sv"].values())
    assert (exp / "report.md").is_file()


def test_fit_killed_with_sigkill_resumes_to_the_exact_weights(digits_exp, tmp_path):
    """A one-process fit with dropout and SpecAugment (in the loader's worker) SIGKILLed mid-epoch and resumed ends
    with the weights of an uninterrupted fit, bit for bit: the checkpoint holds the RNG states and the resume
    restores them. Without the restore the same resume gives other weights (what this test would catch)."""
    full, killed, unrestored = tmp_path / "full", tmp_path / "killed", tmp_path / "unrestored"
    assert _fit(digits_exp, full, 1, 1, epochs=3, random=True).returncode == 0
    for run, extra in ((killed, {}), (unrestored, {"no_rng_restore": True})):
        res = _fit(digits_exp, run, 1, 1, epochs=3, kill_at=[1, 3], random=True, **extra)  # epoch 1, batch 3
        assert res.returncode != 0 and not (run / "model.safetensors").exists()
        assert (run / "ckpt" / "last.ckpt").is_file()  # epoch 0's checkpoint
        res = _fit(digits_exp, run, 1, 1, epochs=3, random=True, **extra)
        assert res.returncode == 0, res.stderr[-3000:]
    a, b = load_file(str(full / "model.safetensors")), load_file(str(killed / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _max_diff(a, load_file(str(unrestored / "model.safetensors"))) > 1e-5
    # the training time counts both fits of the killed run (ckpt/clock.json, carried over the kill)
    clock = json.loads((killed / "ckpt" / "clock.json").read_text())
    summary = json.loads((killed / "train_summary.json").read_text())
    assert summary["train_seconds"] == pytest.approx(clock["seconds"]) and summary["train_cpu_seconds"] > 0
