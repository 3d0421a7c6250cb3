"""The SSL-distillation recipe: schema (unknown keys refused, ASR recipes unchanged), the whole chain on the Speech
Commands smoke list (HuBERT pre-training -> DistilHuBERT student -> KWS/SV fine-tuning in three modes -> evaluation ->
report), a second run that skips everything, frozen encoders left unchanged, a stopped fine-tuning resumed exactly,
and the CLI's dispatch on the recipe kind."""

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

pytest.importorskip("transformers")

from speechkd.config import Recipe, RecipeError, SslRecipe, load_recipe  # noqa: E402
from speechkd.pipeline import make_experiment, run_all  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SYSTEMS = {f"{e}-{m}" for e in ("teacher", "student") for m in ("frozen", "finetune", "multitask")}


def _write(tmp_path, data, name="r.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


# ---------------------------------------------------------------------------------------------- schema
def test_recipes_validate_by_kind():
    for name in ("smoke_ssl.yaml", "ssl_kws_sv.yaml"):
        assert isinstance(load_recipe(REPO / "recipes" / name), SslRecipe)
    for name in ("smoke.yaml", "commands_mvq.yaml", "smoke_codert.yaml"):
        assert type(load_recipe(REPO / "recipes" / name)) is Recipe
    real = load_recipe(REPO / "recipes" / "ssl_kws_sv.yaml")
    assert real.teacher.pretrain is not None and real.teacher.dir is None and real.student.num_layers == 2
    assert set(real.downstream.modes) == {"frozen", "finetune", "multitask"}
    assert real.data.pretrain_corpora == ["commands", "librispeech_spk"] and not real.data.smoke


@pytest.mark.parametrize("bad, words", [
    ({"student": {"num_layer": 2}}, ["num_layer"]),  # typo inside a section
    ({"studnet": {}}, ["studnet"]),  # typo at the top
    ({"teacher": {"dir": "x", "pretrain": {}}}, ["either dir"]),
    ({"downstream": {"tasks": ["kws"]}}, ["multitask"]),
    ({"downstream": {"modes": ["frozen", "frozen"]}}, ["repeats"]),
    ({"data": {"trials": ["sv_test"]}}, ["<corpus>/<list>"]),
    ({"student": {"target_layers": [2, 9]}}, ["out of range"]),
    ({"task": "kws"}, ["task must be 'ssl'"]),
])
def test_recipe_errors_name_the_problem(tmp_path, bad, words):
    base = {"task": "ssl", "name": "x", "exp_dir": str(tmp_path / "e")}
    with pytest.raises(RecipeError) as err:
        load_recipe(_write(tmp_path, {**base, **bad}))
    assert all(w in str(err.value) for w in words), str(err.value)


def test_teacher_defaults_to_pretraining(tmp_path):
    r = load_recipe(_write(tmp_path, {"task": "ssl", "name": "x", "exp_dir": "e"}))
    assert r.teacher.pretrain is not None and r.teacher.dir is None
    r = load_recipe(_write(tmp_path, {"task": "ssl", "name": "x", "exp_dir": "e", "teacher": {"dir": "hf/hubert"}}))
    assert r.teacher.pretrain is None and r.teacher.dir == "hf/hubert"


# ---------------------------------------------------------------------------------------------- the chain
@pytest.fixture(scope="module")
def ssl_exp(tmp_path_factory, corpora_dir):
    exp_dir = tmp_path_factory.mktemp("smoke_ssl") / "exp"
    recipe = load_recipe(REPO / "recipes" / "smoke_ssl.yaml", {"exp_dir": str(exp_dir)})
    recipe.data.corpora_dir = str(corpora_dir)
    exp = make_experiment(recipe, progress=False)
    run_all(exp)
    return exp


def test_chain_writes_report_and_finite_results(ssl_exp):
    from speechkd.eval.metrics import equal_error_rate

    d = ssl_exp.dir
    assert (d / "config.yaml").is_file() and (d / "plots" / "ssl_tasks.png").is_file()
    assert (d / "plots" / "ssl_training_curves.png").is_file() and "No training history" not in (d / "report.md").read_text()
    results = {p.stem: json.loads(p.read_text()) for p in (d / "eval").glob("*.json")}
    assert set(results) == SYSTEMS
    for r in results.values():
        assert 0 <= r["kws_accuracy"] <= 100 and r["rtf"] > 0 and r["params"] > r["encoder_params"] > 0
        sv = r["sv"]["commands/sv_test"]
        assert sv["trials"] == 16 and 0 <= sv["eer"] <= 100 and 0 <= sv["min_dcf"] <= 1
        assert all(math.isfinite(x) for x in (r["kws_accuracy"], r["rtf"], sv["eer"], sv["min_dcf"]))
        lo, hi = r["kws_interval"]  # Wilson's interval of the accuracy on its test clips
        assert lo <= r["kws_accuracy"] <= hi and hi - lo > 0
        assert sv["eer_interval"][0] <= sv["eer"] <= sv["eer_interval"][1]
        # the per-clip results kept for paired comparisons reproduce the summary numbers
        assert len(r["kws_correct"]) == r["kws_test_utts"]
        assert 100 * sum(r["kws_correct"]) / r["kws_test_utts"] == pytest.approx(r["kws_accuracy"], abs=1e-9)
        assert len(sv["scores"]) == len(sv["labels"]) == sv["trials"]
        assert 100 * equal_error_rate(sv["scores"], sv["labels"])[0] == pytest.approx(sv["eer"], abs=1e-3)
    # the student is the teacher's CNN with fewer transformer layers
    assert results["student-frozen"]["encoder_params"] < results["teacher-frozen"]["encoder_params"]
    # one fine-tuned encoder per task costs an encoder more than one shared multi-task encoder
    for enc in ("teacher", "student"):
        fin, multi = results[f"{enc}-finetune"], results[f"{enc}-multitask"]
        assert fin["params"] - multi["params"] == fin["encoder_params"]
        assert results[f"{enc}-frozen"]["params"] == multi["params"]
    report = (d / "report.md").read_text()
    for word in sorted(SYSTEMS) + ["KWS acc %", "EER % (commands/sv_test)", "minDCF (commands/sv_test)", "RTF"]:
        assert word in report
    # the kept trials: 8 target + 8 non-target trials of the held-out list, the cuts of their utterances
    trials = (d / "cuts" / "trials" / "commands-sv_test.tsv").read_text().splitlines()
    assert trials[0] == "label\tenroll_id\ttest_id" and sorted(t[0] for t in trials[1:]) == ["0"] * 8 + ["1"] * 8
    # the student's distillation targets: 3 evenly spaced layers of the 2-layer teacher, without repeats
    assert json.loads((d / "student" / "train_summary.json").read_text())["target_layers"] == [1, 2]


def test_second_run_skips_everything(ssl_exp, capsys):
    outputs = sorted(p for p in ssl_exp.dir.rglob("*") if p.is_file() and p.name != "config.yaml")
    before = {p: p.stat().st_mtime_ns for p in outputs}
    run_all(ssl_exp)
    out = capsys.readouterr().out
    assert "skipped" in out and "steps in" not in out and "pre-trained" not in out
    assert {p: p.stat().st_mtime_ns for p in outputs if p.name != "report.md" and "plots" not in p.parts} == {
        p: t for p, t in before.items() if p.name != "report.md" and "plots" not in p.parts}


def _encoder_state(model_dir):
    from speechkd.teachers.hf import load_ssl_model

    return load_ssl_model(model_dir).state_dict()


def test_frozen_runs_keep_the_encoder_and_finetuned_runs_change_it(ssl_exp):
    for enc in ("teacher", "student"):
        source = _encoder_state(ssl_exp.encoder_dir(enc))
        for task in ("kws", "sv"):
            frozen = _encoder_state(ssl_exp.dir / "finetune" / f"{enc}-frozen-{task}" / "encoder")
            assert frozen.keys() == source.keys() and all(torch.equal(frozen[k], source[k]) for k in source)
        tuned = _encoder_state(ssl_exp.dir / "finetune" / f"{enc}-multitask" / "encoder")
        assert any(not torch.equal(tuned[k], source[k]) for k in source)
        # the CNN stays frozen in fine-tuning (freeze_cnn)
        assert all(torch.equal(tuned[k], source[k]) for k in source if k.startswith("feature_extractor."))


def test_frozen_mode_trains_only_the_heads(ssl_exp, tmp_path):
    from speechkd.ssl_pipeline import FinetuneRun, build_downstream
    from speechkd.training import fit_steps

    model = build_downstream(ssl_exp, FinetuneRun("student", "frozen", ("sv",)))
    enc0 = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    heads0 = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("encoder.")}
    assert not any(p.requires_grad for p in model.encoder.parameters())
    fit_steps(tmp_path / "fit", model, [{"params": model.head_parameters(), "lr": 1e-2}], ssl_exp.cuts("sv_train"),
                lambda b: model.loss(b), steps=2, warmup_steps=0, final_lr_ratio=1.0, weight_decay=0.1, grad_clip=5.0,
                batch_seconds=8, seed=0, ckpt_every=10, fingerprint={}, target_keys=["spk_target"], progress=False)
    assert not model.encoder.training  # a frozen encoder stays in eval mode (no dropout) while the heads train
    assert all(torch.equal(v, enc0[k]) for k, v in model.encoder.state_dict().items())
    heads = {k: v for k, v in model.state_dict().items() if not k.startswith("encoder.")}
    assert any(not torch.equal(heads[k], heads0[k]) for k in heads0 if "num_batches" not in k)


