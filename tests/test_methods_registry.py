"""The KD-method registry: every kd.method of the recipe schema is registered, the stages a recipe needs and the
methods that need the project's teacher come from the declarations."""

import typing

import pytest

from speechkd.config import KDConfig, Recipe, needs_project_teacher
from speechkd.methods import LABEL_STAGES, method_spec, register
from speechkd.pipeline import needed_stages


def test_every_schema_method_is_registered():
    names = typing.get_args(KDConfig.model_fields["method"].annotation)
    assert set(names) == {"none", "mvq", "l1", "l2", "seq", "word", "codert"}
    for name in names:
        spec = method_spec(name)
        assert callable(spec.build) and set(spec.label_stages) <= set(LABEL_STAGES)
    with pytest.raises(ValueError, match="no KD method 'nope'"):
        method_spec("nope")
    with pytest.raises(ValueError, match="registered twice"):
        register("mvq", lambda exp, run, seed: None)


@pytest.mark.parametrize("methods, stages", [
    (["none"], []),
    (["none", "l1"], ["extract"]),
    (["mvq", "l2"], ["extract", "quantize"]),
    (["seq", "mvq"], ["extract", "quantize", "pseudo-label"]),
    (["codert", "none"], []),
])
def test_needed_stages_follow_the_declared_label_stages(methods, stages):
    r = Recipe.model_validate({"name": "x", "exp_dir": "e", "students": [
        {"name": f"s{i}", "kd": {"method": m, "student_layer": 1}} for i, m in enumerate(methods)]})
    assert needed_stages(r) == ["prepare", "teacher", *stages, "distill", "evaluate", "report"]


def test_project_teacher_needs_come_from_the_methods_and_options():
    assert needs_project_teacher(KDConfig(method="mvq")) is None
    assert "seq" in needs_project_teacher(KDConfig(method="seq"))
    assert "CoDERT" in needs_project_teacher(KDConfig(method="codert"))
    assert "kl_scale" in needs_project_teacher(KDConfig(method="mvq", kl_scale=1.0))
    assert "init_from_teacher" in needs_project_teacher(KDConfig(method="none", init_from_teacher=True))


def test_teacher_kind_comes_from_the_recipe(tmp_path):
    from speechkd.pipeline import Experiment
    from speechkd.teachers.hf_ssl import HfSslTeacher
    from speechkd.teachers.project import ProjectTeacher

    project = Experiment(Recipe.model_validate({"name": "x", "exp_dir": str(tmp_path / "a")}), progress=False)
    assert isinstance(project.teacher, ProjectTeacher) and project.teacher.can_decode
    assert project.teacher_frame_shift() == 0.01 * project.recipe.teacher.model.subsampling
    hf = Experiment(Recipe.model_validate({"name": "x", "exp_dir": str(tmp_path / "b"),
                                           "teacher": {"hf_dir": str(tmp_path / "hub"), "layer": 1}}), progress=False)
    assert isinstance(hf.teacher, HfSslTeacher) and not hf.teacher.can_decode
    assert "no ASR head" in hf.teacher.report_note()
    with pytest.raises((FileNotFoundError, NotADirectoryError, ValueError), match="hub"):
        hf.teacher.prepare()  # no such directory: the teacher stage names it
