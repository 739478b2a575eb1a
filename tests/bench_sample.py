"""Benchmark: the host's share of sampling at paper geometry. Not a test (pytest skips it).

    python tests/bench_sample.py                    # host time per 1024 px patch-step
    python tests/bench_sample.py --dry-run --out /tmp/paper_dry.tif [--order wavefront --batch 1]

Default: a stage-3 CDM of the preset whose three networks cost nothing (they return their input)
runs on the 'meta' device, where tensors have shapes but no data: every op of the sampler is
dispatched, none computes. Its time per step is what the host spends to issue a step: with the
noise drawn on the device and no sync in the loop (tests/test_cascade.py checks both) the host runs
ahead of the GPU, so this is the most the host can add to a step, and only if it were slower
than the GPU. Printed beside it: ops per step and, for the earlier host-side route, the time to draw
one 1024 px patch's noise from a CPU generator (twice per step, then a blocking copy).

--io: rank 0's file work per stage-3 round at paper geometry (a sparse 41344^2 canvas, a stand-in
6400^2 stage 2 of tissue), split into what the next round waits for and what runs beside it.

--dry-run: the whole slide with sample.py's cheap stand-in models (geometry, reads, journal,
writes); prints wall time, peak RSS and the time per patch spent outside the model.
"""
import argparse
import dataclasses
import math
import os
import resource
import subprocess
import sys
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import cascade  # noqa: E402
import tiler  # noqa: E402
from operations import aperio, journal, settings, transfer  # noqa: E402

GPU_MS_PER_STEP = 96.8  # the paper1024 U-Net's forward at 1024 px on an A100 at 40 % of 312 TFLOP/s


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def host_per_step(preset, steps, device, repeats=3):
    """(ms per step, ops per step) of each level of a stage-3 patch on `device` with zero-cost nets:
    the difference between `steps` and 2 * `steps` steps, so a level's setup is left out."""
    zero = lambda x, lam, cond=None, aug_lam=None: x
    cdm = cascade.CDM(preset, 3, [zero] * 3, device=device)
    P = preset.patch
    z = torch.zeros(1, 3, P, P, device=device)
    mask = torch.zeros(1, 1, P, P, dtype=torch.bool, device=device)

    def run(n):
        sp = dataclasses.replace(preset.sampling, steps=tuple(n if lvl == k else 1 for k in
                                                              range(3)))
        gens = [tiler.patch_generator(0, 3, 0, 0, device)]
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            cdm.sample(gens, known=z, mask=mask, context=z, region=z, sampling=sp)
            best = min(best, time.perf_counter() - t0)
        with CountOps() as c:
            cdm.sample(gens, known=z, mask=mask, context=z, region=z, sampling=sp)
        return best, c.n

    out = []
    for lvl in range(3):
        (t1, n1), (t2, n2) = run(steps), run(2 * steps)
        out.append(((t2 - t1) / steps * 1e3, (n2 - n1) / steps))
    return out


def cpu_noise_ms(P, repeats=5):
    g = torch.Generator().manual_seed(0)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.randn(1, 3, P, P, generator=g)
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def host_bench(args):
    p = cascade.get_preset(args.preset)
    torch.set_num_threads(1)
    print(f"preset {p.name}, sampler {p.sampling.sampler}, threshold {p.sampling.threshold}, "
          f"feather {p.sampling.feather} px; a stage-3 patch with inpainting, one thread")
    # The same ops on tiny tensors on the CPU: per op the host pays the dispatcher and a kernel
    # on a few hundred numbers, about what a CUDA launch costs it; 'meta' runs many ops as Python
    # reference code (an upper bound).
    tiny = dataclasses.replace(p, patch=32, level_sizes=(8, 16, 32))
    cpu, meta = host_per_step(tiny, args.steps, "cpu"), host_per_step(p, args.steps, "meta")
    for lvl, ((ms, ops), (ms_meta, _)) in enumerate(zip(cpu, meta)):
        print(f"  level {lvl} ({p.level_sizes[lvl]} px): {ops:.0f} ops per step; host {ms:.2f} ms "
              f"per step on tiny CPU tensors, {ms_meta:.2f} ms on 'meta' at "
              f"{p.level_sizes[lvl]} px")
    top_ms, top_ops = cpu[2][0], cpu[2][1]
    print(f"  assumed CUDA launch cost 5 us an op: {top_ops * 5e-3:.2f} ms more per top-level step")
    top_ms += top_ops * 5e-3
    noise = cpu_noise_ms(p.patch)
    print(f"host per {p.patch} px patch-step, launches included: {top_ms:.2f} ms (goal <= 4.5 "
          "ms = 5 % of "
          f"{GPU_MS_PER_STEP} ms of GPU: {'met' if top_ms <= 4.5 else 'NOT met'})")
    print(f"before (noise from CPU generators): {noise:.1f} ms per draw of one {p.patch} px "
          f"patch's noise, 2 draws per step = {2 * noise:.1f} ms, plus the blocking copies")


