"""Sharded labelling: extract (float embeddings), quantize (CI) and pseudo-label (N-best) written as 2 shards and
merged equal the unsharded labels bit for bit; a rerun redoes only missing parts; foreign parts are refused."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import REPO


@pytest.fixture(scope="module")
def exp(tmp_path_factory, corpora_dir):
    from speechkd.config import load_recipe
    from speechkd.pipeline import Experiment, prepare, train_teacher

    d = tmp_path_factory.mktemp("shards") / "exp"
    r = load_recipe(REPO / "recipes" / "smoke.yaml", {"exp_dir": str(d)})
    r.data.corpora_dir = str(corpora_dir)
    r.teacher.train.epochs = 1
    r.pseudo_label.chunk_cuts = 5  # 24 cuts -> 5 chunks
    r.pseudo_label.beam = r.pseudo_label.nbest = 2
    e = Experiment(r, progress=False)
    prepare(e)
    train_teacher(e)
    e.write_config()  # config.yaml: the recipe the CLI reads
    return e


def _frame_labels(path, key):
    from speechkd.data.datamodule import load_cuts
    from speechkd.labels.store import load_frame_labels

    cuts = load_cuts(path)
    return [c.id for c in cuts], {c.id: load_frame_labels(c, key) for c in cuts}


def _same(a, b):
    ids_a, arr_a = a
    ids_b, arr_b = b
    assert ids_a == ids_b  # the merged manifest keeps the cuts' order
    for i in ids_a:
        assert arr_a[i].dtype == arr_b[i].dtype and np.array_equal(arr_a[i], arr_b[i]), i


def test_two_shards_equal_one_bit_for_bit(exp):
    from speechkd.labels.stages import extract, quantize
    from speechkd.methods.mvq_kd import CI_KEY, EMB_KEY

    labels = exp.dir / "labels"
    extract(exp, batch_seconds=4.0)  # small batches: several per shard
    quantize(exp, group_frames=100)  # 808 frames: 8 groups
    emb1, ci1 = _frame_labels(exp.emb_cuts_path, EMB_KEY), _frame_labels(exp.ci_cuts_path, CI_KEY)
    quantizer = load_file(str(labels / "quantizer.safetensors"))
    shutil.rmtree(labels)

    extract(exp, shard="0/2", batch_seconds=4.0)
    assert not exp.emb_cuts_path.exists()  # shard 1 is missing: nothing merged yet
    extract(exp, shard="1/2", batch_seconds=4.0)  # the last shard merges
    _same(emb1, _frame_labels(exp.emb_cuts_path, EMB_KEY))
    assert sorted(p.name for p in labels.glob("teacher_embeddings*.h5")) == [
        "teacher_embeddings.part-0-of-2.h5", "teacher_embeddings.part-1-of-2.h5"]

    quantize(exp, shard="1/2", group_frames=100)  # no stored quantizer: this shard trains the same one (same frames, same seed)
    again = load_file(str(labels / "quantizer.safetensors"))
    assert again.keys() == quantizer.keys() and all(torch.equal(again[k], quantizer[k]) for k in quantizer)
    assert not exp.ci_cuts_path.exists()
    quantize(exp, shard="0/2", group_frames=100)
    _same(ci1, _frame_labels(exp.ci_cuts_path, CI_KEY))


def test_rerun_redoes_only_missing_parts_and_refuses_foreign_ones(exp):
    from speechkd.labels.stages import extract

    labels = exp.dir / "labels"
    shutil.rmtree(labels, ignore_errors=True)
    from speechkd.cli import app

    res = CliRunner().invoke(app, ["extract", str(exp.dir / "config.yaml"), "--shard", "0/2", "--no-progress"])
    assert res.exit_code == 0, res.output
    part0 = labels / "parts" / "teacher_embeddings.part-0-of-2.jsonl.gz"
    stamp = part0.stat().st_mtime_ns
    extract(exp, shard="0/2")  # exists: skipped
    assert part0.stat().st_mtime_ns == stamp
    extract(exp, shard="1/2")
    assert exp.emb_cuts_path.is_file() and part0.stat().st_mtime_ns == stamp
    # a part written with another teacher layer is refused at the merge, naming the part
    exp.emb_cuts_path.unlink()
    exp.recipe.teacher.layer = 2
    try:
        with pytest.raises(ValueError, match="part-0-of-2"):
            extract(exp, shard="1/2")
    finally:
        exp.recipe.teacher.layer = 1
    with pytest.raises(ValueError, match="i/n"):
        extract(exp, shard="2")


def test_nbest_two_shards_equal_one(exp):
    from speechkd.data.datamodule import load_cuts
    from speechkd.labels.nbest import read_parts
    from speechkd.labels.stages import pseudo_label

    shutil.rmtree(exp.nbest_dir, ignore_errors=True)
    pseudo_label(exp)
    one = read_parts(exp.nbest_dir)
    merged_one = [(c.id, c.custom["nbest"]) for c in load_cuts(exp.nbest_cuts_path)]
    shutil.rmtree(exp.nbest_dir)
    exp.nbest_cuts_path.unlink()
    pseudo_label(exp, shard="1/2")
    assert not exp.nbest_cuts_path.exists()
    assert sorted(p.name for p in exp.nbest_dir.glob("part-*")) == ["part-00000005.jsonl.gz", "part-00000015.jsonl.gz"]
    pseudo_label(exp, shard="0/2")
    two = read_parts(exp.nbest_dir)
    assert json.dumps(one, sort_keys=True) == json.dumps(two, sort_keys=True)  # tokens, texts and scores
    assert len(one) == len(list(exp.label_cuts()))
    merged_two = [(c.id, c.custom["nbest"]) for c in load_cuts(exp.nbest_cuts_path)]
    assert merged_two == merged_one and [i for i, _ in merged_two] == [c.id for c in exp.label_cuts()]


def test_hubert_targets_two_shards_equal_one(tmp_path, corpora_dir):
    from safetensors.torch import load_file

    from speechkd.config import load_recipe
    from speechkd.data.datamodule import load_cuts
    from speechkd.labels.store import load_frame_labels
    from speechkd.ssl_pipeline import TARGETS_KEY, SslExperiment, _hubert_config, hubert_targets, prepare
    from speechkd.teachers.hubert_pretrain import mfcc_targets

    r = load_recipe(REPO / "recipes" / "smoke_ssl.yaml", {"exp_dir": str(tmp_path / "exp")})
    r.data.corpora_dir = str(corpora_dir)
    exp = SslExperiment(r, progress=False)
    prepare(exp)
    hubert_targets(exp)
    one = {c.id: load_frame_labels(c, TARGETS_KEY) for c in load_cuts(exp.targets_cuts_path)}
    centroids = load_file(str(exp.centroids_path))["centroids"]
    # the reference: every utterance's ids from the in-memory mfcc_targets with the same centroids
    ref = mfcc_targets(exp.cuts("pretrain"), _hubert_config(exp), centroids=centroids)
    assert one.keys() == ref.labels.keys()
    assert all(np.array_equal(one[u][:, 0], ref.labels[u].numpy()) for u in one)
    shutil.rmtree(exp.dir / "labels" / "parts")
    exp.targets_cuts_path.unlink()
    for f in (exp.dir / "labels").glob("hubert_targets*.h5"):
        f.unlink()
    hubert_targets(exp, shard="1/2")
    assert not exp.targets_cuts_path.exists()
    hubert_targets(exp, shard="0/2")
    two = {c.id: load_frame_labels(c, TARGETS_KEY) for c in load_cuts(exp.targets_cuts_path)}
    assert [c.id for c in load_cuts(exp.targets_cuts_path)] == [c.id for c in exp.cuts("pretrain")]
    assert two.keys() == one.keys() and all(np.array_equal(two[u], one[u]) and two[u].dtype == one[u].dtype
                                            for u in one)
