"""Benchmark: the full paper geometry (41344^2 px, 1 + 49 + 2116 patches) with --dry-run.

Not a test (pytest does not collect it). Runs sample.py in a child process with the
cheap stand-in model and prints wall time, the child's peak RSS, and the time per patch
spent outside the model (sample.py's own summary).
    python tests/bench_sample.py --out /tmp/paper_dry.tif [--order wavefront --batch 1]
"""
import argparse
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/paper_dry.tif")
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--order", default="wavefront")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--keep", action="store_true",
                    help="keep the 41344^2 output (several hundred MB)")
    args = ap.parse_args()
    cmd = [sys.executable, os.path.join(ROOT, "sample.py"), "--preset", args.preset, "--dry-run",
           "--out", args.out,
           "--order", args.order, "--batch", str(args.batch), "--overwrite"]
    t0 = time.time()
    res = subprocess.run(cmd, stderr=subprocess.PIPE, text=True)
    wall = time.time() - t0
    summary = [l for l in res.stderr.splitlines() if l.startswith(("wrote", "  "))]
    print("\n".join(summary) if res.returncode == 0 else res.stderr[-3000:])
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2 ** 20  # KiB -> GiB
    print(f"wall time {wall / 60:.1f} min, peak RSS {peak:.2f} GiB ({args.preset}, {args.order}, "
          f"batch {args.batch})")
    if not args.keep and os.path.exists(args.out):
        os.remove(args.out)


if __name__ == "__main__":
    main()
