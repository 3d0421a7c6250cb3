"""The whole recipe chain on the FSDD smoke list: prepare -> teacher -> extract -> quantize -> distill ->
evaluate -> report, then a second run that must skip everything, a resumed training, and the CLI's errors."""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from speechkd.config import load_recipe
from speechkd.pipeline import Experiment, run_all

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smoke_exp(tmp_path_factory, corpora_dir):
    exp_dir = tmp_path_factory.mktemp("smoke") / "exp"
    recipe = load_recipe(REPO / "recipes" / "smoke.yaml", {"exp_dir": str(exp_dir)})
    recipe.data.corpora_dir = str(corpora_dir)
    exp = Experiment(recipe, progress=False)
    run_all(exp)
    return exp


def test_chain_writes_report_and_results(smoke_exp):
    d = smoke_exp.dir
    assert (d / "config.yaml").is_file() and (d / "report.md").is_file()
    report = (d / "report.md").read_text()
    for name in ("teacher", "baseline", "mvq", "l1"):
        assert name in report
    assert len(list((d / "plots").glob("*.png"))) >= 2
    results = {p.stem: json.loads(p.read_text()) for p in (d / "eval").glob("*.json")}
    assert set(results) == {"teacher", "baseline-seed0", "mvq-seed0", "l1-seed0"}
    for r in results.values():
        assert 0 <= r["dev_wer"] and 0 <= r["test_wer"] and r["rtf"] > 0 and r["params"] > 0
    assert results["teacher"]["params"] > results["baseline-seed0"]["params"]
    # KD heads are not part of the exported students
    assert results["mvq-seed0"]["params"] == results["baseline-seed0"]["params"]
    # label bytes: float32 (teacher dim 32 x 4 bytes) vs 4 codebook indexes per frame, range-coded below one byte
    # each (the coded words counted): more than 32x smaller, as the report says
    from speechkd.data.datamodule import load_cuts
    from speechkd.labels.store import load_frame_labels

    ci = [load_frame_labels(c, "codebook_indexes") for c in load_cuts(smoke_exp.ci_cuts_path)]
    raw_bytes = sum(a.size for a in ci)  # one byte per index
    assert results["l1-seed0"]["label_bytes"] == 32 * raw_bytes
    assert 0 < results["mvq-seed0"]["label_bytes"] < raw_bytes
    assert results["mvq-seed0"]["float32_label_bytes"] == results["l1-seed0"]["label_bytes"]
    ratio = results["l1-seed0"]["label_bytes"] / results["mvq-seed0"]["label_bytes"]
    assert f"{ratio:.1f}× smaller" in report


def test_codebook_indexes_are_uint8_and_match_quantizer(smoke_exp):
    import torch

    from speechkd.data.datamodule import load_cuts
    from speechkd.methods.mvq_kd import CI_KEY, EMB_KEY
    from speechkd.mvq.quantizer import Quantizer
    from speechkd.labels.store import load_frame_labels

    q = Quantizer.load(smoke_exp.quantizer_path)
    cuts = load_cuts(smoke_exp.ci_cuts_path)
    cut = next(iter(cuts))
    ci = load_frame_labels(cut, CI_KEY, {"quantizer_id": q.id})
    emb = load_frame_labels(cut, EMB_KEY)
    assert ci.dtype == np.uint8 and ci.shape == (emb.shape[0], 4)
    assert np.array_equal(ci, q.encode(torch.from_numpy(emb)).numpy())
    with pytest.raises(ValueError, match=cut.id):
        load_frame_labels(cut, CI_KEY, {"quantizer_id": "0" * 16})


def test_second_run_skips_complete_stages(smoke_exp, capsys):
    models = sorted(smoke_exp.dir.glob("**/model.safetensors"))
    before = {p: p.stat().st_mtime_ns for p in models}
    run_all(smoke_exp)
    out = capsys.readouterr().out
    assert "skipped" in out and "trained" not in out
    assert {p: p.stat().st_mtime_ns for p in models} == before


