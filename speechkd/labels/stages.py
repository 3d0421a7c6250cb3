"""The labelling stages: the teacher's float embeddings (extract), their codebook indexes (quantize) and its N-best
lists (pseudo-label), for the training cuts and the untranscribed ones of ``data.unlabelled``.

    extract      -> labels/cuts_train_emb.jsonl.gz + labels/teacher_embeddings*.h5 (float32 teacher layer)
    quantize     -> labels/quantizer.safetensors, labels/cuts_train_ci.jsonl.gz + labels/codebook_indexes*.ci
                    (range-coded; ``*.h5`` with ``quantizer.storage: hdf5``)
    pseudo-label -> labels/nbest/part-*.jsonl.gz, then labels/cuts_train_nbest.jsonl.gz

Each stage splits its work into shards of batches (:mod:`speechkd.labels.shards`): ``--shard i/n`` for n separate
processes (on any machines sharing the experiment directory), or one shard per rank in a multi-process run. A
shard writes its part atomically (frame labels: ``labels/<key>.part-i-of-n.h5`` with the shard's cuts in
``labels/parts/<key>.part-i-of-n.jsonl.gz``; an unsharded run writes ``labels/<key>.h5``); a rerun skips the parts
that exist; once every part exists the cuts are merged in manifest order into the stage's manifest, whose presence
marks the stage complete. Sharded labels equal unsharded ones bit for bit (every cut is computed in the same batch).
"""

from __future__ import annotations

import json
import time
from typing import Callable, Iterator, Optional

import numpy as np
import torch

from speechkd.utils import log


# ---------------------------------------------------------------- shared: parts of frame labels
def _part_paths(exp, key: str, index: int, count: int, codec: str = "hdf5"):
    """``(label file name, shard manifest path)`` of shard ``index`` of ``count`` of frame labels ``key`` (``.h5``;
    ``.ci`` for range-coded CI)."""
    from speechkd.labels.shards import part_name
    from speechkd.labels.store import label_file_suffix

    name = part_name(key, index, count)
    suffix = label_file_suffix(codec)
    return (f"{key}{suffix}" if count == 1 else f"{name}{suffix}"), exp.dir / "labels" / "parts" / f"{name}.jsonl.gz"


def write_frame_label_part(exp, key: str, index: int, count: int, shard_cuts: list,
                           outputs: Callable[[], Iterator], frame_shift: float, extra: dict,
                           codec: str = "hdf5") -> None:
    """Write shard ``index`` of ``count`` of frame labels ``key``: ``labels/<key>.part-i-of-n.h5`` (``<key>.h5``
    unsharded) and its cuts' manifest ``labels/parts/<key>.part-i-of-n.jsonl.gz`` (written last: its presence marks
    the part complete; an existing part is skipped, ``outputs`` is then not called).

    Args:
      exp: the experiment (its ``dir``).
      key: the label key (e.g. ``teacher_embeddings``, ``codebook_indexes``, ``hubert_targets``).
      index, count: the shard.
      shard_cuts: the cuts of this shard.
      outputs: ``() -> iterator of (cut_id, (T, C) array)`` for exactly ``shard_cuts``.
      frame_shift: seconds per label frame.
      extra: string metadata stored with the labels (what made them: teacher layer, quantizer id, centroids id).
      codec: as :func:`speechkd.labels.store.write_frame_labels` (``"range"``: range-coded uint8 CI).

    Raises:
      ValueError: as :func:`speechkd.labels.store.write_frame_labels` (naming the cut).
    """
    from lhotse import CutSet

    from speechkd.data.datamodule import save_cuts
    from speechkd.labels.store import write_frame_labels

    file_name, manifest = _part_paths(exp, key, index, count, codec)
    if manifest.is_file():
        log(f"{key}: part {index}/{count} exists ({manifest}), skipped")
        return
    labelled = write_frame_labels(CutSet.from_cuts(shard_cuts), outputs(), exp.dir / "labels", key=key,
                                  frame_shift=frame_shift, extra=extra, file_name=file_name, codec=codec)
    save_cuts(labelled, manifest)


