"""Benchmark: the paper-scale models on a CUDA device, as training and sampling run them.

Not a test (pytest does not collect it; tests/test_benchmarks.py runs it at tiny sizes on the CPU
so that it cannot rot). For each of stage 3's three U-Nets:
  training  train.Trainer's own loop (forward, backward, clipping, Adam, EMA) fed by the real
            loader (data.StageLevelDataset, --workers auto) from a stand-in slide (bench_data):
            img/s, achieved TFLOP/s, MFU against the device's bf16 peak, peak memory;
  layout    the bare U-Net step with channels_last on and off (img/s);
  sampling  sde.sample at the level's size for a few steps: seconds per patch-step, and the share
            of it the host takes (the same loop with a zero-cost stand-in network).
Writes OUT.json and OUT.md (a markdown table) and prints the table; about 5 minutes on one GPU.
    python tests/bench_gpu.py [--preset paper] [--batch 8] [--out bench_gpu]
    python tests/bench_gpu.py --tiny --device cpu          # the same code, tiny sizes
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
import bench_data  # noqa: E402
import cascade  # noqa: E402
import data  # noqa: E402
import sde  # noqa: E402
import train  # noqa: E402
import unet  # noqa: E402
from bench_flops import flops  # noqa: E402
from operations import distributed, settings  # noqa: E402

PEAK_BF16 = {"A100": 312e12, "H100": 989e12, "H200": 989e12, "L40S": 362e12}  # dense FLOP/s


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_flops(device):
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def training(p, level, args, device, slide, work):
    """img/s, TFLOP/s, MFU, peak GiB of train.Trainer's loop on the real loader."""
    a = train.parse_args(["--preset", p.name, "--out", os.path.join(work, "ck"),
                          "--batch", str(args.batch), "--log-every", "1000",
                          "--save-every", "1000000", "--max-steps", str(args.iters + 2),
                          "--device", device.type])
    os.makedirs(a.out, exist_ok=True)
    cfg = train.Config(**settings.train_fields(a, device))
    trainer = train.Trainer(cfg, p, 3, level, 0, 1, False, device)
    trainer.save = lambda: None  # no multi-GB checkpoint in a benchmark
    ds = data.StageLevelDataset([slide], p, 3, level, area_size=args.size,
                                cache_dir=os.path.join(work, "cache"), length=10 ** 6)
    trainer.max_steps = 2
    trainer.train(ds, [False])  # warm-up (and the loader's workers)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    t0, trainer.max_steps = time.perf_counter(), 2 + args.iters
    trainer.train(ds, [False])
    sync(device)
    ips = args.iters * args.batch / (time.perf_counter() - t0)
    L = p.level_sizes[level]
    size = min(L, p.training.crop) if level == len(p.level_sizes) - 1 else L
    tflops = ips * flops(cascade.unet_config(p, 3, level), size, backward=True) / 1e12
    peak = peak_flops(device)
    return dict(train_img_s=ips, tflop_s=tflops, mfu=tflops * 1e12 / peak if peak else None,
                peak_gib=torch.cuda.max_memory_allocated(device) / 2 ** 30
                if device.type == "cuda" else None, workers=cfg.workers)