def test_stopped_finetuning_resumes_exactly(ssl_exp, tmp_path):
    """A run stopped after its step-2 checkpoint and resumed ends with the weights of a run never stopped."""
    from speechkd.ssl_pipeline import FinetuneRun, build_downstream
    from speechkd.training import fit_steps

    run = FinetuneRun("student", "multitask", ("kws", "sv"))
    cuts = ssl_exp.cuts("multitask_train")
    c = ssl_exp.recipe.downstream

    def fit(ckpt, stop_at=None):
        model = build_downstream(ssl_exp, run)
        calls = []

        def step(batch):
            if stop_at is not None and len(calls) == stop_at:
                raise RuntimeError("simulated stop")
            calls.append(1)
            return model.loss(batch, c.beta)

        groups = [{"params": model.head_parameters(), "lr": 1e-3},
                  {"params": [p for p in model.encoder.parameters() if p.requires_grad], "lr": 1e-4}]
        summary = fit_steps(ckpt, model, groups, cuts, step, steps=4, warmup_steps=1, final_lr_ratio=0.1,
                              weight_decay=0.0, grad_clip=5.0, batch_seconds=8, seed=3, ckpt_every=2,
                              fingerprint={"x": 1}, target_keys=["kws_target", "spk_target"], progress=False)
        return model, summary

    straight, _ = fit(tmp_path / "a")
    with pytest.raises(RuntimeError, match="simulated stop"):
        fit(tmp_path / "b", stop_at=3)  # stopped during step 3, after the checkpoint of step 2
    resumed, summary = fit(tmp_path / "b")
    assert summary.resumed_from == 2 and summary.steps == 4
    a, b = straight.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="other settings"):
        fit_steps(tmp_path / "b", resumed, [{"params": resumed.head_parameters(), "lr": 1e-3}], cuts,
                    lambda b: resumed.loss(b), steps=5, warmup_steps=0, final_lr_ratio=1.0, weight_decay=0.0,
                    grad_clip=1.0, batch_seconds=8, seed=3, ckpt_every=2, fingerprint={"x": 2}, progress=False)