def test_stopped_training_resumes_from_checkpoint(smoke_exp, tmp_path):
    from speechkd.training import fit_model

    r = smoke_exp.recipe
    run = tmp_path / "run"
    cfg = r.student_train.model_copy(update={"epochs": 1})
    args = (r.student_model, cfg, smoke_exp.tokenizer, smoke_exp.cuts("train"), smoke_exp.cuts("dev"))
    fit_model(run, *args, seed=0, progress=False)
    first = json.loads((run / "train_summary.json").read_text())
    # pretend the run was stopped after epoch 1 of 2: the weights are gone, the checkpoint is kept
    (run / "model.safetensors").unlink()
    fit_model(run, r.student_model, cfg.model_copy(update={"epochs": 2}), *args[2:], seed=0, progress=False)
    second = json.loads((run / "train_summary.json").read_text())
    assert first["global_step"] > 0
    assert second["global_step"] == 2 * first["global_step"]  # one more epoch, not two
    assert (run / "model.safetensors").is_file()


def test_cli_refuses_unknown_key(tmp_path):
    from speechkd.cli import app

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"name": "x", "exp_dir": str(tmp_path / "e"), "data": {"corpus": "digits", "sizes": 3}}))
    res = CliRunner().invoke(app, ["prepare", str(bad)])
    assert res.exit_code == 2 and "sizes" in res.output
    res = CliRunner().invoke(app, ["--help"])
    assert res.exit_code == 0 and "quantize" in res.output


def test_resumed_run_keeps_earlier_training_log(smoke_exp, tmp_path):
    import csv

    from speechkd.training import fit_model

    r = smoke_exp.recipe
    run = tmp_path / "run"
    cfg = r.student_train.model_copy(update={"epochs": 1})
    fit_model(run, r.student_model, cfg, smoke_exp.tokenizer, smoke_exp.cuts("train"), smoke_exp.cuts("dev"), seed=0, progress=False)
    (run / "model.safetensors").unlink()
    fit_model(run, r.student_model, cfg.model_copy(update={"epochs": 2}), smoke_exp.tokenizer, smoke_exp.cuts("train"),
                   smoke_exp.cuts("dev"), seed=0, progress=False)
    with open(run / "metrics.csv") as fh:
        epochs = {row["epoch"] for row in csv.DictReader(fh) if row.get("val_wer")}
    assert epochs == {"0", "1"}


def test_training_stopped_mid_fit_resumes_from_last_epoch(smoke_exp, tmp_path, monkeypatch):
    """A fit killed during epoch 1 of 3 leaves ckpt/last.ckpt of epoch 0; the re-run trains only epochs 1-2."""
    import csv

    import torch

    from speechkd.training import AsrTask, fit_model

    r = smoke_exp.recipe
    run = tmp_path / "run"
    cfg = r.student_train.model_copy(update={"epochs": 3})
    args = (run, r.student_model, cfg, smoke_exp.tokenizer, smoke_exp.cuts("train"), smoke_exp.cuts("dev"))

    def stop_in_epoch_1(self):
        if self.current_epoch == 1:
            raise RuntimeError("simulated stop")

    monkeypatch.setattr(AsrTask, "on_train_epoch_start", stop_in_epoch_1, raising=False)
    with pytest.raises(BaseException):
        fit_model(*args, seed=0, progress=False)
    assert not (run / "model.safetensors").exists()
    ckpt = torch.load(run / "ckpt" / "last.ckpt", weights_only=True, map_location="cpu")
    assert ckpt["epoch"] == 0
    monkeypatch.undo()
    fit_model(*args, seed=0, progress=False)
    assert (run / "model.safetensors").is_file()
    with open(run / "metrics.csv") as fh:
        epochs = [row["epoch"] for row in csv.DictReader(fh) if row.get("val_wer")]
    assert epochs == ["0", "1", "2"]  # epoch 0 once (not retrained), then 1 and 2 after the resume