def layout(p, level, args, device, channels_last):
    """img/s of the bare U-Net step (bf16 where native), channels_last or not."""
    cfg = cascade.unet_config(p, 3, level)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    net = unet.build(cfg).to(device, memory_format=fmt)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    L = p.level_sizes[level]
    size = min(L, p.training.crop) if level == len(p.level_sizes) - 1 else L
    x = torch.randn(args.batch, 3, size, size, device=device).to(memory_format=fmt)
    cond = torch.randn(args.batch, cfg.cond_ch, size, size, device=device).to(memory_format=fmt)
    lam = torch.zeros(args.batch, device=device)

    bf16 = distributed.native_bf16(device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            net(x, lam, cond, lam).float().square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(args.iters):
        step()
    sync(device)
    return args.iters * args.batch / (time.perf_counter() - t0)


@torch.no_grad()
def sampling(p, level, args, device):
    """Seconds per patch-step of sde.sample at the level's size (inpainting on, a batch of
    --sample-batch), and the host's share: the same loop around a zero-cost network."""
    cfg = cascade.unet_config(p, 3, level)
    net = unet.build(cfg).to(device, memory_format=torch.channels_last).eval()
    B, L = args.sample_batch, p.level_sizes[level]
    cond = torch.randn(B, cfg.cond_ch, L, L, device=device)
    known = torch.zeros(B, 3, L, L, device=device)
    mask = torch.zeros(B, 1, L, L, dtype=torch.bool, device=device)
    mask[..., :L // 8] = True
    gens = [torch.Generator().manual_seed(k) for k in range(B)]
    aug = torch.zeros(B, device=device) if cfg.aug_emb else None
    real = cascade.denoiser(net, p.schedules[level], cond, aug, distributed.native_bf16(device))
    zero = lambda x_t, t: torch.zeros_like(x_t)

    def run(fn):
        sync(device)
        t0 = time.perf_counter()
        sde.sample(fn, (B, 3, L, L), steps=args.steps, schedule=p.schedules[level],
                   objective=p.objectives[level], known=known, mask=mask, generator=gens,
                   device=device)
        sync(device)
        return (time.perf_counter() - t0) / (args.steps * B)
    run(real)
    t_real, t_host = run(real), run(zero)
    return dict(sample_s_per_patch_step=t_real, host_share=min(1.0, t_host / t_real))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--batch", type=int, default=8, help="training batch")
    ap.add_argument("--sample-batch", type=int, default=1, help="patches per sampling batch")
    ap.add_argument("--iters", type=int, default=10, help="timed training steps")
    ap.add_argument("--steps", type=int, default=5, help="timed sampling steps")
    ap.add_argument("--size", type=int, default=4096, help="stand-in slide side (px)")
    ap.add_argument("--tiny", action="store_true", help="the tiny preset (a CPU smoke run)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="bench_gpu", help="writes OUT.json and OUT.md")
    args = ap.parse_args(argv)
    p = cascade.get_preset("tiny" if args.tiny else args.preset)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    work = tempfile.mkdtemp()
    rows = []
    try:
        slide = os.path.join(work, "standin.svs")
        bench_data.make_slide(slide, args.size)
        real_open = data.open_slide
        data.open_slide = lambda f: bench_data.Level0Windows(real_open(f))
        data.open_slide.__wrapped__ = real_open
        for level in range(3):
            row = dict(level=level, unet=p.unets[level], **training(p, level, args, device,
                                                                    slide, work))
            row.update(img_s_channels_last=layout(p, level, args, device, True),
                       img_s_contiguous=layout(p, level, args, device, False))
            row.update(sampling(p, level, args, device))
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        data.open_slide = getattr(data.open_slide, "__wrapped__", data.open_slide)
        shutil.rmtree(work, ignore_errors=True)
    f = lambda v, d=1: "n.a." if v is None else f"{v:.{d}f}"
    md = [f"{name}, preset {p.name}, batch {args.batch}, bf16 autocast "
          f"{'on' if distributed.native_bf16(device) else 'off'}", "",
          "| stage 3 level | train img/s | TFLOP/s | MFU | peak GiB | img/s channels_last / "
          "contiguous | sampling s per patch-step | host share |",
          "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['level']} ({r['unet']}) | {f(r['train_img_s'])} | {f(r['tflop_s'])} | "
                  f"{f(r['mfu'], 2)} | {f(r['peak_gib'])} | {f(r['img_s_channels_last'])} / "
                  f"{f(r['img_s_contiguous'])} | {f(r['sample_s_per_patch_step'], 4)} | "
                  f"{f(r['host_share'], 2)} |")
    with open(args.out + ".json", "w") as fh:
        json.dump(dict(device=name, preset=p.name, batch=args.batch, rows=rows), fh, indent=1)
    with open(args.out + ".md", "w") as fh:
        fh.write("\n".join(md) + "\n")
    print("\n".join(md))
    return rows


if __name__ == "__main__":
    main()
