"""Benchmark: how the demo's output changes with the sampler and its step count.

Not a test. Two experiments, each evaluated against the bundled slide with metrics.py (the crops
of tests/bench_eval.py), reporting KID per magnification, FID at mag 2, the seam score and the
wall time:

  whole slide (default): the default demo slide (one seed) with ancestral sampling at the
      preset's steps and DPM-Solver++(2M) and DDIM (eta 0) at 1/2, 1/4 and 1/8 of them.
  --paired: stage 3 alone, from the real slide's stage 2 (sample.py --from, --start-stage 3), so
      mag 2 measures the stage that costs the FLOPs without the errors of stages 1-2; several
      seeds; ancestral at --ref-steps (more than the preset's, near convergence) and at 1/4 of
      them, DPM-Solver++(2M) and DDIM at 1/4 and 1/8 of them.

    python tests/bench_samplers.py --out runs/samplers [--n 75]
    python tests/bench_samplers.py --paired --out runs/samplers_paired [--seeds 0 1 2] [--ref-steps
    48 24 40]
"""
import argparse
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import cascade  # noqa: E402
import metrics  # noqa: E402

SLIDE = os.path.join(ROOT, "tests", "data", "cmu_small_region.svs")


def variants(args):
    """[(name, sampler, steps)]"""
    if args.paired:
        ref = args.ref_steps
        div = lambda f: [max(1, s // f) for s in ref]
        return ([("ancestral_ref", "ancestral", ref), ("ancestral_4", "ancestral", div(4))]
                + [(f"{s}_{f}", s, div(f)) for s in ("dpmpp2m", "ddim") for f in (4, 8)])
    base = cascade.get_preset("demo").sampling.steps
    return [("ancestral_1", "ancestral", list(base))] + [
        (f"{s}_{f}", s,
         [max(1, b // f) for b in base]) for s in ("dpmpp2m", "ddim") for f in (2, 4, 8)]


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/samplers")
    ap.add_argument("--n", type=int, default=75)
    ap.add_argument("--seed", type=int, default=0, help="whole-slide experiment: the slide's seed")
    ap.add_argument("--paired", action="store_true",
                    help="stage 3 alone from the real stage 2, several seeds")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="--paired: seeds")
    ap.add_argument("--ref-steps", type=int, nargs=3, default=[48, 24, 40],
                    help="--paired: the reference's steps")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    lines = ["| sampler | steps | wall s per slide | KID x1e3 mag 0 / 1 / 2 | FID mag 2 | seam "
             "stage 2 / 3 |",
             "|---" * 6 + "|"]
    for name, sampler, steps in variants(args):
        folder = os.path.join(args.out, name) if args.paired else args.out
        os.makedirs(folder, exist_ok=True)
        seeds = args.seeds if args.paired else [args.seed]
        extra = ["--from", SLIDE, "--start-stage", "3"] if args.paired else []
        t0, made = time.time(), 0
        for seed in seeds:
            out = os.path.join(folder, f"s{seed}.tif" if args.paired else f"{name}.tif")

            if not os.path.exists(out):
                subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), "--out", out,
                                "--seed", str(seed),
                                "--sampler", sampler, "--steps", *map(str, steps), *extra],
                               check=True, stderr=subprocess.DEVNULL)
                made += 1
        wall = (time.time() - t0) / made if made else float("nan")  # nan: made by an earlier run
        fake = folder if args.paired else os.path.join(folder, f"{name}.tif")
        r = metrics.main(["--real", SLIDE, "--fake", fake, "--preset", "demo", "--n", str(args.n),
                          "--crop", "128",
                          "256", "256", "--cache", os.path.join(args.out, "features"),
                          "--json", os.path.join(args.out, f"{name}.json")])
        kid = " / ".join(f"{1e3 * r[f'mag{m}']['kid']:.0f}" for m in range(3))
        seam = [sum(sc.get(s, float("nan")) for sc in r["seam"]) / len(r["seam"]) for s in (2, 3)]
        lines.append(f"| {sampler} | {' / '.join(map(str, steps))} | {wall:.0f} | {kid} | "
                     f"{r['mag2']['fid']:.0f} | {seam[0]:.2f} / {seam[1]:.2f} |")
        print(lines[-1], flush=True)
    text = "\n".join(lines)
    with open(os.path.join(args.out, "results.md"), "w") as fh:
        fh.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
