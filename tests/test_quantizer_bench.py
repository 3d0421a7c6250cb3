"""The quantizer benchmark's faiss wrappers give codes of the stated size whose reconstructions are what faiss's own
decoder returns, and the table's error is the relative error recomputed here (tiny synthetic frames)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

faiss = pytest.importorskip("faiss")


@pytest.fixture(scope="module")
def bench():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "quantizer_bench.py"
    spec = importlib.util.spec_from_file_location("quantizer_bench", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["quantizer_bench"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_faiss_methods_and_measure(bench, capsys):
    args = bench.parse_args(["--num-frames", "2600", "--held-out", "300", "--dim", "20", "--synthetic-rank", "8",
                             "--bytes-per-frame", "2", "--threads", "1", "--faiss", "pq,opq,rq1,rq8",
                             "--kmeans-iters", "3", "--refine-rounds", "0"])
    x, _ = bench.load_frames(args)
    train, held = bench.split(x, args)
    for method in ("pq", "rq1"):
        r = bench.run_faiss(method, train, held, 2, args)
        assert r["code_size"] == 2 and 0.0 < r["rel_error"] < 1.0
    # the rq1 wrapper's error equals faiss's own encode/decode of the same frames with the same training
    rq = faiss.ResidualQuantizer(20, 2, 8)
    rq.max_beam_size = 1
    rq.train(np.ascontiguousarray(train))
    ref = bench.rel_error(held, rq.decode(rq.compute_codes(np.ascontiguousarray(held))))
    assert r["rel_error"] == pytest.approx(ref, rel=1e-6)
    x64 = held.astype(np.float64)
    assert bench.rel_error(held, np.broadcast_to(held.mean(0), held.shape)) == pytest.approx(1.0)
    assert bench.rel_error(x64, x64) == 0.0
    run = bench.measure(train, held, 2, args, {})
    assert set(run["faiss"]) == {"pq", "opq", "rq1", "rq8"}
    assert run["best_faiss"] == min(run["faiss"], key=lambda m: run["faiss"][m]["rel_error"])
    e = run["speechkd"]["rel_error"] / run["faiss"]["rq8"]["rel_error"]
    assert run["goals"]["error_vs_faiss_rq8"]["value"] == pytest.approx(e)
    assert "err / RQ b8" in capsys.readouterr().out
