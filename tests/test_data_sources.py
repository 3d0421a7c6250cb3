"""The data stage on every source (speechkd.data.prepare): the built-in task unchanged, TSV corpora, lhotse
manifests, a LibriSpeech-layout folder prepared by lhotse's recipe, untranscribed audio, and bad input."""

import json
from pathlib import Path

import pytest

from speechkd.config import Recipe
from speechkd.pipeline import Experiment, prepare

REFERENCE = Path(__file__).parent / "data" / "connected_words_reference.json"


def _exp(tmp_path, corpora_dir, data: dict, name="x") -> Experiment:
    r = Recipe.model_validate({"name": name, "exp_dir": str(tmp_path / name), "data": data})
    r.data.corpora_dir = str(corpora_dir)
    return Experiment(r, progress=False)


def _rows(exp, split):
    return [[c.id, round(c.duration, 6), c.num_frames, c.supervisions[0].text, c.supervisions[0].speaker,
             round(float(c.load_features().mean()), 4)] for c in exp.cuts(split)]


@pytest.mark.parametrize("name,data", [
    ("smoke", {"corpus": "digits", "smoke": True, "num_train": 24, "num_dev": 6, "num_test": 6, "max_words": 3,
               "vocab_size": 32, "num_jobs": 1}),
    ("commands", {"corpus": "commands", "num_train": 20, "num_dev": 8, "num_test": 8, "vocab_size": 48,
                  "num_jobs": 1}),
])
def test_connected_words_cuts_equal_the_previous_behaviour(tmp_path, corpora_dir, name, data):
    # The reference was written by the data stage as it was before data sources existed (commit 168b2a5, the
    # same two recipes): cut ids, durations, frames, texts, speakers and the mean of each cut's fbank.
    ref = json.loads(REFERENCE.read_text())[name]
    exp = _exp(tmp_path, corpora_dir, data, name)
    prepare(exp)
    for split in ("train", "dev", "test"):
        assert _rows(exp, split) == ref[split], split


# ------------------------------------------------------------------------------------------------ text rule
def test_text_normalisation_rule():
    from speechkd.data.text import TextNormalizer, normalize_text

    assert normalize_text("Printing, in the ONLY sense.") == "printing in the only sense"
    assert normalize_text("don't 'quote' me--now") == "don't quote me now"
    assert normalize_text("ｆｕｌｌ\u00a0width") == "full width"  # NFKC folds full-width letters and nbsp
    assert normalize_text("zero\u200bwidth\ufeff") == "zerowidth"  # format characters removed
    assert normalize_text("Keep, Case", lowercase=False, strip_punctuation=False) == "Keep, Case"
    norm = TextNormalizer()
    assert norm.check(norm("Café")) is not None and "U+00E9" in norm.check(norm("Café"))
    assert norm.check(norm(" ... ")).startswith("empty")
    assert norm.check(norm("two thousand and one")) is None
    assert TextNormalizer(alphabet=None).check("café") is None


def test_unknown_data_source_is_refused():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="tssv"):
        Recipe.model_validate({"name": "x", "exp_dir": "e", "data": {"source": "tssv", "corpora": ["an4"]}})
    with pytest.raises(ValidationError, match="corpus"):  # a connected_words key on a tsv source
        Recipe.model_validate({"name": "x", "exp_dir": "e", "data": {"source": "tsv", "corpora": ["an4"],
                                                                   "corpus": "digits"}})
    r = Recipe.model_validate({"name": "x", "exp_dir": "e"})
    assert r.data.source == "connected_words" and r.data.corpus == "commands"


# ------------------------------------------------------------------------------------------------ bad input
def _an4(corpora_dir):
    from speechkd.data.corpora import corpus_dir, read_metadata

    meta = read_metadata(corpus_dir("an4", corpora_dir))
    return list(meta.values())


