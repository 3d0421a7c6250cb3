"""Whisper's encoder as an SSL teacher (the KWS/SV recipe): log-mel against transformers' feature extractor, hidden
states against the sliced encoder on the extractor's features, exact padding, a DistilHuBERT-style student copied
from it, save / load round trips, and the SSL chain with a tiny random Whisper as teacher."""

import shutil

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from conftest import REPO  # noqa: E402
from speechkd.teachers.hf import check_ssl_dir, load_ssl_teacher  # noqa: E402
from speechkd.teachers.whisper import WhisperSSLEncoder, encoder_hidden_states, log_mel  # noqa: E402


@pytest.fixture(scope="module")
def whisper_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("whisper_ssl") / "hf"
    cfg = transformers.WhisperConfig(vocab_size=51864, num_mel_bins=80, d_model=32, encoder_layers=3, decoder_layers=1,
                                     encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                                     decoder_ffn_dim=64)
    torch.manual_seed(0)
    transformers.WhisperForConditionalGeneration(cfg).eval().save_pretrained(d)
    return d


def _speech(corpora_dir, n=3):
    from speechkd.data.corpora import read_metadata, read_split, utterances_to_cuts

    cdir = corpora_dir / "speech_commands_v2_test"
    cuts = utterances_to_cuts(read_split(cdir, "smoke", read_metadata(cdir))[:n], 16000)
    return [torch.from_numpy(c.load_audio()[0].astype(np.float32)) for c in cuts]


def _pad(wavs):
    lens = torch.tensor([len(w) for w in wavs])
    out = torch.zeros(len(wavs), int(lens.max()))
    for i, w in enumerate(wavs):
        out[i, : len(w)] = w
    return out, lens


