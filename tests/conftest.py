"""Shared test settings: one quiet thread, and the shared corpora located beside the checkout."""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def corpora_dir() -> Path:
    """The shared corpora (``$SPEECHKD_CORPORA`` or ``../shared/corpora``)."""
    from speechkd.data.corpora import resolve_corpora_dir

    return resolve_corpora_dir(os.environ.get("SPEECHKD_CORPORA") or REPO.parent / "shared" / "corpora")
