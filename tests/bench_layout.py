"""Benchmark: the two U-Net layouts at equal compute, at demo scale (stage 3, levels 1 and 2).

Not a test. Each layout (ADM-style, Imagen's efficient) trains the same model (demo widths) on the
bundled slide for the same CPU seconds, from the same initial seed and data order; then its EMA
model is scored on held-out crops (dataset items 10^9 + k) by the v-MSE at a fixed grid of t with
fixed noise and the sampling-time conditioning augmentation. Lower is better.
    python tests/bench_layout.py [--seconds 300] [--levels 1 2]
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

SLIDE = os.path.join(ROOT, "tests", "data", "cmu_small_region.svs")


@torch.no_grad()
def validation_loss(net, p, level, items, t_grid=torch.linspace(0.05, 0.95, 10, dtype=torch.float64)):
    x0 = torch.stack([it["x0"] for it in items])
    cond = torch.stack([it["cond"] for it in items])
    g = torch.Generator().manual_seed(1234)
    cond, aug_lam = cascade.augment(p, 3, level, cond, p.sampling.aug_level, g)
    fn = cascade.denoiser(net, p.schedules[level], cond, aug_lam)
    total = 0.0
    for t in t_grid:
        tt = t.expand(len(items))
        eps = torch.randn(x0.shape, generator=g)
        alpha, sigma = sde.alpha_sigma(tt, p.schedules[level])
        x_t = sde.q_sample(x0, tt, eps, p.schedules[level])
        total += float(((fn(x_t, tt.float()) - sde.v_target(x0, eps, alpha, sigma)) ** 2).mean())
    return total / len(t_grid)


def train_for(cfg, p, level, ds, seconds, batch, lr=5e-4, ema_decay=0.995):
    torch.manual_seed(0)
    net = unet.UNet(cfg).to(memory_format=torch.channels_last)
    ema = copy.deepcopy(net).requires_grad_(False).eval()
    opt = torch.optim.Adam(net.parameters(), lr=lr, betas=(0.9, 0.99))
    step, t0 = 0, time.process_time()
    while time.process_time() - t0 < seconds:  # CPU seconds: fair under a noisy machine
        items = [ds[step * batch + b] for b in range(batch)]
        x0 = torch.stack([it["x0"] for it in items])
        cond = torch.stack([it["cond"] for it in items])
        g = torch.Generator().manual_seed(step)
        lo, hi = p.training.aug_train
        cond, aug_lam = cascade.augment(p, 3, level, cond, lo + (hi - lo) * sde.rand(batch, g), g)
        losses, _ = sde.loss_fn(cascade.denoiser(net, p.schedules[level], cond, aug_lam), x0,
                                schedule=p.schedules[level], generator=g)
        opt.zero_grad(set_to_none=True)
        losses.mean().backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for e, w in zip(ema.parameters(), net.parameters()):
                e.lerp_(w, 1 - min(ema_decay, (1 + step) / (10 + step)))
        step += 1
    return ema, step


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=300, help="CPU seconds of training per model")
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--cache", default="runs/layout_cache")
    args = ap.parse_args()
    p = cascade.get_preset("demo")
    print(f"demo stage 3, {args.seconds:.0f} CPU s per model, batch {args.batch}, {torch.get_num_threads()} threads")
    for level in args.levels:
        ds = data.StageLevelDataset([SLIDE], p, 3, level, cache_dir=args.cache, length=2 ** 62)
        held_out = [ds[10 ** 9 + k] for k in range(32)]
        for efficient in (False, True):
            cfg = dataclasses.replace(cascade.unet_config(p, 3, level), efficient=efficient)
            ema, steps = train_for(cfg, p, level, ds, args.seconds, args.batch)
            loss = validation_loss(ema, p, level, held_out)
            print(f"  level {level} {'efficient' if efficient else 'ADM      '}: {unet.count_params(cfg) / 1e6:.2f} M "
                  f"params, {steps} steps, validation v-MSE {loss:.4f}", flush=True)


if __name__ == "__main__":
    main()
