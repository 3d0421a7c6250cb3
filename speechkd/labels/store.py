"""Per-frame teacher labels stored beside lhotse cuts (codebook indexes or float embeddings).

As in icefall's MVQ-KD recipes (Guo et al., ICASSP 2023, arXiv 2211.00508), every cut's label array
``(T, C)`` (time first) is written uncompressed to one HDF5 file with lhotse's ``NumpyHdf5Writer`` and attached
to the cut as a custom field holding a :class:`lhotse.array.TemporalArray` manifest, so lhotse's
``cut.load_custom(key)``, ``cut.truncate(...)`` and ``collate_custom_field`` slice and pad the labels with the
cut. Beside it, ``cut.custom[f"{key}_meta"]`` holds string metadata (e.g. ``{"quantizer_id": ...}``) that
:func:`load_frame_labels` / :func:`check_label_meta` compare, so labels of a different quantizer or teacher
layer are refused rather than silently used.

Label kinds: codebook indexes (CI) are ``uint8 (T, num_codebooks)``; float embeddings (the L1/L2 baseline) are
``float32 (T, D)`` (``float16`` is accepted too); HuBERT cluster ids are ``uint8`` or, beyond 256 clusters,
``int16 (T, 1)``. Storage is lossless (never lilcom).
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Iterable, Mapping, Optional, Tuple, Union

import numpy as np

__all__ = ["write_frame_labels", "load_frame_labels", "check_label_meta", "label_storage_bytes", "label_file_bytes",
           "meta_key", "label_frame_shift"]

Pathlike = Union[str, Path]
_ALLOWED_DTYPES = (np.dtype(np.uint8), np.dtype(np.int16), np.dtype(np.float16), np.dtype(np.float32))
#: lhotse ``storage_type`` of range-coded CI (their reader: :mod:`speechkd.labels.codec`).
RANGE_STORAGE_TYPE = "speechkd_ci_range"
_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def meta_key(key: str) -> str:
    """Name of the cut custom field holding the string metadata of label ``key``: ``f"{key}_meta"``."""
    return f"{key}_meta"


def label_file_suffix(codec: str) -> str:
    """File name suffix of labels stored with ``codec``: ``".ci"`` for ``"range"`` (range-coded CI), else ``".h5"``."""
    return ".ci" if codec == "range" else ".h5"


def _check_key(key: str) -> None:
    if not isinstance(key, str) or not _KEY_RE.match(key):
        raise ValueError(f"label key must be an identifier (letters, digits, '_'), got {key!r}")


def write_frame_labels(
    cuts,
    labels: Union[Mapping[str, np.ndarray], Iterable[Tuple[str, np.ndarray]]],
    storage_dir: Pathlike,
    key: str,
    frame_shift: float,
    extra: Optional[Mapping[str, str]] = None,
    max_frame_mismatch: Optional[int] = 4,
    file_name: Optional[str] = None,
    codec: str = "hdf5",
):
    """Store per-frame labels of every cut in ``storage_dir/{key}.h5`` (or ``storage_dir/file_name``) and attach
    them to the cuts.

    With ``codec="range"`` (uint8 codebook indexes only) the file is ``storage_dir/{key}.ci`` instead, range-coded
    losslessly with a per-codebook model fitted on its first frames (:mod:`speechkd.labels.codec`); it is read
    back bit-exactly through the same lhotse calls.

    Arrays are written with lhotse's ``NumpyHdf5Writer`` (uncompressed) as ``TemporalArray`` manifests with
    ``temporal_dim=0``, ``frame_shift`` and ``start = cut.start`` (the array's offset in the recording), under the
    cut's custom field ``key``; ``cut.custom[f"{key}_meta"] = dict(extra)``. The HDF5 file is written under a
    temporary name in ``storage_dir`` and renamed when complete, so an interrupted run leaves no partial file
    under the final name (an existing file of that name is replaced).

    Args:
      cuts: lhotse ``CutSet`` (ids unique); every cut must receive labels.
      labels: ``{cut_id: array}`` or an iterator of ``(cut_id, array)`` (streamed: consumed once, in any
        order). Arrays: ``(T, C)`` with ``T >= 1`` frames, dtype uint8 (codebook indexes), int16 (cluster ids) or
        float32/float16 (embeddings, finite), the same dtype and ``C`` for all cuts.
      storage_dir: directory of the HDF5 file (created if missing). The manifests record
        ``storage_dir/{key}.h5`` as given (relative paths stay relative to the working directory).
      key: custom field name, also the file name (an identifier such as ``"codebook_indexes"``).
      frame_shift: seconds between label frames (e.g. 0.04 for a 4x-subsampled 10 ms teacher).
      extra: string metadata stored in ``cut.custom[f"{key}_meta"]`` (e.g. ``{"quantizer_id": q.id}``).
      max_frame_mismatch: refuse arrays whose ``T`` differs from ``cut.duration / frame_shift`` by more than
        this many frames (a wrong ``frame_shift`` or cut); ``None`` disables the check. Note that lhotse loads
        at most ``round(duration / frame_shift)`` frames of a cut, so extra trailing frames are not returned.
      file_name: the file's name in ``storage_dir`` (default ``f"{key}.h5"``, with ``codec="range"``
        ``f"{key}.ci"``; e.g. one per shard).
      codec: ``"hdf5"`` (uncompressed, any label kind) or ``"range"`` (entropy-coded uint8 CI).

    Returns:
      a new eager ``CutSet`` with the labels attached, in the order of ``cuts`` (save it, e.g. to jsonl.gz).

    Raises:
      ValueError: bad key/frame_shift/extra; a label for an unknown or repeated cut id; a cut without labels;
        an array of the wrong rank, dtype, width, length or with non-finite values (the message names the cut);
        ``codec="range"`` for labels that are not uint8; an unknown codec.
    """
    if codec not in ("hdf5", "range"):
        raise ValueError(f"codec must be 'hdf5' or 'range', got {codec!r}")
    from lhotse import CutSet, NumpyHdf5Writer
    from lhotse.array import TemporalArray
    from lhotse.features.io import close_cached_file_handles
    from lhotse.utils import fastcopy

    _check_key(key)
    if not (isinstance(frame_shift, (int, float)) and frame_shift > 0 and np.isfinite(frame_shift)):
        raise ValueError(f"frame_shift must be a positive number of seconds, got {frame_shift!r}")
    extra = dict(extra or {})
    bad = {k: v for k, v in extra.items() if not (isinstance(k, str) and isinstance(v, str))}
    if bad:
        raise ValueError(f"extra metadata must map str to str, got {bad!r}")

    cut_list = list(cuts)
    by_id = {}
    for c in cut_list:
        if c.id in by_id:
            raise ValueError(f"cut id '{c.id}' appears twice in cuts")
        by_id[c.id] = c
    storage_dir = Path(storage_dir)
    storage_dir.mkdir(parents=True, exist_ok=True)
    suffix = label_file_suffix(codec)
    final = storage_dir / (file_name or f"{key}{suffix}")
    if final.parent != storage_dir or not final.name.endswith(suffix):
        raise ValueError(f"file_name must be a plain name ending in {suffix}, got {file_name!r}")
    if codec == "range":
        return _write_range_coded(cut_list, by_id, labels, final, key, frame_shift, extra, max_frame_mismatch)
    fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".tmp.h5", dir=storage_dir)
    os.close(fd)
    manifests: dict[str, TemporalArray] = {}
    try:
        with NumpyHdf5Writer(tmp, mode="w") as writer:
            if Path(writer.storage_path) != Path(tmp):  # lhotse adds ".h5" when missing; ours has it
                raise RuntimeError(f"unexpected HDF5 path {writer.storage_path} for {tmp}")
            for cut, arr in _checked_labels(cut_list, by_id, labels, key, frame_shift, max_frame_mismatch):
                m = writer.store_array(key=cut.id, value=arr, frame_shift=frame_shift, temporal_dim=0, start=cut.start)
                manifests[cut.id] = fastcopy(m, array=fastcopy(m.array, storage_path=str(final)))
        from speechkd.utils import default_mode

        os.chmod(tmp, default_mode())  # mkstemp's 0600 -> what open() would give
        os.replace(tmp, final)
        close_cached_file_handles()  # lhotse caches open HDF5 handles by path: drop any to a replaced file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return CutSet.from_cuts(
        c.with_custom(key, manifests[c.id]).with_custom(meta_key(key), dict(extra)) for c in cut_list
    )


def _write_range_coded(cut_list, by_id, labels, final: Path, key: str, frame_shift: float, extra: dict,
                       max_frame_mismatch: Optional[int]):
    """``write_frame_labels(..., codec="range")``: the labels range-coded into ``final`` (atomic)."""
    from lhotse import CutSet
    from lhotse.array import Array, TemporalArray

    from speechkd.labels.codec import STORAGE_TYPE, CIRangeWriter

    shapes: dict[str, list[int]] = {}
    with CIRangeWriter(final) as writer:
        for cut, arr in _checked_labels(cut_list, by_id, labels, key, frame_shift, max_frame_mismatch, np.uint8):
            writer.write(cut.id, arr)
            shapes[cut.id] = list(arr.shape)
    out = []
    for c in cut_list:
        arr = Array(storage_type=STORAGE_TYPE, storage_path=str(final), storage_key=writer.keys[c.id],
                    shape=shapes[c.id])
        out.append(c.with_custom(key, TemporalArray(array=arr, temporal_dim=0, frame_shift=frame_shift, start=c.start))
                   .with_custom(meta_key(key), dict(extra)))
    return CutSet.from_cuts(out)


def _checked_labels(cut_list, by_id, labels, key: str, frame_shift: float, max_frame_mismatch: Optional[int],
                    required_dtype=None):
    """Yield ``(cut, (T, C) contiguous array)`` for each label of ``labels`` (a mapping or an iterator of
    ``(cut_id, array)``), checked as :func:`write_frame_labels` documents; after the last, check that every cut of
    ``cut_list`` got one.

    Raises:
      ValueError (naming the cut): an unknown or repeated cut id, a bad array (:func:`_check_array`), a dtype
        other than ``required_dtype`` (when given), a dtype or width differing from the first array's, or a cut
        without labels.
    """
    seen: set[str] = set()
    dtype = width = None
    items = labels.items() if isinstance(labels, Mapping) else labels
    for cut_id, arr in items:
        cut = by_id.get(cut_id)
        if cut is None:
            raise ValueError(f"labels given for cut '{cut_id}', which is not in cuts")
        if cut_id in seen:
            raise ValueError(f"labels given twice for cut '{cut_id}'")
        arr = np.ascontiguousarray(arr)
        _check_array(arr, cut, frame_shift, max_frame_mismatch)
        if required_dtype is not None and arr.dtype != required_dtype:
            raise ValueError(f"cut '{cut_id}': range-coded labels must be uint8 codebook indexes, got {arr.dtype}")
        if dtype is None:
            dtype, width = arr.dtype, arr.shape[1]
        elif arr.dtype != dtype or arr.shape[1] != width:
            raise ValueError(f"cut '{cut_id}': labels {arr.dtype} (T, {arr.shape[1]}) differ from the other "
                             f"cuts' {dtype} (T, {width})")
        seen.add(cut_id)
        yield cut, arr
    missing = [c.id for c in cut_list if c.id not in seen]
    if missing:
        raise ValueError(f"{len(missing)} cut(s) got no labels for '{key}', e.g. '{missing[0]}'")


def _check_array(arr: np.ndarray, cut, frame_shift: float, max_frame_mismatch: Optional[int]) -> None:
    """Raise ValueError (naming the cut) unless ``arr`` is a valid (T, C) label array for ``cut``."""
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"cut '{cut.id}': labels must be (T, C) with T, C >= 1, got shape {arr.shape}")
    if arr.dtype not in _ALLOWED_DTYPES:
        raise ValueError(f"cut '{cut.id}': labels dtype {arr.dtype} not supported (uint8 indexes, int16 cluster ids, "
                         "float32/float16)")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise ValueError(f"cut '{cut.id}': labels contain NaN or infinite values")
    if max_frame_mismatch is not None:
        expected = cut.duration / frame_shift
        if abs(arr.shape[0] - expected) > max_frame_mismatch + 1e-6:
            raise ValueError(f"cut '{cut.id}': {arr.shape[0]} label frames, but duration {cut.duration} s at frame "
                             f"shift {frame_shift} s implies ~{expected:.1f} (more than {max_frame_mismatch} apart)")


def _custom(cut) -> dict:
    """The cut's custom fields (a MixedCut merges those of its tracks); {} when none."""
    return getattr(cut, "custom", None) or {}


