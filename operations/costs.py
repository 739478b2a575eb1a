"""Costs without running anything: U-Net parameters and FLOPs (counted on the meta device), a
slide's sampling time on N GPUs (sample.py --estimate) and each model's training memory per GPU
(train.py --memory). Times are arithmetic from FLOPs at a stated share of a GPU's peak."""
import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

import cascade
import sde
import tiler
import unet as unet_mod
from operations import checkpoints, distributed, settings, windows

# Rank 0's file work that a round waits for, per patch of the round (known pixels read and sent,
# floats made, the round saved and written: tests/bench_sample.py --io, 1.15 s for a 23-patch paper
# round on a 2-core CPU); the rest of its file work runs beside the GPUs (reader, writer threads).
HOST_S_PER_PATCH = 0.05


def count_params(cfg):
    """Parameter count of a U-Net config, built on the meta device (no memory)."""
    with torch.device("meta"):
        return sum(p.numel() for p in unet_mod.build(cfg).parameters())


def flops(cfg, size, backward=False):
    """FLOP of one image through `cfg` at size x size, forward (or forward + backward), counted by
    torch.utils.flop_counter on the meta device (no memory, no compute)."""
    with torch.device("meta"):
        net = unet_mod.build(cfg)
        x = torch.zeros(1, 3, size, size, requires_grad=backward)
        cond = torch.zeros(1, cfg.cond_ch, size, size) if cfg.cond_ch else None
        lam = torch.zeros(1)
        with FlopCounterMode(display=False) as fc:
            out = net(x, lam, cond, lam)
            if backward:
                out.sum().backward()
    return fc.get_total_flops()


# ---------------------------------------------------------------------- sampling: --estimate

def level_calls(sampling, stage, level):
    """U-Net calls of one level's sampling: its steps, each but the last run `resample` times
    (RePaint, sde.sample_general)."""
    return (sampling.level_steps(stage, level) - 1) * sampling.resample + 1


def patch_flops(preset, sampling, stage):
    """FLOP of one patch of `stage`: its three levels at their sizes and U-Net calls."""
    return sum(flops(cascade.unet_config(preset, stage, lvl), L) * level_calls(sampling, stage, lvl)
               for lvl, L in enumerate(preset.level_sizes))


def rank_loads(work, world):
    """For each round of a plan (tiler.plan), the patches on its busiest rank when each rank takes
    every world-th batch (as a sampling run shares a round): the round's length in patch times."""
    return [max(sum(map(len, rnd[r::world])) for r in range(world)) for rnd in work]


def stage_costs(preset, sampling, order, batch, world, need=None):
    """Per stage (1, 2, 3): (patches, rounds, share of rank time busy, FLOP, FLOP a patch, rank
    time in patch-times) when `world` ranks share each round; need: {stage: cells} (windows)."""
    rows = []
    for s in (1, 2, 3):
        n, cells = preset.n_patches[s - 1], (need or {}).get(s)
        skip = [] if cells is None else [(i, j) for i in range(n) for j in range(n)
                                         if (i, j) not in cells]
        loads = rank_loads(tiler.plan(order, n, batch, skip, world), world) if s > 1 else [1]
        k, flop = n * n - len(skip), patch_flops(preset, sampling, s)
        rows.append((k, len(loads), k / (world * max(sum(loads), 1)), k * flop, flop, sum(loads)))
    return rows


def estimate(args):
    """--estimate: per stage the patches, rounds, rank utilisation, FLOPs and wall time on --gpus
    GPUs at --mfu of --tflops, with rank 0's measured file work; arithmetic, no model loaded.
    With --window / --patches: what those windows cost (--patches: uniform random positions, as
    the tissue is not known before stage 2)."""
    p = settings.get_preset(args.preset)
    ckpt = args.ckpt or (checkpoints.DEMO_CKPT if p.name == "demo" else None)
    students = checkpoints.distilled_in(ckpt, p) if ckpt else {}  # their own step counts
    sp, W = settings.resolve_sampling(args, p, students), args.gpus
    if students and args.steps is None and args.sampler is None:
        print(f"distilled students in {ckpt}: steps per stage and level {list(sp.steps)}")
    batch = args.batch or settings.default_batch(p)
    rate = args.tflops * 1e12 * args.mfu  # FLOP/s of one GPU
    wins, size = settings.check_window_flags(args, p, 3)
    if args.patches:
        rng = np.random.default_rng(sde.derive_seed("windows", args.seed))
        xy = rng.integers(0, cascade.stage_size(p, 3) - size + 1, (args.patches, 2))
        wins = [(int(x), int(y), size, size) for x, y in xy]
    need = windows.needed_cells(p, sp.order, sp.edge_margin, wins, below=2 if args.patches else 1,
                                batch=batch)
    print(f"{p.name}: order {sp.order}, batch {batch}, {W} GPUs at {args.mfu:.0%} of "
          f"{args.tflops:g} TFLOP/s; every patch generated (glass filled instead only shortens it)"
          + (f"; {len(wins)} windows" if wins else ""))
    print("stage  patches  rounds  ranks busy    PFLOP  s a patch   wall h")
    rows = stage_costs(p, sp, sp.order, batch, W, need)
    total_s = 0.0
    for s, (k, n_rounds, busy, flop, one, load) in enumerate(rows, 1):
        seconds = load * one / rate + (k * HOST_S_PER_PATCH if s > 1 else 0)
        total_s += seconds
        print(f"{s:5d} {k:8d} {n_rounds:7d} {busy:10.1%} {flop / 1e15:8.1f} {one / rate:10.1f} "
              f"{seconds / 3600:8.2f}")
    total = sum(r[3] for r in rows)
    whole = sum(r[3] for r in stage_costs(p, sp, sp.order, batch, W)) if wins else total
    print(f"slide {'':24s} {total / 1e15:8.1f} {'':10s} {total_s / 3600:8.2f}  "
          f"({total_s / 60:.0f} min" + (f"; {total / whole:.1%} of the whole slide's FLOPs)"
                                         if wins else ")"))
    print(f"host: {HOST_S_PER_PATCH} s a patch of rank 0's file work on the ranks' path "
          "(included); a step's host work (under 1 ms: tests/bench_sample.py) runs ahead of "
          "the GPU")