def _bad_corpus(tmp_path, corpora_dir, cases) -> Path:
    """A TSV corpus of real an4 recordings: 4 good train rows, 2 dev, 2 test, plus one row per bad case."""
    import shutil

    import numpy as np
    import soundfile as sf

    root = tmp_path / "corpus"
    (root / "audio").mkdir(parents=True)
    (root / "splits").mkdir()
    utts = _an4(corpora_dir)
    header = "id\tpath\tspeaker\ttext\tlabel\tduration\tsample_rate"
    rows, splits = [header], {"train": [], "dev": [], "test": []}

    def add(uid, u, split, text=None, duration=None, path=None, rate=16000):
        if path is None:
            path = f"audio/{uid}.flac"
            shutil.copy(u.path, root / path)
        rows.append(f"{uid}\t{path}\t{u.speaker}\t{u.text if text is None else text}\t\t"
                    f"{u.duration if duration is None else duration:.3f}\t{rate}")
        if split:
            splits[split].append(uid)

    good = utts[:8]
    for i, u in enumerate(good):
        add(f"good{i}", u, (["train"] * 4 + ["dev"] * 2 + ["test"] * 2)[i])
    u = utts[8]
    if "missing" in cases:
        add("missing", u, "train", path="audio/nowhere.flac")
    if "truncated" in cases:
        data = Path(u.path).read_bytes()
        (root / "audio" / "truncated.flac").write_bytes(data[: len(data) // 3])
        add("truncated", u, "train", path="audio/truncated.flac")
    if "nan" in cases:
        wav = np.random.default_rng(0).standard_normal(16000).astype(np.float32) * 0.1
        wav[100:200] = np.nan
        sf.write(root / "audio" / "nan.wav", wav, 16000, subtype="FLOAT")
        add("nan", u, "train", duration=1.0, path="audio/nan.wav")
    if "empty_audio" in cases:
        sf.write(root / "audio" / "empty.wav", np.zeros(0, dtype=np.float32), 16000)
        add("empty_audio", u, "train", duration=1.0, path="audio/empty.wav")
    if "duration" in cases:
        add("duration", u, "train", duration=u.duration + 2.0)
    if "rate" in cases:
        add("rate", u, "train", rate=8000)
    if "empty_text" in cases:
        add("empty_text", u, "train", text="")
    if "alphabet" in cases:
        add("alphabet", u, "train", text="café au lait")
    if "duplicate" in cases:
        shutil.copy(utts[9].path, root / "audio" / "dup.flac")
        add("good0", utts[9], None, path="audio/dup.flac")
    if "two_splits" in cases:
        splits["dev"].append("good0")
    (root / "metadata.tsv").write_text("\n".join(rows) + "\n")
    for split, ids in splits.items():
        (root / "splits" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return root


BAD_CASES = {  # case -> words the reason must hold
    "missing": "not found",
    "truncated": "",  # unreadable or shorter than declared: the message depends on where the FLAC was cut
    "nan": "non-finite",
    "empty_audio": "empty recording",
    "duration": "declared duration",
    "rate": "sample rate",
    "empty_text": "empty transcript",
    "alphabet": "outside the alphabet",
    "duplicate": "duplicate",
    "two_splits": "same audio",
}


def _tsv_exp(tmp_path, corpora_dir, root, **data):
    return _exp(tmp_path, corpora_dir, {"source": "tsv", "corpora": [str(root)], "vocab_size": 40, "num_jobs": 1,
                                        **data}, name="bad")


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_row_stops_with_a_message_naming_it(tmp_path, corpora_dir, case):
    from speechkd.data.validation import BadInputError

    root = _bad_corpus(tmp_path, corpora_dir, {case})
    exp = _tsv_exp(tmp_path, corpora_dir, root)
    with pytest.raises(BadInputError) as err:
        prepare(exp)
    msg = str(err.value)
    assert "metadata.tsv:" in msg and BAD_CASES[case] in msg and "on_bad_input: skip" in msg
    bad_id = "good0" if case in ("duplicate", "two_splits") else case
    assert f"'{bad_id}'" in msg


def test_skip_mode_reports_every_bad_row_and_keeps_the_good_ones(tmp_path, corpora_dir):
    root = _bad_corpus(tmp_path, corpora_dir, set(BAD_CASES))
    exp = _tsv_exp(tmp_path, corpora_dir, root, on_bad_input="skip")
    prepare(exp)
    skipped = [json.loads(line) for line in (exp.dir / "cuts" / "skipped.jsonl").read_text().splitlines()]
    by_id = {}
    for s in skipped:
        by_id.setdefault(s["id"], []).append(s)
    for case, words in BAD_CASES.items():
        cid = "good0" if case in ("duplicate", "two_splits") else case
        assert any(words in s["reason"] and s["file"] for s in by_id[cid]), (case, by_id.get(cid))
    assert len(skipped) == len(BAD_CASES)
    ids = {s: [c.id for c in exp.cuts(s)] for s in ("train", "dev", "test")}
    # good0 stays in the split listed first in the checking order (dev before train)
    assert ids == {"train": ["good1", "good2", "good3"], "dev": ["good4", "good5", "good0"], "test": ["good6", "good7"]}


def test_stopped_prepare_keeps_what_it_wrote_and_resumes(tmp_path, corpora_dir):
    from speechkd.data.validation import BadInputError

    root = _bad_corpus(tmp_path, corpora_dir, {"nan"})
    exp = _tsv_exp(tmp_path, corpora_dir, root)
    with pytest.raises(BadInputError):
        prepare(exp)
    done = {s: exp.cuts_path(s).stat().st_mtime_ns for s in ("test", "dev")}
    assert not exp.cuts_path("train").exists()
    exp.recipe.data.on_bad_input = "skip"
    prepare(exp)
    assert {s: exp.cuts_path(s).stat().st_mtime_ns for s in ("test", "dev")} == done
    assert [c.id for c in exp.cuts("train")] == ["good0", "good1", "good2", "good3"]


# ------------------------------------------------------------------------------------------------ fbank chunks
def test_fbank_chunks_resume_and_match_lhotse(tmp_path, corpora_dir):
    import numpy as np
    from lhotse import CutSet, Fbank, FbankConfig

    from speechkd.data.corpora import corpus_dir, read_metadata, read_split, utterances_to_cuts
    from speechkd.data.features import compute_fbank_chunks, merge_manifests

    cdir = corpus_dir("ljspeech", corpora_dir)  # 22.05 kHz: resampled to 16 kHz on load
    cuts = utterances_to_cuts(read_split(cdir, "smoke", read_metadata(cdir))[:5], sampling_rate=22050)
    raw = tmp_path / "raw.jsonl.gz"
    cuts.to_file(raw)
    out = tmp_path / "feats"
    manifests, skips = compute_fbank_chunks(raw, out, "train", num_jobs=2, chunk_cuts=2, progress=False)
    assert [m.name for m in manifests] == ["chunk-00000.jsonl.gz", "chunk-00001.jsonl.gz", "chunk-00002.jsonl.gz"]
    assert skips == []
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("chunk-*.lca")}
    manifests[1].unlink()  # as if the run had stopped while chunk 1 was being written
    compute_fbank_chunks(raw, out, "train", num_jobs=1, chunk_cuts=2, progress=False)
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("chunk-*.lca")}
    assert after["chunk-00000.lca"] == stamps["chunk-00000.lca"] and after["chunk-00002.lca"] == stamps["chunk-00002.lca"]
    assert after["chunk-00001.lca"] != stamps["chunk-00001.lca"]
    merge_manifests(manifests, tmp_path / "cuts.jsonl.gz")
    got = CutSet.from_file(tmp_path / "cuts.jsonl.gz").to_eager()
    assert [c.id for c in got] == [c.id for c in cuts]
    # the same features as lhotse's own extractor on lhotse's own resampled audio (lilcom: lossy storage)
    fb = Fbank(FbankConfig(num_mel_bins=80, frame_shift=0.01, sampling_rate=16000))
    for c, ref in zip(got, cuts):
        want = fb.extract(ref.resample(16000).load_audio(), 16000)
        assert c.load_features().shape == want.shape
        assert np.abs(c.load_features() - want).max() < 0.05
