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