def test_frozen_system_runs_its_shared_encoder_once(ssl_exp):
    """The frozen system's runs share one unchanged encoder: deployed (and timed for RTF), it runs once and both
    heads read it, with the outputs each run gives on its own."""
    from speechkd.data.classification import WaveformDataset
    from speechkd.models.downstream import load_downstream, system_infer

    models = [load_downstream(ssl_exp.dir / "finetune" / f"teacher-frozen-{t}") for t in ("kws", "sv")]
    batch = WaveformDataset(())[ssl_exp.cuts("kws_test").subset(first=3)]
    calls = []
    hooks = [m.encoder.register_forward_hook(lambda mod, i, o, k=k: calls.append(k)) for k, m in enumerate(models)]
    with torch.inference_mode():
        shared = system_infer(models, "frozen", batch["wavs"], batch["lens"])
        assert calls == [0]
        alone = [m.infer(batch["wavs"], batch["lens"]) for m in models]
        assert calls == [0, 0, 1]
        system_infer(models, "finetune", batch["wavs"], batch["lens"])  # own encoders: each runs
        assert calls == [0, 0, 1, 0, 1]
    for a, b in zip(shared, alone):
        assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    for h in hooks:
        h.remove()


def test_finetune_trains_only_the_runs_asked_for(ssl_exp, tmp_path):
    """``finetune --run`` retrains the named run only (so runs can train in parallel processes); an unknown name is
    an error that lists the recipe's runs."""
    import shutil

    from speechkd.cli import app

    exp_dir = tmp_path / "exp"
    shutil.copytree(ssl_exp.dir, exp_dir)
    shutil.rmtree(exp_dir / "finetune" / "student-frozen-kws")
    shutil.rmtree(exp_dir / "finetune" / "student-frozen-kws.fit")
    shutil.rmtree(exp_dir / "finetune" / "teacher-multitask")
    others = {p: p.stat().st_mtime_ns for p in (exp_dir / "finetune").rglob("*") if p.is_file()}
    args = ["finetune", str(REPO / "recipes" / "smoke_ssl.yaml"), "--exp-dir", str(exp_dir), "--no-progress",
            "--corpora-dir", ssl_exp.recipe.data.corpora_dir]
    res = CliRunner().invoke(app, args + ["--run", "student-frozen-kws"])
    assert res.exit_code == 0, res.output
    assert (exp_dir / "finetune" / "student-frozen-kws" / "downstream.json").is_file()
    assert not (exp_dir / "finetune" / "teacher-multitask").exists()  # not asked for
    assert {p: p.stat().st_mtime_ns for p in others} == others
    # the retrained run repeats the first one exactly (same seeds, same batches)
    from safetensors.torch import load_file

    from speechkd.models.downstream import HEADS_WEIGHTS

    a = load_file(ssl_exp.dir / "finetune" / "student-frozen-kws" / HEADS_WEIGHTS)
    b = load_file(exp_dir / "finetune" / "student-frozen-kws" / HEADS_WEIGHTS)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    res = CliRunner().invoke(app, args + ["--run", "student-frozen-kw"])
    assert res.exit_code == 1 and "student-frozen-kw'" in res.output and "teacher-multitask" in res.output


