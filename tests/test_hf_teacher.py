"""SSL teachers from local HF checkpoints: save_pretrained -> load_ssl_teacher round trips, padding, refusals.

Tiny randomly initialised HuBERT / wav2vec 2.0 / WavLM models (hidden 32, 2 layers, 2 heads, 2 conv layers:
kernels (10, 3), strides (5, 2) -> 10 samples per frame, receptive field 20 samples).
"""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from speechkd.teachers.hf import SSLTeacher, load_ssl_model, load_ssl_teacher  # noqa: E402

from hf_tiny import MODEL_TYPES, tiny_hf_model as _tiny_model  # noqa: E402


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """model_type -> (original model, checkpoint dir), GroupNorm feature encoder (the config default)."""
    out = {}
    for model_type in MODEL_TYPES:
        model = _tiny_model(model_type)
        d = tmp_path_factory.mktemp(model_type)
        model.save_pretrained(d)
        out[model_type] = (model, d)
    return out


def _batch(lens, seed=0):
    g = torch.Generator().manual_seed(seed)
    wavs = torch.randn(len(lens), max(lens), generator=g)
    for i, n in enumerate(lens):
        wavs[i, n:] = 123.0  # garbage padding must not matter
    return wavs, torch.tensor(lens)


@pytest.mark.parametrize("model_type", list(MODEL_TYPES))
def test_round_trip_matches_hf_hidden_states(saved, model_type):
    model, d = saved[model_type]
    assert sorted(p.name for p in d.iterdir()) == ["config.json", "model.safetensors"]
    teacher = load_ssl_teacher(d, layers=[2, 0])
    assert type(teacher.model) is type(model)
    assert (teacher.num_layers, teacher.hidden_size) == (2, 32)
    assert (teacher.samples_per_frame, teacher.min_samples) == (10, 20)
    assert teacher.frame_shift == pytest.approx(10 / 16000)
    assert not teacher.training and not teacher.model.training
    for k, v in model.state_dict().items():
        assert torch.equal(teacher.model.state_dict()[k], v), k

    wavs, lens = _batch([800, 800])
    with torch.no_grad():
        ref = model(wavs, output_hidden_states=True).hidden_states
    out = teacher(wavs, lens)
    assert out.lens.tolist() == [79, 79] and out.lens.dtype == torch.int64
    assert [tuple(h.shape) for h in out.hidden_states] == [(2, 79, 32)] * 2
    # Not bit-exact for WavLM: with every parameter frozen, its call to torch's F.multi_head_attention_forward
    # rounds differently (~5e-7 here; exact again when the parameters require grad).
    torch.testing.assert_close(out.hidden_states[0], ref[2], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.hidden_states[1], ref[0], rtol=1e-5, atol=1e-6)
    all_layers = teacher(wavs, lens, layers=[0, 1, 2]).hidden_states
    for h, r in zip(all_layers, ref):
        torch.testing.assert_close(h, r, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model_type", list(MODEL_TYPES))
def test_padded_utterance_equals_alone(saved, tmp_path, model_type):
    lens = [800, 555, 555, 301]
    wavs, lens_t = _batch(lens, seed=1)
    # GroupNorm feature encoder: exact via per-length sub-batches (default) ...
    _, d = saved[model_type]
    teachers = {"group": load_ssl_teacher(d)}
    # ... LayerNorm feature encoder (and pre-LN transformer): exact through the attention mask in one batch
    layer_model = _tiny_model(model_type, seed=2, feat_extract_norm="layer", do_stable_layer_norm=True)
    layer_model.save_pretrained(tmp_path)
    teachers["layer"] = load_ssl_teacher(tmp_path)
    for norm, teacher in teachers.items():
        out = teacher(wavs, lens_t)
        frames = teacher.frame_lens(lens_t)
        assert torch.equal(out.lens, frames) and out.lens.tolist() == [79, 54, 54, 29]
        for i, n in enumerate(lens):
            alone = teacher(wavs[i : i + 1, :n], torch.tensor([n]))
            assert alone.lens.item() == frames[i]
            for h, a in zip(out.hidden_states, alone.hidden_states):
                torch.testing.assert_close(h[i, : frames[i]], a[0], rtol=1e-5, atol=1e-5, msg=f"{norm} utt {i}")
                assert torch.all(h[i, frames[i] :] == 0), "padded frames are zeroed"

    # Without exact_padding, a GroupNorm encoder sees the padding (fairseq / s3prl behaviour): frames differ.
    fast = load_ssl_teacher(d, exact_padding=False)
    out = fast(wavs, lens_t, layers=[2])
    alone = fast(wavs[3:4, :301], torch.tensor([301]), layers=[2])
    assert (out.hidden_states[0][3, :29] - alone.hidden_states[0][0]).abs().max() > 1e-3


def test_standard_cnn_frame_rate_is_20ms(tmp_path):
    # The wav2vec 2.0 / HuBERT / WavLM CNN (kernels 10,3,3,3,3,2,2; strides 5,2,2,2,2,2,2), narrow channels
    model = _tiny_model(
        "hubert", conv_dim=(8,) * 7, conv_kernel=(10, 3, 3, 3, 3, 2, 2), conv_stride=(5, 2, 2, 2, 2, 2, 2)
    )
    teacher = SSLTeacher(model)
    assert (teacher.samples_per_frame, teacher.frame_shift, teacher.min_samples) == (320, 0.02, 400)
    lens = torch.tensor([16000, 400, 719, 720])
    assert teacher.frame_lens(lens).tolist() == [49, 1, 1, 2]  # floor((S - 400) / 320) + 1
    out = teacher(torch.randn(4, 16000), lens, layers=[1])
    assert out.lens.tolist() == [49, 1, 1, 2] and out.hidden_states[0].shape == (4, 49, 32)


def test_normalize_matches_hf_feature_extractor(tmp_path):
    model = _tiny_model("wav2vec2", seed=3, feat_extract_norm="layer")
    model.save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"do_normalize": True}))
    teacher = load_ssl_teacher(tmp_path)
    assert teacher.normalize
    assert not load_ssl_teacher(tmp_path, normalize=False).normalize

    lens = [700, 430]
    wavs, lens_t = _batch(lens, seed=4)
    wavs = 0.1 * wavs + 0.05
    fe = transformers.Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=True)
    inputs = fe([wavs[i, :n].numpy() for i, n in enumerate(lens)], sampling_rate=16000, padding=True,
                return_tensors="pt")
    with torch.no_grad():
        ref = model(inputs.input_values, attention_mask=inputs.attention_mask, output_hidden_states=True)
    out = teacher(wavs, lens_t)
    for h, r in zip(out.hidden_states, ref.hidden_states):
        for i, t in enumerate(out.lens.tolist()):
            torch.testing.assert_close(h[i, :t], r[i, :t], rtol=1e-4, atol=1e-4)


