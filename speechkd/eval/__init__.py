"""Evaluation: WER / accuracy / EER / minDCF metrics, and parameter, speed and size measures.

The speed helpers need torch; they are imported lazily so that ``speechkd.eval.metrics``
stays light.
"""

from speechkd.eval.metrics import (
    WerStats,
    accuracy,
    equal_error_rate,
    min_dcf,
    word_error_rate,
    write_wer_details,
)

_SPEED = ("count_parameters", "real_time_factor", "file_bytes")

__all__ = [
    "WerStats",
    "word_error_rate",
    "write_wer_details",
    "accuracy",
    "equal_error_rate",
    "min_dcf",
    *_SPEED,
]


def __getattr__(name: str):
    if name in _SPEED:
        from speechkd.eval import speed

        return getattr(speed, name)
    raise AttributeError(f"module 'speechkd.eval' has no attribute {name!r}")
