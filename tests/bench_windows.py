"""Benchmark: what windows cost (sample.py --window / --patches) against whole slides.

Not a test. Pure geometry and FLOP counts (windows.closure; costs.flops on the meta device): for
each preset and order, the patches of each stage that one window of P px depends on (over random
positions), and the share of a whole slide's FLOPs that one window, and k windows of one slide,
cost, at the preset's default --batch (a window runs its patches in the whole slide's batches:
exact pixels); 10k magnification-2 patches from 800 slides is the paper's evaluation set (12.5 a
slide).
    python tests/bench_windows.py [--presets demo paper] [--positions 200] [--k 1 13 100]
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cascade  # noqa: E402
from operations import costs, settings, windows  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["demo", "paper"])
    ap.add_argument("--orders", nargs="+", default=["checkerboard", "packed"])
    ap.add_argument("--positions", type=int, default=200, help="random draws per figure")
    ap.add_argument("--k", type=int, nargs="+", default=[1, 13, 100], help="windows a slide")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    print("| preset | order | windows a slide | patches stage 1 / 2 / 3 (mean) | whole slide | "
          "share of its FLOPs (mean, max) |")
    print("|---|---|---|---|---|---|")
    for name in args.presets:
        p = cascade.get_preset(name)
        sp, N3, P = p.sampling, cascade.stage_size(p, 3), p.patch
        flop = [costs.patch_flops(p, sp, s) for s in (1, 2, 3)]
        whole = sum(n * n * f for n, f in zip(p.n_patches, flop))
        for order in args.orders:
            for k in args.k:
                counts, shares = [], []
                for _ in range(args.positions if k < 50 else max(args.positions // 10, 5)):
                    xy = rng.integers(0, N3 - P + 1, (k, 2))
                    wins = [(int(x), int(y), P, P) for x, y in xy]
                    # k > 1: --patches (stage 2 whole); one window: --window (stage 2's closure)
                    need = windows.needed_cells(p, order, sp.edge_margin, wins,
                                                batch=settings.default_batch(p),
                                               below=2 if k > 1 else 1)
                    c = [len(need.get(s, range(p.n_patches[s - 1] ** 2))) for s in (1, 2, 3)]
                    c[0] = 1
                    counts.append(c)
                    shares.append(sum(n * f for n, f in zip(c, flop)) / whole)
                mean = np.mean(counts, 0)
                print(f"| {name} | {order} | {k} | {' / '.join(f'{v:.1f}' for v in mean)} | "
                      f"{' / '.join(str(n * n) for n in p.n_patches)} | "
                      f"{np.mean(shares):.1%}, {np.max(shares):.1%} |", flush=True)


if __name__ == "__main__":
    main()
