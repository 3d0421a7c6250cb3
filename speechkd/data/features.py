"""Sharded, resumable fbank extraction: a manifest's cuts in chunks, each chunk one lhotse archive.

:func:`compute_fbank_chunks` splits a raw CutSet manifest (read lazily) into chunks of ``chunk_cuts`` cuts and
gives them to ``num_jobs`` worker processes. A chunk ``k`` writes ``chunk-k.lca`` (lhotse ``LilcomChunkyWriter``
features), then ``chunk-k.skipped.jsonl`` (its bad cuts), then ``chunk-k.jsonl.gz`` (its cuts with features)
atomically and last: the manifest marks the chunk done, so a rerun skips finished chunks and redoes only the
rest. Audio is validated as it is read (:func:`speechkd.data.validation.check_audio_samples`: samples present,
finite, and as long as the manifest says); several channels are averaged (downmixed) before the fbank. Cuts that
already carry features matching the recipe's (80-dim kaldi fbank, 10 ms, 16 kHz) keep them, unread.

The progress bar counts seconds of audio done.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from speechkd.data.validation import BadInputPolicy, Skip, audio_file_of, check_audio_samples, read_skips, write_skips
from speechkd.utils import Pathlike, Seconds, atomic_path

from speechkd.data.datamodule import FRAME_SHIFT, NUM_MEL_BINS

#: Sampling rate of the fbank input, Hz (other rates are resampled on load).
SAMPLE_RATE = 16000


def fbank_extractor():
    """lhotse's kaldi-compatible ``Fbank``: 80 mel bins, 25 ms window, 10 ms shift, 16 kHz."""
    from lhotse import Fbank, FbankConfig

    return Fbank(FbankConfig(num_mel_bins=NUM_MEL_BINS, frame_shift=FRAME_SHIFT, sampling_rate=SAMPLE_RATE))


def features_match(cut) -> bool:
    """Whether a cut's stored features are the recipe's fbank (type, 80 bins, 10 ms shift, 16 kHz)."""
    from lhotse import Fbank

    f = cut.features if cut.has_features else None
    return (f is not None and f.type == Fbank.name and f.num_features == NUM_MEL_BINS
            and abs(f.frame_shift - FRAME_SHIFT) < 1e-9 and f.sampling_rate == SAMPLE_RATE)


def _chunk_paths(out_dir: Path, k: int) -> tuple[Path, Path, Path]:
    stem = out_dir / f"chunk-{k:05d}"
    return stem.with_suffix(".jsonl.gz"), stem.with_suffix(".lca"), stem.with_suffix(".skipped.jsonl")


def fbank_chunk(cut_dicts: list[dict], out_dir: str, k: int, split: str, mode: str, tolerance: Seconds,
                worker: bool = False) -> tuple[int, float, int]:
    """Compute and store one chunk's fbank (the unit of parallel work and of resuming).

    Args:
      cut_dicts: the chunk's cuts as lhotse dicts (``cut.to_dict()``).
      out_dir: the split's feature directory.
      k: chunk number (file names ``chunk-%05d``).
      split: for skip records and messages.
      mode: ``error`` or ``skip`` (see :class:`speechkd.data.validation.BadInputPolicy`).
      tolerance: seconds the audio's length may differ from the cut's duration.
      worker: running in a worker process (one torch thread).

    Returns:
      ``(cuts written, seconds of audio written, cuts skipped)``.

    Raises:
      BadInputError: a bad cut in ``error`` mode (the chunk's files are then not written).
    """
    from lhotse import CutSet, LilcomChunkyWriter
    from lhotse.cut.set import deserialize_cut
    from lhotse.utils import fastcopy

    if worker:
        import torch

        torch.set_num_threads(1)
    manifest, archive, skipped = _chunk_paths(Path(out_dir), k)
    policy = BadInputPolicy(mode, split)
    extractor = fbank_extractor()
    done = []
    with LilcomChunkyWriter(archive, mode="wb") as writer:
        for d in cut_dicts:
            cut = deserialize_cut(d) if isinstance(d, dict) else d
            origin = (cut.custom or {}).get("origin", "")
            if features_match(cut):
                done.append(cut)
                continue
            c16 = cut.resample(SAMPLE_RATE) if cut.sampling_rate != SAMPLE_RATE else cut
            try:
                samples = c16.load_audio()  # (C, S) float32
            except Exception as e:  # truncated or unreadable audio; lhotse and soundfile raise several types
                policy.bad(cut.id, audio_file_of(cut), f"audio cannot be read ({type(e).__name__}: {e})", origin)
                continue
            if samples.ndim == 1:
                samples = samples[None]
            problem = check_audio_samples(samples, cut.duration, SAMPLE_RATE, tolerance)
            if problem is not None:
                policy.bad(cut.id, audio_file_of(cut), problem, origin)
                continue
            if samples.shape[0] > 1:
                samples = samples.mean(axis=0, keepdims=True)  # downmix to mono
            feats = extractor.extract_from_samples_and_store(samples, writer, SAMPLE_RATE, offset=c16.start,
                                                             channel=0)
            feats.recording_id = c16.recording_id
            done.append(fastcopy(c16, features=feats))
    write_skips(skipped, policy.skips)
    with atomic_path(manifest) as tmp:
        CutSet.from_cuts(done).to_file(tmp)
    return len(done), sum(c.duration for c in done), len(policy.skips)


