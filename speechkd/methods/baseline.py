"""The baseline: a student trained on the references alone (``kd.method: none``)."""

from __future__ import annotations

from typing import Literal

from speechkd.config import KDSettings
from speechkd.methods import register


class NoKDConfig(KDSettings):
    """``kd: {method: none}`` (the default): references only; ``init_from_teacher`` as every method."""

    method: Literal["none"] = "none"



def build(exp, run, seed: int = 0):
    """No KD method; the training cuts. Returns ``(None, CutSet)``."""
    return None, exp.cuts("train")


register("none", build, NoKDConfig)