def _check_meta(cut, key: str, expected: Optional[Mapping[str, str]]) -> None:
    custom = _custom(cut)
    if key not in custom:
        raise ValueError(f"cut '{cut.id}' has no frame labels '{key}'")
    if not expected:
        return
    stored = custom.get(meta_key(key)) or {}
    wrong = {k: (stored.get(k), v) for k, v in expected.items() if stored.get(k) != v}
    if wrong:
        detail = ", ".join(f"{k}: stored {s!r}, expected {e!r}" for k, (s, e) in wrong.items())
        raise ValueError(f"cut '{cut.id}': labels '{key}' were made with different settings ({detail})")


def load_frame_labels(cut, key: str, expected: Optional[Mapping[str, str]] = None) -> np.ndarray:
    """Load the labels ``key`` of one cut as written by :func:`write_frame_labels`.

    Loading goes through lhotse (``cut.load_custom(key)``), so a truncated cut gets the frames of its own span
    (``round(offset / frame_shift)`` onwards, ``round(duration / frame_shift)`` frames at most) and a padded
    MixedCut gets padded labels, exactly as the training collation sees them.

    Args:
      cut: a lhotse cut carrying the custom field ``key``.
      key: the label name, e.g. ``"codebook_indexes"``.
      expected: metadata that must match ``cut.custom[f"{key}_meta"]`` (e.g. ``{"quantizer_id": q.id}``).

    Returns:
      ``(T, C)`` array: uint8 codebook indexes or float32/float16 embeddings.

    Raises:
      ValueError (naming the cut): no such labels, metadata differing from ``expected``, or the label file
        cannot be read.
    """
    _check_key(key)
    _check_meta(cut, key, expected)
    try:
        return cut.load_custom(key)
    except (OSError, KeyError) as e:
        manifest = _custom(cut)[key]
        path = getattr(getattr(manifest, "array", manifest), "storage_path", "?")
        raise ValueError(f"cut '{cut.id}': cannot read labels '{key}' from {path} ({e})") from e


