"""ONNX export of the SSL recipe's downstream models (an encoder with its KWS and speaker-embedding heads): one graph
from 16 kHz audio to KWS logits and embeddings, checked against PyTorch on real Speech Commands clips for a Whisper
and a HuBERT encoder; the Python API (classify / embed / verify) on the run directory and on the export, and clear
errors for short audio, missing heads and damaged exports."""

import json
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
transformers = pytest.importorskip("transformers")

from hf_tiny import tiny_hf_model  # noqa: E402
from speechkd.config import DownstreamConfig  # noqa: E402
from speechkd.data.classification import KWS_CLASSES  # noqa: E402
from speechkd.export import OnnxSsl, check_ssl_export, export_ssl, ssl_min_samples  # noqa: E402
from speechkd.models.downstream import DownstreamModel, save_downstream  # noqa: E402
from speechkd.teachers.hf import wrap_ssl_model  # noqa: E402


def _encoder(kind: str):
    if kind == "whisper":
        cfg = transformers.WhisperConfig(vocab_size=51864, num_mel_bins=80, d_model=32, encoder_layers=2,
                                         decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
                                         encoder_ffn_dim=64, decoder_ffn_dim=64)
        torch.manual_seed(0)
        return transformers.WhisperForConditionalGeneration(cfg).model.encoder.eval()
    return tiny_hf_model("hubert")


