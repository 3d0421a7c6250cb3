"""An ASR recipe whose teacher is a Hugging Face HuBERT (``teacher.hf_dir``): train (directory check only) ->
extract (HF hidden states at 20 ms) -> quantize -> distill an MVQ student -> evaluate / report without a teacher row.

The teacher is a tiny random HuBERT (tests/hf_tiny.py) with the standard 7-layer CNN strides (320 samples = 20 ms
per frame) and ``do_normalize=True`` in its preprocessor_config.json; the data are the smoke recipe's (FSDD smoke
list, 24 training utterances); the student has 8x subsampling (80 ms), so 4 teacher frames per student frame.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from pydantic import ValidationError

transformers = pytest.importorskip("transformers")

from speechkd.config import Recipe  # noqa: E402
from speechkd.pipeline import Experiment, load_audio_16k, make_kd, run_all, train_teacher  # noqa: E402

from hf_tiny import tiny_hf_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CNN_20MS = dict(conv_dim=(32,) * 7, conv_kernel=(10, 3, 3, 3, 3, 2, 2), conv_stride=(5, 2, 2, 2, 2, 2, 2))
LAYER = 1  # output of transformer layer 1 of 2 (not the last: an off-by-one or a "last" default would differ)
MVQ = {"name": "mvq", "kd": {"method": "mvq", "student_layer": 1}}


def _raw_recipe(exp_dir, corpora_dir, hf_dir, students=(MVQ,)) -> dict:
    raw = yaml.safe_load((REPO / "recipes" / "smoke.yaml").read_text())
    raw["exp_dir"] = str(exp_dir)
    raw["data"]["corpora_dir"] = str(corpora_dir)
    raw["teacher"] = {"hf_dir": str(hf_dir), "layer": LAYER}
    raw["students"] = list(students)
    raw["parallel_runs"] = 1
    return raw


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from speechkd.teachers.hf import write_preprocessor_config

    d = tmp_path_factory.mktemp("hubert")
    tiny_hf_model("hubert", seed=3, **CNN_20MS).save_pretrained(d)
    write_preprocessor_config(d, normalize=True)
    return d


@pytest.fixture(scope="module")
def hf_exp(tmp_path_factory, corpora_dir, hf_dir):
    exp_dir = tmp_path_factory.mktemp("hf_asr") / "exp"
    exp = Experiment(Recipe.model_validate(_raw_recipe(exp_dir, corpora_dir, hf_dir)), progress=False)
    run_all(exp)
    return exp


def test_stored_embeddings_equal_transformers_hidden_states(hf_exp, hf_dir):
    from speechkd.data.datamodule import load_cuts
    from speechkd.methods.mvq_kd import EMB_KEY
    from speechkd.labels.store import load_frame_labels

    assert not (hf_exp.teacher_dir / "model.safetensors").exists()  # no transducer was trained
    cuts = load_cuts(hf_exp.emb_cuts_path)
    model = transformers.HubertModel.from_pretrained(str(hf_dir)).eval()
    for cut in list(cuts)[:2]:
        emb = load_frame_labels(cut, EMB_KEY, {"teacher_layer": str(LAYER)})
        assert cut.sampling_rate == 16000
        x = torch.from_numpy(cut.load_audio()[0].astype(np.float32))[None]  # (1, S)
        x = (x - x.mean()) / torch.sqrt(x.var(unbiased=False) + 1e-7)  # do_normalize=True
        with torch.no_grad():
            ref = model(x, output_hidden_states=True).hidden_states[LAYER][0].numpy()  # (T, 32)
        assert emb.dtype == np.float32 and emb.shape == ref.shape == ((x.shape[1] - 400) // 320 + 1, 32)
        np.testing.assert_allclose(emb, ref, rtol=1e-4, atol=1e-5)


def test_labels_at_20ms_and_ci_cuts_train_a_finite_student(hf_exp):
    from speechkd.data.datamodule import AsrDataset, load_cuts, make_loader
    from speechkd.methods.mvq_kd import CI_KEY, EMB_KEY, MvqKD
    from speechkd.models.build import load_model
    from speechkd.labels.store import label_frame_shift

    emb_cuts, ci_cuts = load_cuts(hf_exp.emb_cuts_path), load_cuts(hf_exp.ci_cuts_path)
    assert label_frame_shift(emb_cuts, EMB_KEY) == pytest.approx(0.02)
    assert label_frame_shift(ci_cuts, CI_KEY) == pytest.approx(0.02)
    assert all(c.custom[CI_KEY].frame_shift == pytest.approx(0.02) for c in ci_cuts)

    run = hf_exp.recipe.students[0]
    kd, cuts, init_fn = make_kd(hf_exp, run)
    assert isinstance(kd, MvqKD) and init_fn is None
    assert kd.frame_ratio == 4  # 80 ms student frames / 20 ms teacher frames
    student, _ = load_model(hf_exp.student_dir(run.name, 0))
    assert all(torch.isfinite(p).all() for p in student.parameters())
    ds = AsrDataset(hf_exp.tokenizer, label_keys=kd.label_keys)
    batch = next(iter(make_loader(cuts, ds, 30, shuffle=False)))
    with torch.no_grad():
        enc, lens, layers = student.encode(batch["features"], batch["feature_lens"])
        loss, logs = kd(batch, enc, lens, layers)
    assert torch.isfinite(loss) and float(loss) > 0 and np.isfinite(logs["mvq_ce"])


def test_evaluate_and_report_have_no_teacher_row(hf_exp):
    assert sorted(p.name for p in (hf_exp.dir / "eval").glob("*.json")) == ["mvq-seed0.json"]
    report = (hf_exp.dir / "report.md").read_text()
    assert "| mvq |" in report and "| teacher |" not in report
    assert "no teacher WER" in report and str(hf_exp.recipe.teacher.hf_dir) in report


def test_non_integer_frame_ratio_is_a_clear_error(hf_exp):
    # a 10 ms student (no subsampling) against 20 ms teacher labels: half a teacher frame per student frame
    recipe = hf_exp.recipe.model_copy(update={"student_model": hf_exp.recipe.student_model.model_copy(
        update={"subsampling": 1})})
    exp = Experiment(recipe, progress=False)
    with pytest.raises(ValueError, match=r"10 ms.*whole multiple.*20 ms"):
        make_kd(exp, recipe.students[0])


@pytest.mark.parametrize("kd", [{"method": "codert"}, {"method": "seq"}, {"method": "none", "init_from_teacher": True}])
def test_recipe_refuses_hf_teacher_with_students_that_need_the_transducer(tmp_path, hf_dir, kd):
    raw = _raw_recipe(tmp_path / "exp", tmp_path, hf_dir, students=[MVQ, {"name": "needs-transducer", "kd": kd}])
    with pytest.raises(ValidationError, match=r"teacher\.hf_dir[\s\S]*'needs-transducer'"):
        Recipe.model_validate(raw)
    del raw["teacher"]["hf_dir"]
    Recipe.model_validate(raw)  # the same students with the project's teacher are fine


def test_train_stage_checks_the_hf_directory(tmp_path, hf_dir, corpora_dir):
    import shutil

    exp = Experiment(Recipe.model_validate({**_raw_recipe(tmp_path / "e1", corpora_dir, hf_dir),
                                            "teacher": {"hf_dir": str(hf_dir), "layer": 3}}), progress=False)
    with pytest.raises(ValueError, match=r"teacher\.layer = 3 .* 2 transformer layers"):
        train_teacher(exp)
    bad = tmp_path / "no_weights"
    bad.mkdir()
    shutil.copy(hf_dir / "config.json", bad / "config.json")
    exp = Experiment(Recipe.model_validate(_raw_recipe(tmp_path / "e2", corpora_dir, bad)), progress=False)
    with pytest.raises(FileNotFoundError, match=r"no_weights has no model\.safetensors"):
        train_teacher(exp)


def test_audio_at_another_rate_is_resampled_to_16k(hf_exp):
    cut = next(iter(hf_exp.cuts("train")))
    wav = load_audio_16k(cut.resample(8000))
    assert wav.dtype == np.float32 and wav.shape == (cut.num_samples,)
    assert np.corrcoef(wav, cut.load_audio()[0])[0, 1] > 0.5