def check_label_meta(cuts, key: str, expected: Mapping[str, str]) -> None:
    """Check that every cut has labels ``key`` whose metadata match ``expected`` (no arrays are read).

    Raises:
      ValueError naming the first offending cut (missing labels or different metadata, e.g. another quantizer).
    """
    _check_key(key)
    for cut in cuts:
        _check_meta(cut, key, expected)


def _manifests(cuts, key: str):
    for cut in cuts:
        custom = _custom(cut)
        if key not in custom:
            raise ValueError(f"cut '{cut.id}' has no frame labels '{key}'")
        m = custom[key]
        yield cut, getattr(m, "array", m)  # TemporalArray -> its Array


def label_frame_shift(cuts, key: str) -> float:
    """The frame shift (seconds) recorded in the ``TemporalArray`` manifests of labels ``key`` (no arrays are read).

    Args:
      cuts: lhotse cuts carrying labels ``key`` (as written by :func:`write_frame_labels`), at least one.

    Returns:
      Seconds between label frames (e.g. 0.02 for a HuBERT teacher, 0.04 for a 4x-subsampled 10 ms one).

    Raises:
      ValueError: no cuts, a cut without labels ``key`` or without a frame shift, or cuts whose frame shifts
        differ (naming the cut).
    """
    _check_key(key)
    shift, first = None, None
    for cut in cuts:
        custom = _custom(cut)
        if key not in custom:
            raise ValueError(f"cut '{cut.id}' has no frame labels '{key}'")
        fs = getattr(custom[key], "frame_shift", None)
        if fs is None:
            raise ValueError(f"cut '{cut.id}': labels '{key}' are not a TemporalArray with a frame shift")
        if shift is None:
            shift, first = float(fs), cut.id
        elif abs(float(fs) - shift) > 1e-9:
            raise ValueError(f"cut '{cut.id}': labels '{key}' have frame shift {fs} s, cut '{first}' {shift} s")
    if shift is None:
        raise ValueError(f"no cuts to read the frame shift of labels '{key}' from")
    return shift


