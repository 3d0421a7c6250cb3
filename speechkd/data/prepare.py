"""The data stage: any source (:mod:`speechkd.data.sources`) -> the same CutSet contract, fbank, tokenizer.

Whatever ``data.source`` is, ``prepare`` writes into the experiment directory:

- ``cuts/raw/<split>.jsonl.gz``: the checked cuts without features (``test``, ``dev``, ``train``, and
  ``unlabelled`` when ``data.unlabelled`` names untranscribed sets), with the skipped rows beside them;
- ``cuts/feats/<split>/chunk-*.{lca,jsonl.gz}``: fbank in resumable chunks (:mod:`speechkd.data.features`);
- ``cuts/<split>.jsonl.gz``: the cuts with features, each with one supervision whose ``text`` is the normalised
  transcript (None in ``unlabelled``); the raw transcript, where normalisation changed it, is the supervision's
  ``custom["orig_text"]``;
- ``cuts/skipped.jsonl``: every row left out (``split``, ``id``, ``file``, ``origin``, ``reason``);
- ``lang/tokens.model``: sentencepiece (``data.token_type``, ``data.vocab_size``) on the normalised train text.

Checks, in split order test, dev, train, unlabelled (an earlier split keeps a cut that a later one repeats):
empty or out-of-alphabet transcripts (labelled splits), duplicate cut ids, the same audio (file, start,
duration) in two cuts, missing/unreadable/empty files and declared durations or rates that disagree with the
file (by the source), NaN samples or truncated audio (when fbank reads it). ``data.on_bad_input`` says whether
they stop the stage or are skipped; training and unlabelled cuts longer than ``data.max_cut_duration`` are
dropped either way. Every step resumes: a finished split, raw manifest or fbank chunk is not redone.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

from speechkd.data.validation import BadInputPolicy, Skip, audio_file_of, read_skips, write_skips
from speechkd.utils import atomic_path, log

#: Labelled splits in the order they are checked (an earlier split wins a cut repeated by a later one).
LABELLED_SPLITS = ("test", "dev", "train")
UNLABELLED = "unlabelled"


def _raw_path(exp_dir: Path, split: str) -> Path:
    return exp_dir / "cuts" / "raw" / f"{split}.jsonl.gz"


def _raw_skips_path(exp_dir: Path, split: str) -> Path:
    return exp_dir / "cuts" / "raw" / f"{split}.skipped.jsonl"


def skipped_report_path(exp_dir: Path) -> Path:
    """``<exp>/cuts/skipped.jsonl``: every row the data stage left out, with its reason."""
    return exp_dir / "cuts" / "skipped.jsonl"


class _Seen:
    """Cut ids and audio spans of the splits checked so far (ids and spans only: no cut held in memory).

    Ids must be unique within a split, and across train and unlabelled (their teacher labels share one store);
    the same audio (file, start, duration) may not appear twice anywhere: that is a cut in two splits. (Dev and
    test may reuse a train id for other audio: the built-in connected-word task's smoke splits do.)
    """

    def __init__(self):
        self.ids: dict[tuple[str, str], str] = {}
        self.spans: dict[tuple, tuple[str, str]] = {}

    @staticmethod
    def _group(split: str) -> str:
        return "train" if split == UNLABELLED else split

    @staticmethod
    def span(cut) -> Optional[tuple]:
        file = audio_file_of(cut)
        return (file, round(cut.start, 3), round(cut.duration, 3)) if file else None

    def add(self, cut, split: str) -> None:
        self.ids[(self._group(split), cut.id)] = split
        s = self.span(cut)
        if s is not None:
            self.spans[s] = (split, cut.id)

    def problem(self, cut, split: str) -> Optional[str]:
        key = (self._group(split), cut.id)
        if key in self.ids:
            other = self.ids[key]
            return f"duplicate cut id (already in {'this split' if other == split else f'split {other!r}'})"
        s = self.span(cut)
        if s is not None and s in self.spans:
            other, oid = self.spans[s]
            where = "this split" if other == split else f"split {other!r}"
            return f"same audio ({s[0]}, {s[1]} s + {s[2]} s) as cut '{oid}' of {where}"
        return None


def _build_raw(exp, split: str, rows, policy: BadInputPolicy, seen: _Seen, normalizer, labelled: bool,
               max_duration: Optional[float]) -> int:
    """Check a split's rows and write ``cuts/raw/<split>.jsonl.gz`` (streamed, atomic); returns the cuts kept."""
    from lhotse import CutSet
    from lhotse.utils import fastcopy

    path = _raw_path(exp.dir, split)
    n = 0
    with atomic_path(path) as tmp, CutSet.open_writer(tmp) as writer:
        for row in rows:
            cut, origin = row.cut, row.origin
            file = audio_file_of(cut)
            if labelled:
                raw_text = " ".join(s.text for s in cut.supervisions if s.text)
                text = normalizer(raw_text)
                problem = normalizer.check(text)
                if problem is not None:
                    policy.bad(cut.id, file, f"{problem} (raw: {raw_text!r})", origin)
                    continue
                sup = cut.supervisions[0]
                custom = dict(sup.custom or {})
                if text != raw_text:
                    custom["orig_text"] = raw_text
                sups = [fastcopy(sup, text=text, duration=cut.duration, start=0.0, custom=custom or None)]
            else:
                sups = [fastcopy(s, text=None) for s in cut.supervisions[:1]]
            problem = seen.problem(cut, split)
            if problem is not None:
                policy.bad(cut.id, file, problem, origin)
                continue
            if max_duration is not None and cut.duration > max_duration:
                policy.drop(cut.id, file, f"longer than data.max_cut_duration ({cut.duration:.2f} s > "
                                          f"{max_duration} s)", origin)
                continue
            seen.add(cut, split)
            writer.write(fastcopy(cut, supervisions=sups, custom={**(cut.custom or {}), "origin": origin}))
            n += 1
    write_skips(_raw_skips_path(exp.dir, split), policy.skips)
    return n


def _source_rows(exp, split: str, policy: BadInputPolicy, shared: dict):
    from speechkd.data.sources import SOURCES, SourceContext, unlabelled_rows

    d = exp.recipe.data
    ctx = SourceContext(exp.dir, d.corpora_dir, policy, num_jobs=d.num_jobs, progress=exp.progress, extra=shared)
    if split == UNLABELLED:
        for i, entry in enumerate(d.unlabelled):
            yield from unlabelled_rows(entry, i, ctx, tolerance=d.duration_tolerance)
    else:
        yield from SOURCES[d.source](d, split, ctx)


def prepare_data(exp) -> None:
    """The data stage of an ASR experiment (see the module docstring); resumes what a stopped run left.

    Args:
      exp: a :class:`speechkd.pipeline.Experiment`.

    Raises:
      speechkd.data.validation.BadInputError: a damaged row with ``data.on_bad_input: error``, naming the row.
      speechkd.data.corpora.CorpusError / FileNotFoundError: a source that cannot be read at all (naming it).
      ValueError: a split left without any cut, or a vocabulary too small for the transcripts' characters.
    """
    from lhotse import CutSet

    from speechkd.data.features import compute_fbank_chunks, merge_manifests
    from speechkd.data.text import TextNormalizer
    from speechkd.data.tokenizer import train_tokenizer

    d = exp.recipe.data
    normalizer = TextNormalizer.from_config(d.text)
    splits = list(LABELLED_SPLITS) + ([UNLABELLED] if d.unlabelled else [])
    seen = _Seen()
    shared: dict = {}
    skips: list[Skip] = []
    for split in splits:
        t0 = time.time()
        labelled = split != UNLABELLED
        raw = _raw_path(exp.dir, split)
        if raw.is_file():
            for cut in CutSet.from_file(raw):
                seen.add(cut, split)
        else:
            policy = BadInputPolicy(d.on_bad_input, split)
            max_dur = d.max_cut_duration if split in ("train", UNLABELLED) else None
            _build_raw(exp, split, _source_rows(exp, split, policy, shared), policy, seen, normalizer, labelled, max_dur)
        skips += read_skips(_raw_skips_path(exp.dir, split))
        out = exp.cuts_path(split)
        if out.is_file():
            log(f"prepare: {out} exists, skipped")
            skips += [s for p in sorted((exp.dir / "cuts" / "feats" / split).glob("chunk-*.skipped.jsonl"))
                      for s in read_skips(p)]
            continue
        manifests, chunk_skips = compute_fbank_chunks(raw, exp.dir / "cuts" / "feats" / split, split,
                                                      num_jobs=d.num_jobs, chunk_cuts=d.fbank_chunk_cuts,
                                                      mode=d.on_bad_input, tolerance=d.duration_tolerance,
                                                      progress=exp.progress)
        skips += chunk_skips
        n = merge_manifests(manifests, out)
        if n == 0:
            out.unlink()
            raise ValueError(f"prepare: split {split!r} has no usable cut left (see {skipped_report_path(exp.dir)} "
                             "and the messages above)")
        cuts = CutSet.from_file(out)
        hours = sum(c.duration for c in cuts) / 3600
        speakers = {s.speaker for c in cuts for s in c.supervisions if s.speaker}
        n_skipped = sum(1 for s in skips if s.split == split)
        log(f"prepare: {split}: {n} cuts, {hours:.2f} h, {len(speakers)} speakers, {n_skipped} left out "
            f"({time.time() - t0:.0f} s)")
    n_skipped = write_skips(skipped_report_path(exp.dir), skips)
    if n_skipped:
        log(f"prepare: {n_skipped} rows left out, with reasons, in {skipped_report_path(exp.dir)}")
    if not exp.tokenizer_path.is_file():
        texts = (c.supervisions[0].text for c in CutSet.from_file(exp.cuts_path("train")))
        train_tokenizer(texts, exp.tokenizer_path, vocab_size=d.vocab_size, model_type=d.token_type)
        log(f"prepare: {d.token_type} tokenizer with {exp.tokenizer.vocab_size} tokens -> {exp.tokenizer_path}")