def test_parallel_finetuning_in_worker_processes_repeats_the_runs_exactly(ssl_exp, tmp_path):
    """``parallel_runs: 2``: the finetune stage trains its runs two at a time in worker processes (one thread
    each, :mod:`speechkd.workers`), with the same weights as the runs trained in this process."""
    import shutil

    from safetensors.torch import load_file

    from speechkd.cli import app
    from speechkd.models.downstream import HEADS_WEIGHTS

    exp_dir = tmp_path / "exp"
    shutil.copytree(ssl_exp.dir, exp_dir)
    redo = ["teacher-frozen-kws", "student-multitask", "student-finetune-sv"]
    for name in redo:
        shutil.rmtree(exp_dir / "finetune" / name)
        shutil.rmtree(exp_dir / "finetune" / f"{name}.fit")
    recipe = yaml.safe_load((REPO / "recipes" / "smoke_ssl.yaml").read_text())
    path = _write(tmp_path, {**recipe, "parallel_runs": 2})
    res = CliRunner().invoke(app, ["finetune", str(path), "--exp-dir", str(exp_dir), "--no-progress",
                                   "--corpora-dir", ssl_exp.recipe.data.corpora_dir])
    assert res.exit_code == 0, res.output
    assert "training 3 fine-tuning runs, 2 at a time" in res.output
    for name in redo:
        a = load_file(ssl_exp.dir / "finetune" / name / HEADS_WEIGHTS)
        b = load_file(exp_dir / "finetune" / name / HEADS_WEIGHTS)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_dispatches_on_the_recipe_kind(tmp_path):
    from speechkd.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0 and "finetune" in res.output and "task: ssl" in res.output
    ssl = REPO / "recipes" / "smoke_ssl.yaml"
    res = runner.invoke(app, ["quantize", str(ssl), "--exp-dir", str(tmp_path / "e")])
    assert res.exit_code == 2 and "does not apply to an SSL" in res.output and "finetune" in res.output
    res = runner.invoke(app, ["finetune", str(REPO / "recipes" / "smoke.yaml"), "--exp-dir", str(tmp_path / "a")])
    assert res.exit_code == 2 and "does not apply to an ASR" in res.output
    res = runner.invoke(app, ["distill", str(ssl), "--exp-dir", str(tmp_path / "e"), "--student", "x"])
    assert res.exit_code == 2 and "ASR recipes only" in res.output
    bad = _write(tmp_path, {"task": "ssl", "name": "x", "exp_dir": str(tmp_path / "e"), "downstream": {"bta": 1}})
    res = runner.invoke(app, ["run", str(bad)])
    assert res.exit_code == 2 and "bta" in res.output


