"""ONNX export of transducers in sherpa-onnx's layout: onnxruntime's encoder frames and greedy hypotheses against
PyTorch's, sherpa-onnx loading the graphs and decoding real audio with its own fbank like onnxruntime does, int8
graphs that run, and clear errors for damaged export directories."""

import json

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from speechkd.config import ModelConfig  # noqa: E402
from speechkd.data.tokenizer import Tokenizer, train_tokenizer  # noqa: E402
from speechkd.decoding.transducer import greedy_search  # noqa: E402
from speechkd.export import OnnxTransducer, export_transducer  # noqa: E402
from speechkd.models.build import build_model  # noqa: E402


@pytest.fixture(scope="module")
def exported(tmp_path_factory, corpora_dir):
    from speechkd.data.corpora import read_metadata, read_split

    d = tmp_path_factory.mktemp("export")
    cdir = corpora_dir / "speech_commands_v2_test"
    utts = read_split(cdir, "smoke", read_metadata(cdir))
    tok = Tokenizer(train_tokenizer([u.text for u in utts if u.text] * 5, d / "tokens.model", vocab_size=24))
    torch.manual_seed(0)
    model = build_model(ModelConfig(dim=32, num_layers=2, num_heads=2, ff_dim=64, decoder_dim=16, joiner_dim=16,
                                    dropout=0.0), tok.vocab_size).eval()
    with torch.no_grad():  # a random model: blank a little less likely, so tokens are emitted; <unk> never (sherpa-onnx
        model.joiner.output_linear.bias[0] -= 0.3  # reads it as blank, speechkd as a token; a trained model never
        model.joiner.output_linear.bias[1] -= 10.0  # emits it, its training text having no unknown characters)
        model.joiner.output_linear.weight *= 4.0  # wider margins, as trained models have: fbank rounding flips fewer
    paths = export_transducer(model, tok, d / "onnx", int8=True, comment="test")
    return model, tok, paths, d / "onnx", utts


def _fbank(utts, corpora_dir):
    import soundfile as sf

    from speechkd.data.features import fbank_extractor

    fe = fbank_extractor()
    out = []
    for u in utts:
        wav, sr = sf.read(corpora_dir / "speech_commands_v2_test" / u.path, dtype="float32")
        assert sr == 16000
        out.append((wav, fe.extract(wav, 16000)))
    return out


def _batch(feats):
    """``(x (N, T, 80), lens (N,))`` tensors of right-padded fbank matrices."""
    from speechkd.export import pad_features

    x, lens = pad_features(feats)
    return torch.from_numpy(x), torch.from_numpy(lens)


def test_layout_and_metadata(exported):
    import onnx

    model, tok, paths, d, _ = exported
    assert {p.name for p in d.iterdir()} == {"encoder.onnx", "decoder.onnx", "joiner.onnx", "tokens.txt",
                                               "encoder.int8.onnx", "decoder.int8.onnx", "joiner.int8.onnx",
                                               "export.json"}  # weights inside each graph, no *.data
    meta = {p.key: p.value for p in onnx.load(str(d / "decoder.onnx")).metadata_props}
    assert meta["vocab_size"] == str(tok.vocab_size) and meta["context_size"] == str(model.decoder.context_size)
    lines = (d / "tokens.txt").read_text().splitlines()
    assert lines[0] == "<blk> 0" and len(lines) == tok.vocab_size
    assert json.loads((d / "export.json").read_text())["vocab_size"] == tok.vocab_size
    with pytest.raises(FileExistsError):
        export_transducer(model, tok, d)