def test_export_cli_writes_a_checked_sherpa_onnx_layout(smoke_exp, tmp_path, corpora_dir):
    """`speechkd export RECIPE --student mvq --int8`: the graphs, tokens and the check against PyTorch; the teacher
    exports without --student; an unknown run is refused by name."""
    pytest.importorskip("onnxruntime")
    from speechkd.cli import app

    base = ["--exp-dir", str(smoke_exp.dir), "--corpora-dir", str(corpora_dir), "--no-progress"]
    res = CliRunner().invoke(app, ["export", str(REPO / "recipes" / "smoke.yaml"), "--student", "mvq", "--int8",
                                   "--check-utts", "4", "--sherpa", *base])
    assert res.exit_code == 0, res.output
    assert "check (sherpa-onnx" in res.output
    out = smoke_exp.dir / "export" / "mvq-seed0"
    assert (out / "encoder.int8.onnx").is_file() and (out / "tokens.txt").is_file()
    assert "greedy hypotheses equal to PyTorch's on 4/4" in res.output  # fp32
    res = CliRunner().invoke(app, ["export", str(REPO / "recipes" / "smoke.yaml"), "--out", str(tmp_path / "t"),
                                   "--check-utts", "0", *base])
    assert res.exit_code == 0 and (tmp_path / "t" / "joiner.onnx").is_file(), res.output
    res = CliRunner().invoke(app, ["export", str(REPO / "recipes" / "smoke.yaml"), "--student", "nope", *base])
    assert res.exit_code == 2 and "nope" in res.output


def test_evaluate_deployed_adds_the_as_deployed_block(smoke_exp, tmp_path):
    """`eval.deployed: true` on an evaluated experiment: each model is exported (fp32 + int8) and its ONNX test WER,
    RTF and graph sizes join its result; the fp32 WER equals the PyTorch model's (same greedy hypotheses) and the
    report gets an "As deployed" table. A malformed block is refused by name."""
    pytest.importorskip("onnxruntime")
    import shutil

    from speechkd.pipeline import evaluate, report
    from speechkd.report import load_results

    shutil.copytree(smoke_exp.dir, tmp_path / "exp")
    recipe = smoke_exp.recipe.model_copy(deep=True)
    recipe.exp_dir = str(tmp_path / "exp")
    recipe.eval.deployed = True
    recipe.students = [s for s in recipe.students if s.name == "mvq"]  # the teacher and one student: enough
    exp = Experiment(recipe, progress=False)
    evaluate(exp)
    results = {p.stem: json.loads(p.read_text()) for p in (exp.dir / "eval").glob("*.json")}
    assert set(results) == {"teacher", "baseline-seed0", "mvq-seed0", "l1-seed0"}
    assert "deployed" not in results.pop("baseline-seed0") and "deployed" not in results.pop("l1-seed0")
    for name, r in results.items():
        d = r["deployed"]
        export = exp.dir / "export" / name
        fp32 = sum((export / f"{g}.onnx").stat().st_size for g in ("encoder", "decoder", "joiner"))
        int8 = sum((export / f"{g}.int8.onnx").stat().st_size for g in ("encoder", "decoder", "joiner"))
        assert (d["fp32"]["bytes"], d["int8"]["bytes"]) == (fp32, int8) and int8 < fp32
        assert d["fp32"]["test_wer"] == pytest.approx(r["test_wer"], abs=1e-9), name  # the PyTorch greedy WER
        assert d["pytorch_greedy_test_wer"] == r["test_wer"]
        assert d["fp32"]["rtf"] > 0 and d["int8"]["rtf"] > 0 and d["int8"]["test_wer"] >= 0
    text = report(exp).read_text()
    section = text.split("## As deployed", 1)[1].split("## Plots", 1)[0]
    assert all(f"| {name} |" in section for name in results) and "| baseline-seed0 |" not in section
    evaluate(exp)  # a second pass skips every model: the blocks are there
    assert json.loads((exp.dir / "eval" / "mvq-seed0.json").read_text()) == results["mvq-seed0"]
    bad = dict(results["mvq-seed0"], deployed={"fp32": d["fp32"], "int8": {"bytes": 1, "rtf": 0.1}})
    (exp.dir / "eval" / "mvq-seed0.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"mvq-seed0.json: deployed.int8: missing keys \['test_wer'\]"):
        load_results(exp.dir)


def test_evaluate_narrowed_to_a_student_writes_its_results_only(smoke_exp, tmp_path):
    """`evaluate --student mvq` on a copy with no eval/: only mvq-seed0.json is written (no teacher, no other
    student), with the WERs the full evaluate gave (greedy decoding is deterministic); an unknown name is refused by
    name before any decoding, through the CLI too (exit 1)."""
    import shutil

    from speechkd.cli import app
    from speechkd.pipeline import evaluate

    shutil.copytree(smoke_exp.dir, tmp_path / "exp")
    shutil.rmtree(tmp_path / "exp" / "eval")
    recipe = smoke_exp.recipe.model_copy(deep=True)
    recipe.exp_dir = str(tmp_path / "exp")
    exp = Experiment(recipe, progress=False)
    evaluate(exp, only="mvq", seeds=[0])
    assert sorted(p.name for p in (exp.dir / "eval").glob("*.json")) == ["mvq-seed0.json"]
    got = json.loads((exp.dir / "eval" / "mvq-seed0.json").read_text())
    full = json.loads((smoke_exp.dir / "eval" / "mvq-seed0.json").read_text())
    assert (got["dev_wer"], got["test_wer"], got["params"]) == (full["dev_wer"], full["test_wer"], full["params"])
    with pytest.raises(ValueError, match=r"no student named 'nope' in the recipe"):
        evaluate(exp, only="nope")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(json.loads(recipe.model_dump_json())))
    res = CliRunner().invoke(app, ["evaluate", str(path), "--student", "nope", "--no-progress"])
    assert res.exit_code == 1 and "no student named 'nope'" in res.output, res.output


