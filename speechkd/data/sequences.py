"""Connected-word ASR utterances built from isolated-word recordings of one speaker.

The shared corpora hold isolated words (Speech Commands) and digits (FSDD) from many speakers, so the ASR
task is connected-word recognition: each utterance joins 1..K recordings of one speaker with short silent
gaps ("go left stop", "seven three nine"). Splits stay speaker-disjoint because each split's utterances are
built only from that split's recordings. Everything is deterministic given the seed.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from speechkd.data.corpora import CorpusError, Utterance
from speechkd.utils import Pathlike, Seconds


@dataclass(frozen=True)
class SequenceSpec:
    """How to build connected-word utterances.

    Attributes:
      num_utts: how many utterances to build.
      min_words / max_words: words per utterance, drawn uniformly in [min_words, max_words].
      min_gap / max_gap: silence between words in seconds, drawn uniformly.
      edge: silence added at the start and the end in seconds.
      sampling_rate: output rate in Hz.
      trim_db: trim each source recording's leading and trailing silence: keep from the first to the last
        10 ms frame whose RMS is within ``trim_db`` dB of the recording's loudest frame (plus ``trim_margin``
        seconds each side). ``None`` keeps recordings whole. Speech Commands clips are 1 s with the word
        in about half of it, so trimming nearly halves the frames to train on.
      trim_margin: seconds kept beyond the detected speech on each side.
    """

    num_utts: int
    min_words: int = 1
    max_words: int = 4
    min_gap: Seconds = 0.05
    max_gap: Seconds = 0.25
    edge: Seconds = 0.1
    sampling_rate: int = 16000
    trim_db: float | None = 35.0
    trim_margin: Seconds = 0.05


def plan_sequences(utts: list[Utterance], spec: SequenceSpec, seed: int) -> list[tuple[str, list[Utterance], list[float]]]:
    """Choose, for each output utterance, a speaker, its word recordings and the gaps (no audio touched).

    Speakers are drawn in proportion to their number of usable recordings; recordings of one speaker are
    drawn without replacement within an utterance where the speaker has enough of them.

    Args:
      utts: isolated-word utterances of one split; rows with empty text or speaker are ignored.
      spec: the sizes.
      seed: the random seed.

    Returns:
      a list of ``(utterance_id, recordings, gaps_seconds)``; ``len(gaps) == len(recordings) - 1``.

    Raises:
      CorpusError: when no utterance has both text and speaker.
    """
    by_speaker: dict[str, list[Utterance]] = defaultdict(list)
    for u in utts:
        if u.text and u.speaker:
            by_speaker[u.speaker].append(u)
    if not by_speaker:
        raise CorpusError("no utterance with both a transcript and a speaker to build sequences from")
    if spec.min_words < 1 or spec.max_words < spec.min_words:
        raise ValueError(f"bad word counts: min_words={spec.min_words}, max_words={spec.max_words}")
    rng = random.Random(seed)
    speakers = sorted(by_speaker)
    weights = [len(by_speaker[s]) for s in speakers]
    plan = []
    for i in range(spec.num_utts):
        spk = rng.choices(speakers, weights=weights)[0]
        pool = by_speaker[spk]
        n = rng.randint(spec.min_words, spec.max_words)
        picks = rng.sample(pool, n) if n <= len(pool) else [rng.choice(pool) for _ in range(n)]
        gaps = [rng.uniform(spec.min_gap, spec.max_gap) for _ in range(n - 1)]
        plan.append((f"{spk}-seq{i:06d}", picks, gaps))
    return plan


def trim_silence(audio: np.ndarray, sampling_rate: int, trim_db: float, margin: Seconds = 0.05) -> np.ndarray:
    """Cut leading and trailing silence.

    Args:
      audio: ``(num_samples,)`` float waveform.
      sampling_rate: Hz.
      trim_db: frames (10 ms, non-overlapping) whose RMS is more than ``trim_db`` dB below the loudest frame
        count as silence.
      margin: seconds kept beyond the first and last loud frame.

    Returns:
      the trimmed waveform (the input itself when it is shorter than one frame or all silent).
    """
    hop = max(1, int(0.01 * sampling_rate))
    n = len(audio) // hop
    if n == 0:
        return audio
    rms = np.sqrt(np.mean(audio[: n * hop].reshape(n, hop).astype(np.float64) ** 2, axis=1))  # (n,)
    peak = rms.max()
    if peak <= 0:
        return audio
    loud = np.nonzero(rms >= peak * 10 ** (-trim_db / 20))[0]
    if len(loud) == 0:  # non-finite samples (refused before trimming by load_source)
        return audio
    pad = int(margin * sampling_rate)
    start = max(0, loud[0] * hop - pad)
    end = min(len(audio), (loud[-1] + 1) * hop + pad)
    return audio[start:end]


def load_source(u: Utterance, sampling_rate: int, tolerance: Seconds = 0.1) -> tuple[Optional[np.ndarray], Optional[str]]:
    """One source recording as float32 mono at ``sampling_rate`` Hz (lhotse resamples), checked as every data entry
    point checks audio (:mod:`speechkd.data.validation`).

    Args:
      u: the metadata row (its declared ``duration`` in seconds and ``sample_rate`` in Hz are checked).
      sampling_rate: Hz of the returned waveform.
      tolerance: seconds the audio's length may differ from the declared duration.

    Returns:
      ``(waveform (S,), None)``, or ``(None, reason)`` when the file is missing, unreadable or truncated, empty,
      holds NaN / infinite samples, or disagrees with its declared duration or sample rate.
    """
    from lhotse import Recording

    from speechkd.data.validation import check_audio_samples

    if not Path(u.path).is_file():
        return None, "audio file not found"
    try:
        rec = Recording.from_file(u.path, recording_id=u.id)
    except Exception as e:  # soundfile / audioread raise several types
        return None, f"unreadable audio ({type(e).__name__}: {e})"
    if rec.num_samples == 0:
        return None, "empty recording (0 samples)"
    if u.sample_rate and rec.sampling_rate != u.sample_rate:
        return None, f"declared sample rate {u.sample_rate} Hz but the file is {rec.sampling_rate} Hz"
    try:
        audio = rec.load_audio()  # (channels, samples)
    except Exception as e:  # a header that reads over data that does not (a file cut short)
        return None, f"truncated or unreadable audio data ({type(e).__name__}: {e})"
    declared = u.duration if u.duration else audio.shape[-1] / rec.sampling_rate
    problem = check_audio_samples(audio, declared, rec.sampling_rate, tolerance)
    if problem is not None:
        return None, problem
    if rec.sampling_rate != sampling_rate:
        audio = rec.resample(sampling_rate).load_audio()
    return audio.mean(axis=0).astype(np.float32), None


def build_sequences(utts: list[Utterance], spec: SequenceSpec, seed: int, audio_dir: Pathlike, progress: bool = True,
                    policy=None, tolerance: Seconds = 0.1, origin: str = "metadata.tsv"):
    """Build connected-word utterances, write their audio as 16-bit FLAC, and return a CutSet.

    Audio files that already exist (from a stopped run) are reused, since names are deterministic for the
    seed; each new file is written atomically. Every source recording is checked when it is first read
    (:func:`load_source`); a damaged one goes to ``policy`` (a :class:`speechkd.data.validation.BadInputPolicy`):
    in ``error`` mode it stops the build naming the utterance, its file and the problem; in ``skip`` mode it is
    listed once, each planned utterance using it is left out (listed too), and the others are built as they would be
    without the damage (the plan does not change).

    Args:
      utts: isolated-word utterances of one split.
      spec: sizes, see :class:`SequenceSpec`.
      seed: random seed; the same seed gives the same utterances.
      audio_dir: where the FLAC files go.
      progress: show a progress bar.
      policy: the split's bad-input policy (None: damaged audio raises :class:`speechkd.data.corpora.CorpusError`).
      tolerance: seconds a source's audio may differ from its declared duration.
      origin: where the rows come from, for the messages (e.g. the corpus's ``metadata.tsv``).

    Raises:
      speechkd.data.validation.BadInputError: damaged source audio in ``error`` mode; CorpusError without a policy.

    Returns:
      lhotse.CutSet of MonoCuts, each with one supervision (``text`` = words joined by spaces, ``speaker``)
      and ``custom["sources"]`` = the source utterance ids.
    """
    import soundfile as sf
    from lhotse import CutSet, Recording, SupervisionSegment
    from tqdm import tqdm

    from speechkd.utils import atomic_path

    audio_dir = Path(audio_dir)
    audio_dir.mkdir(parents=True, exist_ok=True)
    sr = spec.sampling_rate
    plan = plan_sequences(utts, spec, seed)
    cache: dict[str, np.ndarray] = {}
    damaged: dict[str, str] = {}
    cuts = []
    for uid, picks, gaps in tqdm(plan, desc=f"sequences -> {audio_dir.name}", disable=not progress):
        path = audio_dir / f"{uid}.flac"
        if not path.is_file():
            for u in picks:
                if u.id in cache or u.id in damaged:
                    continue
                wav, problem = load_source(u, sr, tolerance)
                if problem is not None:
                    if policy is None:
                        raise CorpusError(f"{origin}: utterance '{u.id}' ({u.path}): {problem}")
                    policy.bad(u.id, str(u.path), problem, origin)  # raises in error mode
                    damaged[u.id] = problem
                    continue
                cache[u.id] = wav if spec.trim_db is None else trim_silence(wav, sr, spec.trim_db, spec.trim_margin)
            bad = [u.id for u in picks if u.id in damaged]
            if bad:
                policy.drop(uid, str(path), f"uses damaged source utterance '{bad[0]}' ({damaged[bad[0]]})", origin)
                continue
            edge = np.zeros(int(spec.edge * sr), dtype=np.float32)
            pieces = [edge]
            for j, u in enumerate(picks):
                pieces.append(cache[u.id])
                pieces.append(np.zeros(int(gaps[j] * sr), dtype=np.float32) if j < len(gaps) else edge)
            audio = np.clip(np.concatenate(pieces), -1.0, 1.0)
            with atomic_path(path) as tmp:
                sf.write(tmp, audio, sr, subtype="PCM_16", format="FLAC")
        rec = Recording.from_file(path, recording_id=uid)
        text = " ".join(u.text for u in picks)
        sup = SupervisionSegment(
            id=uid, recording_id=uid, start=0.0, duration=rec.duration, text=text, speaker=picks[0].speaker
        )
        cut = rec.to_cut()
        cut.supervisions = [sup]
        cut = cut.with_custom("sources", [u.id for u in picks])
        cuts.append(cut)
    return CutSet.from_cuts(cuts)