def _model(kind: str, tasks=("kws", "sv")) -> DownstreamModel:
    torch.manual_seed(1)
    model = DownstreamModel(wrap_ssl_model(_encoder(kind), frozen=True), tasks, DownstreamConfig(), num_speakers=7)
    with torch.no_grad():  # batch-norm statistics other than the initial ones, so eval mode's affine map matters
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.normal_(0.0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _clips(corpora_dir, n=6):
    import soundfile as sf

    from speechkd.data.corpora import read_metadata, read_split

    cdir = corpora_dir / "speech_commands_v2_test"
    wavs = [sf.read(cdir / u.path, dtype="float32")[0] for u in read_split(cdir, "smoke", read_metadata(cdir))[:n]]
    wavs[1] = wavs[1][:9001]  # other lengths: the runner groups equal lengths, never pads
    wavs[2] = wavs[2][:12345]
    return wavs


@pytest.mark.parametrize("kind", ["whisper", "hubert"])
def test_ssl_export_matches_pytorch_on_real_clips(kind, corpora_dir, tmp_path):
    model = _model(kind)
    paths = export_ssl(model, tmp_path / "onnx", int8=True, comment="test")
    assert {p.name for p in (tmp_path / "onnx").iterdir()} == {"model.onnx", "model.int8.onnx", "labels.txt",
                                                                "export.json"}
    assert paths["model"] == tmp_path / "onnx" / "model.onnx"
    info = json.loads((tmp_path / "onnx" / "export.json").read_text())
    assert info["arch"] == "ssl" and info["tasks"] == ["kws", "sv"] and info["min_samples"] == ssl_min_samples(model)
    assert (tmp_path / "onnx" / "labels.txt").read_text().split() == list(KWS_CLASSES)
    wavs = _clips(corpora_dir)
    lo = ssl_min_samples(model)
    wavs.append(wavs[0][:lo])  # the shortest input the model takes
    res = check_ssl_export(model, tmp_path / "onnx", wavs)
    assert res["utterances"] == len(wavs) == res["same_class"]
    assert res["kws_max_abs"] < 1e-4 and res["sv_max_abs"] < 1e-4 and res["sv_min_cosine"] > 1 - 1e-6
    # independent of check_ssl_export: the graph on one batch of equal lengths vs the model on each clip alone
    onnx_model = OnnxSsl(tmp_path / "onnx")
    same = [wavs[0], wavs[3][: len(wavs[0])]] if len(wavs[3]) >= len(wavs[0]) else [wavs[0], wavs[0][::-1].copy()]
    out = onnx_model.infer(same)
    for i, w in enumerate(same):
        ref = model.infer(torch.from_numpy(w)[None], torch.tensor([len(w)]))
        np.testing.assert_allclose(out["kws_logits"][i], ref["kws_logits"][0].numpy(), atol=1e-4, rtol=0)
        np.testing.assert_allclose(out["sv_embeddings"][i], ref["sv_embeddings"][0].numpy(), atol=1e-4, rtol=0)
    q = check_ssl_export(model, tmp_path / "onnx", wavs, int8=True)  # int8 runs; its difference is stated, not zero
    assert q["utterances"] == len(wavs) and np.isfinite(q["kws_max_abs"]) and q["sv_min_cosine"] > 0.5
    with pytest.raises(ValueError, match=f"input 0: {lo - 1} samples"):
        onnx_model.infer([wavs[0][: lo - 1]])


def test_ssl_api_on_the_run_and_its_export(corpora_dir, tmp_path):
    import speechkd
    from speechkd.eval.verification import cosine_scores

    model = _model("whisper")
    run = tmp_path / "run"
    save_downstream(model, run, {"downstream": DownstreamConfig().model_dump(), "num_speakers": 7})
    export_ssl(model, tmp_path / "onnx")
    wavs = _clips(corpora_dir, n=4)
    torch_api, onnx_api = speechkd.load(run), speechkd.load(tmp_path / "onnx")
    assert (torch_api.backend, onnx_api.backend) == ("pytorch", "onnx")
    ref = model.infer(torch.from_numpy(wavs[0])[None], torch.tensor([len(wavs[0])]))
    assert torch_api.classify(wavs[0], sampling_rate=16000) == KWS_CLASSES[int(ref["kws_logits"].argmax())]
    labels = torch_api.classify(wavs, sampling_rate=16000)
    assert onnx_api.classify(wavs, sampling_rate=16000) == labels and len(labels) == 4
    emb = torch_api.embed(wavs, sampling_rate=16000)
    assert emb.shape == (4, model.sv.embed_dim)
    np.testing.assert_allclose(onnx_api.embed(wavs, sampling_rate=16000), emb, atol=1e-4, rtol=0)
    score = torch_api.verify(wavs[0], wavs[1], sampling_rate=16000)
    assert score == pytest.approx(float(cosine_scores(emb[:1].astype(np.float64), emb[1:2].astype(np.float64))[0]),
                                  abs=1e-5)
    assert onnx_api.verify(wavs[0], wavs[1], sampling_rate=16000) == pytest.approx(score, abs=1e-4)
    # 8 kHz audio is resampled: the same clip at 8 kHz classifies as its 16 kHz resampling does
    from scipy.signal import resample_poly

    at8k = resample_poly(wavs[3], 1, 2).astype(np.float32)
    back = resample_poly(at8k, 2, 1).astype(np.float32)
    assert onnx_api.classify(at8k, sampling_rate=8000) == onnx_api.classify(back, sampling_rate=16000)
    with pytest.raises(ValueError, match="shorter than this model takes"):
        onnx_api.classify(np.zeros(100, np.float32), sampling_rate=16000)


def test_ssl_export_errors(tmp_path):
    import speechkd

    kws_only = _model("hubert", tasks=("kws",))
    export_ssl(kws_only, tmp_path / "kws")
    api = speechkd.load(tmp_path / "kws")
    assert api.classify(np.random.default_rng(0).standard_normal(16000).astype(np.float32), 16000) in KWS_CLASSES
    with pytest.raises(ValueError, match="no speaker-embedding head"):
        api.embed(np.zeros(16000, np.float32), 16000)
    with pytest.raises(FileExistsError, match="exists"):
        export_ssl(kws_only, tmp_path / "kws")
    with pytest.raises(ValueError, match="3 labels for a KWS head of 12 classes"):
        export_ssl(kws_only, tmp_path / "bad", labels=["a", "b", "c"])
    with pytest.raises(TypeError, match="DownstreamModel"):
        export_ssl(torch.nn.Linear(2, 2), tmp_path / "bad")
    damaged = tmp_path / "damaged"
    shutil.copytree(tmp_path / "kws", damaged)
    (damaged / "labels.txt").unlink()
    with pytest.raises(FileNotFoundError, match="labels.txt"):
        OnnxSsl(damaged)
    (damaged / "labels.txt").write_text("yes\nno\n")
    with pytest.raises(ValueError, match="lists 2 classes, the graph has 12"):
        OnnxSsl(damaged)
    (damaged / "model.onnx").unlink()
    with pytest.raises(FileNotFoundError, match="model.onnx"):
        OnnxSsl(damaged)