def test_export_cli_exports_a_finetuning_run(ssl_exp, corpora_dir):
    """`speechkd export SSL_RECIPE --student student-multitask --int8`: model.onnx checked against PyTorch on KWS test
    clips; no run or an unknown one is refused naming the runs."""
    pytest.importorskip("onnxruntime")
    from speechkd.cli import app

    base = [str(REPO / "recipes" / "smoke_ssl.yaml"), "--exp-dir", str(ssl_exp.dir), "--corpora-dir",
            str(corpora_dir), "--no-progress"]
    res = CliRunner().invoke(app, ["export", *base, "--student", "student-multitask", "--int8", "--check-utts", "6"])
    assert res.exit_code == 0, res.output
    out = ssl_exp.dir / "export" / "student-multitask"
    assert (out / "model.onnx").is_file() and (out / "model.int8.onnx").is_file() and (out / "labels.txt").is_file()
    assert "check (fp32): KWS class equal to PyTorch's on 6/6 test clips" in res.output
    assert "speaker embeddings within" in res.output and "check (int8)" in res.output
    for args in ([], ["--student", "nope"]):
        res = CliRunner().invoke(app, ["export", *base, *args])
        assert res.exit_code == 2 and "student-multitask" in res.output and "teacher-frozen-kws" in res.output


def test_evaluate_deployed_scores_the_exports(ssl_exp, tmp_path):
    """`eval.deployed: true` on an evaluated SSL experiment (two of its systems): each run exported in fp32 and int8;
    the fp32 export's KWS accuracy and EER equal PyTorch's (same classes and scores to ~1e-5), the sizes are the
    graphs' on disk (a frozen system ships one graph per task), and the report gets an "As deployed" table."""
    pytest.importorskip("onnxruntime")
    import shutil

    from speechkd.ssl_pipeline import evaluate, report

    shutil.copytree(ssl_exp.dir, tmp_path / "exp")
    recipe = ssl_exp.recipe.model_copy(deep=True)
    recipe.exp_dir = str(tmp_path / "exp")
    recipe.downstream.encoders, recipe.downstream.modes = ["student"], ["frozen", "multitask"]
    recipe.eval.deployed = True
    exp = make_experiment(recipe, progress=False)
    evaluate(exp)
    for system, runs in (("student-frozen", ["student-frozen-kws", "student-frozen-sv"]),
                         ("student-multitask", ["student-multitask"])):
        r = json.loads((exp.dir / "eval" / f"{system}.json").read_text())
        d = r["deployed"]
        for q, suffix in (("fp32", ".onnx"), ("int8", ".int8.onnx")):
            assert d[q]["bytes"] == sum((exp.dir / "export" / run / f"model{suffix}").stat().st_size for run in runs)
            assert d[q]["rtf"] > 0 and 0 <= d[q]["kws_accuracy"] <= 100 and 0 <= d[q]["sv_eer"] <= 100
        assert d["fp32"]["kws_accuracy"] == r["kws_accuracy"], system
        assert d["fp32"]["sv_eer"] == pytest.approx(r["sv_eer"], abs=1e-9), system
    section = report(exp).read_text().split("## As deployed", 1)[1]
    assert "| student-frozen |" in section and "| student-multitask |" in section


