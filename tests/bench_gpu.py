"""Benchmark: training and sampling speed of the paper-scale models on a CUDA device.

Not a test (pytest does not collect it; tests/test_benchmarks.py runs it at tiny sizes on the CPU
so that it cannot rot). For each of stage 3's three U-Nets: training steps at bf16 with the
preset's crop and a batch (peak memory, images/s, achieved TFLOP/s), then the time of one forward
per level at sampling size; from these, the time of 200k training steps per model and of a whole
slide at the preset's step counts.
    python tests/bench_gpu.py [--preset paper] [--batch 8] [--iters 5]
    python tests/bench_gpu.py --tiny --device cpu          # the same code, tiny sizes
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cascade  # noqa: E402
import sde  # noqa: E402
import unet  # noqa: E402
from bench_flops import flops  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_speed(p, level, batch, iters, device, bf16):
    """(images/s, peak GiB or None, fwd+bwd FLOP per image) of training steps of stage 3's level."""
    cfg = cascade.unet_config(p, 3, level)
    net = unet.UNet(cfg).to(device, memory_format=torch.channels_last)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4, betas=(0.9, 0.99))
    L = p.training.crop if level == len(p.level_sizes) - 1 else p.level_sizes[level]
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(batch, 3, L, L, generator=g).to(device, memory_format=torch.channels_last)
    cond = torch.randn(batch, cfg.cond_ch, L, L, generator=g).to(device,
                                                                 memory_format=torch.channels_last)

    def step():
        c, aug_lam = cascade.augment(p, 3, level, cond, torch.full((batch,), 0.3), g)
        fn = cascade.denoiser(net, p.schedules[level], c, aug_lam, bf16)
        losses, _ = sde.loss_fn(fn, x0, schedule=p.schedules[level], objective=p.objectives[level],
                                min_snr_gamma=p.training.min_snr_gamma, generator=g)
        opt.zero_grad(set_to_none=True)
        losses.mean().backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
    step()  # warm-up
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    sync(device)
    ips = iters * batch / (time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
    return ips, peak, flops(cfg, L, backward=True)


@torch.no_grad()
def forward_time(p, level, batch, iters, device, bf16):
    """Seconds of one forward of stage 3's level at its full size, per patch (in a batch)."""
    cfg = cascade.unet_config(p, 3, level)
    net = unet.UNet(cfg).to(device, memory_format=torch.channels_last).eval()
    L = p.level_sizes[level]
    x = torch.randn(batch, 3, L, L).to(device, memory_format=torch.channels_last)
    cond = torch.randn(batch, cfg.cond_ch, L, L).to(device, memory_format=torch.channels_last)
    fn = cascade.denoiser(net, p.schedules[level], cond,
                          None if not cfg.aug_emb else torch.zeros(batch, device=device),
                          bf16)
    t = torch.full((batch,), 0.5, device=device)
    fn(x, t)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn(x, t)
    sync(device)
    return (time.perf_counter() - t0) / iters / batch


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--batch", type=int, default=8, help="training batch per device")
    ap.add_argument("--sample-batch", type=int, default=8, help="patches per sampling batch")
    ap.add_argument("--iters", type=int, default=5, help="timed iterations")
    ap.add_argument("--tiny", action="store_true", help="the tiny preset (a CPU smoke run)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    p = cascade.get_preset("tiny" if args.tiny else args.preset)
    device = torch.device(args.device)
    bf16 = cascade.native_bf16(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{name}, preset {p.name}, {'bf16' if bf16 else 'fp32'}; training batch {args.batch}")
    lines, per_patch = [], 0.0
    for level, L in enumerate(p.level_sizes):
        ips, peak, f = train_speed(p, level, args.batch, args.iters, device, bf16)
        days = 200_000 * args.batch / ips / 86400
        mem = "n.a." if peak is None else f"{peak:.1f} GiB"
        lines.append(f"  level {level} ({p.unets[level]}): train {ips:.1f} img/s, peak {mem}, "
                     f"{f * ips / 1e12:.1f} TFLOP/s achieved; 200k steps at batch {args.batch}: "
                     f"{days:.2f} days")
        sec = forward_time(p, level, args.sample_batch, args.iters, device, bf16)
        per_patch += sec * p.sampling.level_steps(3, level)
        lines.append(f"             sampling: {sec * 1e3:.1f} ms per patch and step at {L} px")
    n = sum(k * k for k in p.n_patches)
    lines.append("  one stage-3 patch (steps "
                 f"{tuple(p.sampling.level_steps(3, l) for l in range(3))}): {per_patch:.1f} s; a "
                 f"whole slide ({n} patches at that cost, none filled): {n * per_patch / 3600:.2f} "
                 f"h on one device, {n * per_patch / 3600 / 9:.2f} h on nine")
    print("\n".join(lines))
    return per_patch


if __name__ == "__main__":
    main()