def merge_frame_label_parts(exp, cuts, key: str, count: int, extra: dict):
    """The cuts carrying labels ``key`` from the ``count`` parts, in the order of ``cuts``, or None while a part
    is missing.

    Raises:
      ValueError: a part holds labels with other metadata than ``extra`` (another teacher layer or quantizer; the
        message names the part and says what to delete), or a cut of ``cuts`` is in no part.
    """
    from lhotse import CutSet

    from speechkd.data.datamodule import load_cuts
    from speechkd.labels.store import meta_key

    manifests = [_part_paths(exp, key, i, count)[1] for i in range(count)]
    missing = [str(m) for m in manifests if not m.is_file()]
    if missing:
        log(f"{key}: {len(missing)} of {count} parts still missing (e.g. {missing[0]}): run the other shards")
        return None
    by_id = {}
    for m in manifests:
        for c in load_cuts(m):
            if (c.custom or {}).get(meta_key(key)) != extra:
                raise ValueError(f"{m}: cut '{c.id}' has '{key}' labels written with "
                                 f"{(c.custom or {}).get(meta_key(key))}, not {extra}: delete labels/parts/{key}.* "
                                 f"and labels/{key}*.h5 / *.ci and label again")
            by_id[c.id] = c
    out = []
    for c in cuts:
        if c.id not in by_id:
            raise ValueError(f"cut '{c.id}' is in none of the {count} '{key}' parts: were they written for other cuts? "
                             f"delete labels/parts/{key}.* and label again")
        out.append(by_id[c.id])
    return CutSet.from_cuts(out)


def finish_frame_labels(exp, cuts, key: str, count: int, extra: dict, out_path) -> bool:
    """After this process's part: in a multi-process run wait for every rank and let rank 0 merge; else merge when
    every part exists (:func:`merge_frame_label_parts`), writing the cuts with their labels to ``out_path``.

    Returns:
      True when the merged manifest was written (by this process).

    Raises:
      ValueError: as :func:`merge_frame_label_parts`.
    """
    from speechkd.data.datamodule import save_cuts
    from speechkd.distributed import barrier, is_main, world_size

    if world_size() > 1:
        barrier()
        if not is_main():
            return False
    merged = merge_frame_label_parts(exp, cuts, key, count, extra)
    if merged is None:
        return False
    save_cuts(merged, out_path)
    return True


# ---------------------------------------------------------------- extract
def extract(exp, shard: Optional[str] = None, batch_seconds: Optional[float] = None) -> None:
    """Store the teacher's chosen layer (``teacher.layer``) for every label cut as float32 (the L1/L2 labels), at the
    teacher's frame shift, through the :class:`speechkd.teachers.base.Teacher` interface (its batch plan and layer
    outputs: e.g. the transducer's encoder block over the fbank, or an HF SSL model's hidden state over the 16 kHz
    waveform).

    Args:
      shard: ``"i/n"``: label only shard i of n (batches i, i+n, ... of the teacher's plan); the labels are merged
        once all n exist. Default: everything, or this rank's shard in a multi-process run.
      batch_seconds: seconds of audio per teacher batch (default: the teacher's).

    Raises:
      ValueError: a malformed shard; as the teacher's ``layer_outputs`` and
        :func:`speechkd.labels.store.write_frame_labels`.
    """
    from speechkd.labels.shards import stage_shard
    from speechkd.methods.mvq_kd import EMB_KEY

    if exp.emb_cuts_path.is_file():
        log(f"extract: {exp.emb_cuts_path} exists, skipped")
        return
    index, count = stage_shard(shard)
    layer = exp.recipe.teacher.layer
    teacher = exp.teacher
    cuts = exp.label_cuts()
    t0 = time.time()
    batches = teacher.plan_batches(cuts, index, count, batch_seconds)
    extra = teacher.label_meta(layer)
    write_frame_label_part(exp, EMB_KEY, index, count, [c for b in batches for c in b],
                           lambda: teacher.layer_outputs(batches, layer), teacher.frame_shift(), extra)
    if finish_frame_labels(exp, cuts, EMB_KEY, count, extra, exp.emb_cuts_path):
        log(f"extract: teacher layer {layer} for {len(cuts)} cuts ({time.time() - t0:.0f} s, {count} shard(s)) "
            f"-> {exp.emb_cuts_path}")


