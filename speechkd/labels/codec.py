"""Entropy-coded storage of codebook indexes (CI): a lossless range coder behind lhotse's reader registry.

The stored CI are far from uniform (on Whisper tiny.en layer-2 frames, 16 codebooks: 6.85 bits of empirical
entropy per index instead of 8; docs/quantizer_benchmark.md), so a static per-codebook model saves about 14% of
the bytes at no loss. Each file holds:

* a header: the magic ``SKDCI1\\n``, the header's byte length (uint32 little-endian) and a JSON object
  ``{"num_codebooks": M, "counts": [[...256 ints...] * M]}``: per codebook, the index counts of the frames the
  model was fitted on (the first ``MODEL_FRAMES`` frames written), plus one (Laplace smoothing, so every index
  stays codable);
* the payload: each cut's CI as one range-coded message (Duda-style queue coder of ``constriction``, Bamler 2022,
  ``RangeEncoder`` / ``RangeDecoder``, its ``Categorical`` model with the probabilities ``counts / counts.sum()``),
  codebook-major (codebook 0 of every frame, then codebook 1, ...), as uint32 little-endian words.

A cut's manifest is a :class:`lhotse.array.TemporalArray` whose ``storage_type`` is ``"speechkd_ci_range"``,
``storage_path`` the file and ``storage_key`` ``"<first word>,<number of words>,<frames>"``, so
``cut.load_custom(key)``, truncation and collation work exactly as with lhotse's own formats; the reader decodes a
cut's whole message and slices the requested frames. Decoding is bit-exact (the model's quantisation is a
deterministic function of the stored integer counts).

Only ``uint8 (T, M)`` arrays are accepted; other labels stay in uncompressed HDF5 (:mod:`speechkd.labels.store`).
"""

from __future__ import annotations

import json
import os
import struct
import threading
from pathlib import Path
from typing import Optional, Union

import numpy as np
from lhotse.features.io import FeaturesReader, register_reader

from speechkd.labels.store import RANGE_STORAGE_TYPE

__all__ = ["STORAGE_TYPE", "MAGIC", "MODEL_FRAMES", "CIRangeWriter", "CIRangeReader", "fit_counts"]

Pathlike = Union[str, Path]
#: lhotse ``storage_type`` of range-coded CI.
STORAGE_TYPE = RANGE_STORAGE_TYPE
#: First bytes of a range-coded CI file (format version 1).
MAGIC = b"SKDCI1\n"
#: Frames buffered to fit the file's model before the first cut is written (fewer when the file has fewer).
MODEL_FRAMES = 20000
_WORD = np.dtype("<u4")


def fit_counts(arrays: list[np.ndarray]) -> np.ndarray:
    """Per-codebook index counts plus one: ``(M, 256)`` int64 from ``(T_i, M)`` uint8 arrays (all the same M).

    Raises:
      ValueError: no arrays, or arrays of different widths.
    """
    if not arrays:
        raise ValueError("need at least one array to fit the CI model")
    m = arrays[0].shape[1]
    if any(a.shape[1] != m for a in arrays):
        raise ValueError("CI arrays of different widths cannot share one model")
    ci = np.concatenate(arrays)  # (sum T, M)
    counts = np.ones((m, 256), dtype=np.int64)
    for j in range(m):
        counts[j] += np.bincount(ci[:, j], minlength=256)
    return counts


def _models(counts: np.ndarray):
    """One ``constriction`` categorical model per codebook from ``counts: (M, 256)``."""
    import constriction

    probs = counts.astype(np.float64) / counts.sum(axis=1, keepdims=True)  # (M, 256)
    return [constriction.stream.model.Categorical(p, perfect=False) for p in probs]


def _encode(ci: np.ndarray, models) -> np.ndarray:
    """``ci: (T, M)`` uint8 -> uint32 words of one codebook-major range-coded message."""
    import constriction

    enc = constriction.stream.queue.RangeEncoder()
    sym = ci.astype(np.int32)
    for j, model in enumerate(models):
        enc.encode(np.ascontiguousarray(sym[:, j]), model)
    return np.asarray(enc.get_compressed(), dtype=np.uint32)