def test_classify_cli_names_each_files_keyword(ssl_exp, corpora_dir, tmp_path):
    """`speechkd classify RUN AUDIO... --out F`: each clip's keyword (the KWS head's argmax, as
    speechkd.load(run).classify gives it) and logits; an unreadable file is reported by name; an ASR model or a
    transcribe call on an SSL model is refused with the other command's name."""
    import shutil

    import speechkd
    from speechkd.cli import app

    run = ssl_exp.dir / "finetune" / "student-multitask"
    clips = [c.recording.sources[0].source for c in list(ssl_exp.cuts("kws_test"))[:3]]
    folder = tmp_path / "in"
    folder.mkdir()
    for i, c in enumerate(clips):
        shutil.copy(c, folder / f"{i}.wav")
    (folder / "broken.wav").write_bytes(b"RIFF not really")
    res = CliRunner().invoke(app, ["classify", str(run), str(folder), "--out", str(tmp_path / "k.jsonl"),
                                   "--no-progress"])
    assert res.exit_code == 1 and "broken.wav" in res.output, res.output
    rows = {Path(r["audio"]).name: r for r in map(json.loads, (tmp_path / "k.jsonl").read_text().splitlines())}
    assert rows["broken.wav"]["keyword"] is None and "cannot read audio" in rows["broken.wav"]["error"]
    api = speechkd.load(run)
    for i in range(3):
        r = rows[f"{i}.wav"]
        assert r["keyword"] == api.classify(str(folder / f"{i}.wav"))
        assert max(r["scores"], key=r["scores"].get) == r["keyword"] and len(r["scores"]) == 12
    res = CliRunner().invoke(app, ["transcribe", str(run), str(folder / "0.wav"), "--no-progress"])
    assert res.exit_code == 2 and "speechkd classify" in res.output
    kws_less = ssl_exp.dir / "finetune" / "student-frozen-sv"
    res = CliRunner().invoke(app, ["classify", str(kws_less), str(folder / "0.wav"), "--no-progress"])
    assert res.exit_code == 2 and "without a KWS head" in res.output


def test_more_seeds_train_and_report_every_run_again(ssl_exp, tmp_path):
    """``downstream.more_seeds``: each run trains again under the other seed (new run and system names, other head
    weights), the eval JSON records the seed, and the report gives mean ± sd over the seeds."""
    import shutil

    from safetensors.torch import load_file

    from speechkd.cli import app
    from speechkd.models.downstream import HEADS_WEIGHTS

    exp_dir = tmp_path / "exp"
    shutil.copytree(ssl_exp.dir, exp_dir)
    recipe = yaml.safe_load((REPO / "recipes" / "smoke_ssl.yaml").read_text())
    recipe["downstream"].update(more_seeds=[1], modes=["multitask"])
    path = _write(tmp_path, recipe)
    args = ["--exp-dir", str(exp_dir), "--no-progress", "--corpora-dir", ssl_exp.recipe.data.corpora_dir]
    res = CliRunner().invoke(app, ["finetune", str(path), "--run", "student-multitask-seed1"] + args)
    assert res.exit_code == 0, res.output
    a = load_file(exp_dir / "finetune" / "student-multitask" / HEADS_WEIGHTS)
    b = load_file(exp_dir / "finetune" / "student-multitask-seed1" / HEADS_WEIGHTS)
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)  # another initialisation
    res = CliRunner().invoke(app, ["finetune", str(path), "--run", "teacher-multitask-seed1"] + args)
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(app, ["evaluate", str(path)] + args)
    assert res.exit_code == 0, res.output
    r1 = json.loads((exp_dir / "eval" / "student-multitask-seed1.json").read_text())
    assert r1["finetune_seed"] == 1 and r1["mode"] == "multitask"
    res = CliRunner().invoke(app, ["report", str(path)] + args[:2])
    assert res.exit_code == 0, res.output
    report = (exp_dir / "report.md").read_text()
    section = report.split("### Over fine-tuning seeds")[1].split("## Findings")[0]
    assert "| student-multitask | 0, 1 |" in section and "(2)" in section
    # paired differences: student minus teacher over both seeds, the number from the eval JSONs
    paired = report.split("### Paired differences on the same test set")[1].split("## Findings")[0]
    row = next(line for line in paired.splitlines() if line.startswith("| student - teacher, multitask |"))
    acc = {n: json.loads((exp_dir / "eval" / f"{n}.json").read_text())["kws_accuracy"] for n in
           ("student-multitask", "student-multitask-seed1", "teacher-multitask", "teacher-multitask-seed1")}
    diff = (acc["student-multitask"] + acc["student-multitask-seed1"] - acc["teacher-multitask"]
            - acc["teacher-multitask-seed1"]) / 2
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "2 / 2" and cells[2].startswith(f"{diff:+.2f} [")
    lo, hi = (float(x) for x in cells[2].split("[")[1].rstrip("]").split(","))
    assert lo <= diff <= hi
    with pytest.raises(ValueError, match="distinct"):
        SslRecipe.model_validate({**recipe, "downstream": {**recipe["downstream"], "more_seeds": [0]}})
