"""Data sources: where a recipe's cuts come from (``data.source``), each turned into the same raw cuts.

A source is one function ``rows(cfg, split, ctx) -> Iterator[RawRow]`` registered in :data:`SOURCES` under its
``data.source`` name (and a member of :data:`speechkd.config.AnyData`): it yields, for one split (``train``,
``dev``, ``test``), one lhotse cut per utterance with its recording and one supervision (the transcript as
given, the speaker), and the row it came from for messages. Rows it cannot even build (a missing or unreadable
file, a declared duration or sampling rate that disagrees with the file) go to ``ctx.policy``. Everything after
(text normalisation, duplicate and cross-split checks, fbank, the tokenizer) is shared:
:mod:`speechkd.data.prepare`.

Sources:
  ``connected_words``: the built-in connected-word task (:mod:`speechkd.data.sequences`);
  ``tsv``: corpora in the shared TSV layout (:mod:`speechkd.data.corpora`);
  ``lhotse``: the user's CutSet (or recordings + supervisions) manifests;
  ``librispeech`` / ``mini_librispeech``: a local corpus folder prepared by lhotse's own recipe
  (:data:`LHOTSE_RECIPES`: adding another lhotse recipe is one line there).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

from speechkd.data.validation import BadInputPolicy, audio_file_of
from speechkd.utils import Seconds

AUDIO_SUFFIXES = (".flac", ".wav", ".mp3", ".ogg", ".opus", ".sph")


@dataclass
class RawRow:
    """One utterance read from a source.

    Attributes:
      cut: a lhotse MonoCut (MultiCut for a multi-channel file) with its recording and at most one supervision
        (``text`` as the source gives it, None for untranscribed audio).
      origin: the row it came from, for messages (``<corpus>/metadata.tsv:12``, ``<manifest>#5``).
    """

    cut: object
    origin: str


@dataclass
class SourceContext:
    """What a source may use: the experiment directory (for files a source writes, e.g. lhotse recipe manifests),
    the shared corpora directory, the bad-input policy of the split, worker processes, progress bars, and ``extra``,
    a dict shared by the splits of one data stage (e.g. metadata rows already reported)."""

    exp_dir: Path
    corpora_dir: Optional[str]
    policy: BadInputPolicy
    num_jobs: int = 1
    progress: bool = True
    extra: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------ shared helpers
def recording_cut(path: Path, cut_id: str, text: Optional[str], speaker: Optional[str], origin: str,
                  policy: BadInputPolicy, declared: Optional[Seconds] = None, declared_rate: Optional[int] = None,
                  tolerance: Seconds = 0.1) -> Optional[RawRow]:
    """A whole audio file as a cut with one supervision, or None when the file is bad (reported to ``policy``).

    Checks: the file exists and its header reads; it has samples; its duration is within ``tolerance`` seconds of
    ``declared`` and its rate equals ``declared_rate`` (when given).
    """
    from lhotse import Recording, SupervisionSegment

    if not path.is_file():
        policy.bad(cut_id, str(path), "audio file not found", origin)
        return None
    try:
        rec = Recording.from_file(path, recording_id=cut_id)
    except Exception as e:  # soundfile / audioread raise several types
        policy.bad(cut_id, str(path), f"unreadable audio ({type(e).__name__}: {e})", origin)
        return None
    if rec.num_samples == 0:
        policy.bad(cut_id, str(path), "empty recording (0 samples)", origin)
        return None
    if declared_rate is not None and rec.sampling_rate != declared_rate:
        policy.bad(cut_id, str(path), f"declared sample rate {declared_rate} Hz but the file is "
                                      f"{rec.sampling_rate} Hz", origin)
        return None
    if declared is not None and abs(rec.duration - declared) > tolerance:
        policy.bad(cut_id, str(path), f"declared duration {declared:.3f} s but the file holds {rec.duration:.3f} s "
                                      f"(tolerance {tolerance} s)", origin)
        return None
    cut = rec.to_cut()
    cut.supervisions = [SupervisionSegment(id=cut_id, recording_id=cut_id, start=0.0, duration=rec.duration,
                                           text=text, speaker=speaker or None, channel=rec.channel_ids if
                                           len(rec.channel_ids) > 1 else 0)]
    return RawRow(cut, origin)


def manifest_rows(cuts, origin: str, policy: BadInputPolicy) -> Iterator[RawRow]:
    """Rows of a lhotse CutSet (read lazily): a cut with several supervisions is split into one cut per
    supervision; a cut whose audio file is missing is reported to ``policy``."""
    for i, cut in enumerate(cuts):
        pieces = [cut] if len(cut.supervisions) <= 1 else cut.trim_to_supervisions(keep_overlapping=False)
        for piece in pieces:
            file = audio_file_of(piece)
            if file and piece.recording.sources[0].type == "file" and not Path(file).is_file():
                policy.bad(piece.id, file, "audio file not found", f"{origin}#{i + 1}")
                continue
            yield RawRow(piece, f"{origin}#{i + 1}")


def read_manifest(spec, what: str):
    """A lazily read CutSet from a manifest path, or from a ``{recordings, supervisions}`` pair.

    Raises:
      FileNotFoundError: a manifest is missing (naming ``what``, e.g. ``data.train``).
    """
    from lhotse import CutSet, RecordingSet, SupervisionSet

    if isinstance(spec, (str, Path)):
        if not Path(spec).is_file():
            raise FileNotFoundError(f"{what}: CutSet manifest not found: {spec}")
        return CutSet.from_file(spec)
    for key in ("recordings", "supervisions"):
        if not Path(getattr(spec, key)).is_file():
            raise FileNotFoundError(f"{what}.{key}: manifest not found: {getattr(spec, key)}")
    return CutSet.from_manifests(recordings=RecordingSet.from_file(spec.recordings),
                                 supervisions=SupervisionSet.from_file(spec.supervisions))


# ------------------------------------------------------------------------------------------------ the sources
def connected_words_rows(cfg, split: str, ctx: SourceContext) -> Iterator[RawRow]:
    """The built-in connected-word task: utterances joined from isolated words of one speaker, audio written to
    ``<exp>/cuts/audio/<split>`` (:func:`speechkd.data.sequences.build_sequences`, seeded by the split)."""
    from speechkd.data.corpora import corpus_dir, read_metadata, read_split
    from speechkd.data.sequences import SequenceSpec, build_sequences

    index = ("train", "dev", "test").index(split)
    cdir = corpus_dir(cfg.corpus, cfg.corpora_dir)
    meta = read_metadata(cdir)
    utts = read_split(cdir, "smoke" if cfg.smoke else split, meta)
    sizes = {"train": cfg.num_train, "dev": cfg.num_dev, "test": cfg.num_test}
    spec = SequenceSpec(num_utts=sizes[split], min_words=cfg.min_words, max_words=cfg.max_words,
                        min_gap=cfg.min_gap, max_gap=cfg.max_gap, trim_db=cfg.trim_db)
    cuts = build_sequences(utts, spec, seed=cfg.seed * 1000 + index, audio_dir=ctx.exp_dir / "cuts" / "audio" / split,
                           progress=ctx.progress, policy=ctx.policy, tolerance=cfg.duration_tolerance,
                           origin=f"{cdir / 'metadata.tsv'}")
    for cut in cuts:
        yield RawRow(cut, f"connected_words {cfg.corpus} {split}")


def tsv_corpus_rows(cdir: Path, split: str, ctx: SourceContext, prefix: str = "", with_text: bool = True,
                    tolerance: Seconds = 0.1) -> Iterator[RawRow]:
    """Rows of one TSV-layout corpus split; damaged metadata rows (short, bad numbers, duplicate ids) and bad
    files go to ``ctx.policy`` naming ``metadata.tsv:<line>``."""
    from speechkd.data.corpora import read_metadata_rows, read_split

    rows = {}
    reported = ctx.extra.setdefault("reported_metadata_rows", set())  # a damaged row is reported once, not per split
    for lineno, utt, problem in read_metadata_rows(cdir):
        if problem is not None:
            if (str(cdir), lineno) in reported:
                continue
            reported.add((str(cdir), lineno))
            ctx.policy.bad(utt.id if utt else f"line {lineno}", str(cdir / "metadata.tsv"), problem,
                           f"{cdir / 'metadata.tsv'}:{lineno}")
            continue
        rows[utt.id] = (lineno, utt)
    meta = {uid: u for uid, (_, u) in rows.items()}

    def missing(uid: str, where: str) -> None:
        ctx.policy.bad(prefix + uid, str(cdir / "metadata.tsv"), "listed in the split but not a (good) row of "
                                                                 "metadata.tsv", where)

    for u in read_split(cdir, split, meta, on_missing=missing):
        lineno = rows[u.id][0]
        row = recording_cut(u.path, prefix + u.id, u.text if with_text else None, u.speaker,
                            f"{cdir / 'metadata.tsv'}:{lineno}", ctx.policy, declared=u.duration,
                            declared_rate=u.sample_rate, tolerance=tolerance)
        if row is not None:
            yield row


def tsv_rows(cfg, split: str, ctx: SourceContext) -> Iterator[RawRow]:
    """``source: tsv``: every corpus of ``cfg.corpora``, split ``cfg.<split>_split``; ids prefixed
    ``<corpus folder>-`` when there are several corpora."""
    name = getattr(cfg, f"{split}_split")
    dirs = [_corpus_path(c, cfg.corpora_dir) for c in cfg.corpora]
    for cdir in dirs:
        prefix = f"{cdir.name}-" if len(dirs) > 1 else ""
        yield from tsv_corpus_rows(cdir, name, ctx, prefix=prefix, tolerance=cfg.duration_tolerance)


def _corpus_path(name: str, corpora_dir: Optional[str]) -> Path:
    """A TSV corpus by shared-corpus name, else as a folder path."""
    from speechkd.data.corpora import CorpusError, corpus_dir

    p = Path(name)
    if (p / "metadata.tsv").is_file():
        return p.resolve()
    try:
        return corpus_dir(name, corpora_dir)
    except CorpusError as e:
        raise CorpusError(f"{e}; nor is '{name}' a folder with a metadata.tsv") from None


def lhotse_rows(cfg, split: str, ctx: SourceContext) -> Iterator[RawRow]:
    """``source: lhotse``: the split's CutSet manifest or recordings + supervisions pair."""
    spec = getattr(cfg, split)
    cuts = read_manifest(spec, f"data.{split}")
    yield from manifest_rows(cuts, str(spec if isinstance(spec, str) else spec.supervisions), ctx.policy)


#: lhotse recipes usable as ``data.source``: name -> (module, function). The function is called as
#: ``f(corpus_dir, dataset_parts=[...], output_dir=DIR, num_jobs=N)`` and returns ``{part: {"recordings": ...,
#: "supervisions": ...}}`` (lhotse's recipe convention). One line per recipe: its name becomes a ``data.source`` of
#: :class:`speechkd.config.LhotseRecipeData`.
LHOTSE_RECIPES: dict[str, tuple[str, str]] = {
    "librispeech": ("lhotse.recipes.librispeech", "prepare_librispeech"),
    "mini_librispeech": ("lhotse.recipes.librispeech", "prepare_librispeech"),
}


def lhotse_recipe_rows(cfg, split: str, ctx: SourceContext) -> Iterator[RawRow]:
    """``source: librispeech`` (or another of :data:`LHOTSE_RECIPES`): lhotse's recipe prepares the parts of the
    split from ``cfg.corpus_dir`` (manifests in ``<exp>/cuts/lhotse_recipe``; an existing one is reused by
    lhotse), and each part's cuts are read as the ``lhotse`` source's.

    Raises:
      FileNotFoundError: ``corpus_dir`` is missing, or a part is not in it (naming both).
    """
    from lhotse import CutSet

    corpus = Path(cfg.corpus_dir)
    parts = list(getattr(cfg, split))
    if not corpus.is_dir():
        raise FileNotFoundError(f"data.corpus_dir: {corpus} is not a directory")
    missing = [p for p in parts if not (corpus / p).is_dir()]
    if missing:
        raise FileNotFoundError(f"data.{split}: parts {missing} not found in {corpus} "
                                f"(has {sorted(p.name for p in corpus.iterdir() if p.is_dir())})")
    module, fn = LHOTSE_RECIPES[cfg.source]
    prepare_fn = getattr(importlib.import_module(module), fn)
    out = ctx.exp_dir / "cuts" / "lhotse_recipe"
    manifests = prepare_fn(corpus, dataset_parts=parts, output_dir=out, num_jobs=ctx.num_jobs)
    for part in parts:
        m = manifests[part]
        cuts = CutSet.from_manifests(recordings=m["recordings"], supervisions=m["supervisions"])
        yield from manifest_rows(cuts, f"{cfg.source} {corpus / part}", ctx.policy)


#: ``data.source`` -> its rows function.
SOURCES: dict[str, Callable[..., Iterator[RawRow]]] = {
    "connected_words": connected_words_rows,
    "tsv": tsv_rows,
    "lhotse": lhotse_rows,
    **{name: lhotse_recipe_rows for name in LHOTSE_RECIPES},
}


# ------------------------------------------------------------------------------------------------ unlabelled audio
def unlabelled_rows(entry, index: int, ctx: SourceContext, tolerance: Seconds = 0.1) -> Iterator[RawRow]:
    """Rows of one ``data.unlabelled`` entry (:class:`speechkd.config.UnlabelledSet`), transcripts dropped.

    Raises:
      FileNotFoundError: the manifest or folder is missing (naming ``data.unlabelled[index]``).
    """
    from lhotse.utils import fastcopy

    what = f"data.unlabelled[{index}]"
    if entry.cuts:
        for row in manifest_rows(read_manifest(entry.cuts, f"{what}.cuts"), entry.cuts, ctx.policy):
            row.cut = fastcopy(row.cut, supervisions=[fastcopy(s, text=None) for s in row.cut.supervisions])
            yield row
    elif entry.audio_dir:
        root = Path(entry.audio_dir)
        if not root.is_dir():
            raise FileNotFoundError(f"{what}.audio_dir: {root} is not a directory")
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"{what}.audio_dir: no audio files ({', '.join(AUDIO_SUFFIXES)}) under {root}")
        for p in files:
            cid = str(p.relative_to(root).with_suffix("")).replace("/", "-")
            row = recording_cut(p, cid, None, None, str(p), ctx.policy)
            if row is not None:
                yield row
    else:
        cdir = _corpus_path(entry.tsv, ctx.corpora_dir)
        yield from tsv_corpus_rows(cdir, entry.split, ctx, with_text=False, tolerance=tolerance)
