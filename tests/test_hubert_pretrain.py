"""HuBERT pre-training (iteration 1): MFCC k-means targets, masked-prediction loss, training, export, resume.

Tiny HuBERT (hidden 32, 2 layers, 2 heads, CNN kernels (10, 3), strides (5, 2): 10 samples per frame, receptive
field 20 samples) on 8 real 1-s utterances of the speech_commands_v2_test smoke split, 16 clusters.
"""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("transformers")
pytest.importorskip("lhotse")

from speechkd.data.corpora import read_metadata, read_split  # noqa: E402
from speechkd.teachers.hf import load_ssl_model, load_ssl_teacher  # noqa: E402
from speechkd.teachers.hubert_pretrain import (  # noqa: E402
    SUMMARY_FILE,
    HubertPretrainer,
    hubert_config,
    label_frame_index,
    load_waveforms,
    mfcc_features,
    mfcc_targets,
    pretrain_hubert,
)

K = 16
TINY = dict(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, conv_dim=(32, 32), conv_kernel=(10, 3),
            conv_stride=(5, 2), num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=4)
# 0.2-s crops (1998 samples -> 199 frames), 4 per batch: 2 batches per epoch of the 8 utterances
TRAIN = dict(num_clusters=K, final_dim=16, max_samples=2000, max_batch_samples=4 * 2000, kmeans_iters=10,
             progress=False)


@pytest.fixture(scope="module")
def utterances(corpora_dir):
    cdir = corpora_dir / "speech_commands_v2_test"
    return read_split(cdir, "smoke", read_metadata(cdir))[::8][:8]


@pytest.fixture(scope="module")
def waves(utterances):
    return load_waveforms(utterances)


@pytest.fixture(scope="module")
def config():
    return hubert_config(**TINY)


def test_targets_have_the_model_frame_count(waves, config):
    targets = mfcc_targets(waves, config, num_clusters=K, kmeans_iters=10, seed=0)
    model = HubertPretrainer(config, num_clusters=K).model
    assert targets.centroids.shape == (K, 39)
    for uid, wav in waves.items():
        frames = int(model._get_feat_extract_output_lengths(torch.tensor(wav.shape[0])))
        lab = targets.labels[uid]
        assert lab.shape == (frames,) and lab.dtype == torch.uint8 and int(lab.max()) < K
    # each frame's id is the nearest centroid of its MFCC frame
    uid, wav = next(iter(waves.items()))
    feat = mfcc_features(wav)
    assert feat.shape == (1 + (wav.shape[0] - 400) // 160, 39)
    index = label_frame_index(targets.labels[uid].shape[0], feat.shape[0], config.conv_kernel, config.conv_stride)
    nearest = torch.cdist(feat[index], targets.centroids).argmin(1)
    assert torch.equal(nearest, targets.labels[uid].long())
    # same seed: same clusters; given centroids: same labels without k-means
    again = mfcc_targets(waves, config, num_clusters=K, kmeans_iters=10, seed=0)
    assert torch.equal(again.centroids, targets.centroids)
    reused = mfcc_targets(waves, config, centroids=targets.centroids)
    assert all(torch.equal(reused.labels[u], targets.labels[u]) for u in waves)
    # HuBERT's CNN (20 ms stride, 25 ms field): model frame t takes MFCC frame 2t, as fairseq (label_rate 100 -> 50 Hz)
    s = 16000
    t, f = (s - 400) // 320 + 1, 1 + (s - 400) // 160
    assert torch.equal(label_frame_index(t, f, (10, 3, 3, 3, 3, 2, 2), (5, 2, 2, 2, 2, 2, 2)), 2 * torch.arange(t))


def test_loss_counts_masked_frames_only(waves, config):
    torch.manual_seed(0)
    pre = HubertPretrainer(config, num_clusters=K, final_dim=16).eval()
    wavs = list(waves.values())
    x = torch.stack([wavs[0][:3000], wavs[1][:3000]])
    lens = torch.tensor([3000, 2500])  # second one padded: 249 of 299 frames
    frame_lens = pre.frame_lens(lens)
    mask = pre.sample_mask(frame_lens, 299, seed=3)
    assert torch.equal(mask, pre.sample_mask(frame_lens, 299, seed=3))
    assert not mask[1, 249:].any() and 0.3 < mask.float().mean() < 0.9
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, K, (2, 299), generator=g)
    y[1, 249:] = 999  # padded frames: never read
    with torch.no_grad():
        loss, logs = pre(x, lens, y, mask)
        # by hand: mean cross-entropy of cos / 0.1 logits at masked valid frames
        logits, _ = pre.logits(x, lens, mask)
        lp = logits.log_softmax(-1)
        ref = -torch.stack([lp[n, t, y[n, t]] for n in range(2) for t in range(299) if mask[n, t]]).mean()
        torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
        assert float(logits.abs().max()) <= 1 / 0.1 + 1e-4
        y2 = y.clone()
        unmasked = ~mask & (torch.arange(299)[None] < frame_lens[:, None])
        y2[unmasked] = (y2[unmasked] + 1) % K
        assert torch.equal(pre(x, lens, y2, mask)[0], loss)
        y3 = y.clone()
        y3[mask] = (y3[mask] + 1) % K
        assert not torch.allclose(pre(x, lens, y3, mask)[0], loss)
        # the mask really replaces the CNN features by masked_spec_embed
        other, _ = pre.logits(x, lens, torch.zeros_like(mask))
        assert not torch.allclose(other[mask], logits[mask])
    assert float(logs["mask_frac"]) == pytest.approx(float(mask.sum()) / float(frame_lens.sum()))
    with pytest.raises(ValueError, match="target ids"):
        pre(x, lens, torch.full_like(y, K), mask)