# ---------------------------------------------------------------- quantize
#: Frames of teacher embeddings encoded per quantizer call (per-cut calls of ~50 frames ran 3x slower).
ENCODE_GROUP_FRAMES = 20000


def _encode_groups(cuts, key: str, group_frames: int = ENCODE_GROUP_FRAMES) -> list[list]:
    """Consecutive cuts grouped until a group holds at least ``group_frames`` stored frames (counted from the
    manifests' array shapes, nothing read): the fixed units of work that quantize-encode shards."""
    groups, group, frames = [], [], 0
    for c in cuts:
        group.append(c)
        frames += int(c.custom[key].shape[0])
        if frames >= group_frames:
            groups.append(group)
            group, frames = [], 0
    if group:
        groups.append(group)
    return groups


def _encode_group(quantizer, group: list):
    """``(cut_id, CI (T_i, num_codebooks) uint8)`` for ``(cut_id, embeddings (T_i, D))`` pairs, encoded in one call."""
    if not group:
        return
    ci = quantizer.encode(torch.from_numpy(np.concatenate([e for _, e in group]))).cpu().numpy()  # (sum T_i, B)
    start = 0
    for cid, emb in group:
        yield cid, ci[start:start + len(emb)]
        start += len(emb)


def _train_or_load_quantizer(exp, cuts):
    """The recipe's quantizer: loaded from ``labels/quantizer.safetensors``, or trained on sampled teacher frames
    and saved (in a multi-process run by rank 0 while the others wait, then loaded by all)."""
    from speechkd.distributed import barrier, is_main, world_size
    from speechkd.methods.mvq_kd import EMB_KEY
    from speechkd.mvq.quantizer import Quantizer, train_quantizer

    quantizer = None
    if not exp.quantizer_path.is_file() and (world_size() == 1 or is_main()):
        q = exp.recipe.quantizer
        t0 = time.time()
        frames = _sample_frames(cuts, EMB_KEY, q.train_frames, np.random.default_rng(exp.recipe.data.seed))
        kwargs = {}
        if q.beam is not None:
            kwargs["beam"] = q.beam
        if q.refine_iters is not None:
            kwargs["refine_iters"] = q.refine_iters  # encoder refinement passes (not training rounds)
        quantizer = train_quantizer(torch.from_numpy(frames), num_codebooks=q.num_codebooks, seed=exp.recipe.data.seed,
                                    progress=exp.progress, **kwargs)
        quantizer.save(exp.quantizer_path)
        err = quantizer.relative_error(torch.from_numpy(frames[:5000]))
        log(f"quantize: trained on {len(frames)} frames, dim {quantizer.dim}, {q.num_codebooks} bytes/frame, "
            f"relative error {err:.3f} on 5000 of its training frames ({time.time() - t0:.0f} s), id {quantizer.id}")
    barrier()  # multi-process: every rank waits until rank 0 has saved it (a no-op in one process)
    if quantizer is None:
        quantizer = Quantizer.load(exp.quantizer_path)
        log(f"quantize: reusing {exp.quantizer_path} (id {quantizer.id})")
    return quantizer


