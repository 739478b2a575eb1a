"""Benchmark: the training data loader of each of the nine models against the GPU it feeds.

Not a test (pytest does not collect it). Writes a stand-in pyramidal JPEG slide (SIZE px, 240 px
tiles, smooth H&E-coloured waves; deleted at the end), then for each (stage, level) of the preset
times the loader's samples on one core (one thread, as in a loader worker) and prints img/s per
core beside the GPU's demand and the loader cores one GPU needs:

    python tests/bench_data.py --preset paper [--size 8192] [--n 30] [--positions grid|area]

The GPU's demand is arithmetic, not measured: an A100 at 40 % of 312 TFLOP/s (bf16) spends
3 x the forward FLOPs (tests/bench_flops.py's count) on one training image. The stand-in slide is
smaller than the paper's 41344 px area, so each slide's area is the whole stand-in (stages 1-2
are built from it exactly as at paper scale), and a stage-3 target, which at paper scale is a
1024 px window of level 0, is read as such a window of the stand-in's level 0 (the position
wrapped into it): the same JPEG decoding, the same pipeline after it. With positions 'grid' the
stage-2 targets and stage-3 contexts are read from the slide too: 1310 px squares of the stand-in's
level 0 here, 1654 px squares of a 4x level at paper scale (1.6 x the pixels to decode).
"""
import argparse
import dataclasses
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
import cascade  # noqa: E402
import data  # noqa: E402
from bench_flops import flops  # noqa: E402
from operations import aperio  # noqa: E402

A100_BF16 = 312e12  # FLOP/s, dense bf16
MFU = 0.4           # the share of it a training step achieves (our assumption)


def make_slide(path, size, tile=240):
    """A size x size JPEG Aperio slide of smooth H&E-coloured waves with fine texture."""
    img, rng = np.empty((size, size, 3), np.uint8), np.random.default_rng(0)
    xx = np.arange(size, dtype=np.float32)[None]
    for r0 in range(0, size, 512):
        yy = np.arange(r0, min(r0 + 512, size), dtype=np.float32)[:, None]
        t = 0.5 + 0.25 * np.sin(yy / 37.0) * np.cos(xx / 23.0) + 0.25 * np.sin((yy + xx) / 301.0)
        t = np.clip(t + rng.normal(0, 0.05, t.shape), 0, 1)[..., None]
        img[r0:r0 + len(yy)] = (1 - t) * [230, 150, 200] + t * [110, 50, 140]
    aperio.write_aperio(path, img, tile=tile, compression="jpeg", mpp=0.25)


class Level0Windows:
    """The stand-in slide with stage-3 reads made level-0 window reads (see the docstring)."""

    def __init__(self, slide):
        self.slide, self.size = slide, slide.dimensions[0]

    def __getattr__(self, name):
        return getattr(self.slide, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.slide.close()

    def read_region(self, x, y, w, h, downsample=1.0):
        if downsample >= 1:
            return self.slide.read_region(x, y, w, h, downsample)
        span = self.size - w
        return self.slide.read_region(int(x / downsample) % span, int(y / downsample) % span,
                                      w, h, 1.0)


def time_model(ds, n):
    """Samples per CPU-second of one thread, after two warm-up samples."""
    ds[0], ds[1]
    t0 = time.process_time()
    for idx in range(2, 2 + n):
        ds[idx]
    return n / (time.process_time() - t0)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--size", type=int, default=8192, help="stand-in slide side (px)")
    ap.add_argument("--n", type=int, default=30, help="samples timed per model")
    ap.add_argument("--dir", default=None, help="where the stand-in slide and caches go (temp)")
    ap.add_argument("--positions", default=None, choices=["grid", "area"],
                    help="stage 2-3 training positions (default: the preset's)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    p = cascade.get_preset(args.preset)
    if args.positions:
        p = dataclasses.replace(p, training=dataclasses.replace(p.training,
                                                                positions=args.positions))
    work = tempfile.mkdtemp(dir=args.dir)
    try:
        path = os.path.join(work, "standin.svs")
        t0 = time.time()
        make_slide(path, args.size)
        print(f"stand-in slide {args.size} px, {os.path.getsize(path) / 1e6:.0f} MB, written in "
              f"{time.time() - t0:.0f} s; {args.n} samples per model on one thread; positions "
              f"{p.training.positions}")
        real_open = data.open_slide
        data.open_slide = lambda f: Level0Windows(real_open(f))
        gpu = A100_BF16 * MFU
        print("| model | input px | img/s per core | GPU demand img/s | loader cores per GPU |")
        print("|---|---|---|---|---|")
        worst = 0.0
        for stage in (1, 2, 3):
            for level in range(3):
                ds = data.StageLevelDataset([path], p, stage, level, area_size=args.size,
                                            cache_dir=os.path.join(work, "cache"), length=10 ** 6)
                rate = time_model(ds, args.n)
                L = p.level_sizes[level]
                size = min(L, p.training.crop) if level == 2 else L
                demand = gpu / (3 * flops(cascade.unet_config(p, stage, level), size))
                cores = demand / rate
                worst = max(worst, cores)
                print(f"| stage {stage} level {level} | {size} | {rate:.1f} | {demand:.0f} | "
                      f"{cores:.2f} |", flush=True)
        print(f"most loader cores per GPU: {worst:.2f} (goal <= 3: "
              f"{'met' if worst <= 3 else 'NOT met'})")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