def _chunks(cuts, chunk_cuts: int) -> Iterator[list]:
    group = []
    for c in cuts:
        group.append(c)
        if len(group) == chunk_cuts:
            yield group
            group = []
    if group:
        yield group


def compute_fbank_chunks(raw_manifest: Pathlike, out_dir: Pathlike, split: str, num_jobs: int = 1,
                         chunk_cuts: int = 500, mode: str = "error", tolerance: Seconds = 0.1,
                         progress: bool = True) -> tuple[list[Path], list[Skip]]:
    """Fbank for every cut of ``raw_manifest``, in resumable chunks (see the module docstring).

    Args:
      raw_manifest: a CutSet manifest of cuts with recordings (read lazily, never whole in memory).
      out_dir: the split's feature directory (``chunk-*.lca`` archives and ``chunk-*.jsonl.gz`` manifests).
      split: for messages and skip records.
      num_jobs: worker processes (1: in this process).
      chunk_cuts: cuts per chunk.
      mode: ``error`` or ``skip`` (bad audio).
      tolerance: seconds a cut's audio may differ from its duration.
      progress: show a progress bar in seconds of audio.

    Returns:
      ``(chunk manifests in order, skip records of every chunk)``.

    Raises:
      BadInputError: a bad cut in ``error`` mode (finished chunks stay; a rerun resumes).
    """
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing as mp

    from lhotse import CutSet
    from tqdm import tqdm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    raw = CutSet.from_file(raw_manifest)  # lazy for .jsonl(.gz)
    total = sum(c.duration for c in raw)
    bar = tqdm(total=total, desc=f"fbank {split}", unit="s audio", disable=not progress,
               bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} s audio [{elapsed}<{remaining}, {rate_fmt}]")
    chunks: list[tuple[Path, Path, Path]] = []  # (manifest, archive, skip file) of every chunk, in order

    def todo() -> Iterator[tuple[int, list, float]]:  # chunks not yet done, read lazily
        for k, group in enumerate(_chunks(raw, chunk_cuts)):
            chunks.append(_chunk_paths(out_dir, k))
            manifest = chunks[-1][0]
            seconds = sum(c.duration for c in group)
            if manifest.is_file():
                bar.update(seconds)
                continue
            yield k, group, seconds

    try:
        if num_jobs <= 1:
            for k, group, seconds in todo():
                fbank_chunk(group, str(out_dir), k, split, mode, tolerance)
                bar.update(seconds)
        else:
            from collections import deque

            with ProcessPoolExecutor(max_workers=num_jobs, mp_context=mp.get_context("spawn")) as pool:
                running: deque = deque()  # at most 2 chunks per worker in memory at once
                try:
                    for k, group, seconds in todo():
                        running.append((pool.submit(fbank_chunk, [c.to_dict() for c in group], str(out_dir), k,
                                                    split, mode, tolerance, True), seconds))
                        while len(running) >= 2 * num_jobs:
                            fut, sec = running.popleft()
                            fut.result()
                            bar.update(sec)
                    while running:
                        fut, sec = running.popleft()
                        fut.result()
                        bar.update(sec)
                except BaseException:
                    for fut, _ in running:
                        fut.cancel()
                    raise
    finally:
        bar.close()
    skips = [s for _, _, skip_file in chunks for s in read_skips(skip_file)]
    return [manifest for manifest, _, _ in chunks], skips


def merge_manifests(manifests: list[Path], out: Pathlike) -> int:
    """Concatenate CutSet manifests (streamed, in order) into ``out`` atomically. Returns the number of cuts."""
    from lhotse import CutSet

    n = 0
    with atomic_path(out) as tmp:
        with CutSet.open_writer(tmp) as writer:
            for m in manifests:
                for cut in CutSet.from_file(m):
                    writer.write(cut)
                    n += 1
    return n
