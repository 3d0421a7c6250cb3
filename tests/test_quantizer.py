"""Tests of speechkd.mvq.quantizer: shapes, quality against independent references, search, storage, errors."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from speechkd.mvq.quantizer import Quantizer, train_quantizer

D = 32
M = 4


def _structured(n: int, seed: int) -> torch.Tensor:
    """(n, D) low-rank (rank 8, decaying spectrum) plus isotropic noise (~5% of the variance), non-zero mean."""
    g = np.random.default_rng(1234)  # the same subspace for every split
    basis = g.standard_normal((8, D)) * (1.0 / np.arange(1, 9))[:, None]  # (8, D)
    mean = g.standard_normal(D) * 3
    r = np.random.default_rng(seed)
    x = mean + r.standard_normal((n, 8)) @ basis + 0.15 * r.standard_normal((n, D))
    return torch.from_numpy(x.astype(np.float32))


@pytest.fixture(scope="module")
def data():
    return _structured(3000, 0), _structured(1000, 1)


@pytest.fixture(scope="module")
def quantizer(data):
    train, _ = data
    return train_quantizer(train, num_codebooks=M, seed=0, progress=False)


def _rel_err_np(x: torch.Tensor, rec: torch.Tensor) -> np.ndarray:
    """Per-frame squared errors and the mean-only denominator, computed in float64 numpy."""
    x = x.double().numpy()
    return ((x - rec.double().numpy()) ** 2).sum(1), ((x - x.mean(0)) ** 2).sum()


def _lloyd_error(train: torch.Tensor, held: torch.Tensor, k: int, iters: int = 25, seed: int = 0) -> float:
    """Held-out relative error of a plain k-means codebook (random-row init, brute-force Lloyd, numpy)."""
    x = train.double().numpy()
    r = np.random.default_rng(seed)
    c = x[r.choice(len(x), k, replace=False)].copy()
    for _ in range(iters):
        a = ((x * x).sum(1)[:, None] - 2 * x @ c.T + (c * c).sum(1)[None]).argmin(1)  # (N,) nearest centroid
        for j in range(k):
            if (a == j).any():
                c[j] = x[a == j].mean(0)
    h = held.double().numpy()
    d = ((h * h).sum(1)[:, None] - 2 * h @ c.T + (c * c).sum(1)[None]).min(1)  # (N_h,) squared distance
    return float(d.sum() / ((h - h.mean(0)) ** 2).sum())


def test_indexes_shape_dtype_range(quantizer, data):
    _, held = data
    ci = quantizer.encode(held)
    assert ci.dtype == torch.uint8 and ci.shape == (1000, M)
    assert quantizer.bytes_per_frame == M == quantizer.num_codebooks and quantizer.dim == D
    batched = quantizer.encode(held[:10].reshape(2, 5, D))
    assert batched.shape == (2, 5, M)
    assert torch.equal(batched.reshape(10, M), ci[:10])
    # with 16-entry codebooks every index is < 16, and the first codebook's 16 codewords all get used
    small = train_quantizer(data[0], num_codebooks=2, codebook_size=16, seed=0, progress=False)
    ci16 = small.encode(data[0])
    assert int(ci16.max()) < 16 and small.codebooks.shape == (2, 16, D)
    assert len(torch.unique(ci16[:, 0])) == 16


def test_quality_beats_mean_and_single_kmeans(quantizer, data):
    train, held = data
    err_frames, den = _rel_err_np(held, quantizer.decode(quantizer.encode(held)))
    ours = float(err_frames.sum() / den)
    assert ours == pytest.approx(quantizer.relative_error(held), rel=1e-6)
    assert ours < 1.0
    single = _lloyd_error(train, held, 256)  # one byte per frame: one 256-entry k-means codebook
    assert ours < single, (ours, single)
    # more codebooks -> lower error on held-out frames
    two = train_quantizer(train, num_codebooks=2, seed=0, progress=False)
    assert ours < two.relative_error(held)


@pytest.fixture(scope="module")
def rvq(data):
    """A residual-VQ quantizer: its codebooks overlap, so the search settings matter."""
    return train_quantizer(data[0], num_codebooks=M, structure="rvq", refine_rounds=0, seed=0, progress=False)


def test_pq_is_orthogonal_in_the_waterfilled_subspace():
    """Rank-6 data in 24 dims, 8 bits: only signal directions get codewords; product codebooks are orthogonal."""
    r = np.random.default_rng(3)
    basis = r.standard_normal((6, 24)) * np.linspace(2, 1, 6)[:, None]
    x = r.standard_normal((1200, 6)) @ basis + 0.01 * r.standard_normal((1200, 24))  # (1200, 24)
    x = torch.from_numpy(x.astype(np.float32))
    q = train_quantizer(x, num_codebooks=2, codebook_size=16, structure="pq", refine_rounds=0, subspace_search=False,
                        seed=0, progress=False)
    assert q.orthogonal_codebooks
    assert 2 <= q.subspace_dim <= 6
    cb = q.codebooks.double()
    assert float((cb[0] @ cb[1].T).abs().max()) < 1e-4 * float((cb * cb).sum(2).max())
    # the codewords lie in the span of the signal directions
    proj = torch.from_numpy(np.linalg.pinv(basis) @ basis)  # (24, 24) projector onto the signal rows
    flat = cb.reshape(-1, 24)
    assert torch.allclose(flat @ proj, flat, atol=1e-2 * float(flat.abs().max()))
    # exact per-codebook encoding: search settings cannot change it
    assert torch.equal(q.encode(x, beam=1, refine_iters=0), q.encode(x, beam=8, refine_iters=3))


def test_wider_search_does_not_hurt(rvq, data):
    _, held = data
    assert not rvq.orthogonal_codebooks
    e_greedy = rvq.relative_error(held, beam=1, refine_iters=0)
    e_beam = rvq.relative_error(held, beam=8, refine_iters=0)
    e_refined = rvq.relative_error(held, beam=8, refine_iters=3)
    assert e_refined <= e_beam < e_greedy < 1.0
    # refinement (ICM) never increases any frame's error
    f0, _ = _rel_err_np(held, rvq.decode(rvq.encode(held, beam=1, refine_iters=0)))
    f3, _ = _rel_err_np(held, rvq.decode(rvq.encode(held, beam=1, refine_iters=3)))
    assert np.all(f3 <= f0 * (1 + 1e-5) + 1e-9)
    assert f3.sum() < f0.sum()


def _brute_force(cb: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(n,) smallest squared error over all K^M index tuples (independent of the library's search)."""
    m, k, _ = cb.shape
    combos = torch.tensor(list(itertools.product(range(k), repeat=m)))  # (K^M, M)
    recon = sum(cb[j, combos[:, j]] for j in range(m))  # (K^M, D)
    return ((x[:, None, :] - recon[None]) ** 2).sum(2).min(1).values


