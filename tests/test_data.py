"""Corpus reading, connected-word sequences and the tokenizer, on the real shared corpora."""

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from speechkd.data.corpora import CorpusError, corpus_dir, read_metadata, read_split, utterances_to_cuts
from speechkd.data.sequences import SequenceSpec, build_sequences, plan_sequences, trim_silence
from speechkd.data.tokenizer import Tokenizer, train_tokenizer


def _write_corpus(tmp_path: Path, rows: list[str]) -> Path:
    d = tmp_path / "c"
    (d / "splits").mkdir(parents=True)
    header = "id\tpath\tspeaker\ttext\tlabel\tduration\tsample_rate"
    (d / "metadata.tsv").write_text("\n".join([header] + rows) + "\n")
    return d


def test_malformed_metadata_names_file_and_line(tmp_path):
    d = _write_corpus(tmp_path, ["a\taudio/a.flac\ts1\tyes\tyes\t1.0\t16000", "b\taudio/b.flac\ts1\tno\tno\tone\t16000"])
    with pytest.raises(CorpusError, match=r"metadata.tsv:3: bad duration"):
        read_metadata(d)
    d2 = _write_corpus(tmp_path / "x", ["a\taudio/a.flac\ts1"])
    with pytest.raises(CorpusError, match=r"metadata.tsv:2: expected 7"):
        read_metadata(d2)


def test_missing_corpus_and_unknown_split_id(tmp_path):
    with pytest.raises(CorpusError, match="not found"):
        corpus_dir("commands", tmp_path)
    d = _write_corpus(tmp_path, ["a\taudio/a.flac\ts1\tyes\tyes\t1.0\t16000"])
    (d / "splits" / "train.txt").write_text("a\nzzz\n")
    with pytest.raises(CorpusError, match=r"train.txt:2: utterance id 'zzz'"):
        read_split(d, "train", read_metadata(d))


def test_real_corpus_splits_are_speaker_disjoint(corpora_dir):
    cdir = corpus_dir("commands", corpora_dir)
    meta = read_metadata(cdir)
    spk = {s: {u.speaker for u in read_split(cdir, s, meta) if u.speaker} for s in ("train", "dev", "test")}
    assert spk["train"] and not (spk["train"] & spk["dev"]) and not (spk["train"] & spk["test"])


def test_sequences_deterministic_one_speaker_and_audio_matches(corpora_dir, tmp_path):
    cdir = corpus_dir("digits", corpora_dir)
    meta = read_metadata(cdir)
    utts = read_split(cdir, "smoke", meta)
    spec = SequenceSpec(num_utts=5, min_words=2, max_words=3, trim_db=None)
    p1, p2 = plan_sequences(utts, spec, seed=3), plan_sequences(utts, spec, seed=3)
    assert [(a, [u.id for u in r], g) for a, r, g in p1] == [(a, [u.id for u in r], g) for a, r, g in p2]
    assert plan_sequences(utts, spec, seed=4) != p1
    cuts = build_sequences(utts, spec, seed=3, audio_dir=tmp_path / "audio", progress=False)
    for cut, (uid, picks, gaps) in zip(cuts, p1):
        assert cut.id == uid
        assert {u.speaker for u in picks} == {cut.supervisions[0].speaker}
        assert cut.supervisions[0].text == " ".join(u.text for u in picks)
        audio, sr = sf.read(tmp_path / "audio" / f"{uid}.flac")
        assert sr == 16000
        # length = sum of the 8 kHz sources resampled to 16 kHz + gaps + two 0.1 s edges (to the sample)
        src = sum(round(sf.info(u.path).frames * 2) for u in picks)
        expected = src + sum(int(g * sr) for g in gaps) + 2 * int(0.1 * sr)
        assert abs(len(audio) - expected) <= len(picks)


def test_isolated_utterances_to_cuts_resample(corpora_dir):
    cdir = corpus_dir("digits", corpora_dir)
    utts = read_split(cdir, "smoke", read_metadata(cdir))[:2]
    cuts = utterances_to_cuts(utts)
    for c, u in zip(cuts, utts):
        assert c.sampling_rate == 16000 and abs(c.duration - u.duration) < 0.01
        assert c.load_audio().shape[1] == pytest.approx(u.duration * 16000, abs=20)


def test_tokenizer_round_trip_and_blank(tmp_path):
    texts = ["go left stop", "yes no up down", "one two three four"] * 30
    tok = Tokenizer(train_tokenizer(texts, tmp_path / "t.model", vocab_size=40))
    assert tok.blank_id == 0 and tok.sp.id_to_piece(0) == "<blk>"
    ids = tok.encode(["go left stop", "up down"])
    assert all(0 not in seq for seq in ids)
    assert tok.decode(ids) == ["go left stop", "up down"]
    with pytest.raises(ValueError, match="too small"):
        train_tokenizer(texts, tmp_path / "u.model", vocab_size=5)


def test_trim_silence_keeps_the_loud_part_with_margin():
    sr = 16000
    rng = np.random.default_rng(0)
    tone = 0.5 * np.sin(2 * np.pi * 440 * np.arange(int(0.3 * sr)) / sr)
    audio = np.concatenate([1e-4 * rng.standard_normal(sr // 2), tone, 1e-4 * rng.standard_normal(sr // 4)])
    out = trim_silence(audio, sr, trim_db=35, margin=0.05)
    # 0.3 s of tone plus 0.05 s each side, to within one 10 ms frame
    assert abs(len(out) - int(0.4 * sr)) <= 2 * int(0.01 * sr)
    start = int(np.argmax(np.abs(out) > 0.1))
    assert abs(start - int(0.05 * sr)) <= int(0.01 * sr)
    assert len(trim_silence(np.zeros(1000), sr, 35)) == 1000