# ---------------------------------------------------------------------- training: --memory

class CudaAutocastPolicy(torch.overrides.TorchFunctionMode):
    """CUDA autocast's dtype policy where it cannot run (the meta device, a CPU): the inputs of
    convolutions, linear layers and attention become bf16 (weights through a cast, once a step);
    everything else runs in the dtype it gets (GroupNorm in fp32: unet.GroupNorm32)."""
    LOW = {torch.conv2d, torch.nn.functional.conv2d, torch.nn.functional.linear,
           torch.nn.functional.scaled_dot_product_attention, torch.matmul}

    def __init__(self, weights):
        super().__init__()
        self.weights, self.casts, self.keep = weights, set(), []  # parameters' storages, casts

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.LOW:
            def cast(t):
                if not (isinstance(t, torch.Tensor) and t.is_floating_point()):
                    return t
                out = t.to(torch.bfloat16)
                if _storage(t) in self.weights:  # kept alive: no later tensor reuses its address
                    self.casts.add(_storage(out))
                    self.keep.append(out)
                return out
            args = [cast(a) for a in args]
            kwargs = {k: cast(v) for k, v in kwargs.items()}
        return func(*args, **kwargs)


def _storage(t):
    return t.untyped_storage()._cdata


def saved_bytes(cfg, size, bf16=False):
    """(activations, weights) bytes autograd saves for the backward pass of one image through a
    U-Net at size x size, counted on the meta device: each saved storage once (views share one),
    the weights (and their bf16 casts, per step, not per image) apart; bf16: under CUDA
    autocast's policy (CudaAutocastPolicy)."""
    with torch.device("meta"):
        net = unet_mod.build(cfg)
        weights = {_storage(p) for p in net.parameters()}
        policy = CudaAutocastPolicy(weights)
        seen, acts, wts = set(), [0], [0]

        def pack(t):
            key = _storage(t)
            if key not in seen:
                seen.add(key)
                n = t.untyped_storage().nbytes()
                (wts if key in weights or key in policy.casts else acts)[0] += n
            return t
        cond = torch.zeros(1, cfg.cond_ch, size, size) if cfg.cond_ch else None
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            if bf16:
                with policy:
                    net(torch.zeros(1, 3, size, size), torch.zeros(1), cond, torch.zeros(1))
            else:
                net(torch.zeros(1, 3, size, size), torch.zeros(1), cond, torch.zeros(1))
    return acts[0], wts[0]


def memory_rows(preset, models, batch, bf16, gpu_gib, crop=None):
    """Per model: parameters, the bytes of weights + gradients + Adam + EMA (16 B + 4 B a
    parameter, fp32), activations per image (saved_bytes), the peak per GPU at `batch` and
    whether it fits `gpu_gib`, and the largest batch that does. The peak is an estimate: states +
    batch x activations + the saved weights' casts, with 10 % for the allocator and workspace."""
    rows = []
    for s, lvl in models:
        cfg = cascade.unet_config(preset, s, lvl)
        L = preset.level_sizes[lvl]
        size = min(L, crop or preset.training.crop) if lvl == len(preset.level_sizes) - 1 else L
        n = count_params(cfg)
        states = 20 * n  # fp32 weights, gradients, Adam's two moments, EMA
        act, wts = saved_bytes(cfg, size, bf16)
        peak = lambda b: 1.1 * (states + wts + b * act)
        fit = max(0, int((gpu_gib * 2 ** 30 / 1.1 - states - wts) // act))
        rows.append(dict(stage=s, level=lvl, size=size, params=n, states=states, act=act,
                         peak=peak(batch), fits=peak(batch) <= gpu_gib * 2 ** 30, max_batch=fit))
    return rows


def print_memory(args):
    """train.py --memory: each model's memory per GPU, one line each (auto precision: bf16, as on
    any GPU)."""
    preset, models = settings.train_preset(args), settings.models_to_train(args)
    bf16 = distributed.use_bf16(args.precision, torch.device("cuda"))
    print(f"memory per GPU, preset {preset.name}, batch {args.batch} per GPU, "
          f"{'bf16 autocast' if bf16 else 'fp32'}, {args.gpu_mem:g} GiB a GPU:")
    for r in memory_rows(preset, models, args.batch, bf16, args.gpu_mem, args.crop):
        print(f"  stage {r['stage']} level {r['level']} at {r['size']} px: "
              f"{r['params'] / 1e6:.1f} M params, states {r['states'] / 2 ** 30:.1f} GiB, "
              f"activations {r['act'] / 2 ** 30:.2f} GiB an image -> peak "
              f"{r['peak'] / 2 ** 30:.1f} GiB: {'fits' if r['fits'] else 'does NOT fit'}"
              + ("" if r["fits"] else f"; use --batch {r['max_batch']} or less" if r["max_batch"]
                 else "; not even at batch 1: a GPU with more memory, or a smaller --crop")
              + f" (largest batch that fits: {r['max_batch']})")
