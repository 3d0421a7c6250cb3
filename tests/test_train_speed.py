"""The exact training speed-ups (issue 18): batches read from the loader's memory equal lhotse's reads, and more
duration buckets pad less. The RNN-T loop order and the MVQ head on valid frames are tested in test_rnnt.py and
test_kd_losses.py; their timings are in benchmarks/train_bench.py."""

import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def labelled_exp(corpora_dir, tmp_path_factory):
    """A prepared smoke experiment whose training cuts carry range-coded CI and float16 embeddings."""
    from speechkd.config import Recipe
    from speechkd.labels.store import write_frame_labels
    from speechkd.pipeline import Experiment, prepare

    tmp = tmp_path_factory.mktemp("speed")
    r = Recipe.model_validate({"name": "x", "exp_dir": str(tmp / "exp"), "data": {
        "corpus": "digits", "smoke": True, "num_train": 40, "num_dev": 4, "num_test": 4, "vocab_size": 32,
        "num_jobs": 1}})
    r.data.corpora_dir = str(corpora_dir)
    exp = Experiment(r, progress=False)
    prepare(exp)
    cuts = exp.cuts("train").to_eager()
    rng = np.random.default_rng(0)
    frames = {c.id: c.num_frames // 4 for c in cuts}
    ci = {cid: rng.integers(0, 256, (t, 4), dtype=np.uint8) for cid, t in frames.items()}
    emb = {cid: rng.standard_normal((t, 6)).astype(np.float16) for cid, t in frames.items()}
    cuts = write_frame_labels(cuts, ci, tmp / "labels", key="codebook_indexes", frame_shift=0.04, codec="range")
    cuts = write_frame_labels(cuts, emb, tmp / "labels", key="teacher_embeddings", frame_shift=0.04)
    return exp, cuts


def _batches(dataset, cuts, epochs=2):
    from speechkd.data.datamodule import make_sampler

    sampler = make_sampler(cuts, 6.0, shuffle=True, seed=3)
    out = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        out += [dataset[(epoch, b)] for b in sampler]
    return out


@pytest.mark.parametrize("cache_bytes", [2**30, 60_000])  # everything held / the cache full after a few cuts
def test_batches_from_memory_equal_lhotse_reads(labelled_exp, cache_bytes):
    from speechkd.data.datamodule import AsrDataset

    exp, cuts = labelled_exp
    keys = ("codebook_indexes", "teacher_embeddings")
    ref = _batches(AsrDataset(exp.tokenizer, keys, spec_augment=True, seed=1), cuts)
    cached = AsrDataset(exp.tokenizer, keys, spec_augment=True, seed=1, cache_bytes=cache_bytes)
    got = _batches(cached, cuts)
    assert len(got) == len(ref) > 2
    for a, b in zip(got, ref):
        assert a["cut_ids"] == b["cut_ids"] and a["tokens"] == b["tokens"]
        assert a["features"].dtype == b["features"].dtype and torch.equal(a["features"], b["features"])
        assert a["feature_lens"].dtype == b["feature_lens"].dtype
        assert torch.equal(a["feature_lens"], b["feature_lens"])
        for k in keys:
            (va, la), (vb, lb) = a["labels"][k], b["labels"][k]
            assert va.dtype == vb.dtype and torch.equal(va, vb) and torch.equal(la, lb)
    assert 0 < cached._cached_bytes <= cache_bytes
    if cache_bytes == 2**30:  # every cut's features and both labels were read once and kept
        assert len(cached._cache) == 3 * len(cuts)
    else:
        assert len(cached._cache) < 3 * len(cuts)


def test_twenty_buckets_pad_less_than_five(labelled_exp):
    from speechkd.data.datamodule import make_sampler

    _, cuts = labelled_exp

    def padding(num_buckets):
        padded = real = 0
        for seed in range(4):
            for b in make_sampler(cuts, 6.0, shuffle=True, seed=seed, num_buckets=num_buckets):
                n = [c.num_frames for c in b]
                padded += max(n) * len(n)
                real += sum(n)
        return 1 - real / padded

    assert padding(20) < padding(5)
