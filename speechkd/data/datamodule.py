"""Batches and loaders: lhotse samplers over (lazily read) cut manifests and a small ASR dataset (the fbank itself
is computed by :mod:`speechkd.data.features`).

Every model and KD method in speechkd reads its batches from :class:`AsrDataset`; a KD method only names the
per-frame teacher labels (cut custom fields) it needs, which are collated beside the features.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional, Sequence

import torch

import speechkd.labels.codec  # noqa: F401  (lhotse's reader of range-coded CI, also in spawned loader workers)
from speechkd.utils import Pathlike, Seconds

#: Frame shift of the fbank features, seconds.
FRAME_SHIFT: Seconds = 0.01
NUM_MEL_BINS = 80
#: Padding value of collated per-frame integer labels (ignored by cross-entropy).
IGNORE_INDEX = -100


class AsrDataset(torch.utils.data.Dataset):
    """Turns a CutSet batch (from a lhotse sampler) into tensors.

    Args:
      tokenizer: a :class:`speechkd.data.tokenizer.Tokenizer` (or None for unlabelled data).
      label_keys: cut custom fields holding teacher labels to collate. Per-frame arrays (e.g.
        ``"codebook_indexes"``) become ``batch["labels"][key] = (values (N, T_l, C), lens (N,))``, padded
        with ``IGNORE_INDEX`` for integer labels and 0 for float labels; plain JSON fields (e.g. the
        ``"nbest"`` list of pseudo labels) become a list of N values in batch order.
      spec_augment: apply lhotse's SpecAugment (frequency and frame masks only: time warping is disabled so
        per-frame teacher labels stay aligned with the features).
      seed: seeds the SpecAugment masks (with the epoch and the batch's cut ids).
      cache_bytes: hold up to this many bytes of read features and labels in memory (the process's own copy,
        e.g. a persistent DataLoader worker's), so that later epochs do not read or decode them again; arrays
        read once the cache is full come from disk every time. 0 = no cache. The batches are bit-identical
        either way (the cached arrays are lhotse's own reads, padded as lhotse pads them).

    A batch is a dict: ``features (N, T, 80)`` float32, ``feature_lens (N,)`` frames, ``tokens`` a list of
    N token-id lists, ``texts`` ('' for an untranscribed cut), ``has_text (N,)`` bool (the cut has a transcript:
    only those rows carry a reference loss), ``cut_ids``, ``durations`` (N,) seconds, and ``labels``.
    """

    def __init__(self, tokenizer=None, label_keys: Sequence[str] = (), spec_augment: bool = False, seed: int = 0,
                 cache_bytes: int = 0):
        super().__init__()
        self.seed = int(seed)
        self.cache_bytes = int(cache_bytes)
        self._cache: dict = {}  # (cut id, field or None for the features) -> numpy array
        self._cached_bytes = 0
        self.tokenizer = tokenizer
        self.label_keys = list(label_keys)
        self.spec_augment = None
        if spec_augment:
            from lhotse.dataset import SpecAugment

            self.spec_augment = SpecAugment(
                time_warp_factor=-1, num_feature_masks=2, features_mask_size=15, num_frame_masks=5,
                frames_mask_size=20, max_frames_mask_fraction=0.15, p=0.9,
            )

    def __getitem__(self, cuts) -> dict:
        epoch = None
        if isinstance(cuts, tuple):  # (epoch, CutSet) from an EpochTagged sampler
            epoch, cuts = cuts
        cuts = cuts.sort_by_duration(ascending=False)
        for cut in cuts:
            if not cut.has_features:
                raise ValueError(f"cut '{cut.id}' has no features: run `speechkd prepare` first")
        features, feature_lens = self._collate_features(cuts)  # features: (N, T, 80)
        if self.spec_augment is not None:
            features = self._augment(features, epoch, [c.id for c in cuts])
        texts = [" ".join(s.text for s in c.supervisions if s.text) for c in cuts]
        batch = {
            "features": features,
            "feature_lens": feature_lens,
            "texts": texts,
            "has_text": torch.tensor([bool(t) for t in texts], dtype=torch.bool),
            "cut_ids": [c.id for c in cuts],
            "durations": torch.tensor([c.duration for c in cuts], dtype=torch.float32),
            "labels": {},
        }
        if self.tokenizer is not None:
            batch["tokens"] = self.tokenizer.encode(texts)
        for key in self.label_keys:
            missing = [c.id for c in cuts if not (c.custom and key in c.custom)]
            if missing:
                raise ValueError(f"cut '{missing[0]}' has no teacher label '{key}' (run the label stage first)")
            if isinstance(next(iter(cuts)).custom[key], (list, dict)):  # plain JSON labels (e.g. an N-best list)
                batch["labels"][key] = [c.custom[key] for c in cuts]
                continue
            values, lens = self._collate_field(cuts, key)
            if not values.is_floating_point():
                values = values.long()
                mask = torch.arange(values.shape[1])[None, :] >= lens[:, None]  # (N, T_l)
                values[mask] = IGNORE_INDEX
            batch["labels"][key] = (values, lens)
        return batch


    def _read(self, cut, field: Optional[str]):
        """The cut's features (``field=None``, ``(T, 80)``) or custom array ``field``, from the cache when held."""
        key = (cut.id, field)
        arr = self._cache.get(key)
        if arr is None:
            arr = cut.load_features() if field is None else cut.load_custom(field)
            if self._cached_bytes + arr.nbytes <= self.cache_bytes:
                self._cache[key] = arr
                self._cached_bytes += arr.nbytes
        return arr

    def _collate_features(self, cuts) -> tuple[torch.Tensor, torch.Tensor]:
        """``(features (N, T_max, F) float32, lens (N,) int32 frames)`` as lhotse's ``collate_features``: right
        padding with ``LOG_EPSILON`` (lhotse's padding value of log-energy features)."""
        if not self.cache_bytes:
            from lhotse.dataset.collation import collate_features

            return collate_features(cuts)
        from lhotse.utils import LOG_EPSILON

        arrays = [self._read(c, None) for c in cuts]
        lens = torch.tensor([c.num_frames for c in cuts], dtype=torch.int)
        for c, a in zip(cuts, arrays):
            if a.shape[0] != c.num_frames:
                raise ValueError(f"cut '{c.id}': its features have {a.shape[0]} frames, the manifest says "
                                 f"{c.num_frames}")
        out = torch.full((len(arrays), int(lens.max()), arrays[0].shape[1]), LOG_EPSILON, dtype=torch.float32)
        for i, a in enumerate(arrays):
            out[i, : a.shape[0]] = torch.from_numpy(a)
        return out, lens

    def _collate_field(self, cuts, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(values (N, T_max, ...), lens (N,) int32)`` of a temporal custom array as lhotse's
        ``collate_custom_field(cuts, key, pad_value=0)``: right padding with 0, small integer types as int64."""
        if not self.cache_bytes:
            from lhotse.dataset.collation import collate_custom_field

            return collate_custom_field(cuts, key, pad_value=0)
        arrays = [torch.from_numpy(self._read(c, key)) for c in cuts]
        temporal = getattr(cuts[0], key).temporal_dim
        lens = torch.tensor([a.shape[temporal] for a in arrays], dtype=torch.int32)
        shape = list(max(arrays, key=torch.numel).shape)
        shape[temporal] = int(lens.max())
        dtype = arrays[0].dtype
        if dtype in (torch.uint8, torch.int8, torch.int16, torch.int32):
            dtype = torch.int64
        out = torch.zeros((len(arrays), *shape), dtype=dtype)
        for i, a in enumerate(arrays):
            index = [i] + [slice(0, n) if d == temporal else slice(None) for d, n in enumerate(a.shape)]
            out[tuple(index)] = a
        return out, lens

    def _augment(self, features: torch.Tensor, epoch: Optional[int], cut_ids: list[str]) -> torch.Tensor:
        """SpecAugment of a batch ``features (N, T, 80)`` drawn from a generator seeded by (dataset seed, epoch, the
        batch's cut ids): the same masks whichever process or worker collates the batch and however often the fit
        was stopped and resumed (a worker's own generator would restart at a resume). The caller's global random
        state is left as it was (with no DataLoader worker this runs in the training process)."""
        import hashlib
        import random

        key = f"{self.seed}:{-1 if epoch is None else epoch}:{','.join(cut_ids)}".encode()
        batch_seed = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & (2**63 - 1)
        py_state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            random.seed(batch_seed)
            torch.manual_seed(batch_seed)
            try:
                return self.spec_augment(features)
            finally:
                random.setstate(py_state)


class EpochTagged:
    """A sampler view yielding ``(epoch, CutSet)`` so :class:`AsrDataset` can seed each batch's augmentation by its
    epoch; ``set_epoch`` and ``epoch`` reach the wrapped lhotse sampler."""

    def __init__(self, sampler):
        self.sampler = sampler

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def __len__(self):
        return len(self.sampler)

    def __iter__(self):
        epoch = self.sampler.epoch
        for cuts in self.sampler:
            yield epoch, cuts


def _loader_generator(seed: int) -> torch.Generator:
    """The DataLoader's own generator: its workers' base seed is drawn from it rather than from the global torch
    generator, so creating an iterator does not shift the training process's random stream (dropout) and a resumed
    fit draws what an uninterrupted one would."""
    return torch.Generator().manual_seed(int(seed))


#: Duration buckets of the training sampler: with 20 instead of 5 the padding of a connected-word batch falls from
#: about 16% to 4% of its frames (benchmarks/train_bench.py).
NUM_BUCKETS = 20


def make_sampler(cuts, max_duration: Seconds, shuffle: bool, seed: int = 0, world_size: int = 1, rank: int = 0,
                 num_buckets: int = NUM_BUCKETS):
    """A lhotse sampler over ``cuts``: ``DynamicBucketingSampler`` (``num_buckets`` duration buckets, shuffled) for
    training, a ``SimpleCutSampler`` in manifest order otherwise.

    Args:
      cuts: lhotse.CutSet.
      max_duration: seconds of audio per batch (per process).
      shuffle: bucket and shuffle (training); otherwise keep order.
      num_buckets: duration buckets (training): more buckets, less padding per batch; at most the number of cuts.
      seed: sampler seed (the epoch is added by the sampler's ``set_epoch``).
      world_size, rank: the data-parallel processes and this one's global rank. Always given explicitly (from the
        Lightning trainer): lhotse would otherwise read ``RANK`` / ``WORLD_SIZE`` from the environment, which
        Lightning's own launcher does not set. With ``world_size = W`` the sampler draws W batches at a time and
        keeps the ``rank``-th, so the processes see disjoint cuts and the same number of batches (the last round's
        cuts are redistributed, duplicating a few only when fewer cuts than processes remain).
    """
    from lhotse.dataset import DynamicBucketingSampler, SimpleCutSampler

    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..{world_size - 1} (world_size {world_size})")
    if shuffle:
        import itertools

        # lhotse needs at least as many cuts as buckets, and 2 buckets (a smoke list, a filtered label set may have
        # fewer cuts): below 2 cuts there is nothing to bucket
        num_buckets = min(num_buckets, sum(1 for _ in itertools.islice(cuts, num_buckets)))
        if num_buckets < 2:
            return SimpleCutSampler(cuts, max_duration=max_duration, shuffle=True, seed=seed, world_size=world_size,
                                    rank=rank)
        with warnings.catch_warnings():  # some CutSets (e.g. filtered N-best labels) are small and eager on purpose
            warnings.filterwarnings("ignore", message=".*eagerly read CutSet.*")
            return DynamicBucketingSampler(cuts, max_duration=max_duration, shuffle=True, num_buckets=num_buckets, seed=seed,
                                           world_size=world_size, rank=rank)
    return SimpleCutSampler(cuts, max_duration=max_duration, shuffle=False, world_size=world_size, rank=rank)


def make_loader(cuts, dataset: AsrDataset, max_duration: Seconds, shuffle: bool, seed: int = 0, num_workers: int = 0,
                world_size: int = 1, rank: int = 0):
    """A DataLoader over ``cuts`` with :func:`make_sampler`'s sampler (``batch_size=None``: the sampler yields
    CutSets, ``dataset`` collates them).

    Args:
      cuts, max_duration, shuffle, seed, world_size, rank: as :func:`make_sampler`.
      dataset: the :class:`AsrDataset` that collates each batch.
      num_workers: DataLoader workers.
    """
    sampler = make_sampler(cuts, max_duration, shuffle, seed=seed, world_size=world_size, rank=rank)
    return torch.utils.data.DataLoader(
        dataset, sampler=sampler, batch_size=None, num_workers=num_workers, persistent_workers=num_workers > 0,
        generator=_loader_generator(seed),
    )


def shard_cuts(cuts, index: int, count: int):
    """Cuts ``index, index + count, index + 2 * count, ...`` of ``cuts`` (in manifest order) as an eager CutSet:
    shard ``index`` of ``count`` disjoint shards whose union is ``cuts``.

    Raises:
      ValueError: ``index`` not in ``0..count-1``.
    """
    from lhotse import CutSet

    from speechkd.labels.shards import every_nth

    return CutSet.from_cuts(every_nth(cuts, index, count))


def _lightning_data_module():
    import lightning as L

    return L.LightningDataModule


class AsrDataModule(_lightning_data_module()):
    """Training and dev loaders of one fit, built per process once the trainer knows its rank.

    In :meth:`setup` (called by Lightning after the processes have joined and before the optimisers are made) the
    training sampler is built with the trainer's ``world_size`` and ``global_rank`` (:func:`make_sampler`) and its
    batches in one epoch are counted (:attr:`batches_per_epoch`, the same on every rank), so the learning-rate
    schedule spans the steps really taken. The dev cuts are split into disjoint shards, one per rank
    (:func:`shard_cuts`); the WER is summed over the ranks as error counts.

    Args:
      train_cuts, dev_cuts: lhotse CutSets with features.
      train_dataset, dev_dataset: :class:`AsrDataset` collating the batches.
      max_duration: seconds of audio per batch and process.
      seed: the training sampler's seed.
      num_workers: DataLoader workers of the training loader (the dev loader uses none).
      num_buckets: duration buckets of the training sampler.
    """

    def __init__(self, train_cuts, dev_cuts, train_dataset: AsrDataset, dev_dataset: AsrDataset,
                 max_duration: Seconds, seed: int, num_workers: int = 1, num_buckets: int = NUM_BUCKETS):
        super().__init__()
        self.train_cuts, self.dev_cuts = train_cuts, dev_cuts
        self.train_dataset, self.dev_dataset = train_dataset, dev_dataset
        self.max_duration, self.seed, self.num_workers = max_duration, seed, num_workers
        self.num_buckets = num_buckets
        self.train_sampler = None
        self.batches_per_epoch = None

    def _world(self) -> tuple[int, int]:
        t = self.trainer
        return (1, 0) if t is None else (t.world_size, t.global_rank)

    def setup(self, stage: str) -> None:
        if self.train_sampler is not None:
            return
        from speechkd.training import count_batches

        world, rank = self._world()
        self.train_sampler = make_sampler(self.train_cuts, self.max_duration, shuffle=True, seed=self.seed,
                                          world_size=world, rank=rank, num_buckets=self.num_buckets)
        self.batches_per_epoch = max(1, count_batches(self.train_sampler))

    def train_dataloader(self):
        # Lightning creates the loader's iterator before it calls set_epoch, so a resumed fit would replay epoch 0's
        # shuffle in its first epoch. Set the epoch Lightning will set (its processed epochs, already restored from
        # the checkpoint here; `current_epoch` lags by one when the checkpoint was written at an epoch's end).
        self.train_sampler.set_epoch(self.trainer.fit_loop.epoch_progress.current.processed if self.trainer else 0)
        return torch.utils.data.DataLoader(self.train_dataset, sampler=EpochTagged(self.train_sampler), batch_size=None,
                                           num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                                           generator=_loader_generator(self.seed))

    def val_dataloader(self):
        world, rank = self._world()
        cuts = self.dev_cuts if world == 1 else shard_cuts(self.dev_cuts, rank, world)
        return make_loader(cuts, self.dev_dataset, self.max_duration, shuffle=False)


class SkipFirst:
    """A sampler view that drops the first ``skip`` batches of its next pass (a resumed fit's batches already
    trained in the interrupted epoch), then passes everything; ``set_epoch`` reaches the wrapped sampler."""

    def __init__(self, sampler, skip: int = 0):
        self.sampler, self.skip = sampler, int(skip)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __iter__(self):
        skip, self.skip = self.skip, 0
        for k, batch in enumerate(self.sampler):
            if k >= skip:
                yield batch


class WaveformDataModule(_lightning_data_module()):
    """Training batches of waveform cuts (the SSL stages) for a step-based fit, built per rank.

    The sampler is lhotse's ``DynamicBucketingSampler`` over ``cuts`` (:data:`NUM_BUCKETS` duration buckets, ``batch_seconds`` of audio
    per batch and process, shuffled with ``seed`` and the epoch) with the trainer's world size and rank; the batches
    are collated by :class:`speechkd.data.classification.WaveformDataset` in a DataLoader worker. A fit resumed in
    the middle of an epoch skips the batches that epoch had already trained (``global step`` minus the batches of the
    earlier epochs), so it sees what a fit never stopped would have seen.

    Args:
      cuts: lhotse CutSet of mono recordings (16 kHz after resampling).
      target_keys: integer cut fields collated as targets (``kws_target``, ``spk_target``).
      batch_seconds: seconds of audio per batch and process.
      seed: sampler seed.
      num_workers: DataLoader workers.
      dataset: collates the sampler's CutSets instead of ``WaveformDataset(target_keys)``.

    Raises:
      ValueError: in :meth:`setup`, when the sampler yields no batch.
    """

    def __init__(self, cuts, target_keys: Sequence[str], batch_seconds: Seconds, seed: int, num_workers: int = 1,
                 dataset=None):
        super().__init__()
        self.cuts, self.target_keys = cuts, list(target_keys)
        self.batch_seconds, self.seed, self.num_workers = batch_seconds, seed, num_workers
        self.dataset = dataset
        self.sampler = None

    def _make(self):
        t = self.trainer
        world, rank = (1, 0) if t is None else (t.world_size, t.global_rank)
        return make_sampler(self.cuts, self.batch_seconds, shuffle=True, seed=self.seed, world_size=world, rank=rank)

    def setup(self, stage: str) -> None:
        from speechkd.training import count_batches

        if self.sampler is None:
            self.sampler = self._make()
            if count_batches(self.sampler) == 0:
                raise ValueError(f"no training batch: {len(self.cuts)} cuts with batch_seconds={self.batch_seconds}")

    def _position(self) -> tuple[int, int]:
        """``(epoch, batches of it already trained)`` where the fit (re)starts."""
        import copy

        from speechkd.training import count_batches

        t = self.trainer
        if t is None:
            return 0, 0
        epoch = t.fit_loop.epoch_progress.current.processed
        done = t.global_step * t.accumulate_grad_batches
        for e in range(epoch):  # batches of the epochs before
            s = copy.deepcopy(self.sampler)
            s.set_epoch(e)
            done -= count_batches(s)
        return epoch, max(0, done)

    def train_dataloader(self):
        from speechkd.data.classification import WaveformDataset

        epoch, skip = self._position()
        self.sampler.set_epoch(epoch)  # Lightning sets it only after making the iterator
        dataset = self.dataset if self.dataset is not None else WaveformDataset(self.target_keys)
        return torch.utils.data.DataLoader(dataset, sampler=SkipFirst(self.sampler, skip),
                                           batch_size=None, num_workers=self.num_workers,
                                           persistent_workers=self.num_workers > 0)


def load_cuts(path: Pathlike, lazy: bool = True):
    """Open a CutSet manifest (``.jsonl.gz``): lazily by default (cuts are read from the file on each pass, never
    the whole corpus in memory), or eagerly.

    Raises:
      FileNotFoundError: with the path, when the manifest is missing.
    """
    from lhotse import CutSet

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"cuts manifest not found: {path}")
    cuts = CutSet.from_file(path)
    if cuts is None:  # lhotse reads an empty manifest (e.g. a shard with no cuts) as None
        return CutSet.from_cuts([])
    return cuts if lazy else cuts.to_eager()


def save_cuts(cuts, path: Pathlike) -> None:
    """Write a CutSet manifest atomically."""
    from speechkd.utils import atomic_path

    with atomic_path(path) as tmp:
        cuts.to_file(tmp)
