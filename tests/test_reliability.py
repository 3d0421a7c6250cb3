"""What docs/reliability.md guarantees and is not tested elsewhere: the training clock carried over a killed fit,
atomic writes leaving no partial file and giving outputs the umask's permissions, the RNG state round trip."""

import json
import os
import random
import stat
import time
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def test_train_clock_sums_every_fit_of_a_run(tmp_path):
    from speechkd.training import TrainClock

    first = TrainClock(tmp_path, every=0.0)
    first.start()
    time.sleep(0.05)
    first.tick()  # every=0: written at once, as a long fit writes every 30 s
    killed = json.loads((tmp_path / "ckpt" / "clock.json").read_text())["seconds"]
    assert killed >= 0.05
    # the process dies here; the next fit of the run starts from what was written
    second = TrainClock(tmp_path)
    second.start()
    time.sleep(0.05)
    seconds, cpu = second.stop()
    assert seconds >= killed + 0.05 and seconds < killed + 5 and cpu >= 0
    assert json.loads((tmp_path / "ckpt" / "clock.json").read_text()) == {"seconds": seconds, "cpu_seconds": cpu}


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    from speechkd.training import rng_state, set_rng_state

    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    torch.save({"rng": rng_state()}, tmp_path / "c.ckpt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(torch.load(tmp_path / "c.ckpt", weights_only=True)["rng"])  # no pickled numpy objects needed
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_atomic_writes_get_the_umask_permissions_and_leave_nothing_on_failure(tmp_path):
    from speechkd.utils import atomic_dir, atomic_path, write_text_atomic

    old = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "a.txt", "x")
        with atomic_dir(tmp_path / "d") as d:
            (d / "f").write_text("y")
        assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o644  # not mkstemp's 0600
        assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755  # not mkdtemp's 0700
        with pytest.raises(RuntimeError):
            with atomic_path(tmp_path / "b.txt") as tmp:
                tmp.write_text("half")
                raise RuntimeError("stopped")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "d"]  # no b.txt, no temporary file
    finally:
        os.umask(old)


def test_label_files_get_the_umask_permissions(tmp_path):
    from lhotse import CutSet
    from lhotse.testing.dummies import dummy_cut

    from speechkd.labels.store import write_frame_labels

    cuts = CutSet.from_cuts([dummy_cut(0, duration=1.0)])
    old = os.umask(0o022)
    try:
        write_frame_labels(cuts, {cuts[0].id: np.zeros((100, 2), np.uint8)}, tmp_path, "ci", frame_shift=0.01)
    finally:
        os.umask(old)
    (h5,) = tmp_path.glob("*.h5")
    assert stat.S_IMODE(h5.stat().st_mode) == 0o644


# ------------------------------------------------------------------------------------------ experiment lock
def test_experiment_lock_exclusive_shared_and_scopes(tmp_path):
    from speechkd.lock import ExperimentLocked, experiment_lock

    with experiment_lock(tmp_path, command="speechkd run a.yaml"):
        for scope in (None, "distill mvq"):
            with pytest.raises(ExperimentLocked, match=r"in use by pid \d+ on .*`speechkd run a.yaml`"):
                with experiment_lock(tmp_path, scope):
                    pass
    # narrowed commands share the directory, each with its own scope
    with experiment_lock(tmp_path, "distill only mvq", command="speechkd distill --student mvq"):
        with experiment_lock(tmp_path, "distill only l1"):
            pass
        with pytest.raises(ExperimentLocked, match="distill only mvq of experiment .* already running"):
            with experiment_lock(tmp_path, "distill only mvq"):
                pass
        with pytest.raises(ExperimentLocked, match="in use by .*`speechkd distill --student mvq`"):
            with experiment_lock(tmp_path):
                pass
    with experiment_lock(tmp_path):  # all released
        pass


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    import subprocess
    import sys

    from speechkd.lock import ExperimentLocked, experiment_lock

    code = ("import sys, time; from speechkd.lock import experiment_lock\n"
            "with experiment_lock(sys.argv[1], command='holder'):\n    print('held', flush=True); time.sleep(60)")
    p = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "held"
        with pytest.raises(ExperimentLocked, match=f"pid {p.pid} .*`holder`"):
            with experiment_lock(tmp_path):
                pass
    finally:
        p.kill()  # SIGKILL: no clean-up runs
        p.wait()
    with experiment_lock(tmp_path):  # the lock file is still there, the lock is not
        pass


