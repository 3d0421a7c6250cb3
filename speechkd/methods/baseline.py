"""The baseline: a student trained on the references alone (``kd.method: none``)."""

from __future__ import annotations

from speechkd.methods import register


def build(exp, run, seed: int = 0):
    """No KD method; the training cuts. Returns ``(None, CutSet)``."""
    return None, exp.cuts("train")


register("none", build)
