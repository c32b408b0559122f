"""Data parallelism: under torchrun every rank runs its share of the batches one process would run (see
_runner); the exact integer totals are gathered (all_gather_object, any backend) and summed, so K
processes give bit for bit the result of one. Rank 0 writes the files."""

from __future__ import annotations


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env(device: str = "cpu") -> bool:
    """Join the torchrun process group when WORLD_SIZE > 1 and none exists (nccl for a CUDA device,
    gloo otherwise)."""
    import os

    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    if torch.cuda.is_available() and device.startswith("cuda"):
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return True


def all_gather(obj) -> list:
    """Every rank's obj, in rank order (a one-element list without a process group)."""
    import torch.distributed as dist

    rank, world = rank_and_world()
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    import torch.distributed as dist

    if rank_and_world()[1] > 1:
        dist.barrier()


def shutdown() -> None:
    """Leave the process group (at the end of a command that joined it)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
