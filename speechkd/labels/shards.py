"""Splitting a labelling stage into shards: which batches a shard labels and where its parts are written.

A labelling stage walks its cuts in a fixed order and batches them deterministically (a sampler in manifest
order, or fixed groups of cuts); shard ``i`` of ``n`` takes batches ``i, i + n, i + 2n, ...`` of that one sequence.
Every cut is therefore computed in exactly the batch (same neighbours, same padding) it would have in an unsharded
run, so the merged labels equal the unsharded ones bit for bit. Each shard writes its own part atomically; a rerun
skips shards whose part exists; a merge reads the parts back in the cuts' order.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Optional, TypeVar

T = TypeVar("T")


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


def stage_shard(spec: Optional[str]) -> tuple[int, int]:
    """The shard this process labels: ``--shard i/n`` when given; else, in a multi-process run, ``(rank, world
    size)`` (:mod:`speechkd.distributed`); else ``(0, 1)`` (everything).

    Raises:
      ValueError: a malformed spec; ``--shard`` given inside a multi-process run (the ranks already split the
        work).
    """
    from speechkd.distributed import rank, world_size

    if world_size() > 1:
        if spec is not None:
            raise ValueError(f"--shard {spec} in a run of {world_size()} processes: the ranks split the cuts "
                             "themselves; give --shard only to single-process runs")
        return rank(), world_size()
    return parse_shard(spec)


def every_nth(items: Iterable[T], index: int, count: int) -> Iterator[T]:
    """Items ``index, index + count, ...`` of ``items`` (0-based), lazily.

    Raises:
      ValueError: ``index`` not in ``0..count-1``.
    """
    if not (count >= 1 and 0 <= index < count):
        raise ValueError(f"shard {index}/{count}: the index must be in 0..{count - 1}")
    for k, item in enumerate(items):
        if k % count == index:
            yield item


class BatchShard:
    """A batch sampler view keeping batches ``index, index + count, ...`` of ``sampler`` (for a DataLoader with
    ``batch_size=None``: only the kept batches are collated, so only their features are read)."""

    def __init__(self, sampler, index: int, count: int):
        if not (count >= 1 and 0 <= index < count):
            raise ValueError(f"shard {index}/{count}: the index must be in 0..{count - 1}")
        self.sampler, self.index, self.count = sampler, index, count

    def __iter__(self):
        return every_nth(self.sampler, self.index, self.count)


def part_name(key: str, index: int, count: int) -> str:
    """File stem of shard ``index`` of ``count`` for labels ``key``: ``"{key}.part-{index}-of-{count}"``."""
    return f"{key}.part-{index}-of-{count}"