def quantize(exp, shard: Optional[str] = None, group_frames: int = ENCODE_GROUP_FRAMES) -> None:
    """Train the multi-codebook quantizer on sampled teacher frames (or reuse ``labels/quantizer.safetensors``) and
    write the CI of every label cut.

    Args:
      shard: ``"i/n"``: encode only shard i of n (groups of about 20,000 frames i, i+n, ...); the CI are merged
        once all n exist. Each shard process trains the same quantizer when none is stored yet (same frames, same
        seed): train it once first (``speechkd quantize`` on one shard) to save the others the time. Default:
        everything, or this rank's shard in a multi-process run (rank 0 trains the quantizer).
      group_frames: frames encoded per quantizer call (the unit of sharding).

    Raises:
      ValueError: a malformed shard; labels of another quantizer in the parts.
    """
    from speechkd.data.datamodule import load_cuts
    from speechkd.labels.shards import every_nth, stage_shard
    from speechkd.labels.store import label_frame_shift, load_frame_labels
    from speechkd.methods.mvq_kd import CI_KEY, EMB_KEY

    if exp.ci_cuts_path.is_file():
        log(f"quantize: {exp.ci_cuts_path} exists, skipped")
        return
    index, count = stage_shard(shard)
    cuts = load_cuts(exp.emb_cuts_path)
    quantizer = _train_or_load_quantizer(exp, cuts)
    groups = list(every_nth(_encode_groups(cuts, EMB_KEY, group_frames), index, count))

    def indexes():
        for group in groups:
            yield from _encode_group(quantizer, [(c.id, load_frame_labels(c, EMB_KEY)) for c in group])

    extra = {"quantizer_id": quantizer.id}
    # the CI frames are the embeddings' frames: same frame shift (20 ms for an HF teacher, 10 ms x subsampling else)
    write_frame_label_part(exp, CI_KEY, index, count, [c for g in groups for c in g], indexes,
                            label_frame_shift(cuts, EMB_KEY), extra, codec=exp.recipe.quantizer.storage)
    if finish_frame_labels(exp, cuts, CI_KEY, count, extra, exp.ci_cuts_path):
        log(f"quantize: codebook indexes for {len(cuts)} cuts ({count} shard(s)) -> {exp.ci_cuts_path}")


def _sample_frames(cuts, key: str, num: int, rng) -> np.ndarray:
    """``num`` frames drawn uniformly without replacement from the stored labels ``key`` of all cuts, ``(num, D)``
    (every frame, in cut order, when there are no more than ``num``).

    Only the sampled frames are held: a first pass reads each cut's labels to count its frames (as lhotse loads
    them for the cut's span) and keeps the counts, a second reads the cuts holding a drawn frame. The draw is
    ``rng.choice(total, num, replace=False)`` over the frames concatenated in cut order, in the draw's order.

    Raises:
      ValueError: a cut's labels changed between the passes (naming the cut).
    """
    from speechkd.labels.store import load_frame_labels

    lens = [len(load_frame_labels(c, key)) for c in cuts]  # frames per cut
    total = sum(lens)
    if total <= num:
        return np.concatenate([load_frame_labels(c, key) for c in cuts])  # (total, D)
    idx = rng.choice(total, num, replace=False)  # (num,) positions in the concatenation
    order = np.argsort(idx, kind="stable")
    wanted = idx[order]  # ascending
    starts = np.cumsum([0] + lens)  # (num_cuts + 1,)
    picked, pos = [], 0
    for i, c in enumerate(cuts):
        lo, hi = starts[i], starts[i + 1]
        end = pos + int(np.searchsorted(wanted[pos:], hi))
        if end > pos:
            emb = load_frame_labels(c, key)  # (T_i, D)
            if len(emb) != hi - lo:
                raise ValueError(f"cut '{c.id}': {len(emb)} '{key}' frames now, {hi - lo} in the first pass")
            picked.append(emb[wanted[pos:end] - lo])
            pos = end
    frames = np.empty((num, picked[0].shape[1]), dtype=picked[0].dtype)  # (num, D) in the draw's order
    frames[order] = np.concatenate(picked)
    return frames