def label_storage_bytes(cuts, key: str) -> int:
    """Bytes of the stored label arrays of ``cuts``: sum over cuts of ``T * C * itemsize`` for HDF5 arrays, and of
    the coded message's bytes for range-coded CI (:mod:`speechkd.labels.codec`; the file's model header excluded).

    Counts each cut's whole stored array (not a truncated cut's slice); the dtype is read from the HDF5 files.
    Compare :func:`label_file_bytes` for the size on disk (HDF5 overhead included).

    Raises:
      ValueError: a cut without labels ``key``, or an unreadable label file.
    """
    import h5py

    files: dict[str, "h5py.File"] = {}
    total = 0
    try:
        for cut, arr in _manifests(cuts, key):
            path = arr.storage_path
            if arr.storage_type == RANGE_STORAGE_TYPE:  # range-coded CI: the message's 32-bit words
                total += 4 * int(arr.storage_key.split(",")[1])
                continue
            if path not in files:
                try:
                    files[path] = h5py.File(path, "r")
                except OSError as e:
                    raise ValueError(f"cut '{cut.id}': cannot open label file {path} ({e})") from e
            itemsize = files[path][arr.storage_key].dtype.itemsize
            total += int(np.prod(arr.shape)) * itemsize
    finally:
        for f in files.values():
            f.close()
    return total


def label_file_bytes(cuts, key: str) -> int:
    """Size on disk (bytes) of the distinct label files referenced by ``cuts`` for ``key``.

    Raises:
      ValueError: a cut without labels ``key``, or a missing file.
    """
    paths = {}
    for cut, arr in _manifests(cuts, key):
        paths.setdefault(arr.storage_path, cut.id)
    total = 0
    for path, cut_id in paths.items():
        if not os.path.isfile(path):
            raise ValueError(f"cut '{cut_id}': label file {path} does not exist")
        total += os.path.getsize(path)
    return total