def test_second_run_on_one_directory_is_refused(tmp_path):
    from typer.testing import CliRunner

    from speechkd.cli import app
    from speechkd.lock import experiment_lock

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: r\nexp_dir: {tmp_path / 'exp'}\n")
    with experiment_lock(tmp_path / "exp", command="speechkd run other.yaml"):
        for args in (["run", str(recipe)], ["distill", str(recipe), "--student", "mvq"], ["evaluate", str(recipe)]):
            res = CliRunner().invoke(app, [*args, "--no-progress"])
            assert res.exit_code == 3 and "`speechkd run other.yaml`" in res.output, res.output
    assert not (tmp_path / "exp" / "config.yaml").exists()  # the refused command wrote nothing


def test_ssl_distillation_runs_beside_teacher_fine_tuning(tmp_path):
    """An SSL recipe's `distill` writes only student/: it takes a scoped lock, so `finetune --run teacher-...` can
    hold the directory at the same time; a student run asked for before the student exists is refused clearly."""
    from typer.testing import CliRunner

    from speechkd.cli import app
    from speechkd.lock import experiment_lock

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"task: ssl\nname: r\nexp_dir: {tmp_path / 'exp'}\n")
    asr = tmp_path / "asr.yaml"
    asr.write_text(f"name: a\nexp_dir: {tmp_path / 'exp'}\n")
    with experiment_lock(tmp_path / "exp", "finetune runs teacher-frozen-kws", command="speechkd finetune --run t"):
        res = CliRunner().invoke(app, ["distill", str(recipe), "--no-progress"])
        assert res.exit_code == 1 and "error in stage 'distill'" in res.output, res.output  # no cuts: not the lock
        res = CliRunner().invoke(app, ["distill", str(asr), "--no-progress"])  # an ASR distill writes everything
        assert res.exit_code == 3 and "`speechkd finetune --run t`" in res.output, res.output
    with experiment_lock(tmp_path / "exp", "distill student"):
        res = CliRunner().invoke(app, ["distill", str(recipe), "--no-progress"])
        assert res.exit_code == 3 and "distill student of experiment" in res.output, res.output
    res = CliRunner().invoke(app, ["finetune", str(recipe), "--run", "student-multitask", "--no-progress"])
    assert res.exit_code == 1 and "student-multitask need the distilled student" in res.output, res.output


# ------------------------------------------------------------------------------------------ recipe checks
@pytest.mark.parametrize("extra,words", [
    ({"teacher": {"layer": 3, "model": {"num_layers": 2}}}, ["teacher.layer 3", "2 Conformer blocks", "1..2 or -1"]),
    ({"student_model": {"num_layers": 2}, "students": [{"name": "m", "kd": {"method": "mvq", "student_layer": 4}}]},
     ["students['m'].kd.student_layer 4", "student_model.num_layers", "1..2 or -1"]),
    ({"students": [{"name": "l", "kd": {"method": "l1", "student_layer": 0}}]}, ["students['l'].kd.student_layer 0"]),
    ({"data": {"min_words": 3, "max_words": 2}}, ["data.min_words (3) exceeds data.max_words (2)"]),
    ({"students": [{"name": "b", "seeds": [0, 0]}]}, ["students['b'].seeds [0, 0]", "distinct seeds >= 0"]),
    ({"students": [{"name": "b", "seeds": []}]}, ["students['b'].seeds []"]),
])
def test_recipe_values_are_checked_when_the_recipe_loads(tmp_path, extra, words):
    import yaml

    from speechkd.config import RecipeError, load_recipe

    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"name": "x", "exp_dir": str(tmp_path / "e"), **extra}))
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    assert str(path) in str(e.value) and all(w in str(e.value) for w in words), str(e.value)


