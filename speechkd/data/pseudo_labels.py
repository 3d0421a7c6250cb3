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
from typing import Optional

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


def parse_shard(spec: Optional[str]) -> tuple[int, int]:
    """``"i/n"`` -> ``(i, n)`` with 0 <= i < n; None -> ``(0, 1)``.

    Raises:
      ValueError: a malformed spec (named).
    """
    if spec is None:
        return 0, 1
    try:
        i, n = (int(v) for v in spec.split("/"))
    except ValueError:
        raise ValueError(f"--shard must look like i/n (e.g. 0/4), got {spec!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise ValueError(f"--shard {spec}: need 0 <= i < n")
    return i, n


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


def write_pseudo_labels(model, cuts, tokenizer, out_dir: Pathlike, meta: dict, beam: int = 8, nbest: int = 8,
                        shard: tuple[int, int] = (0, 1), chunk_cuts: int = 500, max_duration: float = 200.0,
                        progress: bool = True) -> int:
    """Decode this shard's cuts that have no pseudo labels yet and write their N-best lists in parts.

    Args:
      model: the teacher (transducer or attention encoder-decoder), in eval mode.
      cuts: the CutSet to label (with features).
      tokenizer: turns hypotheses' token ids into text.
      out_dir: the label directory (``labels/nbest``).
      meta: identifies the teacher and settings (``{"teacher_id", "beam", "nbest"}``); must equal the
        directory's ``meta.json`` when it exists.
      beam, nbest: beam width and hypotheses kept per cut (nbest <= beam).
      shard: ``(i, n)``: this run labels cuts i, i+n, ...
      chunk_cuts: cuts per part file.
      max_duration: seconds of audio per decoding batch.

    Returns:
      number of cuts labelled by this call.

    Raises:
      ValueError: labels of another teacher/settings in ``out_dir``, bad shard.
    """
    from lhotse import CutSet
    from tqdm import tqdm

    from speechkd.data.datamodule import AsrDataset, make_loader
    from speechkd.decoding import nbest_search

    out_dir = Path(out_dir)
    i, n = shard
    if not (n >= 1 and 0 <= i < n):
        raise ValueError(f"bad shard {i}/{n}")
    _check_meta(out_dir, meta)
    done = set(read_parts(out_dir))
    todo = [(k, c) for k, c in enumerate(cuts) if k % n == i and c.id not in done]
    bar = tqdm(total=len(todo), desc=f"pseudo-label {i}/{n}", unit="cut", disable=not progress)
    for start in range(0, len(todo), chunk_cuts):
        chunk = todo[start:start + chunk_cuts]
        chunk_set = CutSet.from_cuts(c for _, c in chunk)
        found = {}
        dl = make_loader(chunk_set, AsrDataset(None), max_duration, shuffle=False)
        with torch.inference_mode():
            for batch in dl:
                enc, lens, _ = model.encode(batch["features"], batch["feature_lens"])
                for cid, hyps in zip(batch["cut_ids"], nbest_search(model, enc, lens, beam=beam, nbest=nbest)):
                    found[cid] = [{"tokens": list(map(int, toks)), "text": tokenizer.decode([toks])[0], "score": float(s)}
                                  for toks, s in hyps]
                bar.update(len(batch["cut_ids"]))
        with atomic_path(out_dir / f"part-{chunk[0][0]:08d}.jsonl.gz") as tmp, gzip.open(tmp, "wt", encoding="utf-8") as f:
            for _, c in chunk:
                f.write(json.dumps({"id": c.id, "hyps": found[c.id]}) + "\n")
    bar.close()
    return len(todo)


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
