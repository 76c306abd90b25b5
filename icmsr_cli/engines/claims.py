"""Which worker upscales which file: static shards and dynamic claims, with no scheduler of our own.

Two ways to split one planned job list (every worker plans the same list from the same folders):
- `--shard I/N` for workers that share a filesystem but nothing else (Slurm arrays, Kubernetes
  indexed jobs): a file belongs to shard hash(relative path) mod N, so the split is disjoint and
  complete, the same on every machine and every rerun, and a file keeps its shard when others are
  added or removed.
- Claims from a shared counter (torch.distributed's TCPStore under torchrun or accelerate, see
  ranks.py): each worker takes the next unclaimed index when it is ready for more work, so a slow
  worker never leaves the others idle and each job is claimed exactly once.
Resume is unchanged either way: a job whose output exists is skipped by whoever gets it.
Another engine (Ray, Spark) can drive `claimed` with its own counter.
"""

from __future__ import annotations

import hashlib
from typing import Callable, Iterator, Sequence, TypeVar

from ..errors import SetupError

T = TypeVar("T")


def parse_shard(text: str) -> tuple[int, int]:
    """"I/N" with 0 <= I < N (0-based, as SLURM_ARRAY_TASK_ID with --array=0-N-1 and JOB_COMPLETION_INDEX)."""
    index, sep, count = text.partition("/")
    if sep and index.strip().isdigit() and count.strip().isdigit() and int(index) < int(count):
        return int(index), int(count)
    raise SetupError(f"--shard {text}: expected I/N with 0 <= I < N, e.g. 0/4 ... 3/4 (I is 0-based)")


def shard_of(key: str, count: int) -> int:
    """The shard of a relative path: a stable hash (not Python's hash(), which changes per process)."""
    return int.from_bytes(hashlib.sha1(key.encode("utf-8", "surrogateescape")).digest()[:8], "big") % count


def take_shard(items: Sequence[T], key: Callable[[T], str], index: int, count: int) -> list[T]:
    return [item for item in items if shard_of(key(item), count) == index]


def claimed(items: Sequence[T], next_index: Callable[[], int]) -> Iterator[T]:
    """The items this worker claims, in claim order: `next_index` returns a fresh index per call
    across all workers (an atomic counter); past the end, the work is done."""
    while (i := next_index()) < len(items):
        yield items[i]
