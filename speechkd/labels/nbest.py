"""N-best pseudo labels from a teacher's beam search, stored beside the cuts (``speechkd pseudo-label``).

Layout of the label directory (``labels/nbest/``)::

    meta.json                         teacher id (a hash of its weights), beam, nbest
    part-<first cut index>.jsonl.gz   one JSON line per cut: {"id", "hyps": [{"tokens", "text", "score"}]}

Each part holds ``chunk_cuts`` consecutive cuts of one shard and is written atomically, so a stopped run
loses at most one part and resumes by skipping every cut already in a part (whatever shards wrote it).
``--shard i/n`` takes cuts ``i, i+n, i+2n, ...``; :func:`merge_pseudo_labels` puts the parts of all shards
onto the cuts (``custom["nbest"]``) once every cut has its list, and refuses parts of another teacher.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import torch

from speechkd.utils import Pathlike, atomic_path, write_json_atomic

NBEST_KEY = "nbest"


def model_id(model_dir: Pathlike) -> str:
    """A short content hash (16 hex digits) of ``model_dir/model.safetensors``: which teacher wrote labels."""
    h = hashlib.sha256()
    with open(Path(model_dir) / "model.safetensors", "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def _check_meta(out_dir: Path, meta: dict) -> None:
    path = out_dir / "meta.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if old != meta:
            raise ValueError(f"{out_dir} holds pseudo labels written with {old}, not {meta}: delete the directory "
                             "to write them again with this teacher and these settings")
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, meta)


def read_parts(out_dir: Pathlike) -> dict:
    """Every record of the part files: ``{cut id: [{"tokens", "text", "score"}, ...]}``.

    Raises:
      ValueError: a malformed line (names the file and line).
    """
    records = {}
    for part in sorted(Path(out_dir).glob("part-*.jsonl.gz")):
        with gzip.open(part, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                try:
                    rec = json.loads(line)
                    records[rec["id"]] = rec["hyps"]
                except (json.JSONDecodeError, KeyError) as e:
                    raise ValueError(f"{part}:{lineno}: not a pseudo-label record ({e})") from e
    return records


def project_nbest_decoder(model, tokenizer, beam: int = 8, nbest: int = 8, max_duration: float = 200.0,
                          ctc_weight: float = 0.0):
    """A chunk decoder for :func:`write_nbest_parts` from a project teacher (transducer or AED, in eval mode):
    batches of ``max_duration`` seconds of fbank in manifest order, :func:`speechkd.decoding.nbest_search` (an AED's
    joint CTC/attention search with ``ctc_weight > 0``).

    Returns:
      ``(CutSet chunk) -> iterator of (cut_id, [{"tokens", "text", "score"}, ...])``, best first; ``tokens`` in the
      experiment's tokenizer, ``score`` the sequence log-probability.
    """
    from speechkd.data.datamodule import AsrDataset, make_loader
    from speechkd.decoding import nbest_search

    def decode(chunk):
        dl = make_loader(chunk, AsrDataset(None), max_duration, shuffle=False)
        with torch.inference_mode():
            for batch in dl:
                enc, lens, _ = model.encode(batch["features"], batch["feature_lens"])
                for cid, hyps in zip(batch["cut_ids"], nbest_search(model, enc, lens, beam=beam, nbest=nbest,
                                                                          ctc_weight=ctc_weight)):
                    yield cid, [{"tokens": list(map(int, toks)), "text": tokenizer.decode([toks])[0], "score": float(s)}
                                for toks, s in hyps]

    return decode


def write_pseudo_labels(model, cuts, tokenizer, out_dir: Pathlike, meta: dict, beam: int = 8, nbest: int = 8,
                        shard: tuple[int, int] = (0, 1), chunk_cuts: int = 500, max_duration: float = 200.0,
                        progress: bool = True, ctc_weight: float = 0.0) -> int:
    """:func:`write_nbest_parts` with a project teacher's beam search (:func:`project_nbest_decoder`).

    Args:
      model: the teacher (transducer or attention encoder-decoder), in eval mode.
      tokenizer: turns hypotheses' token ids into text.
      beam, nbest: beam width and hypotheses kept per cut (nbest <= beam).
      max_duration: seconds of audio per decoding batch.
      ctc_weight: an AED teacher's joint CTC/attention weight (0 = attention alone).
      cuts, out_dir, meta, shard, chunk_cuts, progress: as :func:`write_nbest_parts`.
    """
    return write_nbest_parts(project_nbest_decoder(model, tokenizer, beam, nbest, max_duration, ctc_weight), cuts, out_dir, meta,
                             shard=shard, chunk_cuts=chunk_cuts, progress=progress)


def write_nbest_parts(decode, cuts, out_dir: Pathlike, meta: dict, shard: tuple[int, int] = (0, 1),
                      chunk_cuts: int = 500, progress: bool = True) -> int:
    """Decode this shard's chunks of cuts that have no part file yet and write their N-best lists, one part per chunk.

    The cuts are cut into fixed chunks of ``chunk_cuts`` in manifest order (chunk j: cuts ``j * chunk_cuts ...``,
    written to ``part-{j * chunk_cuts:08d}.jsonl.gz``); shard ``(i, n)`` decodes chunks i, i+n, ... Each chunk is
    decoded the same way whatever the sharding, so sharded and unsharded runs write the same hypotheses and scores.

    Args:
      decode: ``(CutSet chunk) -> iterator of (cut_id, hyps)`` for every cut of the chunk (a teacher's
        :meth:`~speechkd.teachers.base.Teacher.nbest_decoder`).
      cuts: the CutSet to label.
      out_dir: the label directory (``labels/nbest``).
      meta: identifies the teacher and settings (``{"teacher_id", "beam", "nbest"}``); must equal the
        directory's ``meta.json`` when it exists.
      shard: ``(i, n)``: this run decodes chunks i, i+n, ...
      chunk_cuts: cuts per part file.

    Returns:
      number of cuts labelled by this call.

    Raises:
      ValueError: labels of another teacher/settings in ``out_dir``, bad shard, a cut the decoder left out.
    """
    from lhotse import CutSet
    from tqdm import tqdm

    from speechkd.labels.shards import every_nth

    out_dir = Path(out_dir)
    i, n = shard
    if not (n >= 1 and 0 <= i < n):
        raise ValueError(f"bad shard {i}/{n}")
    _check_meta(out_dir, meta)
    cut_list = list(cuts)
    starts = range(0, len(cut_list), chunk_cuts)  # chunk j starts at cut j * chunk_cuts
    todo = [k for k in every_nth(starts, i, n) if not (out_dir / f"part-{k:08d}.jsonl.gz").is_file()]
    bar = tqdm(total=sum(len(cut_list[k:k + chunk_cuts]) for k in todo), desc=f"pseudo-label {i}/{n}", unit="cut",
               disable=not progress)
    labelled = 0
    for start in todo:
        chunk = cut_list[start:start + chunk_cuts]
        found = {}
        for cid, hyps in decode(CutSet.from_cuts(chunk)):
            found[cid] = hyps
            bar.update(1)
        missing = [c.id for c in chunk if c.id not in found]
        if missing:
            raise ValueError(f"the N-best decoder returned nothing for cut '{missing[0]}' ({len(missing)} missing)")
        with atomic_path(out_dir / f"part-{start:08d}.jsonl.gz") as tmp, gzip.open(tmp, "wt", encoding="utf-8") as f:
            for c in chunk:
                f.write(json.dumps({"id": c.id, "hyps": found[c.id]}) + "\n")
        labelled += len(chunk)
    bar.close()
    return labelled


def merge_pseudo_labels(cuts, out_dir: Pathlike, meta: dict):
    """The cuts with their N-best lists attached as ``custom["nbest"]``.

    Args:
      cuts: the labelled CutSet; out_dir: the label directory; meta: as in :func:`write_pseudo_labels`.

    Returns:
      ``(CutSet with custom["nbest"] on every cut, missing cut ids)``: when cuts are missing the CutSet is
      None (run the remaining shards first).

    Raises:
      ValueError: labels of another teacher/settings.
    """
    from lhotse import CutSet
    from lhotse.utils import fastcopy

    out_dir = Path(out_dir)
    _check_meta(out_dir, meta)
    records = read_parts(out_dir)
    missing = [c.id for c in cuts if c.id not in records]
    if missing:
        return None, missing
    labelled = []
    for c in cuts:
        labelled.append(fastcopy(c, custom={**(c.custom or {}), NBEST_KEY: records[c.id]}))
    return CutSet.from_cuts(labelled), []


def label_bytes(out_dir: Pathlike) -> int:
    """Bytes on disk of the pseudo-label parts (gzip JSON lines)."""
    return sum(p.stat().st_size for p in Path(out_dir).glob("part-*.jsonl.gz"))
