"""One process among many under torchrun or `accelerate launch` (the engines set RANK, WORLD_SIZE,
LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT): the rank's device and CPU share, the
shared claim counter, and the few collective steps (same plan everywhere, staggered model loading,
summed counts) over gloo, which needs no GPU. torch is imported only once a launch is found.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from datetime import timedelta

from ..errors import RanksLostError, SetupError

# the last collective waits for the slowest rank's last image; only a dead rank should time it out
_TIMEOUT = timedelta(hours=12)


@dataclass
class Ranks:
    rank: int
    world: int
    local_rank: int
    local_world: int
    store: object = None

    @classmethod
    def from_env(cls) -> Ranks | None:
        """The launch this process belongs to; None for a plain single process."""
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if world <= 1:
            return None
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        return cls(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", 0)), local_world)

    def join(self) -> None:
        """Meet the other ranks through the launcher's store (env:// rendezvous) and open a gloo group."""
        import torch.distributed as dist

        try:
            store, rank, world = next(dist.rendezvous("env://", timeout=_TIMEOUT))
        except (RuntimeError, ValueError, KeyError) as exc:
            raise SetupError(f"cannot join the other ranks at {os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} ({exc})") from None
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=_TIMEOUT)
        # a restarted worker group (torchrun --max-restarts) counts its claims afresh
        self.store = dist.PrefixStore(f"icmsr/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/", store)

    def leave(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()

    def device(self, requested: str) -> str:
        """auto and cuda mean this rank's own GPU (LOCAL_RANK); an explicit cuda:N is kept."""
        import torch

        if requested in ("auto", "cuda") and torch.cuda.is_available():
            return f"cuda:{self.local_rank % torch.cuda.device_count()}"
        return requested

    def share_cpu(self) -> None:
        """A fair share of this machine's cores for torch and the PNG writer (torchrun sets
        OMP_NUM_THREADS=1 for every rank)."""
        import torch

        from ..io import png

        share = max(1, png.cpu_count() // self.local_world)
        torch.set_num_threads(share)
        png.default_threads = share

    def next_index(self) -> int:
        """A job index no other rank gets (the store's atomic add)."""
        try:
            return int(self.store.add("next", 1)) - 1
        except Exception as exc:  # noqa: BLE001 - torch raises DistNetworkError, DistStoreError or RuntimeError
            raise _lost(exc) from None

    def check_same_plan(self, names: list[str]) -> None:
        """Every rank must have planned the same job list, or indices would mean different files."""
        digest = hashlib.sha1("\0".join(names).encode("utf-8", "surrogateescape")).hexdigest()
        import torch.distributed as dist

        digests: list[str | None] = [None] * self.world
        dist.all_gather_object(digests, digest)
        if len(set(digests)) > 1:
            raise SetupError("the ranks found different input files (did the folders change while they started?); rerun")

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    def total(self, counts: list[int]) -> list[int]:
        """Element-wise sum of every rank's counts."""
        import torch
        import torch.distributed as dist

        tensor = torch.tensor(counts, dtype=torch.int64)
        try:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        except Exception as exc:  # noqa: BLE001 - gloo: "Connection closed by peer" when another rank has stopped
            # a rank whose last claim came before the launcher died gets here while the others stop
            # at their next claim: the same loss, in the same words
            raise _lost(exc) from None
        return tensor.tolist()


def _lost(exc: BaseException) -> RanksLostError:
    return RanksLostError(f"lost contact with the other ranks ({_first_line(exc)}); finished outputs are complete, rerun to resume")


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