@pytest.mark.parametrize("lut", [True, False])
@pytest.mark.parametrize("m,k,beam", [(2, 8, 8), (3, 4, 16)])
def test_full_beam_finds_exact_optimum(m, k, beam, lut, monkeypatch):
    """With beam >= K^(M-1) the search is exhaustive: compare with brute force over all K^M index tuples (with the
    look-up-table search and, with no room for its table, the residual-vector search)."""
    from speechkd.mvq import quantizer as Q

    if not lut:
        monkeypatch.setattr(Q, "_CROSS_BYTES", 0)
    g = torch.Generator().manual_seed(m)
    cb = torch.randn(m, k, 4, generator=g)
    q = Quantizer(torch.zeros(4), torch.ones(4), cb, beam=beam, refine_iters=0)
    x = torch.randn(50, 4, generator=g)
    got = ((x - q.decode(q.encode(x))) ** 2).sum(1)
    assert torch.allclose(got, _brute_force(cb, x), atol=1e-5)
    # the same codewords embedded in a 3-dim subspace of 7 dims: the search runs in the subspace
    basis = torch.linalg.qr(torch.randn(7, 4, generator=g))[0][:, :3]  # (7, 3) orthonormal
    cb7 = cb[:, :, :3] @ basis.T  # (m, k, 7)
    q7 = Quantizer(torch.zeros(7), torch.ones(7), cb7, beam=beam, refine_iters=0)
    assert q7.subspace_dim == 3 and not q7.orthogonal_codebooks
    x7 = torch.randn(50, 7, generator=g)
    got7 = ((x7 - q7.decode(q7.encode(x7))) ** 2).sum(1)
    assert torch.allclose(got7, _brute_force(cb7, x7), atol=1e-4)


def test_lookup_table_search_matches_residual_search():
    """The table search (errors accumulated from x . c and cross terms) and the residual-vector search keep the same
    paths: equal squared errors per frame (float32 rounding apart) for beams 1 and 4, and equal indexes on almost
    every frame."""
    from speechkd.mvq import quantizer as Q

    g = torch.Generator().manual_seed(11)
    cb = torch.randn(6, 32, 12, generator=g) * torch.linspace(1.0, 0.3, 6)[:, None, None]  # (M, K, D)
    cb_sq = (cb * cb).sum(2)
    x = torch.randn(400, 12, generator=g)
    cross = Q._cross_terms(cb)
    assert cross is not None and cross[3].shape == (3 * 32, 32)
    assert torch.allclose(cross[3][2 * 32 + 5], cb[3] @ cb[2, 5], atol=1e-5)
    for beam in (1, 4):
        i1, r1 = Q._beam_search_lut(x, cb, cb_sq, beam, cross)
        i2, r2 = Q._beam_search(x, cb, cb_sq, beam)
        assert torch.allclose((r1 * r1).sum(1), (r2 * r2).sum(1), rtol=1e-4, atol=1e-4)
        assert float((i1 == i2).all(1).float().mean()) > 0.98
        recon = sum(cb[m][i1[:, m]] for m in range(6))
        assert torch.allclose(r1, x - recon, atol=1e-5)