# ---------------------------------------------------------------- pseudo-label
def pseudo_label_meta(exp) -> dict:
    """What identifies a set of N-best labels: ``{"teacher_id", "beam", "nbest"}`` of the recipe's teacher, plus
    ``backend`` (and its compute type) when it is not the teacher's native beam search, and ``ctc_weight`` when the
    search is joint CTC/attention."""
    p = exp.recipe.pseudo_label
    meta = {"teacher_id": exp.teacher.teacher_id(), "beam": p.beam, "nbest": p.nbest}
    if p.backend != "native":
        meta.update(backend=p.backend, compute_type=p.ctranslate2_compute_type)
    if p.ctc_weight > 0:
        meta.update(ctc_weight=p.ctc_weight)
    return meta


def pseudo_label(exp, shard: Optional[str] = None) -> None:
    """The teacher's beam search writes an N-best list for every label cut (sequence-level KD labels).

    With ``shard="i/n"`` only chunks i, i+n, ... of the cuts are decoded (run the n shards in parallel, on any
    machines sharing the directory); in a multi-process run each rank decodes its own chunks. The labels are merged
    onto the cuts once every cut has its list.

    Raises:
      ValueError: the recipe's teacher cannot decode (e.g. a Hugging Face SSL model, ``teacher.hf_dir``); a
        malformed shard.
    """
    from speechkd.data.datamodule import save_cuts
    from speechkd.distributed import barrier, is_main, world_size
    from speechkd.labels.nbest import merge_pseudo_labels, write_nbest_parts
    from speechkd.labels.shards import stage_shard

    if exp.nbest_cuts_path.is_file():
        log(f"pseudo-label: {exp.nbest_cuts_path} exists, skipped")
        return
    if not exp.teacher.has_nbest:
        raise ValueError(f"pseudo-label: the teacher ({exp.teacher.describe()}) has no ASR head: it cannot write "
                         "N-best lists (sequence-level KD needs a teacher that decodes)")
    p = exp.recipe.pseudo_label
    if p.backend not in exp.teacher.nbest_backends:
        raise ValueError(f"pseudo_label.backend = {p.backend!r}: the teacher ({exp.teacher.describe()}) decodes with "
                         f"{', '.join(exp.teacher.nbest_backends)}")
    i, n = stage_shard(shard)
    cuts = exp.label_cuts()
    meta = pseudo_label_meta(exp)
    if world_size() > 1:  # rank 0 writes meta.json before anyone checks it
        if is_main():
            from speechkd.labels.nbest import _check_meta

            _check_meta(exp.nbest_dir, meta)
        barrier()
    decode = exp.teacher.nbest_decoder(p.beam, p.nbest, p.max_duration)
    t0 = time.time()
    done = write_nbest_parts(decode, cuts, exp.nbest_dir, meta, shard=(i, n), chunk_cuts=p.chunk_cuts,
                             progress=exp.progress)
    log(f"pseudo-label: shard {i}/{n}: {done} cuts decoded (beam {p.beam}, {p.nbest}-best) in {time.time() - t0:.0f} s")
    if world_size() > 1:
        barrier()
        if not is_main():
            return
    labelled, missing = merge_pseudo_labels(cuts, exp.nbest_dir, meta)
    if missing:
        log(f"pseudo-label: {len(missing)} of {len(cuts)} cuts still need labels (run the other shards); not merged")
        return
    save_cuts(labelled, exp.nbest_cuts_path)
    log(f"pseudo-label: N-best lists for {len(labelled)} cuts -> {exp.nbest_cuts_path}")


def check_label_meta_nbest(exp) -> None:
    """Refuse N-best labels written by another teacher or with other settings than the recipe's.

    Raises:
      FileNotFoundError: no ``labels/nbest/meta.json`` (pseudo-label has not run).
      ValueError: naming the label directory.
    """
    meta_path = exp.nbest_dir / "meta.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} not found: run `speechkd pseudo-label` first")
    if json.loads(meta_path.read_text()) != pseudo_label_meta(exp):
        raise ValueError(f"{exp.nbest_dir}: pseudo labels were written by another teacher or with other settings "
                         "than this recipe's: delete labels/nbest and labels/cuts_train_nbest.jsonl.gz and re-run")