def test_onnxruntime_matches_pytorch_on_real_fbank(exported, corpora_dir):
    model, tok, _, d, utts = exported
    feats = [f for _, f in _fbank(utts[:12], corpora_dir)]
    x, lens = _batch(feats)
    with torch.no_grad():
        enc, enc_lens, _ = model.encode(x, lens)
        ref = greedy_search(model, enc, enc_lens)
        proj = model.joiner.encoder_proj(enc)
    onnx_model = OnnxTransducer(d)
    out, out_lens = onnx_model.encode(x.numpy(), lens.numpy())
    assert out_lens.tolist() == enc_lens.tolist()
    for i, n in enumerate(out_lens):
        np.testing.assert_allclose(out[i, :n], proj[i, :n].numpy(), rtol=0, atol=1e-4)
    hyps = onnx_model.greedy(out, out_lens)
    assert hyps == ref and any(hyps)
    # the decoder graph reads sherpa-onnx's start context [-1, blank] as [blank, blank]
    dec = onnx_model.sessions["decoder"]
    c = model.decoder.context_size
    np.testing.assert_allclose(dec.run(None, {"y": np.array([[-1] + [0] * (c - 1)])})[0],
                               dec.run(None, {"y": np.zeros((1, c), dtype=np.int64)})[0], rtol=0, atol=0)
    q = OnnxTransducer(d, int8=True).transcribe_features(feats)  # int8: runs; equality not asserted
    assert len(q) == len(feats)


def test_sherpa_onnx_decodes_the_export_like_onnxruntime(exported, corpora_dir):
    """sherpa-onnx (its own fbank from the waveform) and onnxruntime on speechkd's fbank give the same tokens."""
    sherpa_onnx = pytest.importorskip("sherpa_onnx")
    model, tok, _, d, utts = exported
    rec = sherpa_onnx.OfflineRecognizer.from_transducer(
        encoder=str(d / "encoder.onnx"), decoder=str(d / "decoder.onnx"), joiner=str(d / "joiner.onnx"),
        tokens=str(d / "tokens.txt"), num_threads=1, sample_rate=16000, feature_dim=80,
        decoding_method="greedy_search")
    onnx_model = OnnxTransducer(d)
    same = 0
    pairs = _fbank(utts[:20], corpora_dir)
    for wav, feats in pairs:
        stream = rec.create_stream()
        stream.accept_waveform(16000, wav)
        rec.decode_stream(stream)
        ours = [onnx_model.tokens[t].replace("\u2581", " ") for t in onnx_model.transcribe_features([feats])[0]]
        same += list(stream.result.tokens) == ours
    assert same >= len(pairs) - 1, f"{same}/{len(pairs)}"


def test_damaged_exports_are_named(exported, tmp_path):
    import shutil

    model, tok, _, d, _ = exported
    bad = tmp_path / "bad"
    shutil.copytree(d, bad)
    (bad / "joiner.onnx").unlink()
    with pytest.raises(FileNotFoundError, match="joiner.onnx"):
        OnnxTransducer(bad)
    shutil.copy(d / "joiner.onnx", bad / "joiner.onnx")
    (bad / "tokens.txt").write_text("<blk> 0\n")
    with pytest.raises(ValueError, match="tokens.txt"):
        OnnxTransducer(bad)
    other = Tokenizer(train_tokenizer(["yes no"] * 5, tmp_path / "o.model", vocab_size=10))
    with pytest.raises(ValueError, match="tokenizer"):
        export_transducer(model, other, tmp_path / "x")