def test_orthogonal_codebooks_exact():
    """Codebooks on disjoint coordinates: per-codebook encoding equals the brute-force optimum."""
    g = torch.Generator().manual_seed(5)
    cb = torch.zeros(3, 6, 6)
    for j in range(3):
        cb[j, :, 2 * j : 2 * j + 2] = torch.randn(6, 2, generator=g)
    q = Quantizer(torch.full((6,), 0.5), torch.full((6,), 2.0), cb, beam=1, refine_iters=0)
    assert q.orthogonal_codebooks
    x = torch.randn(40, 6, generator=g)
    got = ((x - q.decode(q.encode(x))) ** 2).sum(1)
    ref = _brute_force(cb * 2.0, x - 0.5)  # decode = 0.5 + 2 * sum of codewords
    assert torch.allclose(got, ref, atol=1e-5)


def test_waterfill_dims():
    from speechkd.mvq.quantizer import _waterfill_dims

    lam = torch.tensor([4.0, 1.0, 0.25, 1 / 16])
    # derived by hand: 2.5 bits -> water level 2^-1.5 (2 components above); 5 bits -> 2^(-10/3) (3 above)
    assert _waterfill_dims(lam, 2.5) == 2
    assert _waterfill_dims(lam, 5.0) == 3
    assert _waterfill_dims(lam, 100.0) == 4


def test_decode_is_sum_of_codewords(quantizer, data):
    _, held = data
    ci = quantizer.encode(held[:50]).long()
    cb = quantizer.codebooks.double().numpy()
    manual = sum(cb[j, ci[:, j].numpy()] for j in range(M))  # (50, D) in the normalised space
    manual = manual * quantizer.scale.double().numpy() + quantizer.mean.double().numpy()
    assert np.allclose(quantizer.decode(ci).double().numpy(), manual, atol=1e-4)
    assert torch.equal(quantizer.decode(ci), quantizer.decode(ci.to(torch.uint8)))


def test_chunked_encode_matches_pieces(quantizer, rvq):
    x = _structured(2500, 7)  # more than one encode chunk
    for q in (quantizer, rvq):
        whole = q.encode(x)
        pieces = torch.cat([q.encode(x[i : i + 100]) for i in range(0, 2500, 100)])
        assert torch.equal(whole, pieces)


def test_save_load_round_trip(quantizer, data, tmp_path):
    _, held = data
    path = tmp_path / "q.safetensors"
    quantizer.save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.safetensors"]  # no temporary left behind
    q2 = Quantizer.load(path)
    assert q2.id == quantizer.id and len(q2.id) == 16
    for name in ("mean", "scale", "codebooks"):
        assert torch.equal(getattr(q2, name), getattr(quantizer, name))
    assert (q2.beam, q2.refine_iters) == (quantizer.beam, quantizer.refine_iters)
    assert torch.equal(q2.encode(held), quantizer.encode(held))
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["id"] == quantizer.id and meta["dim"] == str(D) and meta["num_codebooks"] == str(M)
    assert "format_version" in meta


def test_modified_file_refused(quantizer, tmp_path):
    path = tmp_path / "q.safetensors"
    quantizer.save(path)
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x40  # flip a bit inside the last tensor's data
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="bad.safetensors.*does not match"):
        Quantizer.load(bad)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="junk.safetensors"):
        Quantizer.load(junk)
    with pytest.raises(ValueError, match="no such"):
        Quantizer.load(tmp_path / "missing.safetensors")


def test_id_tracks_contents(quantizer):
    q2 = Quantizer(quantizer.mean, quantizer.scale, quantizer.codebooks.clone(), beam=3, refine_iters=0)
    assert q2.id == quantizer.id  # search defaults are not part of the id
    cb = quantizer.codebooks.clone()
    cb[0, 0, 0] += 1e-3
    assert Quantizer(quantizer.mean, quantizer.scale, cb).id != quantizer.id


