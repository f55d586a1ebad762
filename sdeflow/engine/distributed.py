"""torch.distributed in four small functions: the same code runs on one process without it.

Under ``torchrun`` (``WORLD_SIZE`` > 1) :func:`init_distributed` starts the process group (NCCL on
CUDA, one GPU per local rank; gloo on the CPU). Every helper degrades to the identity on one process.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

__all__ = ["world_info", "init_distributed", "all_reduce", "all_gather_objects", "broadcast_flag", "broadcast_int",
           "check_batch_divides"]


def world_info() -> tuple[int, int]:
    """(rank, world size): (0, 1) without torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device: str = "cpu") -> tuple[int, int, torch.device]:
    """Start torch.distributed when launched by torchrun (WORLD_SIZE > 1): NCCL on CUDA (one GPU per
    local rank), gloo on the CPU. Returns (rank, world size, device of this rank)."""
    device = torch.device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and dist.is_available() and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda" and world > 1:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    rank, world = world_info()
    return rank, world, device


def all_reduce(values: torch.Tensor, op=None) -> torch.Tensor:
    """In-place sum (or ``op``) over ranks; the identity on one process."""
    if world_info()[1] > 1:
        dist.all_reduce(values, op=op or dist.ReduceOp.SUM)
    return values


def all_gather_objects(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...]; [obj] on one process."""
    rank, world = world_info()
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def broadcast_flag(flag: bool, device) -> bool:
    """Rank 0's ``flag`` on every rank, so that all ranks take the same branch."""
    if world_info()[1] == 1:
        return bool(flag)
    value = torch.tensor([float(flag)], device=device)
    dist.broadcast(value, 0)
    return bool(value.item())


def broadcast_int(value: int, device) -> int:
    """Rank 0's integer ``value`` on every rank."""
    if world_info()[1] == 1:
        return int(value)
    tensor = torch.tensor([int(value)], dtype=torch.int64, device=device)
    dist.broadcast(tensor, 0)
    return int(tensor.item())


def check_batch_divides(batch_size: int, world: int) -> int:
    """The per-process batch size ``batch_size // world``; ValueError naming batch_size unless the
    global batch divides evenly across the ``world`` processes."""
    if batch_size % world:
        raise ValueError(f"batch_size {batch_size} does not divide across {world} processes; "
                         f"use a multiple of {world}")
    return batch_size // world