def test_pretrain_loss_falls_exports_hf_dir_and_resumes(utterances, waves, config, tmp_path):
    out = tmp_path / "hubert"
    torch.manual_seed(0)  # pretrain_hubert builds its model the same way: same initial weights
    initial = HubertPretrainer(config, num_clusters=K, final_dim=16)
    res = pretrain_hubert(utterances, out, steps=40, config=config, lr=3e-3, warmup_steps=4, log_every=4, seed=0,
                          **TRAIN)
    assert res.step == 40 and len(res.history) == 10 and res.resumed_from == 0

    # the masked-prediction loss on a fixed batch (first 0.2 s of every utterance, fixed mask) fell
    centroids = load_file(str(out.with_name("hubert.fit") / "centroids.safetensors"))["centroids"]
    targets = mfcc_targets(waves, config, centroids=centroids)
    x = torch.stack([w[:2000] for w in waves.values()])
    y = torch.stack([targets.labels[u][:199].long() for u in waves])
    lens = torch.full((len(waves),), 2000)
    with torch.no_grad():
        before, _ = initial.eval()(x, lens, y, seed=1)
        after, logs = res.pretrainer(x, lens, y, seed=1)
    assert float(after) < float(before) - 0.5, (float(before), float(after))
    assert float(logs["acc_m"]) > 1.5 / K

    # a Hugging Face HuBERT directory that loads like a downloaded one, with the trained weights
    assert json.loads((out / "config.json").read_text())["model_type"] == "hubert"
    assert (out / "model.safetensors").is_file() and (out / SUMMARY_FILE).is_file()
    loaded = load_ssl_model(out)
    with torch.no_grad():
        ref = res.pretrainer.model(x, output_hidden_states=True).hidden_states
        got = loaded(x, output_hidden_states=True).hidden_states
    assert len(got) == 3
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    teacher = load_ssl_teacher(out)
    assert teacher.num_layers == 2 and teacher.normalize is False

    # resume: continues from the saved step
    shutil.rmtree(out)  # the export is written once; a longer run writes it again
    more = pretrain_hubert(utterances, out, steps=44, config=config, lr=3e-3, warmup_steps=4, log_every=4, **TRAIN)
    assert more.resumed_from == 40 and more.step == 44 and [h["step"] for h in more.history][-2:] == [40, 44]
    assert json.loads((out / SUMMARY_FILE).read_text())["steps"] == 44
    with pytest.raises(ValueError, match="16 clusters, not num_clusters=8"):
        pretrain_hubert(utterances, out, steps=48, config=config, **{**TRAIN, "num_clusters": 8})
    with pytest.raises(ValueError, match="not waveforms"):
        pretrain_hubert(waves, tmp_path / "x", steps=1, config=config, **TRAIN)


def test_interrupted_run_resumes_exactly(utterances, config, tmp_path):
    kw = dict(config=config, steps=5, warmup_steps=2, ckpt_every=3, **TRAIN)
    straight = pretrain_hubert(utterances, tmp_path / "a", **kw).pretrainer.state_dict()

    def stop(step, logs):
        if step == 4:
            raise RuntimeError("stopped")

    with pytest.raises(RuntimeError, match="stopped"):
        pretrain_hubert(utterances, tmp_path / "b", callback=stop, **kw)
    assert not (tmp_path / "b").exists()  # nothing exported by the interrupted run
    resumed = pretrain_hubert(utterances, tmp_path / "b", **kw)
    assert resumed.resumed_from == 3
    for key, value in resumed.pretrainer.state_dict().items():
        torch.testing.assert_close(value, straight[key], rtol=0, atol=0, msg=key)


def test_export_refuses_a_foreign_directory(config, tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        HubertPretrainer(config, num_clusters=K).save_pretrained(tmp_path)
    assert (tmp_path / "keep.txt").is_file()


def test_centroids_of_sampled_frames_match_the_in_memory_reference(waves, config):
    """mfcc_centroids reads one utterance at a time and holds only the sampled frames; the reference clusters the
    same draw from every MFCC frame held at once."""
    from speechkd.mvq.quantizer import _kmeans
    from speechkd.teachers.hubert_pretrain import mfcc_centroids

    frames = torch.cat([mfcc_features(w) for w in waves.values()])  # (total, 39)
    gen = torch.Generator().manual_seed(3)
    pick = frames[torch.randperm(frames.shape[0], generator=gen)[:300]]
    reference, _ = _kmeans(pick, K, 5, gen, seed_rows=50_000)
    got = mfcc_centroids(waves, config, K, kmeans_iters=5, max_kmeans_frames=300, seed=3)
    assert frames.shape[0] > 300 and torch.equal(got, reference)
    every = mfcc_centroids(waves, config, K, kmeans_iters=5, max_kmeans_frames=None, seed=3)
    assert torch.equal(every, _kmeans(frames, K, 5, torch.Generator().manual_seed(3), seed_rows=50_000)[0])
