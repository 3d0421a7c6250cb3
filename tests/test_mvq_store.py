"""Tests of speechkd.labels.store: per-frame labels beside lhotse cuts (bit-exact, metadata-checked, sliceable)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from lhotse import CutSet
from lhotse.testing.dummies import dummy_cut

from speechkd.labels.store import (
    check_label_meta,
    label_file_bytes,
    label_storage_bytes,
    load_frame_labels,
    write_frame_labels,
)

FS = 0.04  # seconds per label frame


@pytest.fixture()
def cuts():
    # different durations and a cut that starts 0.5 s into its recording (audio is never loaded)
    return CutSet.from_cuts([
        dummy_cut(0, start=0.0, duration=1.0),
        dummy_cut(1, start=0.5, duration=0.8, recording_duration=2.0),
        dummy_cut(2, start=0.0, duration=1.6, recording_duration=1.6),
    ])


def _arrays(cuts, seed=0):
    r = np.random.default_rng(seed)
    ci, emb = {}, {}
    for c in cuts:
        t = round(c.duration / FS) - (1 if c.id.endswith("1") else 0)  # one cut a frame short, like a conv frontend
        ci[c.id] = r.integers(0, 256, size=(t, 8), dtype=np.uint8)
        e = r.standard_normal((t, 16)).astype(np.float32) * 1e3
        e[0, 0] = np.float32(1e-40)  # a subnormal: must survive untouched
        emb[c.id] = e
    return ci, emb


def test_round_trip_bit_exact_through_jsonl(cuts, tmp_path):
    ci, emb = _arrays(cuts)
    labels_dir = tmp_path / "labels"
    with_ci = write_frame_labels(cuts, ci, labels_dir, key="codebook_indexes", frame_shift=FS,
                                 extra={"quantizer_id": "0123456789abcdef"})
    # the embeddings arrive as a stream in another order
    stream = ((cid, emb[cid]) for cid in reversed(list(emb)))
    both = write_frame_labels(with_ci, stream, labels_dir, key="teacher_embeddings", frame_shift=FS,
                              extra={"teacher_layer": "6"})
    assert sorted(os.listdir(labels_dir)) == ["codebook_indexes.h5", "teacher_embeddings.h5"]  # no temporaries
    path = tmp_path / "cuts.jsonl.gz"
    both.to_file(path)
    loaded = CutSet.from_file(path)
    assert [c.id for c in loaded] == [c.id for c in cuts]
    for c in loaded:
        a = load_frame_labels(c, "codebook_indexes", expected={"quantizer_id": "0123456789abcdef"})
        assert a.dtype == np.uint8 and np.array_equal(a, ci[c.id])
        b = load_frame_labels(c, "teacher_embeddings", expected={"teacher_layer": "6"})
        assert b.dtype == np.float32 and b.tobytes() == emb[c.id].tobytes()
        assert c.custom["codebook_indexes"].start == pytest.approx(c.start)
        assert c.custom["codebook_indexes_meta"] == {"quantizer_id": "0123456789abcdef"}
        assert c.custom["custom_attribute"] == "dummy-value"  # existing custom fields are kept


def test_metadata_mismatch_and_missing_labels_refused(cuts, tmp_path):
    ci, _ = _arrays(cuts)
    out = write_frame_labels(cuts, ci, tmp_path, key="codebook_indexes", frame_shift=FS,
                             extra={"quantizer_id": "aaaa"})
    cut = out[0]
    with pytest.raises(ValueError, match=f"{cut.id}.*quantizer_id.*'aaaa'.*'bbbb'"):
        load_frame_labels(cut, "codebook_indexes", expected={"quantizer_id": "bbbb"})
    with pytest.raises(ValueError, match=cut.id):
        check_label_meta(out, "codebook_indexes", {"quantizer_id": "bbbb"})
    check_label_meta(out, "codebook_indexes", {"quantizer_id": "aaaa"})  # matching: no error
    with pytest.raises(ValueError, match=f"'{cut.id}' has no frame labels 'teacher_embeddings'"):
        load_frame_labels(cut, "teacher_embeddings")
    with pytest.raises(ValueError, match="has no frame labels"):
        check_label_meta(cuts, "codebook_indexes", {"quantizer_id": "aaaa"})


def test_truncate_slices_labels(cuts, tmp_path):
    ci, _ = _arrays(cuts)
    out = write_frame_labels(cuts, ci, tmp_path, key="codebook_indexes", frame_shift=FS, extra={})
    for c in out:
        part = c.truncate(offset=0.4, duration=0.4)
        got = load_frame_labels(part, "codebook_indexes")
        lo = round(0.4 / FS)  # 10 frames in, 10 frames long
        assert np.array_equal(got, ci[c.id][lo : lo + 10])


def test_storage_bytes(cuts, tmp_path):
    ci, emb = _arrays(cuts)
    out = write_frame_labels(cuts, ci, tmp_path, key="codebook_indexes", frame_shift=FS, extra={})
    out = write_frame_labels(out, emb, tmp_path, key="teacher_embeddings", frame_shift=FS, extra={})
    assert label_storage_bytes(out, "codebook_indexes") == sum(a.nbytes for a in ci.values())
    assert label_storage_bytes(out, "teacher_embeddings") == sum(a.nbytes for a in emb.values())
    on_disk = label_file_bytes(out, "codebook_indexes")
    assert on_disk == os.path.getsize(tmp_path / "codebook_indexes.h5")
    assert on_disk >= sum(a.nbytes for a in ci.values())


def test_bad_labels_refused_and_nothing_left_behind(cuts, tmp_path):
    ci, _ = _arrays(cuts)
    first = cuts[0].id
    cases = [
        ({**ci, "no-such-cut": ci[first]}, "not in cuts"),
        ({k: v for k, v in ci.items() if k != first}, "got no labels"),
        ({**ci, first: ci[first].astype(np.int64)}, f"'{first}'.*dtype"),
        ({**ci, first: ci[first][:, :4]}, r"\(T, 8\) differ from the other cuts' uint8 \(T, 4\)"),
        ({**ci, first: ci[first][:3]}, f"'{first}'.*3 label frames"),
        ({**ci, first: ci[first][:, 0]}, f"'{first}'.*shape"),
    ]
    for labels, msg in cases:
        with pytest.raises(ValueError, match=msg):
            write_frame_labels(cuts, labels, tmp_path / "x", key="codebook_indexes", frame_shift=FS, extra={})
        assert os.listdir(tmp_path / "x") == []
    nan = {k: v.astype(np.float32) for k, v in ci.items()}
    nan[first][2, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        write_frame_labels(cuts, nan, tmp_path / "x", key="teacher_embeddings", frame_shift=FS, extra={})
    with pytest.raises(ValueError, match="str to str"):
        write_frame_labels(cuts, ci, tmp_path / "x", key="codebook_indexes", frame_shift=FS, extra={"id": 3})
    with pytest.raises(ValueError, match="identifier"):
        write_frame_labels(cuts, ci, tmp_path / "x", key="../evil", frame_shift=FS, extra={})
