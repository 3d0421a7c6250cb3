"""Small shared helpers: atomic file writes, thread policy, logging, type aliases for units."""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional, Union

Pathlike = Union[str, Path]
Seconds = float
Bytes = int


def log(msg: str) -> None:
    """One-line stage summary on stdout (``[speechkd] ...``), from global rank 0 only in a multi-process run (the
    other ranks' errors still reach stderr)."""
    from speechkd.distributed import rank

    if rank() == 0:
        print(f"[speechkd] {msg}", flush=True)


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, final_ratio: float) -> float:
    """Learning-rate factor at optimiser step ``step`` (0-based): linear warm-up ``(step + 1) / warmup_steps``,
    then cosine decay from 1 to ``final_ratio`` at ``total_steps`` (and ``final_ratio`` after it)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block with Python's, NumPy's and torch's global generators seeded with ``seed``, then put back the
    states they had: modules built inside start from the same weights on every run, and the caller's random stream
    is left alone."""
    import random

    import numpy as np
    import torch

    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


_UMASK: Optional[int] = None


def default_mode(directory: bool = False) -> int:
    """The permission bits a plain ``open()`` / ``mkdir()`` would give under the process's umask (``0o666`` /
    ``0o777`` minus it): temporary files from :mod:`tempfile` are 0600 / 0700, so atomic writes set this on the
    result before it replaces its target (others in the user's group read the outputs as they would any file)."""
    global _UMASK
    if _UMASK is None:
        _UMASK = os.umask(0o022)
        os.umask(_UMASK)
    return (0o777 if directory else 0o666) & ~_UMASK


@contextlib.contextmanager
def atomic_path(path: Pathlike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``.

    The caller writes the whole file to the yielded path. If the block raises, the temporary file is
    removed and ``path`` is left as it was, so a stopped run never leaves a half-written output.

    Args:
      path: the final file path. Its parent directory is created if missing.
      suffix: suffix of the temporary file (default: the suffix of ``path``, so libraries that choose a
        format by extension, e.g. lhotse's ``.jsonl.gz``, still do the right thing).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix is None:
        suffix = "".join(path.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name.split('.')[0]}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.is_file():
            os.chmod(tmp_path, default_mode())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(path: Pathlike) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; on success it replaces ``path`` (an earlier one is removed).

    The caller writes the whole directory into the yielded one. If the block raises, the temporary directory is
    removed and ``path`` is left as it was.
    """
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, default_mode(directory=True))
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / path.name)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_text_atomic(path: Pathlike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (temporary file, then rename)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: Pathlike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def set_thread_policy(num_threads: int | None = None) -> None:
    """Make torch behave on a small, possibly busy CPU machine.

    Sets ``OMP_WAIT_POLICY=PASSIVE`` (when not already set; it only takes effect if torch's OpenMP runtime
    has not started yet, so call this before heavy torch work) and ``torch.set_num_threads``. On a 2-core
    machine with another busy process, spinning OpenMP threads made training steps 30-50x slower.

    Args:
      num_threads: intra-op threads for torch; ``None`` keeps torch's default.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    if num_threads is not None and num_threads > 0:
        torch.set_num_threads(num_threads)


