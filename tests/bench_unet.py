"""Benchmark: U-Net forward+backward (or, with --train, full training step) images/s,
fp32 vs channels_last vs bf16 autocast.

Not a test (pytest does not collect it). Example:
    python tests/bench_unet.py --config paper256 --size 256 --batch 2
Prints one line per variant, all measured in this one run so they compare like with like.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import unet  # noqa: E402
from operations import costs  # noqa: E402


def bench(model, x, lam, cond, steps, autocast, opt=None):
    def step():
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
            out = model(x, lam, cond, lam)
        out.float().square().mean().backward()
        if opt is not None:  # a full training step, as train.py does it
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
    step()  # warm-up
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * x.shape[0] / (time.perf_counter() - t0)


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny", help="named U-Net config (unet.CONFIGS)")
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=5, help="timed iterations per variant")
    p.add_argument("--cond-ch", type=int, default=9,
                   help="conditioning channels (0 for a base model)")
    p.add_argument("--train", action="store_true",
                   help="time full training steps (+ grad clip + Adam)")
    p.add_argument("--variants", nargs="+", default=None,
                   help="subset of: fp32 channels_last channels_last+bf16")
    args = p.parse_args()
    cfg = unet.get_config(args.config, cond_ch=args.cond_ch, aug_emb=args.cond_ch > 0)
    model = unet.build(cfg)
    print(f"{args.config}: {costs.count_params(cfg) / 1e6:.1f} M params, {args.size}px, batch "
          f"{args.batch}, {torch.get_num_threads()} threads")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=g)
    cond = torch.randn(args.batch, args.cond_ch, args.size,
                       args.size, generator=g) if args.cond_ch else None
    lam = torch.zeros(args.batch)
    variants = [("fp32", False, False), ("channels_last", True, False)]
    # bf16 autocast on CPU is only worth it with native bf16 units (AVX512-BF16 / AMX).
    cpu_bf16 = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if cpu_bf16:
        variants.append(("channels_last+bf16", True, True))
    variants = [v for v in variants if args.variants is None or v[0] in args.variants]
    for name, cl, ac in variants:
        fmt = torch.channels_last if cl else torch.contiguous_format
        m = model.to(memory_format=fmt)
        opt = torch.optim.Adam(m.parameters(), lr=1e-4, betas=(0.9, 0.99)) if args.train else None
        ips = bench(m, x.to(memory_format=fmt), lam,
                    None if cond is None else cond.to(memory_format=fmt),
                    args.steps, ac, opt)
        print(f"  {name:20s} {ips:8.2f} images/s "
              f"({'training step' if args.train else 'forward+backward'})")
    if not cpu_bf16:
        print("  bf16 autocast skipped: this CPU has no native bf16 support")


if __name__ == "__main__":
    main()