def test_frozen_and_trainable(saved):
    model, d = saved["hubert"]
    teacher = load_ssl_teacher(d)
    assert not any(p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.training and not teacher.model.training
    wavs, lens = _batch([300, 200])
    out = teacher(wavs.requires_grad_(), lens)
    assert not out.hidden_states[0].requires_grad

    trainable = load_ssl_teacher(d, frozen=False)
    trainable.train()
    assert trainable.training and trainable.model.training
    trainable.eval()
    out = trainable(wavs, lens, layers=[2])
    out.hidden_states[0].sum().backward()
    assert trainable.model.encoder.layers[0].attention.q_proj.weight.grad is not None


def test_layer_and_input_errors(saved):
    _, d = saved["wavlm"]
    teacher = load_ssl_teacher(d)
    wavs, lens = _batch([300, 200])
    for bad in ([3], [-1], [0, 5]):
        with pytest.raises(ValueError, match=r"valid layers are 0\.\.2"):
            teacher(wavs, lens, layers=bad)
    with pytest.raises(ValueError, match=r"valid layers are 0\.\.2"):
        load_ssl_teacher(d, layers=[0, 3])
    with pytest.raises(ValueError, match="at least one"):
        teacher(wavs, lens, layers=[])
    with pytest.raises(ValueError, match="receptive field"):
        teacher(wavs, torch.tensor([300, 19]))
    with pytest.raises(ValueError, match="exceeds"):
        teacher(wavs, torch.tensor([301, 200]))
    with pytest.raises(ValueError, match=r"\(N, S\)"):
        teacher(wavs[0], lens[:1])
    with pytest.raises(ValueError, match=r"\(N,\)"):
        teacher(wavs, lens[:1])
    with pytest.raises(ValueError, match="integer"):
        teacher(wavs, lens.float())


def test_refuses_bad_checkpoint_dirs(saved, tmp_path):
    model, good = saved["hubert"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_ssl_model(tmp_path / "nope")

    no_config = tmp_path / "no_config"
    no_config.mkdir()
    with pytest.raises(FileNotFoundError, match=r"no_config has no config\.json"):
        load_ssl_model(no_config)

    # a pickled checkpoint only: refused, and never unpickled
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((good / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"not a pickle: must never be opened")
    with pytest.raises(FileNotFoundError, match=r"pickled has no model\.safetensors.*pytorch_model\.bin"):
        load_ssl_teacher(pickled)

    unsupported = tmp_path / "bert"
    unsupported.mkdir()
    (unsupported / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (unsupported / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match=r"unsupported model_type 'bert'"):
        load_ssl_model(unsupported)

    # weights missing from model.safetensors would be initialised at random: refused
    from safetensors.torch import load_file, save_file

    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_text((good / "config.json").read_text())
    weights = load_file(good / "model.safetensors")
    dropped = next(k for k in weights if "layers.1.feed_forward" in k)
    save_file({k: v for k, v in weights.items() if k != dropped}, partial / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing weights"):
        load_ssl_model(partial)
