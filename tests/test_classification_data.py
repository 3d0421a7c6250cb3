"""KWS / SV CutSets and waveform batches, on the shared corpora's smoke splits."""

import shutil
from pathlib import Path

import pytest
import torch

from speechkd.data.classification import (
    IGNORE_INDEX,
    KWS_CLASSES,
    KWS_CORPUS,
    WaveformDataset,
    kws_cuts,
    sv_train_cuts,
    sv_trial_cuts,
)
from speechkd.data.corpora import CorpusError
from speechkd.data.datamodule import make_loader


def test_kws_class_list_and_smoke_cuts(corpora_dir):
    assert len(KWS_CLASSES) == 12 and len(set(KWS_CLASSES)) == 12
    assert KWS_CLASSES[-2:] == ("_unknown_", "_silence_")
    cuts = kws_cuts("smoke", corpora_dir)
    assert len(cuts) == 60
    targets = [c.custom["kws_target"] for c in cuts]
    assert all(0 <= t < 12 for t in targets) and sorted(set(targets)) == list(range(12))
    assert all(c.custom["spk_target"] == IGNORE_INDEX for c in cuts)
    assert all(c.sampling_rate == 16000 for c in cuts)
    assert all(c.custom["speaker"] == "" for c in cuts if c.custom["kws_target"] == KWS_CLASSES.index("_silence_"))


def test_waveform_batches_have_documented_shapes(corpora_dir):
    cuts = kws_cuts("smoke", corpora_dir)
    loader = make_loader(cuts, WaveformDataset(), max_duration=4.0, shuffle=True, seed=0)
    for i, batch in enumerate(loader):
        n = len(batch["cut_ids"])
        assert 1 <= n <= 4
        assert batch["wavs"].dtype == torch.float32 and batch["wavs"].shape == (n, int(batch["lens"].max()))
        assert batch["lens"].dtype == torch.int64 and batch["lens"].shape == (n,)
        assert (batch["lens"] == 16000).all()  # 1-s clips at 16 kHz
        for key in ("kws_target", "spk_target"):
            assert batch[key].dtype == torch.int64 and batch[key].shape == (n,)
        assert ((batch["kws_target"] >= 0) & (batch["kws_target"] < 12)).all()
        if i == 2:
            break


def test_sv_train_cuts_speakers_and_padding(corpora_dir):
    cuts, speakers = sv_train_cuts("smoke", corpora_dir=corpora_dir, max_segment=4.0)
    assert speakers == sorted(speakers) and len(set(speakers)) == len(speakers)
    assert any(s.startswith("speech_commands_v2_test/") for s in speakers)
    assert any(s.startswith("librispeech_spk/") for s in speakers)
    for c in cuts:
        assert 0 <= c.custom["spk_target"] < len(speakers)
        assert speakers[c.custom["spk_target"]] == c.custom["speaker"]
        assert c.duration <= 4.0 + 1e-6
        is_kws = c.custom["corpus"] == KWS_CORPUS
        assert (0 <= c.custom["kws_target"] < 12) if is_kws else c.custom["kws_target"] == IGNORE_INDEX
    n_silence = sum(c.custom["kws_target"] == KWS_CLASSES.index("_silence_") for c in cuts)
    assert n_silence == 0  # no speaker: left out unless keep_no_speaker
    joint, _ = sv_train_cuts("smoke", corpora_dir=corpora_dir, keep_no_speaker=True, max_segment=4.0)
    assert len(joint) == len(cuts) + 5
    # a batch mixing a 1-s clip and a 4-s segment: zero padding after lens
    pick = [next(c for c in cuts if c.duration < 1.5), next(c for c in cuts if c.duration > 3.5)]
    batch = WaveformDataset()[pick]
    assert batch["wavs"].shape == (2, int(batch["lens"].max())) and batch["lens"].tolist()[0] < batch["lens"][1]
    assert batch["wavs"][0, batch["lens"][0]:].abs().sum() == 0


def test_sv_trial_cuts_cover_the_trials(corpora_dir):
    cuts, trials = sv_trial_cuts("librispeech_spk", "sv_dev", corpora_dir)
    assert set(cuts.ids) == set(trials.enroll_ids) | set(trials.test_ids)
    assert all(c.custom["spk_target"] == IGNORE_INDEX for c in cuts)
    with pytest.raises(CorpusError, match=r"sv_nope.tsv: trial file not found .*sv_dev"):
        sv_trial_cuts("librispeech_spk", "sv_nope", corpora_dir)


def _tiny_commands(tmp_path: Path, corpora_dir: Path, rows: list[str]) -> Path:
    """A corpora dir with a 'speech_commands_v2_test' of the given metadata rows (audio copied from the real one)."""
    d = tmp_path / KWS_CORPUS
    (d / "splits").mkdir(parents=True)
    (d / "audio").mkdir()
    src = corpora_dir / KWS_CORPUS / "audio" / "yes" / "0bac8a71_nohash_0.flac"
    shutil.copy(src, d / "audio" / "a.flac")
    header = "id\tpath\tspeaker\ttext\tlabel\tduration\tsample_rate"
    (d / "metadata.tsv").write_text("\n".join([header] + rows) + "\n")
    (d / "splits" / "smoke.txt").write_text("a\n")
    return tmp_path


def test_malformed_metadata_and_labels_name_file_and_utterance(tmp_path, corpora_dir):
    root = _tiny_commands(tmp_path / "ok", corpora_dir, ["a\taudio/a.flac\tspk\tyes\tyes\t1.0\t16000"])
    assert [c.custom["kws_target"] for c in kws_cuts("smoke", root)] == [0]
    root = _tiny_commands(tmp_path / "bad_row", corpora_dir, ["a\taudio/a.flac\tspk\tyes"])
    with pytest.raises(CorpusError, match=r"speech_commands_v2_test/metadata.tsv:2: expected 7"):
        kws_cuts("smoke", root)
    root = _tiny_commands(tmp_path / "bad_label", corpora_dir, ["a\taudio/a.flac\tspk\tcat\tcat\t1.0\t16000"])
    with pytest.raises(CorpusError, match=r"metadata.tsv: utterance 'a' has label 'cat'"):
        kws_cuts("smoke", root)
    root = _tiny_commands(tmp_path / "no_audio", corpora_dir, ["a\taudio/zz.flac\tspk\tyes\tyes\t1.0\t16000"])
    with pytest.raises(CorpusError, match=r"utterance 'a' not found: .*zz.flac"):
        kws_cuts("smoke", root)