def test_log_mel_equals_the_feature_extractor(corpora_dir):
    fe = transformers.WhisperFeatureExtractor(feature_size=80)
    wavs = _speech(corpora_dir)
    wavs[1] = wavs[1][:9000]  # unequal lengths: the padded batch of padding="longest"
    padded, lens = _pad(wavs)
    ref = fe([w.numpy() for w in wavs], sampling_rate=16000, padding="longest", return_tensors="pt").input_features
    mine = log_mel(padded, lens, torch.from_numpy(fe.mel_filters.T.astype(np.float32)))
    assert mine.shape == ref.shape == (3, 80, padded.shape[1] // 160)
    torch.testing.assert_close(mine, ref.float(), rtol=0, atol=2e-4)


def test_ssl_encoder_equals_the_sliced_encoder_and_is_exact_under_padding(whisper_dir, corpora_dir):
    info = check_ssl_dir(whisper_dir)
    assert (info.model_type, info.num_layers, info.hidden_size, info.frame_shift) == ("whisper", 3, 32, 0.02)
    enc = load_ssl_teacher(whisper_dir)
    assert isinstance(enc, WhisperSSLEncoder) and enc.frozen and not enc.training
    full = transformers.WhisperForConditionalGeneration.from_pretrained(whisper_dir).eval()
    fe = transformers.WhisperFeatureExtractor(feature_size=80)
    wavs = _speech(corpora_dir)
    wavs[0] = wavs[0][:7001]
    padded, lens = _pad(wavs)
    out = enc(padded, lens)
    assert out.lens.tolist() == [((n // 160) + 1) // 2 for n in lens.tolist()]
    for i, w in enumerate(wavs):  # each utterance alone, through transformers' encoder weights and feature extractor
        feats = fe(w.numpy(), sampling_rate=16000, padding="longest", return_tensors="pt").input_features
        with torch.inference_mode():
            ref = encoder_hidden_states(full.model.encoder, feats.float(), [0, 1, 2, 3])
        for layer, r in enumerate(ref):
            n = int(out.lens[i])
            torch.testing.assert_close(out.hidden_states[layer][i, :n], r[0, :n], rtol=0, atol=2e-4)
            assert float(out.hidden_states[layer][i, n:].abs().sum()) == 0.0
    loose = load_ssl_teacher(whisper_dir, exact_padding=False)(padded, lens)  # padded: Whisper attends to silence
    assert not torch.allclose(loose.hidden_states[3][0, :5], out.hidden_states[3][0, :5], atol=1e-4)
    with pytest.raises(ValueError, match="receptive field"):
        enc(torch.zeros(1, 100), torch.tensor([100]))


def test_distilled_student_is_the_teachers_first_layers_and_round_trips(whisper_dir, corpora_dir, tmp_path):
    from speechkd.models.ssl import build_ssl_student, load_ssl_student

    teacher = load_ssl_teacher(whisper_dir)
    student = build_ssl_student(teacher, num_layers=2, target_layers=[1, 3])
    assert student.num_layers == 2 and student.hidden_size == 32
    padded, lens = _pad(_speech(corpora_dir, 2))
    with torch.no_grad():
        t_out, s_out = teacher(padded, lens), student(padded, lens)
        ln = teacher.model.layer_norm
        torch.testing.assert_close(s_out.hidden_states[1], t_out.hidden_states[1], rtol=0, atol=1e-5)
        n = int(s_out.lens.min())  # the student's last layer carries the teacher's final LayerNorm
        torch.testing.assert_close(s_out.hidden_states[2][:, :n], ln(t_out.hidden_states[2])[:, :n], rtol=0, atol=1e-4)
    student.train()
    loss, _ = student.distill_loss(student(padded, lens), teacher(padded, lens, layers=[1, 3]))
    loss.backward()
    g_conv = student.model.conv1.weight.grad
    assert g_conv is not None and torch.isfinite(g_conv).all() and float(g_conv.abs().sum()) > 0
    student.save_pretrained(tmp_path / "s")
    again = load_ssl_student(tmp_path / "s")
    enc = load_ssl_teacher(tmp_path / "s")  # the encoder alone, as fine-tuning loads it
    student.eval()
    with torch.no_grad():
        torch.testing.assert_close(again(padded, lens).hidden_states[2], student(padded, lens).hidden_states[2])
        torch.testing.assert_close(enc(padded, lens).hidden_states[2], student(padded, lens).hidden_states[2])
    enc2 = load_ssl_teacher(tmp_path / "s", frozen=False)
    enc2.freeze_front_end()
    assert not any(p.requires_grad for p in enc2.model.conv1.parameters())
    assert all(p.requires_grad for p in enc2.model.layers.parameters())


def test_truncated_checkpoint_is_refused_by_name(whisper_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    from speechkd.teachers.whisper import load_whisper_encoder

    d = tmp_path / "bad"
    shutil.copytree(whisper_dir, d)
    state = load_file(d / "model.safetensors")
    del state["model.encoder.layers.1.fc1.weight"]
    save_file(state, d / "model.safetensors")
    with pytest.raises(ValueError, match=r"model.encoder.layers.1.fc1.weight"):
        load_whisper_encoder(d)


def test_ssl_chain_with_a_whisper_teacher(whisper_dir, tmp_path, corpora_dir):
    """The KWS/SV chain (distil, fine-tune frozen / finetune / multitask, evaluate, report) with Whisper's encoder as
    the teacher (teacher.dir: a Whisper directory)."""
    import json

    from speechkd.config import load_recipe
    from speechkd.pipeline import make_experiment, run_all

    recipe = load_recipe(REPO / "recipes" / "smoke_ssl.yaml",
                         {"exp_dir": str(tmp_path / "exp"), "teacher": {"dir": str(whisper_dir)}})
    recipe.data.corpora_dir = str(corpora_dir)
    exp = make_experiment(recipe, progress=False)
    run_all(exp)
    results = {p.stem: json.loads(p.read_text()) for p in (exp.dir / "eval").glob("*.json")}
    assert {"teacher-frozen", "student-multitask"} <= set(results)
    student = load_ssl_teacher(exp.dir / "student")
    assert isinstance(student, WhisperSSLEncoder) and student.num_layers == 1
    assert (exp.dir / "report.md").is_file()
