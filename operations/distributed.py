"""Processes: torchrun or plain python, the device, bf16 where it is native, and the few
collectives a sampling run needs (rank 0 reads and writes; the others only compute)."""
import os
import sys

import torch
import torch.distributed as dist

PRECISION_HELP = ("U-Net arithmetic: auto = bf16 autocast where the device computes bf16 natively "
                  "(CUDA GPUs; CPUs with AMX or AVX512-BF16), fp32 elsewhere; GroupNorm and the "
                  "loss stay fp32")


def init_distributed(device_arg=None):
    """torchrun or plain python [nanoGPT]: returns (ddp, rank, world, device). Under torchrun the
    process group uses nccl on GPU and gloo on CPU; device_arg: 'cuda', 'cpu' or None (auto)."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    rank, world, local = 0, 1, 0
    cuda = torch.cuda.is_available() and device_arg != "cpu"
    if ddp and cuda and int(os.environ.get("LOCAL_RANK", 0)) >= torch.cuda.device_count():
        raise SystemExit(f"error: {os.environ.get('LOCAL_WORLD_SIZE', 'more')} processes on a "
                         f"machine with {torch.cuda.device_count()} GPUs: pass --nproc_per_node "
                         f"{torch.cuda.device_count()} or fewer, and add machines with torchrun "
                         "--nnodes for more ranks (or --device cpu)")
    if ddp:
        dist.init_process_group(backend="nccl" if cuda else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local}" if cuda else (device_arg or "cpu"))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return ddp, rank, world, device


def native_bf16(device):
    """Whether bf16 autocast is fast here: CUDA, or a CPU with bf16 units (AVX512-BF16 / AMX)."""
    if device.type == "cuda":
        return True
    return (device.type == "cpu" and torch.backends.mkldnn.is_available()
            and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def use_bf16(precision, device):
    """--precision (auto, fp32, bf16) on `device`: the one meaning of auto (PRECISION_HELP) in
    sample.py, train.py and train.py --memory (which plans for a GPU: bf16)."""
    return precision == "bf16" or (precision == "auto" and native_bf16(device))


def barrier(world):
    if world > 1:
        dist.barrier()


def broadcast(obj, world):
    """Rank 0's `obj` on every rank."""
    if world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_rank0(check, rank, world):
    """check() run on rank 0 alone (it reads files the other ranks need not see), its outcome on
    every rank: its return value, or the one-line error (flags.fail's SystemExit) it ended with,
    which then ends every rank alike, so that no rank waits for one that has left."""
    outcome = None
    if rank == 0:
        try:
            outcome = ("ok", check())
        except SystemExit as e:
            outcome = ("exit", e.code)
    kind, value = broadcast(outcome, world)
    if kind == "exit":
        sys.exit(value)
    return value


def scatter_batches(rnd, lows, read, rank, world):
    """This rank's batches of a round as transfer.RawBatch: every world-th batch, read by rank 0
    (read(cells, low), low: the batch's inputs from the stage below, already read) and scattered
    (read lazily in one process)."""
    if world == 1:
        return (read(b, low) for b, low in zip(rnd, lows))
    mine = [None]
    shares = ([[read(b, low) for b, low in zip(rnd[r::world], lows[r::world])]
               for r in range(world)] if rank == 0 else None)
    dist.scatter_object_list(mine, shares, src=0)
    return mine[0]


def gather(items, rank, world):
    """Every rank's list of items, concatenated on rank 0 (None elsewhere)."""
    if world == 1:
        return items
    parts = [None] * world if rank == 0 else None
    dist.gather_object(items, parts, dst=0)
    return [r for part in parts for r in part] if rank == 0 else None