class CIRangeWriter:
    """Write range-coded CI of many cuts to one file (atomically: a temporary name, renamed by :meth:`close`).

    The first ``MODEL_FRAMES`` frames are buffered to fit the file's model (:func:`fit_counts`), then written with
    every later cut as it arrives. Use as a context manager; :meth:`abort` (or an exception in the ``with`` body)
    removes the temporary file.

    Args:
      path: the final file (e.g. ``labels/codebook_indexes.ci``); its directory must exist.
      model_frames: frames buffered to fit the model (default :data:`MODEL_FRAMES`).

    Raises:
      ValueError (from :meth:`write`): an array that is not ``(T, M)`` uint8 with ``T >= 1`` or whose ``M``
        differs from the first array's.
    """

    def __init__(self, path: Pathlike, model_frames: Optional[int] = None):
        import tempfile

        self.path = Path(path)
        fd, self._tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        self._f = os.fdopen(fd, "wb")
        self._model_frames = int(MODEL_FRAMES if model_frames is None else model_frames)
        self._pending: list[tuple[str, np.ndarray]] = []
        self._pending_frames = 0
        self._models = None
        self._width: Optional[int] = None
        self._words = 0  # words written so far
        self.keys: dict[str, str] = {}  # label key -> storage_key, filled as cuts are written
        self._done = False

    def write(self, key: str, ci: np.ndarray) -> None:
        """Queue or write one cut's ``ci: (T, M)`` uint8 under ``key`` (its storage key appears in :attr:`keys`
        once written; all are written by :meth:`close`)."""
        ci = np.ascontiguousarray(ci)
        if ci.dtype != np.uint8 or ci.ndim != 2 or ci.shape[0] < 1 or ci.shape[1] < 1:
            raise ValueError(f"'{key}': range-coded CI must be (T, M) uint8 with T, M >= 1, got {ci.dtype} "
                             f"{ci.shape}")
        if self._width is None:
            self._width = ci.shape[1]
        elif ci.shape[1] != self._width:
            raise ValueError(f"'{key}': CI with {ci.shape[1]} codebooks, the file's other cuts have {self._width}")
        if self._models is None:
            self._pending.append((key, ci))
            self._pending_frames += ci.shape[0]
            if self._pending_frames >= self._model_frames:
                self._start()
            return
        self._put(key, ci)

    def _start(self) -> None:
        counts = fit_counts([a for _, a in self._pending])
        header = json.dumps({"num_codebooks": int(counts.shape[0]), "counts": counts.tolist()},
                            separators=(",", ":")).encode()
        self._f.write(MAGIC + struct.pack("<I", len(header)) + header)
        pad = (-self._f.tell()) % 4  # payload starts word-aligned
        self._f.write(b"\0" * pad)
        self._models = _models(counts)
        pending, self._pending = self._pending, []
        for key, ci in pending:
            self._put(key, ci)

    def _put(self, key: str, ci: np.ndarray) -> None:
        words = _encode(ci, self._models)
        self._f.write(words.astype(_WORD).tobytes())
        self.keys[key] = f"{self._words},{words.size},{ci.shape[0]}"
        self._words += words.size

    def close(self) -> None:
        """Write what is buffered, flush, and rename the file to its final name (replacing one of that name)."""
        if self._done:
            return
        if self._models is None and self._pending:
            self._start()
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        from speechkd.utils import default_mode

        os.chmod(self._tmp, default_mode())
        os.replace(self._tmp, self.path)
        _drop_cached(self.path)
        self._done = True

    def abort(self) -> None:
        """Discard the temporary file (nothing under the final name is touched)."""
        if self._done:
            return
        self._f.close()
        if os.path.exists(self._tmp):
            os.unlink(self._tmp)
        self._done = True

    def __enter__(self) -> "CIRangeWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


# (path, mtime_ns, size) -> (payload offset in bytes, models); a replaced file gets a new entry
_CACHE: dict[tuple, tuple[int, list]] = {}
_LOCK = threading.Lock()


def _drop_cached(path: Path) -> None:
    with _LOCK:
        for k in [k for k in _CACHE if k[0] == str(path)]:
            del _CACHE[k]


def _open_header(path: str) -> tuple[int, list]:
    """``(payload offset, models)`` of a range-coded CI file, parsed once per file version.

    Raises:
      ValueError: not a range-coded CI file (wrong magic) or a damaged header (naming the file).
    """
    st = os.stat(path)
    key = (path, st.st_mtime_ns, st.st_size)
    with _LOCK:
        hit = _CACHE.get(key)
    if hit is not None:
        return hit
    with open(path, "rb") as f:
        head = f.read(len(MAGIC) + 4)
        if len(head) < len(MAGIC) + 4 or head[: len(MAGIC)] != MAGIC:
            raise ValueError(f"{path}: not a range-coded CI file (expected it to start with {MAGIC!r})")
        (n,) = struct.unpack("<I", head[len(MAGIC):])
        try:
            meta = json.loads(f.read(n))
            counts = np.asarray(meta["counts"], dtype=np.int64)
        except (ValueError, KeyError) as e:
            raise ValueError(f"{path}: damaged CI file header ({e})") from e
    if counts.ndim != 2 or counts.shape != (int(meta["num_codebooks"]), 256) or (counts < 1).any():
        raise ValueError(f"{path}: damaged CI file header (counts of shape {counts.shape})")
    start = len(MAGIC) + 4 + n
    start += (-start) % 4
    entry = (start, _models(counts))
    with _LOCK:
        _CACHE[key] = entry
    return entry


@register_reader
class CIRangeReader(FeaturesReader):
    """lhotse reader of range-coded CI files (``storage_type = "speechkd_ci_range"``).

    ``read(storage_key, left_offset_frames, right_offset_frames)`` returns the cut's ``(T, M)`` uint8 indexes
    (frames ``left:right`` of them).

    Raises:
      ValueError: a malformed storage key, a message outside the file, or a file that is not range-coded CI
        (each naming the file and key).
    """

    name = STORAGE_TYPE

    def __init__(self, storage_path: Pathlike, *args, **kwargs):
        super().__init__()
        self.storage_path = str(storage_path)

    def read(self, key: str, left_offset_frames: int = 0, right_offset_frames: Optional[int] = None) -> np.ndarray:
        import constriction

        try:
            first, num, frames = (int(v) for v in key.split(","))
        except ValueError:
            raise ValueError(f"{self.storage_path}: malformed CI storage key {key!r} (want 'word,words,frames')")
        start, models = _open_header(self.storage_path)
        with open(self.storage_path, "rb") as f:
            f.seek(start + 4 * first)
            raw = f.read(4 * num)
        if len(raw) != 4 * num or num < 1 or frames < 1:
            raise ValueError(f"{self.storage_path}: CI message {key!r} lies outside the file (truncated?)")
        dec = constriction.stream.queue.RangeDecoder(np.frombuffer(raw, dtype=_WORD).astype(np.uint32))
        ci = np.empty((frames, len(models)), dtype=np.uint8)
        for j, model in enumerate(models):
            ci[:, j] = dec.decode(model, frames)
        return ci[left_offset_frames:right_offset_frames]