def test_identical_kd_runs_give_identical_weights(smoke_exp, tmp_path):
    """An MVQ-KD and an L1 student trained again from the same recipe and seed (here in this process, first in a
    spawned one) end with the same weights, bit for bit: the KD head is built from the run's seed, not from
    whatever the global generator held."""
    import shutil

    from safetensors.torch import load_file

    from speechkd.pipeline import _train_student

    shutil.copytree(smoke_exp.dir, tmp_path / "exp")
    recipe = smoke_exp.recipe.model_copy(deep=True)
    recipe.exp_dir = str(tmp_path / "exp")
    exp = Experiment(recipe, progress=False)
    for name in ("mvq", "l1"):
        shutil.rmtree(exp.student_dir(name, 0))
        _train_student(exp, name, 0)
        a = load_file(str(smoke_exp.student_dir(name, 0) / "model.safetensors"))
        b = load_file(str(exp.student_dir(name, 0) / "model.safetensors"))
        assert a.keys() == b.keys() and all(__import__("torch").equal(a[k], b[k]) for k in a), name


class _Payload:
    """Unpickling this makes a directory: what a checkpoint handed in by someone else could do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return os.mkdir, (self.marker,)


def test_resume_never_unpickles_a_checkpoint(smoke_exp, tmp_path):
    """A run's ckpt/last.ckpt holding arbitrary pickled objects is refused on resume (torch.load weights_only=True),
    and nothing in it runs."""
    import shutil

    import torch

    from speechkd.pipeline import _train_student

    shutil.copytree(smoke_exp.dir, tmp_path / "exp")
    recipe = smoke_exp.recipe.model_copy(deep=True)
    recipe.exp_dir = str(tmp_path / "exp")
    exp = Experiment(recipe, progress=False)
    run = exp.student_dir("baseline", 0)
    (run / "model.safetensors").unlink()
    marker = tmp_path / "payload-ran"
    torch.save({"state_dict": {}, "x": _Payload(marker)}, run / "ckpt" / "last.ckpt")
    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported global"):
        _train_student(exp, "baseline", 0)
    assert not marker.exists()
