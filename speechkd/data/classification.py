"""Raw-waveform CutSets and batches for keyword spotting (KWS) and speaker verification (SV).

Data for the downstream tasks of arXiv 2210.16611 (SSL-model distillation, then single- or multi-task fine-tuning
for KWS and SV, with SUPERB-style heads: :mod:`speechkd.models.heads`), built from the shared corpora with the
corpus reader of :mod:`speechkd.data.corpora`:

* KWS (:func:`kws_cuts`): ``speech_commands_v2_test`` splits, 12 classes :data:`KWS_CLASSES` taken from the
  ``label`` column of ``metadata.tsv``; accuracy is the metric.
* SV training (:func:`sv_train_cuts`): the speakers of the ``train`` splits of ``speech_commands_v2_test`` and
  ``librispeech_spk`` (the corpora's ``train/dev/test`` splits are speaker-disjoint, and trial lists only use
  held-out speakers); a speaker's class is its label ``"<corpus folder>/<speaker id>"`` (:func:`speaker_label`),
  indexed in sorted order.
* SV evaluation (:func:`sv_trial_cuts`): every utterance a corpus's ``trials/<name>.tsv`` uses, whole, for cosine
  scoring (:mod:`speechkd.eval.verification`) and EER / minDCF (:mod:`speechkd.eval.metrics`).

Every cut carries two integer targets in ``cut.custom`` -- ``kws_target`` (index in :data:`KWS_CLASSES`) and
``spk_target`` (index in the training speaker list) -- set to :data:`IGNORE_INDEX` where the utterance has no
such label (LibriSpeech has no KWS label, ``_silence_`` clips no speaker, evaluation utterances no training
speaker class). So one CutSet serves a joint multi-task loss ``L_KWS + beta * L_SV`` (both losses ignore
:data:`IGNORE_INDEX`): ``sv_train_cuts("train", keep_no_speaker=True)`` holds every Speech Commands train clip
with its KWS class (and its speaker where it has one) plus the LibriSpeech train speakers.

Audio is read as 16 kHz mono float32 (lhotse resamples on load where a corpus has another rate). Batches come
from lhotse's samplers through :func:`speechkd.data.datamodule.make_loader` (``DynamicBucketingSampler`` when
shuffling, ``SimpleCutSampler`` otherwise, both by total duration) with :class:`WaveformDataset` as the
dataset.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch

from speechkd.data.corpora import CorpusError, Utterance, corpus_dir, read_metadata, read_split, utterances_to_cuts
from speechkd.utils import Pathlike, Seconds

__all__ = [
    "SAMPLE_RATE",
    "KWS_CORPUS",
    "KWS_CLASSES",
    "IGNORE_INDEX",
    "SV_TRAIN_CORPORA",
    "speaker_label",
    "kws_cuts",
    "sv_train_cuts",
    "sv_trial_cuts",
    "WaveformDataset",
    "waveform_batches",
]

SAMPLE_RATE = 16000
"""Hz; every waveform this module gives is at this rate."""

KWS_CORPUS = "speech_commands_v2_test"
"""Corpus folder of the KWS task."""

KWS_CLASSES: tuple[str, ...] = (
    "yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go", "_unknown_", "_silence_",
)
"""The 12 Speech Commands v0.02 classes (Warden, arXiv 1804.03209, sec. 7) in s3prl's ``CLASSES`` order; class
index = position. Other words are ``_unknown_``, background-noise clips ``_silence_``."""

IGNORE_INDEX = -100
"""Target of an utterance without that label (``ignore_index`` of ``F.cross_entropy`` and
:class:`speechkd.models.heads.AMSoftmaxLoss`)."""

SV_TRAIN_CORPORA: tuple[str, ...] = ("speech_commands_v2_test", "librispeech_spk")
"""Corpora whose training speakers :func:`sv_train_cuts` uses by default."""


def speaker_label(corpus: str, speaker: str) -> str:
    """Global speaker label ``"<corpus folder>/<speaker id>"`` (speaker ids are only unique within a corpus)."""
    return f"{corpus}/{speaker}"


def _kws_target(u: Utterance, cdir: Path, strict: bool) -> int:
    """Class index of a KWS utterance; IGNORE_INDEX for other corpora (``strict=False``)."""
    if not strict and cdir.name != KWS_CORPUS:
        return IGNORE_INDEX
    if u.label not in KWS_CLASSES:
        raise CorpusError(
            f"{cdir / 'metadata.tsv'}: utterance '{u.id}' has label {u.label!r}, not one of the "
            f"{len(KWS_CLASSES)} KWS classes {list(KWS_CLASSES)}"
        )
    return KWS_CLASSES.index(u.label)


def _targets(u: Utterance, cdir: Path, strict: bool, speaker_index: Optional[dict[str, int]] = None) -> dict:
    """``cut.custom`` of one utterance: ``kws_target`` (:func:`_kws_target`), ``spk_target`` (its index in
    ``speaker_index``, IGNORE_INDEX without one or without a speaker), ``speaker`` and ``corpus``."""
    spk = speaker_label(cdir.name, u.speaker) if u.speaker else ""
    return {
        "kws_target": _kws_target(u, cdir, strict=strict),
        "spk_target": speaker_index[spk] if speaker_index is not None and spk else IGNORE_INDEX,
        "speaker": spk,
        "corpus": cdir.name,
    }


def _attach(cuts, custom: dict[str, dict]):
    """Set ``cut.custom`` from ``custom[cut.id]`` (in place, eager CutSets) and return the CutSet."""
    for cut in cuts:
        cut.custom = dict(custom[cut.id])
    return cuts


def kws_cuts(split: str, corpora_dir: Optional[Pathlike] = None, sampling_rate: int = SAMPLE_RATE):
    """The Speech Commands clips of one split, with their KWS class.

    Args:
        split: a split of ``speech_commands_v2_test/splits`` (``train``, ``dev``, ``test``, ``smoke``).
        corpora_dir: the shared corpora (see :func:`speechkd.data.corpora.resolve_corpora_dir`).
        sampling_rate: Hz the audio is loaded at.

    Returns:
        an eager lhotse CutSet, one cut per clip (id = utterance id), in split order; ``cut.custom`` has
        ``kws_target`` (index in :data:`KWS_CLASSES`), ``spk_target`` = :data:`IGNORE_INDEX`, ``speaker``
        (:func:`speaker_label`, '' for ``_silence_``) and ``corpus``.

    Raises:
        CorpusError: missing corpus, metadata, split or audio file, malformed metadata, or a label outside
            :data:`KWS_CLASSES` (the message names the file and the utterance).
    """
    cdir = corpus_dir(KWS_CORPUS, corpora_dir)
    utts = read_split(cdir, split, read_metadata(cdir))
    custom = {u.id: _targets(u, cdir, strict=True) for u in utts}
    return _attach(utterances_to_cuts(utts, sampling_rate), custom)


def sv_train_cuts(
    split: str = "train",
    corpora: Sequence[str] = SV_TRAIN_CORPORA,
    corpora_dir: Optional[Pathlike] = None,
    sampling_rate: int = SAMPLE_RATE,
    keep_no_speaker: bool = False,
    max_segment: Optional[Seconds] = None,
    min_segment: Seconds = 1.0,
):
    """Speaker-labelled training utterances of several corpora, and their speaker list.

    Args:
        split: the split read in every corpus (``train``; ``smoke`` for tests).
        corpora: corpus task or folder names (see :data:`speechkd.data.corpora.CORPUS_NAMES`).
        corpora_dir: the shared corpora.
        sampling_rate: Hz the audio is loaded at.
        keep_no_speaker: also keep utterances without a speaker (Speech Commands ``_silence_``) with
            ``spk_target`` = :data:`IGNORE_INDEX` (for joint KWS + SV training).
        max_segment: if set, cut utterances longer than this many seconds into consecutive windows of this
            length (ids ``<utt id>-<i>``; a LibriSpeech utterance is up to 23 s long, a Speech Commands clip 1 s);
            a last window shorter than ``min_segment`` seconds is dropped.
        min_segment: see ``max_segment``.

    Returns:
        ``(cuts, speakers)``: an eager lhotse CutSet in corpus then split order, and the sorted list of speaker
        labels (:func:`speaker_label`) with ``spk_target`` = index in it. ``cut.custom`` has ``spk_target``,
        ``kws_target`` (KWS class for Speech Commands clips, else :data:`IGNORE_INDEX`), ``speaker`` and
        ``corpus``.

    Raises:
        CorpusError: missing or malformed corpus files, a KWS label outside :data:`KWS_CLASSES`, an utterance id
            found in two corpora, or no speaker-labelled utterance at all.
        ValueError: ``max_segment`` not above ``min_segment`` or non-positive.
    """
    from lhotse import CutSet

    if max_segment is not None and not (0 < min_segment <= max_segment):
        raise ValueError(f"need 0 < min_segment <= max_segment, got {min_segment}, {max_segment}")
    per_corpus = []
    owner: dict[str, str] = {}
    for name in corpora:
        cdir = corpus_dir(name, corpora_dir)
        utts = [u for u in read_split(cdir, split, read_metadata(cdir)) if u.speaker or keep_no_speaker]
        for u in utts:
            if u.id in owner:
                raise CorpusError(f"utterance id '{u.id}' is in both {owner[u.id]} and {cdir.name}")
            owner[u.id] = cdir.name
        per_corpus.append((cdir, utts))
    speakers = sorted({speaker_label(c.name, u.speaker) for c, utts in per_corpus for u in utts if u.speaker})
    if not speakers:
        raise CorpusError(f"no speaker-labelled utterance in split '{split}' of {list(corpora)}")
    index = {s: i for i, s in enumerate(speakers)}
    cuts = []
    for cdir, utts in per_corpus:
        custom = {u.id: _targets(u, cdir, strict=False, speaker_index=index) for u in utts}
        for cut in _attach(utterances_to_cuts(utts, sampling_rate), custom):
            if max_segment is not None and cut.duration > max_segment:
                cuts.extend(w for w in cut.cut_into_windows(max_segment) if w.duration >= min_segment)
            else:
                cuts.append(cut)
    return CutSet.from_cuts(cuts), speakers


def sv_trial_cuts(corpus: str, trials: str = "sv_dev", corpora_dir: Optional[Pathlike] = None,
                  sampling_rate: int = SAMPLE_RATE):
    """The utterances of one trial list, whole, for embedding extraction and cosine scoring.

    Args:
        corpus: corpus task or folder name (``commands``, ``librispeech_spk``, ...).
        trials: trial list name, ``<corpus>/trials/<trials>.tsv`` (``sv_dev``, ``sv_test``, ...).
        corpora_dir: the shared corpora.
        sampling_rate: Hz the audio is loaded at.

    Returns:
        ``(cuts, trials)``: an eager lhotse CutSet with one cut per utterance the trials use (id = utterance id,
        order of first use in the list) and the :class:`speechkd.eval.verification.Trials`. ``cut.custom`` has
        ``spk_target`` = :data:`IGNORE_INDEX` (trial speakers are held out from training), ``kws_target``,
        ``speaker`` and ``corpus``.

    Raises:
        CorpusError: a missing trial file (the message lists the available ones), a malformed trial file (file and
            line), a trial utterance not in ``metadata.tsv`` (names both), or missing/malformed corpus files.
    """
    from speechkd.eval.verification import read_trials

    cdir = corpus_dir(corpus, corpora_dir)
    path = cdir / "trials" / f"{trials}.tsv"
    if not path.is_file():
        have = sorted(p.stem for p in (cdir / "trials").glob("*.tsv"))
        raise CorpusError(f"{path}: trial file not found (available: {have})")
    try:
        tr = read_trials(path)
    except ValueError as e:
        raise CorpusError(str(e)) from e
    meta = read_metadata(cdir)
    utts = []
    for uid in tr.utterance_ids():
        if uid not in meta:
            raise CorpusError(f"{path}: utterance id '{uid}' is not in {cdir / 'metadata.tsv'}")
        utts.append(meta[uid])
    custom = {u.id: _targets(u, cdir, strict=False) for u in utts}
    return _attach(utterances_to_cuts(utts, sampling_rate), custom), tr


class WaveformDataset(torch.utils.data.Dataset):
    """Turns a CutSet batch (from a lhotse sampler) into padded waveforms and integer targets.

    Use with :func:`speechkd.data.datamodule.make_loader` (``batch_size=None``: the sampler yields CutSets).
    Cuts keep the sampler's order.

    Args:
        target_keys: ``cut.custom`` integer fields collated as ``(N,)`` int64 tensors (default: both targets).
        sampling_rate: Hz; cuts at another rate are resampled to it (lhotse) before loading; None keeps each cut's
            own rate.

    A batch is a dict: ``wavs (N, S)`` float32 waveforms at the cuts' rate (16 kHz here) or ``sampling_rate``,
    zero-padded on the right; ``lens (N,)`` int64 valid samples; ``<key> (N,)`` int64 for each target key
    (``kws_target``, ``spk_target``; :data:`IGNORE_INDEX` where absent); ``cut_ids`` and ``speakers`` (lists of N str).
    """

    def __init__(self, target_keys: Sequence[str] = ("kws_target", "spk_target"), sampling_rate: Optional[int] = None):
        super().__init__()
        self.target_keys = list(target_keys)
        self.sampling_rate = sampling_rate

    def __getitem__(self, cuts) -> dict:
        """Collate one batch.

        Args:
            cuts: a non-empty lhotse CutSet (or sequence of cuts) of mono recordings.

        Returns:
            the batch dict described in the class docstring.

        Raises:
            CorpusError: an audio file that cannot be read or is not mono (names the utterance and file), or a
                cut without an integer target field (names the cut and the field).
        """
        cuts = list(cuts)
        if not cuts:
            raise ValueError("empty batch")
        if self.sampling_rate is not None:
            cuts = [c if c.sampling_rate == self.sampling_rate else c.resample(self.sampling_rate) for c in cuts]
        wavs = []
        for cut in cuts:
            try:
                audio = cut.load_audio()  # (channels, S) float32
            except Exception as e:  # lhotse / soundfile raise many types
                src = [s.source for s in cut.recording.sources] if cut.has_recording else "?"
                raise CorpusError(f"cannot read the audio of utterance '{cut.id}' ({src}): {e}") from e
            if audio.ndim != 2 or audio.shape[0] != 1:
                raise CorpusError(f"utterance '{cut.id}': expected mono audio, got shape {audio.shape}")
            wavs.append(torch.from_numpy(audio[0]).float())
        lens = torch.tensor([w.shape[0] for w in wavs], dtype=torch.int64)
        batch: dict = {
            "wavs": torch.nn.utils.rnn.pad_sequence(wavs, batch_first=True),
            "lens": lens,
            "cut_ids": [c.id for c in cuts],
            "speakers": [(c.custom or {}).get("speaker", "") for c in cuts],
        }
        for key in self.target_keys:
            values = []
            for c in cuts:
                v = (c.custom or {}).get(key)
                if not isinstance(v, int) or isinstance(v, bool):
                    raise CorpusError(f"cut '{c.id}' has no integer target '{key}' (got {v!r}); build cuts with "
                                      "speechkd.data.classification")
                values.append(v)
            batch[key] = torch.tensor(values, dtype=torch.int64)
        return batch


def waveform_batches(cuts, batch_seconds: Seconds, target_keys: Sequence[str] = (),
                     sampling_rate: Optional[int] = None):
    """Yield :class:`WaveformDataset` batches of ``cuts`` in their order, at most ``batch_seconds`` of audio each
    (a longer cut alone), for inference.

    Args:
        cuts: a CutSet (or sequence of cuts) of mono recordings.
        batch_seconds: seconds of audio per batch.
        target_keys, sampling_rate: as for :class:`WaveformDataset`.

    Yields:
        The batch dicts of :class:`WaveformDataset` (``wavs (N, S)``, ``lens (N,)`` samples, ``cut_ids``, ...).

    Raises:
        CorpusError: as :class:`WaveformDataset` (naming the utterance).
    """
    from lhotse import CutSet
    from lhotse.dataset import SimpleCutSampler

    if not isinstance(cuts, CutSet):
        cuts = CutSet.from_cuts(cuts)
    dataset = WaveformDataset(target_keys, sampling_rate=sampling_rate)
    # world_size/rank explicit: in a multi-process run lhotse would otherwise give this process every other batch
    for batch_cuts in SimpleCutSampler(cuts, max_duration=batch_seconds, shuffle=False, world_size=1, rank=0):
        yield dataset[batch_cuts]
