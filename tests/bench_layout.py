"""Benchmark: U-Net layouts and training recipes at equal compute, at demo scale.

Not a test. Each variant trains one demo model (a stage, a level) on the bundled slide for the
same CPU seconds, from the same initial seed and data order; then its EMA model is scored on
held-out crops (dataset items 10^9 + k) by the unweighted v-MSE at a fixed grid of t with fixed
noise and the sampling-time conditioning augmentation. Lower is better.
    python tests/bench_layout.py [--seconds 300] [--stage 3] [--levels 1 2]          # the two
    layouts python tests/bench_layout.py --stage 2 --levels 2 --variants adm eff eff_w48 eff_lr1e-3
    eff_snr5
A variant's name lists its changes from the demo's v1 recipe (ADM layout, width 32, lr 5e-4,
no min-SNR): 'eff' = efficient layout, 'w48' = width 48, 'lr1e-3', 'snr5' = min-SNR gamma 5.
"""
import argparse
import copy
import dataclasses
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import cascade  # noqa: E402
import data  # noqa: E402
import sde  # noqa: E402
import unet  # noqa: E402
from operations import costs  # noqa: E402

SLIDE = os.path.join(ROOT, "tests", "data", "cmu_small_region.svs")


@torch.no_grad()
def validation_loss(net, p, stage, level, items,
                    t_grid=torch.linspace(0.05, 0.95, 10, dtype=torch.float64)):
    x0 = torch.stack([it["x0"] for it in items])
    cond = torch.stack([it["cond"] for it in items])
    g = torch.Generator().manual_seed(1234)
    cond, aug_lam = cascade.augment(p, stage, level, cond, p.sampling.aug_level, g)
    fn = cascade.denoiser(net, p.schedules[level], cond, aug_lam)
    total = 0.0
    for t in t_grid:
        tt = t.expand(len(items))
        eps = torch.randn(x0.shape, generator=g)
        alpha, sigma = sde.alpha_sigma(tt, p.schedules[level])
        x_t = sde.q_sample(x0, tt, eps, p.schedules[level])
        total += float(((fn(x_t, tt.float()) - sde.v_target(x0, eps, alpha, sigma)) ** 2).mean())
    return total / len(t_grid)


def train_for(cfg, p, stage, level, ds, seconds, batch, lr=5e-4,
              ema_decay=0.995, min_snr_gamma=None):
    torch.manual_seed(0)
    net = unet.build(cfg).to(memory_format=torch.channels_last)
    ema = copy.deepcopy(net).requires_grad_(False).eval()
    opt = torch.optim.Adam(net.parameters(), lr=lr, betas=(0.9, 0.99))
    step, t0 = 0, time.process_time()
    while time.process_time() - t0 < seconds:  # CPU seconds: fair under a noisy machine
        items = [ds[step * batch + b] for b in range(batch)]
        x0 = torch.stack([it["x0"] for it in items])
        cond = torch.stack([it["cond"] for it in items])
        g = torch.Generator().manual_seed(step)
        lo, hi = p.training.aug_train
        cond, aug_lam = cascade.augment(p, stage, level, cond,
                                        lo + (hi - lo) * sde.rand(batch, g), g)
        losses, _ = sde.loss_fn(cascade.denoiser(net, p.schedules[level], cond, aug_lam), x0,
                                schedule=p.schedules[level],
                                min_snr_gamma=min_snr_gamma, generator=g)
        opt.zero_grad(set_to_none=True)
        losses.mean().backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for e, w in zip(ema.parameters(), net.parameters()):
                e.lerp_(w, 1 - min(ema_decay, (1 + step) / (10 + step)))
        step += 1
    return ema, step


def parse_variant(name):
    """'eff_w48_lr1e-3_snr5' -> (config overrides, training overrides)."""
    cfg, train = {"efficient": False}, {}
    for part in name.split("_"):
        if part == "eff":
            cfg["efficient"] = True
        elif part.startswith("w") and part[1:].isdigit():
            cfg["width"] = int(part[1:])
        elif part.startswith("lr"):
            train["lr"] = float(part[2:])
        elif part.startswith("snr"):
            train["min_snr_gamma"] = float(part[3:])
        elif part != "adm":
            raise SystemExit(f"error: --variants {name}: unknown part {part!r} (adm, eff, wN, lrX, "
                             "snrX)")
    return cfg, train


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=300, help="CPU seconds of training per model")
    ap.add_argument("--stage", type=int, default=3, choices=[1, 2, 3])
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--variants", nargs="+", default=["adm", "eff"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--cache", default="runs/layout_cache")
    args = ap.parse_args()
    p = cascade.get_preset("demo")
    print(f"demo stage {args.stage}, {args.seconds:.0f} CPU s per model, batch {args.batch}, "
          f"{torch.get_num_threads()} threads")
    for level in args.levels:
        ds = data.StageLevelDataset([SLIDE], p, args.stage, level,
                                    cache_dir=args.cache, length=2 ** 62)
        held_out = [ds[10 ** 9 + k] for k in range(32)]
        for name in args.variants:
            cfg_over, train_over = parse_variant(name)
            cfg = dataclasses.replace(cascade.unet_config(p, args.stage, level), **cfg_over)
            ema, steps = train_for(cfg, p, args.stage, level, ds, args.seconds,
                                   args.batch, **train_over)
            loss = validation_loss(ema, p, args.stage, level, held_out)
            print(f"  level {level} {name:14s}: {costs.count_params(cfg) / 1e6:.2f} M params, "
                  f"{steps} steps, validation v-MSE {loss:.4f}", flush=True)


if __name__ == "__main__":
    main()