def io_bench(args, n_round=23):
    """Seconds of rank 0's file work for one wavefront round of `n_round` stage-3 patches."""
    import pickle

    import numpy as np

    import data
    import sample
    p = cascade.get_preset(args.preset)
    grid, work = cascade.stage_grid(p, 3, p.sampling.edge_margin), args.out + ".io"
    os.makedirs(work, exist_ok=True)
    try:
        N2, rng = cascade.stage_size(p, 2), np.random.default_rng(0)
        stage2 = aperio.DiskArray(os.path.join(work, "stage2.npy"), (N2, N2, 3))
        for r0 in range(0, N2, 640):  # pink tissue with texture: every patch is generated
            band = rng.integers(0, 40, (min(640, N2 - r0), N2, 3), dtype=np.uint8)
            stage2.write(r0, 0, band + np.array([190, 90, 160], np.uint8))
        canvas = aperio.DiskArray(os.path.join(work, "stage3.npy"), (grid.size, grid.size, 3))
        lower = tiler.Lower(stage2, cascade.zoom(p, 3), p.background)
        white = tiler.WhiteTest(0.5, data.tissue_fraction)
        cells = [(i, n_round - 1 - i) for i in range(n_round)]  # one anti-diagonal: a round
        run, _ = settings.resolve(sample.parse_args(["--preset", p.name, "--dry-run", "--out",
                                                   args.out]), torch.device("cpu"))
        log = journal.Journal(work, run)
        t = {}
        t0 = time.perf_counter()
        low = [transfer.lower_inputs(grid, [c], lower, white) for c in cells]
        t["lower stage: context, region, white test"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        raws = [transfer.read_batch(grid, canvas, [c], lower=lower, below=lo)
                for c, lo in zip(cells, low)]
        t["known pixels from the canvas"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        sent = len(pickle.dumps(raws))  # what scatter_object_list does to them
        t["inputs pickled for the ranks"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        transfer.float_inputs(grid, raws[0], "wavefront")
        t["one patch's floats, on its rank (x ranks' share)"] = (
            (time.perf_counter() - t0) * math.ceil(n_round / args.gpus))
        results = [(c, rng.integers(0, 255, (p.patch, p.patch, 3), dtype=np.uint8), False)
                   for c in cells]
        t0 = time.perf_counter()
        log.stage_round(3, results)
        t["round saved whole (round.npz, fsync)"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        journal.write_round(canvas, grid, results)
        t["round into the canvas"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        canvas.flush()
        log.mark(3, results, 0.0)
        t["canvas synced, journal marked"] = time.perf_counter() - t0
    finally:
        import shutil
        shutil.rmtree(work, ignore_errors=True)
    waits = ("known pixels from the canvas", "inputs pickled for the ranks",
             "one patch's floats, on its rank (x ranks' share)",
             "round saved whole (round.npz, fsync)",
             "round into the canvas")
    print(f"rank 0's file work for a round of {n_round} stage-3 patches ({p.name}, {args.gpus} "
          "ranks at batch 1):")
    for k, v in t.items():
        print(f"  {k:50s} {v:6.2f} s  {'next round waits' if k in waits else 'beside compute'}")
    before, after = sum(t.values()), sum(t[k] for k in waits)
    print(f"on the ranks' path per round: {after:.2f} s ({after / n_round:.3f} s a patch; all "
          "of it "
          f"in line would be {before:.2f} s); {sent / 2 ** 20:.0f} MiB sent to the ranks")


def dry_run(args):
    cmd = [sys.executable, os.path.join(ROOT, "sample.py"), "--preset", args.preset, "--dry-run",
           "--out", args.out, "--order", args.order, "--batch", str(args.batch), "--overwrite"]
    t0 = time.time()
    res = subprocess.run(cmd, stderr=subprocess.PIPE, text=True)
    wall = time.time() - t0
    summary = [l for l in res.stderr.splitlines() if l.startswith(("wrote", "  "))]
    print("\n".join(summary) if res.returncode == 0 else res.stderr[-3000:])
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2 ** 20  # KiB -> GiB
    print(f"wall time {wall / 60:.1f} min, peak RSS {peak:.2f} GiB ({args.preset}, {args.order}, "
          f"batch {args.batch})")
    if not args.keep and os.path.exists(args.out):
        os.remove(args.out)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--steps", type=int, default=20, help="steps timed per level (host bench)")
    ap.add_argument("--io", action="store_true", help="rank 0's file work per round")
    ap.add_argument("--gpus", type=int, default=8, help="ranks sharing a round (--io)")
    ap.add_argument("--dry-run", action="store_true", help="the whole slide, stand-in models")
    ap.add_argument("--out", default="/tmp/paper_dry.tif")
    ap.add_argument("--order", default="wavefront")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--keep", action="store_true",
                    help="keep the 41344^2 output (several hundred MB)")
    args = ap.parse_args()
    dry_run(args) if args.dry_run else io_bench(args) if args.io else host_bench(args)


if __name__ == "__main__":
    main()