def test_transcribe_api_and_cli(exported, corpora_dir, tmp_path):
    """speechkd.load(...).transcribe: PyTorch run and ONNX export give the texts of the PyTorch greedy search; other
    sampling rates and channel counts are read; a damaged file is reported by name while the others are
    transcribed (CLI, JSON lines)."""
    import shutil

    import soundfile as sf
    from scipy.signal import resample_poly
    from typer.testing import CliRunner

    import speechkd
    from speechkd.cli import app
    from speechkd.models.build import save_model

    model, tok, _, d, utts = exported
    pt = tmp_path / "run"
    save_model(model, pt, ModelConfig(dim=32, num_layers=2, num_heads=2, ff_dim=64, decoder_dim=16, joiner_dim=16,
                                      dropout=0.0), tok.vocab_size)
    shutil.copy(d.parent / "tokens.model", pt / "tokens.model")
    paths = [str(corpora_dir / "speech_commands_v2_test" / u.path) for u in utts[:6]]
    texts = speechkd.load(pt).transcribe(paths)
    assert texts == speechkd.load(d).transcribe(paths)  # onnx chosen by encoder.onnx
    pairs = _fbank(utts[:6], corpora_dir)
    x, lens = _batch([f for _, f in pairs])
    with torch.no_grad():
        enc, enc_lens, _ = model.encode(x, lens)
    assert texts == [t.strip() for t in tok.decode(greedy_search(model, enc, enc_lens))]
    wav = pairs[0][0]
    assert speechkd.load(pt).transcribe(wav, sampling_rate=16000) == texts[0]  # an array
    stereo = tmp_path / "stereo.wav"
    sf.write(stereo, np.stack([wav, wav], 1), 16000)
    assert speechkd.load(pt).transcribe(str(stereo)) == texts[0]  # downmixed
    low = tmp_path / "low.wav"
    sf.write(low, resample_poly(wav, 1, 2).astype(np.float32), 8000)
    assert isinstance(speechkd.load(pt).transcribe(str(low)), str)  # resampled to 16 kHz
    with pytest.raises(ValueError, match="longer than"):
        speechkd.load(pt, max_seconds=0.5).transcribe(paths[0])
    folder = tmp_path / "in"
    folder.mkdir()
    for p in paths[:3]:
        shutil.copy(p, folder)
    (folder / "broken.flac").write_bytes(b"fLaC not really")
    res = CliRunner().invoke(app, ["transcribe", str(d), str(folder), "--out", str(tmp_path / "o.jsonl"),
                                   "--no-progress"])
    assert res.exit_code == 1 and "broken.flac" in res.output
    rows = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and sum(r["text"] is not None for r in rows) == 3
    assert [r for r in rows if r["text"] is None][0]["audio"].endswith("broken.flac")
    # --beam 3: the PyTorch model's modified beam search, best hypothesis; refused for the ONNX graphs
    from speechkd.decoding import nbest_search

    with torch.no_grad():
        best = [nb[0][0] for nb in nbest_search(model, enc, enc_lens, beam=3)]
    assert speechkd.load(pt, beam=3).transcribe(paths) == [t.strip() for t in tok.decode(best)]
    res = CliRunner().invoke(app, ["transcribe", str(pt), paths[0], "--beam", "3", "--no-progress"])
    assert res.exit_code == 0 and res.output.strip() == f"{paths[0]}\t{tok.decode(best)[0].strip()}", res.output
    res = CliRunner().invoke(app, ["transcribe", str(d), paths[0], "--beam", "3", "--no-progress"])
    assert res.exit_code == 2 and "PyTorch model only" in res.output
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        (pt / "tokens.model").unlink()
        speechkd.load(pt)


def test_aed_export_matches_pytorch(exported, corpora_dir, tmp_path):
    """An attention encoder-decoder: encoder.onnx + decoder.onnx; onnxruntime's encoder frames and greedy hypotheses
    equal PyTorch's; speechkd.load picks it from export.json."""
    import speechkd
    from speechkd.decoding.aed import greedy_search as aed_greedy
    from speechkd.export import OnnxAed, export_model, load_onnx

    _, tok, _, d, utts = exported
    torch.manual_seed(1)
    aed = build_model(ModelConfig(arch="aed", dim=32, num_layers=2, num_heads=2, ff_dim=64, decoder_dim=32,
                                  decoder_layers=1, decoder_heads=2, decoder_ff_dim=64, dropout=0.0),
                      tok.vocab_size).eval()
    out = tmp_path / "aed"
    export_model(aed, tok, out, int8=True)
    assert isinstance(load_onnx(out), OnnxAed) and not (out / "joiner.onnx").exists()
    pairs = _fbank(utts[:8], corpora_dir)
    feats = [f for _, f in pairs]
    x, lens = _batch(feats)
    with torch.no_grad():
        enc, enc_lens, _ = aed.encode(x, lens)
        ref = aed_greedy(aed, enc, enc_lens)
    m = OnnxAed(out)
    o, ol = m.encode(x.numpy(), lens.numpy())
    for i, n in enumerate(ol):
        np.testing.assert_allclose(o[i, :n], enc[i, :n].numpy(), rtol=0, atol=1e-4)
    assert m.greedy(o, ol) == ref and any(ref)
    texts = speechkd.load(out).transcribe([w for w, _ in pairs], sampling_rate=16000)
    assert texts == [t.strip() for t in tok.decode(ref)]
    assert len(OnnxAed(out, int8=True).transcribe_features(feats)) == len(feats)
