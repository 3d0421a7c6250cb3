"""Range-coded codebook indexes (speechkd.labels.codec): bit-exact through lhotse, near the entropy bound, atomic,
clear errors."""

from __future__ import annotations

import numpy as np
import pytest
from lhotse import CutSet
from lhotse.testing.dummies import dummy_cut

from speechkd.labels import codec
from speechkd.labels.store import label_file_bytes, label_storage_bytes, load_frame_labels, write_frame_labels

FS = 0.04
M = 6


def _cuts(n, duration=2.0):
    return CutSet.from_cuts([dummy_cut(i, start=0.3 * (i % 2), duration=duration, recording_duration=duration + 1)
                             for i in range(n)])


def _skewed(cuts, seed=0):
    """CI with a different Zipf-like distribution per codebook, ``round(duration / FS)`` frames per cut."""
    rng = np.random.default_rng(seed)
    probs = []
    for j in range(M):
        w = 1.0 / np.arange(1, 257) ** (0.6 + 0.15 * j)
        probs.append(w / w.sum())
    out = {c.id: np.stack([rng.choice(256, round(c.duration / FS), p=p) for p in probs], 1).astype(np.uint8)
           for c in cuts}
    return out, np.array(probs)


def test_round_trip_is_bit_exact_and_slices_like_hdf5(tmp_path, monkeypatch):
    monkeypatch.setattr(codec, "MODEL_FRAMES", 120)  # the model is fitted after 3 cuts: both paths are covered
    cuts = _cuts(8)
    ci, _ = _skewed(cuts)
    ranged = write_frame_labels(cuts, ci, tmp_path / "r", "codebook_indexes", FS, codec="range")
    plain = write_frame_labels(cuts, ci, tmp_path / "h", "codebook_indexes", FS)
    assert [p.name for p in (tmp_path / "r").iterdir()] == ["codebook_indexes.ci"]
    for a, b in zip(ranged, plain):
        got = load_frame_labels(a, "codebook_indexes")
        assert got.dtype == np.uint8 and np.array_equal(got, ci[a.id])
        for offset, dur in ((0.4, 0.8), (1.0, 1.0), (0.0, 0.12)):
            ta, tb = a.truncate(offset=offset, duration=dur), b.truncate(offset=offset, duration=dur)
            assert np.array_equal(load_frame_labels(ta, "codebook_indexes"), load_frame_labels(tb, "codebook_indexes"))
    # collation as training sees it (padding included) equals the HDF5 store's
    from lhotse.dataset.collation import collate_custom_field

    mixed = [c.truncate(duration=1.0 + 0.2 * i) for i, c in enumerate(ranged)]
    mixed_h = [c.truncate(duration=1.0 + 0.2 * i) for i, c in enumerate(plain)]
    xa, la = collate_custom_field(CutSet.from_cuts(mixed), "codebook_indexes", pad_value=-100)
    xb, lb = collate_custom_field(CutSet.from_cuts(mixed_h), "codebook_indexes", pad_value=-100)
    assert np.array_equal(np.asarray(xa), np.asarray(xb)) and np.array_equal(np.asarray(la), np.asarray(lb))
    # stored bytes: the messages' words, fewer than one byte per index; the manifest survives a JSON round trip
    start, _ = codec._open_header(str(tmp_path / "r" / "codebook_indexes.ci"))
    words = label_storage_bytes(ranged, "codebook_indexes")
    assert words == label_file_bytes(ranged, "codebook_indexes") - start
    assert words < label_storage_bytes(plain, "codebook_indexes") == sum(a.size for a in ci.values())
    again = CutSet.from_dicts([c.to_dict() for c in ranged])
    assert np.array_equal(load_frame_labels(again[5], "codebook_indexes"), ci[again[5].id])


def test_size_is_near_the_entropy_of_the_source(tmp_path):
    """Payload bits against the Shannon entropy of the distributions the indexes were drawn from (computed here with
    numpy): at most 2% plus two 32-bit words per cut above it (the coder's flush), and not below 97% of it."""
    cuts = _cuts(60, duration=4.0)  # 100 frames each, 6000 frames: the model is fitted on all of them
    ci, probs = _skewed(cuts, seed=1)
    out = write_frame_labels(cuts, ci, tmp_path, "codebook_indexes", FS, codec="range")
    frames = sum(a.shape[0] for a in ci.values())
    entropy_bits = frames * float(-(probs * np.log2(probs)).sum())  # sum over codebooks of H_j, per frame
    start, _ = codec._open_header(str(tmp_path / "codebook_indexes.ci"))
    payload_bits = 8 * (label_file_bytes(out, "codebook_indexes") - start)
    assert payload_bits <= 1.02 * entropy_bits + 64 * len(cuts)
    assert payload_bits >= 0.97 * entropy_bits
    assert payload_bits < 0.8 * 8 * frames * M  # well below one byte per index for these sources


def test_rejects_bad_input_and_leaves_nothing(tmp_path):
    cuts = _cuts(3)
    ci, _ = _skewed(cuts)
    bad = dict(ci)
    bad[cuts[1].id] = ci[cuts[1].id].astype(np.int16)
    with pytest.raises(ValueError, match=f"cut '{cuts[1].id}'.*uint8"):
        write_frame_labels(cuts, bad, tmp_path, "codebook_indexes", FS, codec="range")
    narrow = dict(ci)
    narrow[cuts[2].id] = ci[cuts[2].id][:, :3]
    with pytest.raises(ValueError, match=f"cut '{cuts[2].id}'"):
        write_frame_labels(cuts, narrow, tmp_path, "codebook_indexes", FS, codec="range")
    with pytest.raises(ValueError, match="codec"):
        write_frame_labels(cuts, ci, tmp_path, "codebook_indexes", FS, codec="zip")
    assert list(tmp_path.iterdir()) == []  # no final file, no temporary left
    import os
    import stat

    old = os.umask(0o022)
    try:
        write_frame_labels(cuts, ci, tmp_path, "codebook_indexes", FS, codec="range")
    finally:
        os.umask(old)
    (path,) = tmp_path.iterdir()
    assert path.name == "codebook_indexes.ci" and stat.S_IMODE(path.stat().st_mode) == 0o644


def test_damaged_files_are_named(tmp_path):
    cuts = _cuts(3)
    ci, _ = _skewed(cuts)
    out = write_frame_labels(cuts, ci, tmp_path, "codebook_indexes", FS, codec="range")
    path = tmp_path / "codebook_indexes.ci"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 40])  # the last cut's message cut short
    with pytest.raises(ValueError, match=r"codebook_indexes\.ci.*outside the file"):
        load_frame_labels(out[2], "codebook_indexes")
    path.write_bytes(b"NOTCI\n" + data[6:])
    with pytest.raises(ValueError, match=r"codebook_indexes\.ci: not a range-coded CI file"):
        load_frame_labels(out[0], "codebook_indexes")
