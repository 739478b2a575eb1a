"""Benchmark: how close distilled students stay to their teachers, level by level, on the same
inputs and the same noise (issue: few-step slides; docs/distillation.md prints its table).

Not a test. For each (stage, level) asked, n real examples of that level at its full size (the
bundled slide's conditioning: low-res input, context, region, as training builds them) are
sampled by
  teacher N       the teacher at its preset's sampler and steps (the demo: ancestral), noise a
                  (the reference every other row is compared with)
  floor           the same, noise b: how far two samples of the teacher are anyway
  ode 2^R K       the teacher's DDIM at the steps the first round distilled (deterministic)
  ddim K, dpm K   the teacher itself at the student's K steps (DDIM eta 0, DPM-Solver++(2M))
  student K       the student at its K steps (DDIM, as it samples), noise a
and each row gives its paired distance to the reference (RMSE in grey levels, mean over the n
examples) and to the ODE's result, and its KID x1e3 against the reference set (FID Inception
features, subsets of n). The student should sit closer to the teacher than the teacher does at
the same K.

    python tests/bench_distill.py --teachers checkpoints/demo --students checkpoints/demo_distilled
        [--models 2,1 2,2 3,1 3,2] [--n 32] [--threads 2] [--json OUT.json]
    python tests/bench_distill.py --ends [--n 8]   # the teachers with 'clamped' vs imagen's ends
    python tests/bench_distill.py --jumps          # RePaint's jump noise over imagen-pytorch's
"""
import argparse
import dataclasses
import json
import os
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import cascade  # noqa: E402
import data  # noqa: E402
import metrics  # noqa: E402
import sde  # noqa: E402
from operations import checkpoints, features  # noqa: E402

SLIDE = os.path.join(ROOT, "tests", "data", "cmu_small_region.svs")


def examples(preset, stage, level, n, cache):
    """n real (x0, cond) of (stage, level) at the level's full size (no top-level crop)."""
    L = preset.level_sizes[level]
    p = dataclasses.replace(preset, training=dataclasses.replace(preset.training, crop=L))
    ds = data.StageLevelDataset([SLIDE], p, stage, level, cache_dir=cache, augment=False, seed=7)
    items = [ds[k] for k in range(n)]
    cond = torch.stack([it["cond"] for it in items])
    return torch.stack([it["x0"] for it in items]), (None if cond.shape[1] == 0 else cond)


def run(net, preset, stage, level, cond, sampler, steps, noise):
    """One level's samples of `net` on the conditioning `cond`, one generator per example derived
    from `noise` (the augmentation's noise and the sampler's alike), as cascade.CDM.sample draws."""
    B, L = len(cond), preset.level_sizes[level]  # levels 1-2: a low-res input at least
    gens = [torch.Generator().manual_seed(sde.derive_seed("distill bench", noise, k))
            for k in range(B)]
    c, aug_lam = cascade.augment(preset, stage, level, cond, preset.sampling.aug_level, gens)
    sp = dataclasses.replace(preset.sampling, sampler=sampler,
                             steps=(steps,) * 3, resample=1, eta=0.0)
    fn = cascade.denoiser(net, preset.schedules[level], c, aug_lam, ends=sp.ends)
    with torch.no_grad():
        x = cascade.sample_level(fn, (B, 3, L, L), sp, stage, level, preset, generator=gens)
    return cascade.to_uint8(x.clamp(-1, 1))


def rmse(a, b):
    """Mean over examples of the RMSE between paired uint8 images, grey levels."""
    d = a.astype(np.float64) - b.astype(np.float64)
    return float(np.sqrt((d ** 2).reshape(len(a), -1).mean(1)).mean())


def ends(args, preset):
    """Paired RMSE between the teachers' stage-3 outputs with 'clamped' and with imagen's ends
    (sde.log_snr), same inputs and noise, at the preset's sampler and steps."""
    for s, lvl in ((3, 1), (3, 2)):
        net, _ = checkpoints.load_unet(os.path.join(args.teachers, checkpoints.model_filename(
            s, lvl)), preset, s, lvl)
        _, cond = examples(preset, s, lvl, args.n, args.cache)
        out = {}
        for e in sde.ENDS:
            p = dataclasses.replace(preset, sampling=dataclasses.replace(preset.sampling, ends=e))
            out[e] = run(net, p, s, lvl, cond, preset.sampling.level_sampler(s, lvl),
                         preset.sampling.level_steps(s, lvl), "a")
        print(f"stage {s} level {lvl} at {preset.sampling.level_steps(s, lvl)} steps: clamped vs "
              f"imagen ends, paired RMSE {rmse(out['clamped'], out['imagen']):.2f} grey levels")


