"""Tests for speechkd.report on a small fake experiment directory."""

import json

import numpy as np
import pytest
from matplotlib.image import imread

from speechkd import report as R

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

TEACHER_PARAMS, STUDENT_PARAMS = 40_000_000, 10_000_000
F32_BYTES, CI_BYTES = 64_000_000, 1_000_000
BASE_TEST, BASE_DEV = [20.0, 22.0, 21.5], [18.0, 19.0, 18.4]
MVQ_TEST, MVQ_DEV = [18.0, 17.5, 19.0], [16.0, 15.5, 16.9]


def _result(name, group, role, method, seed, params, dev, test, kind="none", lbytes=None, **kw):
    return dict(name=name, group=group, role=role, method=method, seed=seed, params=params,
                dev_wer=dev, test_wer=test, rtf=0.05 if role != "teacher" else 0.2,
                label_kind=kind, label_bytes=lbytes, train_seconds=3600.0, **kw)


def _csv(path, epochs=3, start=5.0, wer=50.0):
    """A Lightning CSVLogger-like file: train rows and val rows are separate."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["epoch,step,train_loss,val_loss,val_wer"]
    step = 0
    for ep in range(epochs):
        for _ in range(2):
            lines.append(f"{ep},{step},{start / (ep + 1) + 0.1 * step:.4f},,")
            step += 1
        lines.append(f"{ep},{step - 1},,{start / (ep + 1):.3f},{wer - 10 * ep:.2f}")
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture
def exp(tmp_path):
    e = tmp_path / "exp1"
    ev = e / "eval"
    ev.mkdir(parents=True)
    res = [_result("teacher", "teacher", "teacher", "none", 0, TEACHER_PARAMS, 8.0, 10.0)]
    for i, (d, t) in enumerate(zip(BASE_DEV, BASE_TEST)):
        res.append(_result(f"baseline-seed{i}", "baseline", "baseline", "none", i,
                           STUDENT_PARAMS, d, t))
    for i, (d, t) in enumerate(zip(MVQ_DEV, MVQ_TEST)):
        res.append(_result(f"student-mvq-seed{i}", "student-mvq", "distilled", "mvq", i,
                           STUDENT_PARAMS, d, t, kind="ci", lbytes=CI_BYTES))
    res.append(_result("student-l1-seed0", "student-l1", "distilled", "l1", 0, STUDENT_PARAMS,
                       17.0, 19.5, kind="float32", lbytes=F32_BYTES, notes="one seed | only"))
    for r in res:
        (ev / f"{r['name']}.json").write_text(json.dumps(r))
    _csv(e / "teacher" / "metrics.csv", wer=30.0)
    for r in res[1:7]:
        _csv(e / "students" / r["name"] / "metrics.csv", start=r["test_wer"] / 5,
             wer=45.0 + 2 * r["test_wer"] / 10)
    # Lightning's default layout, one level down; and l1 has no CSV at all
    (e / "students" / "baseline-seed2" / "metrics.csv").rename(
        _mk(e / "students" / "baseline-seed2" / "lightning_logs" / "version_0") / "metrics.csv")
    return e


def _mk(d):
    d.mkdir(parents=True)
    return d


def _row(rows, group):
    return next(r for r in rows if r["group"] == group)


def test_load_results_and_aggregate(exp):
    results = R.load_results(exp)
    assert len(results) == 8
    rows = R.aggregate(results)
    # role order, then first appearance (files are read sorted by name)
    assert [r["group"] for r in rows] == ["teacher", "baseline", "student-l1", "student-mvq"]

    base, mvq = _row(rows, "baseline"), _row(rows, "student-mvq")
    for row, test, dev in ((base, BASE_TEST, BASE_DEV), (mvq, MVQ_TEST, MVQ_DEV)):
        assert row["n"] == 3
        assert row["test_wer_mean"] == pytest.approx(np.mean(test))
        assert row["test_wer_std"] == pytest.approx(np.std(test, ddof=1))
        assert row["dev_wer_mean"] == pytest.approx(np.mean(dev))
        assert row["dev_wer_std"] == pytest.approx(np.std(dev, ddof=1))
    l1 = _row(rows, "student-l1")
    assert (l1["n"], l1["test_wer_std"], l1["dev_wer_std"]) == (1, 0.0, 0.0)

    # relative reduction vs baseline: (21.1667 - 18.1667) / 21.1667 * 100 = 14.17 %
    assert mvq["rel_test_wer_reduction"] == pytest.approx((63.5 / 3 - 54.5 / 3) / (63.5 / 3) * 100)
    assert mvq["rel_test_wer_reduction"] == pytest.approx(14.173, abs=1e-3)
    assert mvq["rel_dev_wer_reduction"] == pytest.approx(
        (np.mean(BASE_DEV) - np.mean(MVQ_DEV)) / np.mean(BASE_DEV) * 100)
    assert base["rel_test_wer_reduction"] == 0.0
    assert l1["rel_test_wer_reduction"] == pytest.approx((63.5 / 3 - 19.5) / (63.5 / 3) * 100)

    assert mvq["storage_ratio"] == pytest.approx(64.0)
    assert l1["storage_ratio"] is None and base["storage_ratio"] is None
    assert mvq["label_bytes"] == CI_BYTES and base["label_bytes"] is None
    assert mvq["params_ratio"] == pytest.approx(0.25)
    assert _row(rows, "teacher")["params_ratio"] == 1.0
    assert mvq["rtf_mean"] == pytest.approx(0.05)


def test_aggregate_rejects_inconsistent_groups():
    a = _result("a", "g", "distilled", "mvq", 0, 10, 1.0, 1.0)
    with pytest.raises(ValueError, match="'g'.*method"):
        R.aggregate([a, {**a, "name": "b", "seed": 1, "method": "l1"}])
    with pytest.raises(ValueError, match="repeated seed"):
        R.aggregate([a, {**a, "name": "b"}])
    with pytest.raises(ValueError, match="baseline"):
        R.aggregate([{**a, "role": "baseline"}, {**a, "group": "h", "role": "baseline"}])


def test_write_report(exp):
    path = R.write_report(exp, title="KD test run")
    assert path == exp / "report.md"
    text = path.read_text()
    lines = text.splitlines()
    summary = lines[: lines.index("## Individual runs")]
    assert lines[0] == "# KD test run"
    assert any("exp1" in ln for ln in lines[1:4])

    def table_row(group):
        rows = [ln for ln in summary if ln.startswith(f"| {group} |")]
        assert len(rows) == 1, group
        return [c.strip() for c in rows[0].strip("|").split(" | ")]

    mvq = table_row("student-mvq")
    assert mvq[:5] == ["student-mvq", "distilled", "mvq", "10.00", "0.250"]
    exp_test = f"{np.mean(MVQ_TEST):.2f} ± {np.std(MVQ_TEST, ddof=1):.2f} (3)"
    assert mvq[6] == exp_test == "18.17 ± 0.76 (3)"
    assert mvq[7] == "+14.2"
    assert mvq[10:] == ["ci", "977 KiB"]
    l1 = table_row("student-l1")
    assert l1[6] == "19.50 ± - (1)" and l1[11] == "61 MiB"
    assert table_row("teacher")[3] == "40.00"
    assert table_row("baseline")[7] == "(reference)"

    assert "is below the baseline student's 21.17%" in text
    assert "nothing to pass on" not in text
    assert "64.0× smaller" in text
    assert "one seed \\| only" in text  # notes are escaped for the markdown table
    assert "no metrics.csv for student-l1-seed0" in text

    for name in ("training_curves.png", "wer_vs_label_bytes.png"):
        png = exp / "plots" / name
        assert f"](plots/{name})" in text
        assert png.read_bytes()[:8] == PNG_MAGIC
        img = imread(png)
        assert img.ndim == 3 and img.shape[0] > 300 and img.shape[1] > 500
        assert img[..., :3].std() > 0.05  # not a blank canvas
    leftovers = [p.name for p in exp.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []


def test_report_warns_when_teacher_not_better(exp):
    f = exp / "eval" / "teacher.json"
    res = json.loads(f.read_text())
    res["test_wer"] = 25.0
    f.write_text(json.dumps(res))
    text = R.write_report(exp).read_text()
    assert text.startswith("# Experiment report: exp1\n")
    assert "WARNING" in text and "distillation has nothing to pass on" in text


def test_malformed_json_names_file(exp):
    bad = exp / "eval" / "zz-bad.json"
    bad.write_text('{"name": "x", ')
    with pytest.raises(ValueError, match="zz-bad.json.*malformed"):
        R.load_results(exp)
    bad.write_text(json.dumps({"name": "x", "group": "x"}))
    with pytest.raises(ValueError, match=r"zz-bad\.json: missing keys \['role'"):
        R.load_results(exp)
    good = json.loads((exp / "eval" / "teacher.json").read_text())
    bad.write_text(json.dumps({**good, "name": "y", "role": "student"}))
    with pytest.raises(ValueError, match="zz-bad.json: role"):
        R.load_results(exp)
    bad.write_text(json.dumps({**good, "name": "y", "test_wer": "12%"}))
    with pytest.raises(ValueError, match="zz-bad.json: key 'test_wer'"):
        R.write_report(exp)
    assert not (exp / "report.md").exists()


def test_report_with_minimal_data(tmp_path):
    """One model, no teacher/baseline, no labels, no CSVs: the report still comes out."""
    (tmp_path / "eval").mkdir()
    r = _result("solo", "solo", "distilled", "mvq", 0, 5, 3.0, 4.0)
    r["rtf"] = r["train_seconds"] = None
    (tmp_path / "eval" / "solo.json").write_text(json.dumps(r))
    text = R.write_report(tmp_path).read_text()
    assert "cannot compare, no teacher and baseline results" in text
    assert "Label storage ratio: n/a" in text
    assert "no metrics.csv for solo" in text
    row = next(ln for ln in text.splitlines() if ln.startswith("| solo | distilled |"))
    cells = [c.strip() for c in row.strip("|").split(" | ")]
    assert cells[4:8] == ["-", "3.00 ± - (1)", "4.00 ± - (1)", "-"]
    for name in ("training_curves.png", "wer_vs_label_bytes.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:8] == PNG_MAGIC


def test_load_results_missing_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="eval"):
        R.load_results(tmp_path)
    (tmp_path / "eval").mkdir()
    with pytest.raises(ValueError, match="no result files"):
        R.load_results(tmp_path)


def test_storage_ratio_from_float32_bytes_beside_ci(tmp_path):
    import json as _json

    from speechkd.report import write_report

    (tmp_path / "eval").mkdir()
    base = {"params": 100, "rtf": 0.01, "train_seconds": 1.0, "label_bytes": None, "label_kind": "none", "seed": 0}
    rows = [
        dict(base, name="teacher", group="teacher", role="teacher", method="none", params=900, dev_wer=10.0, test_wer=11.0),
        dict(base, name="baseline-seed0", group="baseline", role="baseline", method="none", dev_wer=30.0, test_wer=31.0),
        dict(base, name="mvq-seed0", group="mvq", role="distilled", method="mvq", dev_wer=20.0, test_wer=21.0,
             label_kind="ci", label_bytes=1000, float32_label_bytes=40000),
    ]
    for r in rows:
        (tmp_path / "eval" / f"{r['name']}.json").write_text(_json.dumps(r))
    text = write_report(tmp_path).read_text()
    assert "40.0× smaller" in text


def test_students_of_several_sizes_compare_with_their_own_baseline(tmp_path):
    """Two sizes: each KD row is compared with the baseline of its size; the size table and plot appear."""
    (tmp_path / "eval").mkdir()
    rows = [
        _result("teacher", "teacher", "teacher", "none", 0, 1000, 10.0, 10.0),
        _result("base-big-seed0", "base-big", "baseline", "none", 0, 500, 11.0, 11.0),
        _result("seq-big-seed0", "seq-big", "distilled", "seq", 0, 500, 10.5, 10.5, kind="nbest", lbytes=100),
        _result("base-small-seed0", "base-small", "baseline", "none", 0, 100, 20.0, 20.0),
        _result("seq-small-seed0", "seq-small", "distilled", "seq", 0, 100, 15.0, 15.0, kind="nbest", lbytes=100),
    ]
    for r in rows:
        (tmp_path / "eval" / f"{r['name']}.json").write_text(json.dumps(r))
    agg = {r["group"]: r for r in R.aggregate(R.load_results(tmp_path))}
    assert agg["seq-small"]["baseline"] == "base-small" and agg["seq-big"]["baseline"] == "base-big"
    assert agg["seq-small"]["rel_test_wer_reduction"] == pytest.approx(25.0)  # (20 - 15) / 20
    assert agg["seq-big"]["rel_test_wer_reduction"] == pytest.approx(100 * 0.5 / 11)
    assert agg["seq-small"]["param_reduction"] == pytest.approx(10.0)
    assert agg["seq-small"]["rel_test_wer_increase"] == pytest.approx(50.0)  # (15 - 10) / 10
    text = R.write_report(tmp_path).read_text()
    assert "## Size against accuracy" in text and "+50.0" in text
    assert (tmp_path / "plots" / "wer_vs_params.png").read_bytes()[:8] == PNG_MAGIC
    # two baselines of one size are ambiguous
    (tmp_path / "eval" / "x.json").write_text(json.dumps(
        _result("x", "base-small-2", "baseline", "none", 0, 100, 20.0, 20.0)))
    with pytest.raises(ValueError, match="per size"):
        R.aggregate(R.load_results(tmp_path))


def test_report_gives_the_test_sets_sampling_error(exp):
    from speechkd.eval.metrics import bootstrap_wer_interval, write_wer_details

    rng = np.random.default_rng(0)
    refs = [" ".join(rng.choice(["yes", "no", "up", "down"], size=3)) for _ in range(60)]
    ids = [f"u{i}" for i in range(60)]

    def hyps(p):  # drop each reference's first word with probability p
        return [r.split(" ", 1)[1] if rng.random() < p else r for r in refs]

    for name, p in [("baseline-seed0", 0.5), ("baseline-seed1", 0.5), ("baseline-seed2", 0.5),
                    ("student-mvq-seed0", 0.2), ("student-mvq-seed1", 0.2), ("student-mvq-seed2", 0.2)]:
        write_wer_details(exp / "eval" / f"{name}-test-errs.txt", ids, refs, hyps(p))
    text = open(R.write_report(exp)).read()
    section = text.split("### Sampling error of the test set")[1].split("## Findings")[0]
    mvq = next(line for line in section.splitlines() if line.startswith("| student-mvq |"))
    base = next(line for line in section.splitlines() if line.startswith("| baseline |"))
    assert "vs baseline" in mvq and "| 3 | 60 |" in mvq and "| - |" in base
    # the printed interval is the paired bootstrap of the two groups' error counts
    from speechkd.eval.metrics import read_wer_details

    err = lambda g: np.array([[e for e, _ in read_wer_details(exp / "eval" / f"{g}-seed{i}-test-errs.txt").values()]
                              for i in range(3)])
    lo, hi = bootstrap_wer_interval(err("student-mvq"), np.full(60, 3), baseline_errors=err("baseline"))
    assert f"[{lo:+.2f}, {hi:+.2f}]" in mvq and hi < 0  # clearly better than the baseline


def test_individual_runs_show_the_dev_curves_plateau(tmp_path):
    e = tmp_path / "e"
    (e / "eval").mkdir(parents=True)
    wers = [90, 60, 40, 30, 25, 22, 21, 20.5, 20.2, 20.1]
    lines = ["epoch,step,train_loss,val_wer"] + [f"{i},{i * 10},1.0,{w}" for i, w in enumerate(wers)]
    (e / "students" / "b-seed0").mkdir(parents=True)
    (e / "students" / "b-seed0" / "metrics.csv").write_text("\n".join(lines) + "\n")
    (e / "eval" / "b-seed0.json").write_text(json.dumps(_result("b-seed0", "b", "baseline", "none", 0, 10, 20.1, 21)))
    row = next(l for l in open(R.write_report(e)).read().splitlines() if l.startswith("| b-seed0 |"))
    assert "| 10 | 20.10 (10) | -4.90 |" in row  # 10 epochs, best at the last, 20.1 - 25.0 (epoch 10 vs 5)


def test_ssl_loss_plateau_table_gives_the_last_two_quarters_means(tmp_path):
    """The SSL report's "Have the losses flattened?" rows: means of the logged losses over the third and the last
    quarter of a fit, checked against the numbers written."""
    from speechkd.report import _ssl_loss_plateau_table

    (tmp_path / "student").mkdir()
    (tmp_path / "finetune" / "teacher-multitask").mkdir(parents=True)
    (tmp_path / "finetune" / "teacher-multitask.fit").mkdir()  # checkpoints: not a run
    loss = np.r_[np.full(20, 3.0), np.full(10, 2.0), np.full(10, 1.0)]  # 40 logs: quarters of 10
    rows = ["step,loss,lr"] + [f"{10 * (i + 1)},{v},0.1" for i, v in enumerate(loss)]
    (tmp_path / "student" / "metrics.csv").write_text("\n".join(rows) + "\n")
    rows = ["step,kws_loss,sv_loss"] + [f"{10 * (i + 1)},0.5,{8.0 if i < 30 else 8.4}" for i in range(40)]
    (tmp_path / "finetune" / "teacher-multitask" / "metrics.csv").write_text("\n".join(rows) + "\n")
    table = "\n".join(_ssl_loss_plateau_table(tmp_path))
    assert "| distillation | loss | 400 | 210-300: 2.0000 | 310-400: 1.0000 | -50.0% |" in table
    assert "| teacher-multitask | kws_loss | 400 | 210-300: 0.5000 | 310-400: 0.5000 | +0.0% |" in table
    assert "| teacher-multitask | sv_loss | 400 | 210-300: 8.0000 | 310-400: 8.4000 | +5.0% |" in table
    assert "teacher-multitask.fit" not in table
    assert _ssl_loss_plateau_table(tmp_path / "nothing") == []
