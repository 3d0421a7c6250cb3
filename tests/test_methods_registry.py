"""The KD-method registry: every method is registered with its settings class (the kd: section is validated by the
class of its method), the stages a recipe needs and the methods that need the project's teacher come from the
declarations."""

import typing

import pytest

from pydantic import ValidationError

from speechkd.config import KDSettings, Recipe, RecipeError, kd_settings, load_recipe, needs_project_teacher
from speechkd.methods import LABEL_STAGES, method_names, method_spec, register
from speechkd.pipeline import needed_stages


def test_every_method_is_registered_with_its_settings_class():
    names = method_names()
    assert set(names) == {"none", "mvq", "l1", "l2", "seq", "word", "codert"}
    for name in names:
        spec = method_spec(name)
        assert callable(spec.build) and set(spec.label_stages) <= set(LABEL_STAGES)
        assert issubclass(spec.config, KDSettings)
        assert name in typing.get_args(spec.config.model_fields["method"].annotation)
        assert type(kd_settings(method=name)) is spec.config
    with pytest.raises(ValueError, match="no KD method 'nope'"):
        method_spec("nope")
    with pytest.raises(ValueError, match="registered twice"):
        register("mvq", lambda exp, run, seed: None, method_spec("mvq").config)
    with pytest.raises(ValueError, match="settings class"):
        register("other", lambda exp, run, seed: None, method_spec("mvq").config)  # its method Literal lacks it


def test_kd_section_is_validated_by_its_methods_class(tmp_path):
    r = Recipe.model_validate({"name": "x", "exp_dir": "e", "students": [
        {"name": "a"}, {"name": "b", "kd": {"method": "mvq", "student_layer": 1}},
        {"name": "c", "kd": {"method": "seq", "nbest": 2}}], "pseudo_label": {"beam": 4, "nbest": 4}})
    assert [type(s.kd).__name__ for s in r.students] == ["NoKDConfig", "FrameKDConfig", "SeqKDConfig"]
    assert r.model_dump()["students"][2]["kd"]["nbest"] == 2  # every field of the method's class is dumped
    assert Recipe.model_validate(r.model_dump()).students[2].kd == r.students[2].kd
    with pytest.raises(ValidationError, match=r"nbest"):
        kd_settings(method="mvq", nbest=3)  # a key of another method
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nexp_dir: e\nstudents:\n  - {name: a, kd: {method: mvq, kl_scale: 1.0}}\n")
    with pytest.raises(RecipeError, match=r"students.0.kd.kl_scale"):
        load_recipe(bad)
    bad.write_text("name: x\nexp_dir: e\nstudents:\n  - {name: a, kd: {method: mvqq}}\n")
    with pytest.raises(RecipeError, match=r"no KD method 'mvqq'"):
        load_recipe(bad)
    with pytest.raises(ValidationError, match="pseudo_label.nbest"):
        Recipe.model_validate({"name": "x", "exp_dir": "e", "students": [{"name": "c", "kd": {"method": "seq",
                                                                                              "nbest": 9}}]})


@pytest.mark.parametrize("methods, stages", [
    (["none"], []),
    (["none", "l1"], ["extract"]),
    (["mvq", "l2"], ["extract", "quantize"]),
    (["seq", "mvq"], ["extract", "quantize", "pseudo-label"]),
    (["codert", "none"], []),
])
def test_needed_stages_follow_the_declared_label_stages(methods, stages):
    r = Recipe.model_validate({"name": "x", "exp_dir": "e", "students": [
        {"name": f"s{i}", "kd": {"method": m}} for i, m in enumerate(methods)]})
    assert needed_stages(r) == ["prepare", "teacher", *stages, "distill", "evaluate", "report"]


def test_project_teacher_needs_come_from_the_methods_and_options():
    assert needs_project_teacher(kd_settings(method="mvq")) is None
    assert "seq" in needs_project_teacher(kd_settings(method="seq"))
    assert needs_project_teacher(kd_settings(method="seq"), teacher_has_nbest=True) is None  # e.g. Whisper
    assert "kl_scale" in needs_project_teacher(kd_settings(method="seq", kl_scale=1.0), teacher_has_nbest=True)
    assert "CoDERT" in needs_project_teacher(kd_settings(method="codert"))
    assert "init_from_teacher" in needs_project_teacher(kd_settings(method="none", init_from_teacher=True))


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
