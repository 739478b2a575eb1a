"""Benchmark: region-read throughput and memory of data.open_slide on a large synthetic slide.

Not a test (pytest does not collect it). Writes a SIZE x SIZE JPEG Aperio slide once (tiles
streamed from a memmap, so writing it needs little memory), then times random 1024 x 1024
reads at downsample 1 and 4 and reports the peak memory of one read (tracemalloc: numpy
buffers included).
    python tests/bench_data.py --size 40000 --dir /tmp
"""
import argparse
import os
import sys
import time
import tracemalloc

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import sample  # noqa: E402


def make_slide(path, size):
    mm_path = path + ".npy"
    img = np.lib.format.open_memmap(mm_path, mode="w+", dtype=np.uint8, shape=(size, size, 3))
    xx = np.arange(size)
    for r0 in range(0, size, 1024):
        yy = np.arange(r0, min(r0 + 1024, size))[:, None]
        t = (0.5 + 0.25 * np.sin(yy / 37.0) * np.cos(xx[None] / 23.0)
             + 0.25 * np.sin((yy + xx[None]) / 301.0))[..., None]
        img[r0:r0 + len(yy)] = ((1 - t) * [230, 150, 200] + t * [110, 50, 140]).astype(np.uint8)

    sample.write_aperio(path, img, compression="jpeg", mpp=0.25)
    del img
    os.remove(mm_path)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=40000, help="slide side in pixels")
    ap.add_argument("--dir", default="/tmp",
                    help="where the synthetic slide is written (kept for reuse)")
    ap.add_argument("--reads", type=int, default=10, help="reads per downsample")
    args = ap.parse_args()
    path = os.path.join(args.dir, f"bench_slide_{args.size}.svs")
    if not os.path.exists(path):
        t0 = time.perf_counter()
        make_slide(path, args.size)
        print(f"wrote {path} ({os.path.getsize(path) / 1e6:.0f} MB) in "
              f"{time.perf_counter() - t0:.1f} s")
    slide = data.open_slide(path)
    print(f"{path}: {slide.dimensions}, levels {[round(d, 2) for d in slide.level_downsamples]}")
    rng = np.random.default_rng(0)
    for ds in (1, 4):
        span = int(1024 * ds)
        t0 = time.perf_counter()
        for _ in range(args.reads):
            x, y = rng.integers(0, args.size - span, size=2)
            slide.read_region(int(x), int(y), 1024, 1024, ds)
        dt = (time.perf_counter() - t0) / args.reads
        print(f"  downsample {ds}: {dt * 1e3:7.1f} ms per 1024^2 read, "
              f"{1024 * 1024 / dt / 1e6:6.1f} output MP/s")
    tracemalloc.start()
    slide.read_region(args.size // 2, args.size // 2, 1024, 1024, 1.0)
    peak = tracemalloc.get_traced_memory()[1]
    print(f"  peak memory of one 1024^2 read at downsample 1: {peak / 2 ** 20:.1f} MiB (output "
          "itself: 3.0 MiB)")


if __name__ == "__main__":
    main()
