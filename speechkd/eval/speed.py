"""Model size and speed measures: parameter counts, real-time factor, bytes on disk."""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Iterable, Union

import torch

__all__ = ["count_parameters", "real_time_factor", "file_bytes"]


def count_parameters(module: torch.nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters (elements, not bytes) in ``module``.

    Parameters shared between submodules are counted once (``module.parameters()`` dedups).

    Args:
        module: any ``torch.nn.Module``.
        trainable_only: count only parameters with ``requires_grad=True``.

    Returns:
        The element count.

    Raises:
        TypeError: when ``module`` is not a ``torch.nn.Module``.
    """
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(module).__name__}")
    return int(
        sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
    )


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def real_time_factor(
    fn: Callable[[Any], Any],
    batches: Iterable[Any],
    audio_seconds: float,
    warmup: int = 1,
) -> float:
    """Real-time factor: wall seconds spent inside ``fn`` / seconds of audio it processed.

    ``fn`` is first called ``warmup`` extra times on the first batch, untimed (lazy init,
    allocator and kernel warm-up); then it is called once on every batch, timed with
    ``time.perf_counter`` under ``torch.inference_mode()``. Only time inside ``fn`` counts,
    not the time spent producing the batches. On CUDA the device is synchronised after each
    call so queued kernels are included.

    RTF < 1 means faster than real time (RTF 0.1 = one hour of audio in six minutes). The value
    depends on the hardware, batch size and the number of threads (``torch.get_num_threads()``,
    ``OMP_NUM_THREADS``): compare RTFs only when measured under the same settings.

    Args:
        fn: function applied to one batch (e.g. a model forward plus decoding).
        batches: iterable of batches (a generator is fine: it is consumed once).
        audio_seconds: total duration, in seconds, of the audio in ALL ``batches``
            (the warm-up calls are not counted).
        warmup: number of untimed calls on the first batch, >= 0.

    Returns:
        The RTF (unitless, >= 0).

    Raises:
        ValueError: ``audio_seconds <= 0``, ``warmup < 0`` or no batch.
    """
    if not audio_seconds > 0:
        raise ValueError(f"audio_seconds must be > 0, got {audio_seconds}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    it = iter(batches)
    try:
        first = next(it)
    except StopIteration:
        raise ValueError("real_time_factor needs at least one batch") from None
    elapsed = 0.0
    with torch.inference_mode():
        for _ in range(warmup):
            fn(first)
        _sync()
        batch = first
        while True:
            start = time.perf_counter()
            fn(batch)
            _sync()
            elapsed += time.perf_counter() - start
            try:
                batch = next(it)
            except StopIteration:
                break
    return elapsed / float(audio_seconds)


def file_bytes(path: Union[str, os.PathLike]) -> int:
    """Size on disk of a file, or the summed sizes of all files under a directory (recursive).

    Symlinked files are counted at their target's size; symlinked directories are not entered.

    Args:
        path: a file or a directory.

    Returns:
        Size in bytes (apparent size, ``st_size``; not block usage).

    Raises:
        FileNotFoundError: when ``path`` does not exist.
    """
    p = os.fspath(path)
    if os.path.isfile(p):
        return os.path.getsize(p)
    if not os.path.isdir(p):
        raise FileNotFoundError(f"no such file or directory: {p}")
    total = 0
    for root, _dirs, files in os.walk(p):
        for name in files:
            fp = os.path.join(root, name)
            if os.path.isfile(fp):  # skips broken links and special files
                total += os.path.getsize(fp)
    return total
