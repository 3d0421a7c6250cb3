"""The shared corpora (``metadata.tsv`` + ``splits/`` + ``trials/``) read into records and lhotse CutSets.

Format (see the corpora's README): ``<corpus>/metadata.tsv`` is UTF-8, tab-separated, one header line with
at least the columns ``id path speaker text label duration sample_rate``; ``<corpus>/splits/<split>.txt``
holds one utterance id per line; ``<corpus>/trials/*.tsv`` has ``label enroll_id test_id``.

The corpora directory comes from (first found): an explicit argument (the CLI's ``--corpora-dir``), the
environment variable ``SPEECHKD_CORPORA``, ``../shared/corpora`` beside the current directory or beside the
source checkout.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

from speechkd.utils import Pathlike, Seconds

#: Short task names used by recipes -> corpus folder names.
CORPUS_NAMES = {
    "digits": "fsdd",
    "commands": "speech_commands_v2_test",
    "an4": "an4_mini",
    "librispeech_spk": "librispeech_spk",
    "ljspeech": "ljspeech_mini",
}

REQUIRED_COLUMNS = ("id", "path", "speaker", "text", "label", "duration", "sample_rate")
ENV_VAR = "SPEECHKD_CORPORA"


class CorpusError(ValueError):
    """A corpus file is missing or malformed; the message names the file (and line)."""


@dataclass(frozen=True)
class Utterance:
    """One row of a corpus's ``metadata.tsv``.

    Attributes:
      id: utterance id, unique within the corpus.
      path: absolute path of the audio file.
      speaker: speaker id ('' where the source has none).
      text: lower-case transcript ('' where none).
      label: class label ('' where none).
      duration: seconds.
      sample_rate: Hz.
    """

    id: str
    path: Path
    speaker: str
    text: str
    label: str
    duration: Seconds
    sample_rate: int


def resolve_corpora_dir(corpora_dir: Optional[Pathlike] = None) -> Path:
    """Find the shared corpora directory.

    Args:
      corpora_dir: an explicit directory; otherwise ``$SPEECHKD_CORPORA``; otherwise ``../shared/corpora``
        relative to the current directory, then relative to the source checkout.

    Returns:
      the directory (it exists).

    Raises:
      CorpusError: when no candidate exists (the message lists where it looked).
    """
    candidates: list[Path] = []
    if corpora_dir is not None:
        candidates.append(Path(corpora_dir))
    elif os.environ.get(ENV_VAR):
        candidates.append(Path(os.environ[ENV_VAR]))
    else:
        candidates.append(Path.cwd().parent / "shared" / "corpora")
        candidates.append(Path(__file__).resolve().parents[3] / "shared" / "corpora")
    for c in candidates:
        if c.is_dir():
            return c.resolve()
    raise CorpusError(
        "corpora directory not found; looked in: "
        + ", ".join(str(c) for c in candidates)
        + f". Pass --corpora-dir or set {ENV_VAR}."
    )


def corpus_dir(name: str, corpora_dir: Optional[Pathlike] = None) -> Path:
    """The folder of one corpus, by task name (``digits``, ``commands``, ...) or folder name.

    Raises:
      CorpusError: unknown name or missing folder.
    """
    root = resolve_corpora_dir(corpora_dir)
    folder = CORPUS_NAMES.get(name, name)
    path = root / folder
    if not path.is_dir():
        known = ", ".join(sorted(CORPUS_NAMES))
        raise CorpusError(f"corpus '{name}' not found at {path} (task names: {known})")
    return path


def read_metadata_rows(cdir: Pathlike) -> Iterator[tuple[int, Optional[Utterance], Optional[str]]]:
    """Read ``<cdir>/metadata.tsv`` row by row, reporting damaged rows instead of stopping at them.

    Yields:
      ``(line number, Utterance, None)`` for a good row; ``(line number, Utterance or None, problem)`` for a short
      row, an empty id, a bad or non-positive number, or an id already seen (the Utterance where one could be read).

    Raises:
      CorpusError: missing file, empty file or missing columns (the file itself is unusable), naming the file.
    """
    path = Path(cdir) / "metadata.tsv"
    if not path.is_file():
        raise CorpusError(f"{path}: metadata file not found")
    seen: set[str] = set()
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        try:
            header = next(reader)
        except StopIteration:
            raise CorpusError(f"{path}:1: empty file, expected a header line") from None
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            raise CorpusError(f"{path}:1: header lacks column(s) {missing}; has {header}")
        col = {c: header.index(c) for c in REQUIRED_COLUMNS}
        for lineno, row in enumerate(reader, start=2):
            if not row or all(not x for x in row):
                continue
            if len(row) < len(header):
                yield lineno, None, f"expected {len(header)} tab-separated fields, got {len(row)}"
                continue
            uid = row[col["id"]]
            if not uid:
                yield lineno, None, "empty utterance id"
                continue
            try:
                duration = float(row[col["duration"]])
                sample_rate = int(row[col["sample_rate"]])
            except ValueError:
                yield lineno, None, (f"bad duration/sample_rate '{row[col['duration']]}'/'{row[col['sample_rate']]}' "
                                     f"for '{uid}'")
                continue
            utt = Utterance(
                id=uid,
                path=(Path(cdir) / row[col["path"]]).resolve(),
                speaker=row[col["speaker"]],
                text=row[col["text"]].strip(),
                label=row[col["label"]],
                duration=duration,
                sample_rate=sample_rate,
            )
            if duration <= 0 or sample_rate <= 0:
                yield lineno, utt, f"non-positive duration or sample_rate for '{uid}'"
            elif uid in seen:
                yield lineno, utt, f"duplicate utterance id '{uid}'"
            else:
                seen.add(uid)
                yield lineno, utt, None


def read_metadata(cdir: Pathlike) -> dict[str, Utterance]:
    """Read ``<cdir>/metadata.tsv``.

    Returns:
      utterance id -> :class:`Utterance`, in file order.

    Raises:
      CorpusError: missing file, missing columns, a short row, a bad number or a duplicate id; the message
        names the file and line.
    """
    path = Path(cdir) / "metadata.tsv"
    out: dict[str, Utterance] = {}
    for lineno, utt, problem in read_metadata_rows(cdir):
        if problem is not None:
            raise CorpusError(f"{path}:{lineno}: {problem}")
        out[utt.id] = utt
    return out


def read_split(cdir: Pathlike, split: str, metadata: dict[str, Utterance],
               on_missing: Optional[Callable[[str, str], None]] = None) -> list[Utterance]:
    """The utterances listed in ``<cdir>/splits/<split>.txt``, in file order.

    Args:
      on_missing: called as ``on_missing(utterance_id, "<file>:<line>")`` for an id not in ``metadata`` (e.g. its
        row was damaged and skipped), which is then left out; None raises instead.

    Raises:
      CorpusError: missing split file, or an id not in the metadata (names file and line) without ``on_missing``.
    """
    path = Path(cdir) / "splits" / f"{split}.txt"
    if not path.is_file():
        have = sorted(p.stem for p in (Path(cdir) / "splits").glob("*.txt"))
        raise CorpusError(f"{path}: split file not found (available: {have})")
    out = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        uid = line.strip()
        if not uid:
            continue
        if uid not in metadata:
            if on_missing is not None:
                on_missing(uid, f"{path}:{lineno}")
                continue
            raise CorpusError(f"{path}:{lineno}: utterance id '{uid}' is not in metadata.tsv")
        out.append(metadata[uid])
    return out


def utterances_to_cuts(utts: list[Utterance], sampling_rate: int = 16000):
    """Isolated utterances -> a lhotse CutSet (one MonoCut + supervision each), resampled lazily.

    Args:
      utts: the utterances; their audio files must exist.
      sampling_rate: target rate in Hz (lhotse resamples on load).

    Returns:
      lhotse.CutSet with one supervision per cut carrying ``text`` and ``speaker``.

    Raises:
      CorpusError: an audio file is missing (names it and the utterance).
    """
    from lhotse import CutSet, Recording, SupervisionSegment

    cuts = []
    for u in utts:
        if not u.path.is_file():
            raise CorpusError(f"audio file for utterance '{u.id}' not found: {u.path}")
        rec = Recording.from_file(u.path, recording_id=u.id)
        if rec.sampling_rate != sampling_rate:
            rec = rec.resample(sampling_rate)
        sup = SupervisionSegment(
            id=u.id, recording_id=u.id, start=0.0, duration=rec.duration, text=u.text, speaker=u.speaker
        )
        cut = rec.to_cut()
        cut.supervisions = [sup]
        cuts.append(cut)
    return CutSet.from_cuts(cuts)
