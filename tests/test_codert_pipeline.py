"""The CoDERT chain on the FSDD smoke list: teacher -> baseline / static / tandem / shared students -> evaluate ->
report; what each mode leaves in the training checkpoint (the co-learned teacher, for resuming) and in the
exported student (nothing of the teacher)."""

import json
from pathlib import Path

import pytest
import torch

from speechkd.config import load_recipe
from speechkd.pipeline import Experiment, make_kd, run_all

REPO = Path(__file__).resolve().parents[1]
STUDENTS = ("baseline", "static", "tandem", "shared")


@pytest.fixture(scope="module")
def codert_exp(tmp_path_factory, corpora_dir):
    exp_dir = tmp_path_factory.mktemp("smoke_codert") / "exp"
    recipe = load_recipe(REPO / "recipes" / "smoke_codert.yaml", {"exp_dir": str(exp_dir)})
    recipe.data.corpora_dir = str(corpora_dir)
    exp = Experiment(recipe, progress=False)
    run_all(exp)
    return exp


def _run(exp, name):
    return next(r for r in exp.recipe.students if r.name == name)


def _kd_state(exp, name):
    ckpt = torch.load(exp.student_dir(name, 0) / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    return {k[len("kd."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("kd.")}


def test_chain_evaluates_and_reports_every_student(codert_exp):
    d = codert_exp.dir
    results = {p.stem: json.loads(p.read_text()) for p in (d / "eval").glob("*.json")}
    assert set(results) == {"teacher"} | {f"{s}-seed0" for s in STUDENTS}
    for r in results.values():
        assert 0 <= r["dev_wer"] and 0 <= r["test_wer"] and r["rtf"] > 0 and r["params"] > 0
    for s in ("static", "tandem", "shared"):
        assert results[f"{s}-seed0"]["method"] == "codert"
        assert results[f"{s}-seed0"]["params"] == results["baseline-seed0"]["params"]  # no teacher exported
    report = (d / "report.md").read_text()
    for name in ("teacher",) + STUDENTS:
        assert name in report


def test_checkpoints_hold_the_co_learned_teacher_only(codert_exp):
    assert _kd_state(codert_exp, "static") == {}
    tandem = _kd_state(codert_exp, "tandem")
    assert tandem and all(k.startswith("teacher.") for k in tandem)
    assert any(k.startswith("teacher.joiner.") for k in tandem)
    shared = _kd_state(codert_exp, "shared")
    assert shared and all(k.startswith(("teacher_encoder.", "proj.")) for k in shared)
    assert shared["proj.weight"].shape == (16, 32)  # student dim 16, teacher dim 32
    # the tandem teacher trained: its checkpointed weights moved away from the ones it started from
    fresh, _, _ = make_kd(codert_exp, _run(codert_exp, "tandem"), seed=0)
    start = {f"teacher.{k}": v for k, v in fresh.teacher.state_dict().items()}
    assert set(start) == set(tandem)
    assert any(not torch.equal(start[k], tandem[k]) for k in start)


def test_co_learned_teacher_init_follows_the_seed(codert_exp):
    run = _run(codert_exp, "shared")
    torch.manual_seed(5)
    a = make_kd(codert_exp, run, seed=0)[0].state_dict()
    b = make_kd(codert_exp, run, seed=0)[0].state_dict()
    c = make_kd(codert_exp, run, seed=1)[0].state_dict()
    after = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(torch.rand(3), after)  # make_kd leaves the global random state alone
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same seed builds the same teacher
    assert any(not torch.equal(a[k], c[k]) for k in a)  # another seed another one
    # the student of seed 0 is drawn from torch seed 0 (fit_model): its first layer must not copy the teacher's
    from speechkd.models.build import build_model

    torch.manual_seed(0)
    student = build_model(codert_exp.recipe.student_model_of(run), codert_exp.tokenizer.vocab_size)
    first = student.encoder.embed.conv[0].weight  # (16, 80, 3)
    assert not torch.equal(first, a["teacher_encoder.embed.conv.0.weight"][: first.shape[0]])


def test_teacher_model_dir_copies_a_model_trained_in_another_experiment(codert_exp, tmp_path, corpora_dir):
    import shutil

    from safetensors.torch import load_file

    from speechkd.pipeline import prepare, train_teacher

    def other(name, **teacher):
        recipe = load_recipe(REPO / "recipes" / "smoke_codert.yaml", {"exp_dir": str(tmp_path / name)})
        recipe.data.corpora_dir = str(corpora_dir)
        recipe.teacher = recipe.teacher.model_copy(update=teacher)
        exp = Experiment(recipe, progress=False)
        prepare(exp)
        return exp

    src = codert_exp.dir / "teacher"
    exp = other("a", model_dir=str(src))
    train_teacher(exp)  # copies, trains nothing
    a, b = load_file(str(exp.teacher_dir / "model.safetensors")), load_file(str(src / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    meta = json.loads((exp.teacher_dir / "model.json").read_text())
    assert meta["role"] == "teacher" and meta["source"] == str(src) and not (exp.teacher_dir / "ckpt").exists()
    # another model than teacher.model, or another experiment's tokenizer, is refused and nothing is written
    wrong = other("b", model_dir=str(src), model=codert_exp.recipe.teacher.model.model_copy(update={"dim": 48}))
    with pytest.raises(ValueError, match="differs from teacher.model"):
        train_teacher(wrong)
    fake = tmp_path / "fake_exp" / "students" / "t"
    shutil.copytree(src, fake, ignore=shutil.ignore_patterns("ckpt", "csv*", "tb"))
    (fake.parent.parent / "lang").mkdir()
    from speechkd.data.tokenizer import train_tokenizer

    train_tokenizer(["other words entirely", "zebra quartz"] * 20, fake.parent.parent / "lang" / "tokens.model",
                    vocab_size=20)
    bad = other("c", model_dir=str(fake))
    with pytest.raises(ValueError, match="tokenizer"):
        train_teacher(bad)
    assert not (bad.teacher_dir / "model.safetensors").exists()
