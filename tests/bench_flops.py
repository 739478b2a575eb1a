"""FLOP counts of the paper's three U-Nets (forward, one image) and of a whole slide.

Not a test. Counted with torch.utils.flop_counter on the meta device (no memory, no compute).
    python tests/bench_flops.py [--preset paper]
"""
import argparse
import os
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cascade  # noqa: E402
import unet  # noqa: E402


def human(f):
    for unit, scale in (("EFLOP", 1e18), ("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9)):
        if f >= scale:
            return f"{f / scale:.2f} {unit}"
    return f"{f / 1e6:.2f} MFLOP"


def forward_flops(cfg, size):
    with torch.device("meta"):
        net = unet.UNet(cfg)
        x = torch.zeros(1, 3, size, size)
        cond = torch.zeros(1, cfg.cond_ch, size, size) if cfg.cond_ch else None
        lam = torch.zeros(1)
        with FlopCounterMode(display=False) as fc:
            net(x, lam, cond, lam)
    return fc.get_total_flops()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--steps", type=int, nargs=3, default=None, help="steps per level (default: the preset's)")
    args = ap.parse_args()
    p = cascade.get_preset(args.preset)
    steps = args.steps or p.sampling.steps
    total = 0.0
    for s in (1, 2, 3):
        n = p.n_patches[s - 1] ** 2
        per_patch = 0.0
        for level, L in enumerate(p.level_sizes):
            f = forward_flops(cascade.unet_config(p, s, level), L)
            per_patch += f * steps[level]
            if s == 3:
                train = forward_flops(cascade.unet_config(p, s, level), p.training.crop if level == 2 else L) * 3
                print(f"  level {level} ({L} px): {human(f)} per forward; training step per image "
                      f"(fwd+bwd ~ 3x fwd{', on ' + str(p.training.crop) + ' crops' if level == 2 else ''}): {human(train)}")
        total += n * per_patch
        print(f"stage {s}: {n} patches x {human(per_patch)} = {human(n * per_patch)}")
    print(f"whole slide at steps {steps}: {total:.2e} FLOP; on 9 A100s (312 TFLOP/s bf16) at 40 % MFU: "
          f"{total / (9 * 312e12 * 0.4) / 3600:.1f} h")


if __name__ == "__main__":
    main()
