"""Benchmark: how the demo slide changes with the sampler and its step count.

Not a test. Samples the default demo slide (seed 0) with ancestral sampling at the preset's
steps and with DPM-Solver++(2M) and DDIM (eta 0) at 1/2, 1/4 and 1/8 of them, then evaluates
each against the bundled slide with metrics.py (the crops of tests/bench_eval.py) and reports
KID per magnification, the seam score and the wall time.
    python tests/bench_samplers.py --out runs/samplers [--n 75]
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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/samplers")
    ap.add_argument("--n", type=int, default=75)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    base = cascade.get_preset("demo").sampling.steps
    variants = [("ancestral", 1)] + [(s, f) for s in ("dpmpp2m", "ddim") for f in (2, 4, 8)]
    lines = ["| sampler | steps | wall s | KID x1e3 mag 0 / 1 / 2 | FID mag 2 | seam stage 2 / 3 |", "|---" * 6 + "|"]
    for sampler, f in variants:
        steps = [max(1, s // f) for s in base]
        out = os.path.join(args.out, f"{sampler}_{f}.tif")
        t0 = time.time()
        if not os.path.exists(out):
            subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), "--out", out, "--seed", str(args.seed),
                            "--sampler", sampler, "--steps", *map(str, steps)], check=True, stderr=subprocess.DEVNULL)
        wall = time.time() - t0
        r = metrics.main(["--real", SLIDE, "--fake", out, "--preset", "demo", "--n", str(args.n), "--crop", "128", "256",
                          "256", "--cache", os.path.join(args.out, "features"),
                          "--json", os.path.join(args.out, f"{sampler}_{f}.json")])
        kid = " / ".join(f"{1e3 * r[f'mag{m}']['kid']:.0f}" for m in range(3))
        seam = r["seam"][0]
        lines.append(f"| {sampler} | {' / '.join(map(str, steps))} | {wall:.0f} | {kid} | {r['mag2']['fid']:.0f} | "
                     f"{seam.get(2, float('nan')):.2f} / {seam.get(3, float('nan')):.2f} |")
        print(lines[-1], flush=True)
    text = "\n".join(lines)
    with open(os.path.join(args.out, "results.md"), "w") as fh:
        fh.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