def test_deterministic(quantizer, data):
    train, held = data
    again = train_quantizer(train, num_codebooks=M, seed=0, progress=False)
    assert again.id == quantizer.id
    assert torch.equal(quantizer.encode(held), quantizer.encode(held))
    other = train_quantizer(train, num_codebooks=M, seed=1, progress=False)
    assert other.id != quantizer.id


def test_errors(quantizer, data):
    train, held = data
    with pytest.raises(ValueError, match="at least codebook_size"):
        train_quantizer(train[:100], num_codebooks=2, progress=False)
    bad = train.clone()
    bad[5, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        train_quantizer(bad, num_codebooks=2, progress=False)
    with pytest.raises(ValueError, match="num_codebooks"):
        train_quantizer(train, num_codebooks=0, progress=False)
    with pytest.raises(ValueError, match="codebook_size"):
        train_quantizer(train, num_codebooks=2, codebook_size=512, progress=False)
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        train_quantizer(train[None], num_codebooks=2, progress=False)
    with pytest.raises(ValueError, match="shape"):
        quantizer.encode(held[:, :5])
    with pytest.raises(ValueError, match="beam"):
        quantizer.encode(held, beam=0)
    with pytest.raises(ValueError, match="integer"):
        quantizer.decode(torch.zeros(3, M))
    small = Quantizer(torch.zeros(D), torch.ones(D), torch.randn(M, 16, D))
    with pytest.raises(ValueError, match="lie in"):
        small.decode(torch.full((2, M), 20, dtype=torch.uint8))


def test_beam_trained_rvq_reduces_to_greedy_and_keeps_the_best_path():
    """_init_rvq_beam: with beam 1 each stage's indexes are the nearest codewords of the greedy residual (recomputed
    here from the codebooks alone); with beam >= K and two codebooks it is exhaustive, so each frame's path is
    the brute-force best."""
    from speechkd.mvq import quantizer as Q

    z = _structured(600, 3)[:, :6].contiguous()  # (N, p)
    cb, idx, resid = Q._init_rvq_beam(z, 3, 16, 5, True, torch.Generator().manual_seed(7), beam=1)
    r = z.clone()
    for m in range(3):
        nearest = torch.cdist(r.double(), cb[m].double()).argmin(1)  # (N,)
        assert torch.equal(idx[:, m], nearest)
        r = r - cb[m][nearest]
    assert torch.allclose(resid, r, atol=1e-5)

    k = 8
    cb, idx, resid = Q._init_rvq_beam(z, 2, k, 5, False, torch.Generator().manual_seed(0), beam=k)
    assert torch.allclose(resid, z - cb[0][idx[:, 0]] - cb[1][idx[:, 1]], atol=1e-5)
    pairs = torch.tensor(list(itertools.product(range(k), range(k))))  # (K*K, 2) every index pair
    recon = cb[0][pairs[:, 0]] + cb[1][pairs[:, 1]]  # (K*K, p)
    brute = ((z.unsqueeze(1) - recon.unsqueeze(0)) ** 2).sum(2).min(1).values  # (N,)
    assert torch.allclose((resid * resid).sum(1), brute, rtol=1e-4, atol=1e-5)


def test_shrunk_seeds_are_rows_pulled_to_the_mean():
    """_kmeans with seed_scale and no Lloyd iteration returns g + s (r_i - g) for k distinct rows r_i (g the rows'
    mean); one Lloyd iteration never raises the k-means objective."""
    from speechkd.mvq import quantizer as Q

    r = _structured(300, 5)[:, :4].contiguous() + 3.0  # (N, 4), mean away from 0
    g = r.mean(0)
    cb, _ = Q._kmeans(r, 12, 0, torch.Generator().manual_seed(0), 4096, seed_scale=0.25)
    rows = g + (cb - g) / 0.25  # (12, 4): the picked rows
    hit = torch.cdist(rows.double(), r.double()).min(1)  # nearest data row of each
    assert float(hit.values.max()) < 1e-4 and hit.indices.unique().numel() == 12

    def objective(c):
        return float(torch.cdist(r.double(), c.double()).min(1).values.pow(2).sum())

    cb1, idx1 = Q._kmeans(r, 12, 1, torch.Generator().manual_seed(0), 4096, seed_scale=0.25)
    assert objective(cb1) <= objective(cb) + 1e-6
    assert torch.equal(idx1, torch.cdist(r.double(), cb1.double()).argmin(1))


def test_train_beam_is_checked():
    x = _structured(400, 0)
    with pytest.raises(ValueError, match="train_beam"):
        train_quantizer(x, 2, codebook_size=16, train_beam=0, progress=False)
    q = train_quantizer(x, 2, codebook_size=16, structure="rvq", train_beam=4, progress=False)
    assert q.num_codebooks == 2