def test_corpora_dir_precedence_option_recipe_environment(tmp_path, corpora_dir, monkeypatch):
    """--corpora-dir > the recipe's data.corpora_dir > $SPEECHKD_CORPORA: the environment no longer overrides a
    recipe that names its corpora."""
    import yaml
    from typer.testing import CliRunner

    from speechkd.cli import app

    monkeypatch.setenv("SPEECHKD_CORPORA", str(tmp_path / "elsewhere"))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": "r", "exp_dir": str(tmp_path / "exp"),
                                      "data": {"corpora_dir": str(corpora_dir)}}))
    config = tmp_path / "exp" / "config.yaml"
    CliRunner().invoke(app, ["report", str(recipe), "--no-progress"])  # fails (nothing evaluated) after the config
    assert yaml.safe_load(config.read_text())["data"]["corpora_dir"] == str(corpora_dir)
    CliRunner().invoke(app, ["report", str(recipe), "--corpora-dir", str(tmp_path / "cli"), "--no-progress"])
    assert yaml.safe_load(config.read_text())["data"]["corpora_dir"] == str(tmp_path / "cli")


def test_paths_a_recipe_needs_are_checked_before_any_stage(tmp_path):
    """A recipe naming a teacher directory or manifests that do not exist stops the command at once (exit 2),
    naming the recipe file, each key and path; nothing is written."""
    import yaml
    from typer.testing import CliRunner

    from speechkd.cli import app

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "r", "exp_dir": str(tmp_path / "exp"), "teacher": {"whisper_dir": str(tmp_path / "no-whisper")},
        "data": {"source": "lhotse", "train": str(tmp_path / "train.jsonl.gz"), "dev": str(recipe),
                 "test": {"recordings": str(recipe), "supervisions": str(tmp_path / "sups.jsonl.gz")}}}))
    res = CliRunner().invoke(app, ["run", str(recipe), "--no-progress"])
    assert res.exit_code == 2, res.output
    for words in (str(recipe), f"teacher.whisper_dir: {tmp_path / 'no-whisper'} does not exist",
                  f"data.train: {tmp_path / 'train.jsonl.gz'}", "data.test.supervisions", "import-whisper"):
        assert words in res.output, res.output
    assert "data.dev" not in res.output and "data.test.recordings" not in res.output  # those exist
    assert not (tmp_path / "exp").exists()


def test_teacher_model_dir_is_needed_by_the_teacher_stage_only(tmp_path):
    """``teacher.model_dir`` is checked for ``run`` and the teacher stage until the copy exists; ``prepare`` and
    student runs that do not need the teacher go ahead before the model it names is trained. The ASR teacher stage
    holds its own lock scope (it writes teacher/ only), and so does pseudo-label (labels/nbest/); the SSL teacher
    stage holds the whole experiment."""
    from speechkd.cli import _lock_scope
    from speechkd.config import load_recipe, missing_paths

    src = tmp_path / "other" / "students" / "big-seed0"
    recipe = load_recipe(REPO / "recipes" / "smoke_codert.yaml", {"exp_dir": str(tmp_path / "exp")})
    recipe.teacher = recipe.teacher.model_copy(update={"model_dir": str(src)})
    want = [("teacher.model_dir", str(src))]
    assert missing_paths(recipe) == want and missing_paths(recipe, "teacher") == want
    assert missing_paths(recipe, "prepare") == [] and missing_paths(recipe, "distill") == []
    (tmp_path / "exp" / "teacher").mkdir(parents=True)
    (tmp_path / "exp" / "teacher" / "model.safetensors").write_bytes(b"")
    assert missing_paths(recipe) == [] and missing_paths(recipe, "teacher") == []  # copied: the source may go

    assert _lock_scope("teacher", recipe, {}) == "teacher"
    assert _lock_scope("distill", recipe, {}) is None
    assert _lock_scope("pseudo-label", recipe, {}) == "pseudo-label"
    assert _lock_scope("pseudo-label", recipe, {"shard": "1/2"}) == "pseudo-label shard 1/2"
    assert _lock_scope("distill", recipe, {"only": "baseline", "seeds": [0, 2]}) == "distill only baseline seeds 0,2"
    assert _lock_scope("evaluate", recipe, {"only": "baseline"}) == "evaluate only baseline"  # eval/ files of its own
    assert _lock_scope("evaluate", recipe, {}) is None
    ssl = load_recipe(REPO / "recipes" / "smoke_ssl.yaml", {"exp_dir": str(tmp_path / "ssl")})
    assert _lock_scope("teacher", ssl, {}) is None and _lock_scope("distill", ssl, {}) == "distill student"
