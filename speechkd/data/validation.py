"""One bad-input policy for every data entry point: a damaged row stops the run with a message naming the row and
the problem (``on_bad_input: error``), or is left out and listed in the skip report (``on_bad_input: skip``).

The skip report of an experiment is ``cuts/skipped.jsonl``: one JSON object per line with ``split``, ``id``,
``file`` (the audio file or manifest), ``origin`` (the manifest/TSV row) and ``reason``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Literal, Optional

from speechkd.utils import Pathlike, atomic_path


class BadInputError(ValueError):
    """A damaged input row (missing or unreadable audio, NaN samples, an empty recording, a duration or sampling
    rate that disagrees with the file, an empty or out-of-alphabet transcript, a duplicate id, a cut in two
    splits); the message names the row and the problem and says how to skip such rows."""


@dataclass(frozen=True)
class Skip:
    """One row left out of the data: its ``split``, cut ``id``, ``file``, ``origin`` (row) and ``reason``."""

    split: str
    id: str
    file: str
    origin: str
    reason: str


class BadInputPolicy:
    """Raise on a damaged row, or record it and go on.

    Args:
      mode: ``error`` (raise :class:`BadInputError`) or ``skip`` (record a :class:`Skip`).
      split: the split named in the records.

    Attributes:
      skips: the rows recorded so far (``skip`` mode; also rows dropped by a rule such as the maximum duration).
    """

    def __init__(self, mode: Literal["error", "skip"], split: str):
        if mode not in ("error", "skip"):
            raise ValueError(f"on_bad_input must be 'error' or 'skip', got {mode!r}")
        self.mode = mode
        self.split = split
        self.skips: list[Skip] = []

    def bad(self, cut_id: str, file: str, reason: str, origin: str = "") -> None:
        """Report a damaged row.

        Raises:
          BadInputError: in ``error`` mode, naming the origin (row), the cut, the file and the reason.
        """
        if self.mode == "error":
            where = f"{origin}: " if origin else ""
            raise BadInputError(f"{where}{self.split} cut '{cut_id}' ({file}): {reason} "
                                "(fix the row, or set data.on_bad_input: skip to leave such rows out)")
        self.skips.append(Skip(self.split, cut_id, str(file), origin, reason))

    def drop(self, cut_id: str, file: str, reason: str, origin: str = "") -> None:
        """Record a row left out by a rule (e.g. longer than ``data.max_cut_duration``), in either mode."""
        self.skips.append(Skip(self.split, cut_id, str(file), origin, reason))


def write_skips(path: Pathlike, skips: Iterable[Skip]) -> int:
    """Write skip records as JSON lines, atomically. Returns how many were written."""
    rows = [json.dumps(asdict(s), ensure_ascii=False) for s in skips]
    with atomic_path(path) as tmp:
        Path(tmp).write_text("".join(r + "\n" for r in rows), encoding="utf-8")
    return len(rows)


def read_skips(path: Pathlike) -> list[Skip]:
    """Read a skip report written by :func:`write_skips` ([] when the file does not exist)."""
    path = Path(path)
    if not path.is_file():
        return []
    return [Skip(**json.loads(line)) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def audio_file_of(cut) -> str:
    """The audio file (or other source) of a cut's recording, for messages; '' when it has none."""
    rec = getattr(cut, "recording", None)
    if rec is None or not rec.sources:
        return ""
    return str(rec.sources[0].source)


def check_audio_samples(samples, expected_seconds: float, sampling_rate: int, tolerance: float) -> Optional[str]:
    """Why loaded audio is unusable, or None when it is fine.

    Args:
      samples: ``(C, S)`` float samples as loaded.
      expected_seconds: the duration the manifest/TSV declares.
      sampling_rate: Hz of ``samples``.
      tolerance: seconds the loaded length may differ from ``expected_seconds``.
    """
    import numpy as np

    if samples.size == 0 or samples.shape[-1] == 0:
        return "empty recording (no samples)"
    if not np.isfinite(samples).all():
        n = int((~np.isfinite(samples)).sum())
        return f"{n} non-finite (NaN/inf) samples"
    got = samples.shape[-1] / sampling_rate
    if abs(got - expected_seconds) > tolerance:
        return f"declared duration {expected_seconds:.3f} s but the audio holds {got:.3f} s (tolerance {tolerance} s)"
    return None
