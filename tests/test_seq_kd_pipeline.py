"""The sequence-level KD chain on the FSDD smoke list: AED teacher -> pseudo-label -> students -> report; the
pseudo-label files' round trip, resume after a stop, and shard merge equal to a single run."""

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from speechkd.config import load_recipe
from speechkd.labels.stages import pseudo_label_meta as _pseudo_label_meta
from speechkd.pipeline import Experiment, run_all

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def seq_exp(tmp_path_factory, corpora_dir):
    exp_dir = tmp_path_factory.mktemp("smoke_seqkd") / "exp"
    recipe = load_recipe(REPO / "recipes" / "smoke_seqkd.yaml", {"exp_dir": str(exp_dir)})
    recipe.data.corpora_dir = str(corpora_dir)
    exp = Experiment(recipe, progress=False)
    run_all(exp)
    return exp


def test_chain_writes_report_with_every_student(seq_exp):
    d = seq_exp.dir
    results = {p.stem: json.loads(p.read_text()) for p in (d / "eval").glob("*.json")}
    assert set(results) == {"teacher", "baseline-seed0", "seq-seed0", "word-seed0", "seq-init-seed0", "rnnt-seq-seed0"}
    for r in results.values():
        assert 0 <= r["dev_wer"] and r["rtf"] > 0 and r["params"] > 0
    assert results["seq-seed0"]["label_kind"] == "nbest" and results["seq-seed0"]["label_bytes"] > 0
    assert results["teacher"]["params"] > results["baseline-seed0"]["params"]
    meta = json.loads((d / "students" / "rnnt-seq-seed0" / "model.json").read_text())
    assert meta["model"]["arch"] == "transducer" and meta["method"] == "seq"
    report = (d / "report.md").read_text()
    for name in ("teacher", "baseline", "seq", "word", "seq-init", "rnnt-seq"):
        assert name in report


def test_nbest_labels_on_every_cut_sorted_and_bounded(seq_exp):
    from speechkd.data.datamodule import load_cuts

    cuts = load_cuts(seq_exp.nbest_cuts_path)
    assert len(cuts) == len(seq_exp.cuts("train"))
    for c in cuts:
        hyps = c.custom["nbest"]
        assert 1 <= len(hyps) <= seq_exp.recipe.pseudo_label.nbest
        scores = [h["score"] for h in hyps]
        assert scores == sorted(scores, reverse=True) and all(s <= 1e-6 for s in scores)
        for h in hyps:
            assert h["text"] == seq_exp.tokenizer.decode([h["tokens"]])[0]
    meta = json.loads((seq_exp.nbest_dir / "meta.json").read_text())
    assert meta["ctc_weight"] == seq_exp.recipe.pseudo_label.ctc_weight == 0.3  # joint CTC/attention labels
    assert json.loads((seq_exp.dir / "eval" / "teacher.json").read_text())["decoding_settings"] == {
        "decoding": "beam", "beam": 2, "ctc_weight": 0.3}


def _records(path):
    from speechkd.labels.nbest import read_parts

    return read_parts(path)


def _same(a, b):
    assert set(a) == set(b)
    for cid in a:
        assert [h["tokens"] for h in a[cid]] == [h["tokens"] for h in b[cid]], cid
        assert [h["score"] for h in a[cid]] == pytest.approx([h["score"] for h in b[cid]], abs=1e-4), cid


def test_shards_merge_to_the_single_run_and_resume_after_a_stop(seq_exp, tmp_path):
    from speechkd.labels.nbest import merge_pseudo_labels, write_pseudo_labels
    from speechkd.models.build import load_model

    model, _ = load_model(seq_exp.teacher_dir)
    cuts = seq_exp.cuts("train")
    meta = _pseudo_label_meta(seq_exp)
    kw = dict(beam=4, nbest=4, chunk_cuts=5, progress=False, ctc_weight=seq_exp.recipe.pseudo_label.ctc_weight)
    single = tmp_path / "single"
    assert write_pseudo_labels(model, cuts, seq_exp.tokenizer, single, meta, **kw) == len(cuts)
    sharded = tmp_path / "sharded"
    n0 = write_pseudo_labels(model, cuts, seq_exp.tokenizer, sharded, meta, shard=(0, 2), **kw)
    labelled, missing = merge_pseudo_labels(cuts, sharded, meta)
    assert labelled is None and len(missing) == len(cuts) - n0  # not merged before every shard ran
    n1 = write_pseudo_labels(model, cuts, seq_exp.tokenizer, sharded, meta, shard=(1, 2), **kw)
    assert n0 + n1 == len(cuts)
    _same(_records(single), _records(sharded))
    _same(_records(single), _records(seq_exp.nbest_dir))  # the pipeline's own run (other batching)
    # a stop: one part lost -> a re-run decodes exactly its cuts and nothing else
    parts = sorted(single.glob("part-*.jsonl.gz"))
    lost = len(_records_of(parts[1]))
    parts[1].unlink()
    assert write_pseudo_labels(model, cuts, seq_exp.tokenizer, single, meta, **kw) == lost
    _same(_records(single), _records(sharded))
    labelled, missing = merge_pseudo_labels(cuts, single, meta)
    assert not missing and [c.id for c in labelled] == [c.id for c in cuts]
    # labels of another teacher or other settings are refused
    with pytest.raises(ValueError, match="delete"):
        write_pseudo_labels(model, cuts, seq_exp.tokenizer, single, {**meta, "beam": 2}, **{**kw, "beam": 2, "nbest": 2})


def _records_of(part):
    import gzip

    with gzip.open(part, "rt") as f:
        return [json.loads(line) for line in f]


def test_malformed_part_names_file_and_line(tmp_path):
    import gzip

    from speechkd.labels.nbest import read_parts

    with gzip.open(tmp_path / "part-00000000.jsonl.gz", "wt") as f:
        f.write('{"id": "a", "hyps": []}\n{"oops": 1}\n')
    with pytest.raises(ValueError, match=r"part-00000000.jsonl.gz:2"):
        read_parts(tmp_path)


def test_cli_pseudo_label_bad_shard_and_distill_refuses_foreign_labels(seq_exp, tmp_path):
    from speechkd.cli import app

    exp = tmp_path / "exp"
    shutil.copytree(seq_exp.dir, exp)
    args = ["--exp-dir", str(exp), "--corpora-dir", seq_exp.recipe.data.corpora_dir, "--no-progress"]
    (exp / "labels" / "cuts_train_nbest.jsonl.gz").unlink()
    res = CliRunner().invoke(app, ["pseudo-label", str(REPO / "recipes" / "smoke_seqkd.yaml"), "--shard", "3/2", *args])
    assert res.exit_code == 1 and "0 <= i < n" in res.output
    # merged labels whose meta.json names another teacher are refused by distill
    meta = json.loads((exp / "labels" / "nbest" / "meta.json").read_text())
    res = CliRunner().invoke(app, ["pseudo-label", str(REPO / "recipes" / "smoke_seqkd.yaml"), *args])
    assert res.exit_code == 0, res.output
    (exp / "labels" / "nbest" / "meta.json").write_text(json.dumps({**meta, "teacher_id": "0" * 16}))
    shutil.rmtree(exp / "students" / "seq-seed0")
    res = CliRunner().invoke(app, ["distill", str(REPO / "recipes" / "smoke_seqkd.yaml"), "--student", "seq", *args])
    assert res.exit_code == 1 and "another teacher" in res.output