def jumps():
    """RePaint's jump noise std over imagen-pytorch's q_sample_from_to's, on the authors' grids."""
    for steps, schedule in ((1024, "cosine"), (256, "cosine"), (256, "linear")):
        grid, ratio = sde.time_grid(steps), []
        for i in range(steps - 1):
            (_, a_t, s_t), (_, a_s, s_s) = (sde.coeffs(float(u), schedule, "imagen")
                                            for u in grid[i:i + 2])
            ours = (s_t ** 2 - (a_t / a_s) ** 2 * s_s ** 2) ** 0.5
            ratio.append(ours / abs((s_t * a_s - s_s * a_t) / a_s))
        r = np.array(ratio)
        print(f"{schedule} at {steps} steps: ours / imagen's jump std, median {np.median(r):.1f}, "
              f"10-90 % {np.quantile(r, 0.1):.1f}-{np.quantile(r, 0.9):.1f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teachers", default=os.path.join(ROOT, "checkpoints", "demo"))
    ap.add_argument("--students", default=os.path.join(ROOT, "checkpoints", "demo_distilled"))
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--models", nargs="+", default=["2,1", "2,2", "3,1", "3,2"],
                    help="stage,level of students in --students (default: the shipped ones)")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", default="/tmp/urcdm_bench_cache")
    ap.add_argument("--json", default=None)
    ap.add_argument("--ends", action="store_true", help="the teachers' ends, clamped vs imagen's")
    ap.add_argument("--jumps", action="store_true", help="RePaint's jump noise over imagen's")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    preset = cascade.get_preset(args.preset)
    if args.jumps:
        return jumps()
    if args.ends:
        return ends(args, preset)
    inception = metrics.FeatureNet(features.installed_inception(), "inception", "--inception")
    results = {}
    for spec in args.models:
        s, lvl = (int(v) for v in spec.split(","))
        name = checkpoints.model_filename(s, lvl)
        teacher, _ = checkpoints.load_unet(os.path.join(args.teachers, name), preset, s, lvl)
        student, _ = checkpoints.load_unet(os.path.join(args.students, name), preset, s, lvl)
        rec = checkpoints.distilled(os.path.join(args.students, name))
        if not rec:
            sys.exit(f"error: --models {spec}: {args.students}/{name} is not a distilled student")
        K, first = rec["steps"], rec["teacher_steps"] * 2 ** (rec["round"] - 1)
        _, cond = examples(preset, s, lvl, args.n, args.cache)
        N, own = preset.sampling.level_steps(s, lvl), preset.sampling.level_sampler(s, lvl)
        rows = {f"teacher {own} {N}": (teacher, own, N, "a"), "floor": (teacher, own, N, "b"),
                f"ode: teacher ddim {first}": (teacher, "ddim", first, "a"),
                f"teacher ddim {K}": (teacher, "ddim", K, "a"),
                f"teacher dpmpp2m {K}": (teacher, "dpmpp2m", K, "a"),
                f"student ddim {K}": (student, "ddim", K, "a")}
        images, seconds = {}, {}
        for label, (net, sampler, steps, noise) in rows.items():
            t0 = time.time()
            images[label] = run(net, preset, s, lvl, cond, sampler, steps, noise)
            seconds[label] = time.time() - t0
        ref, ode = images[f"teacher {own} {N}"], images[f"ode: teacher ddim {first}"]
        feats = {k: inception(v) for k, v in images.items()}
        table = {}
        for label in rows:
            k = metrics.kid(feats[f"teacher {own} {N}"], feats[label], subsets=50,
                            subset_size=args.n)[0]
            table[label] = dict(rmse_ref=rmse(images[label], ref),
                                rmse_ode=rmse(images[label], ode),
                                kid_e3=None if k is None else 1e3 * k, seconds=seconds[label])
        results[spec] = table
        print(f"stage {s} level {lvl} ({preset.level_sizes[lvl]} px, n {args.n}; student of "
              f"{K} steps, round {rec['round']}):")
        print(f"  {'row':28s} {'RMSE vs teacher':>16s} {'RMSE vs ode':>12s} {'KID x1e3':>9s} "
              f"{'s':>6s}")
        for label, r in table.items():
            kid = "-" if r["kid_e3"] is None else f"{r['kid_e3']:.1f}"
            print(f"  {label:28s} {r['rmse_ref']:16.2f} {r['rmse_ode']:12.2f} {kid:>9s} "
                  f"{r['seconds']:6.1f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
