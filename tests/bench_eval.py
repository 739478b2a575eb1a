"""Benchmark: the README's results table for the shipped demo, regenerated.

Not a test (pytest does not collect it). Samples demo slides (seeds), then evaluates against the
bundled CC0 slide with metrics.py, same crops for every row:
  real vs real     two disjoint crop samples of the bundled slide (the floor)
  demo             the shipped models at their defaults (sample.py's: the distilled students)
  teachers         the demo's teachers (checkpoints/demo) at their defaults
  paper seams      the same models with the paper's seam handling (--edge-margin 0 --feather 0)
  no detail        bicubic upsampling of the stage below (stage 2 = stage 1 upsampled, stage 3 =
                   stage 2 upsampled): what a cascade without generated detail scores
  paired stage 3   stage 3 generated from the real slide's stage 2 (sample.py --from): mag 2 then
                   measures stage 3 alone, without the errors it inherits (mag 0-1 are real)
  old demo         with --old DIR: the models in DIR at the defaults (e.g. the previous demo)
    python tests/bench_eval.py --out runs/eval [--seeds 0 1 2 3] [--n 75] [--old DIR] [--rows ...]
(one thread for each process: OMP_NUM_THREADS=1 python tests/bench_eval.py ...; a slide's pixels
then differ from a multi-threaded sample.py's by float rounding, as CPU kernels split work by
thread count)
Writes OUT/results.md and OUT/results.json; slides and features are kept and reused.
"""
import argparse
import os
import shlex
import subprocess
import sys

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import cascade  # noqa: E402
import data  # noqa: E402
import metrics  # noqa: E402
from operations import aperio, files  # noqa: E402
from operations.flags import DEMO_CKPT  # noqa: E402

SLIDE = os.path.join(ROOT, "tests", "data", "cmu_small_region.svs")


# row key: (label, sample.py flags, metrics.py flags)
ROWS = {"floor": ("real vs real (floor)", (), ["--fake-seed", "1"]),
        "demo": ("demo", (), []),
        "teachers": ("demo teachers", ("--ckpt", os.path.join(ROOT, "checkpoints", "demo")), []),
        "old": ("old demo", (), []),
        "paper_seams": ("demo, paper seams", ("--edge-margin", "0", "--feather", "0"),
                        ["--edge-margin", "0"]),
        "no_detail": ("no detail (bicubic)", (), []),
        "paired": ("paired: stage 3 from the real stage 2",
                   ("--from", SLIDE, "--start-stage", "3"), [])}


def sample(out, seed, *flags):
    if not os.path.exists(out):
        cmd = [sys.executable, os.path.join(ROOT, "sample.py"), "--out", out,
               "--seed", str(seed), *flags]
        print(" ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, check=True, stderr=subprocess.DEVNULL)


def no_detail(src, out, preset):
    """A slide whose stage s is the bicubic upsample of the generated stage s-1."""
    if os.path.exists(out):
        return
    s1 = Image.open(src + ".stage1.png")
    s2 = Image.open(src + ".stage2.png")
    n2, n3 = cascade.stage_size(preset, 2), cascade.stage_size(preset, 3)
    s1.save(out + ".stage1.png")
    s1.resize((n2, n2), Image.BICUBIC).save(out + ".stage2.png")
    aperio.write_aperio(out, np.asarray(s2.resize((n3, n3), Image.BICUBIC)), mpp=0.499)


def row(name, fake_dir, args, extra=()):
    argv = ["--real", SLIDE, "--fake", fake_dir, "--preset", "demo", "--n", str(args.n), "--n-pfid",
            str(args.n),
            "--crop", "128", "256", "256", "--cache", os.path.join(args.out, "features"),
            "--json", os.path.join(args.out, f"{name}.json"), *extra]
    print(f"== {name}", flush=True)
    return metrics.main(argv)


def mean_of(values):
    return float(np.mean(values)) if values else None


def kid_e3(m):
    return None if m["kid"] is None else 1e3 * m["kid"]


def table(rows):
    f = lambda v, d=1: "n.a." if v is None else f"{v:.{d}f}"
    lines = ["| | FID mag 0 / 1 / 2 | KID x1e3 mag 0 / 1 / 2 | IP mag 0 / 1 / 2 | IR mag 0 / 1 / 2 "
             "| pFID | consistency MAE stage 2 / 3 | seam stage 2 / 3 | glass p90 | stage 1 ~ "
             "training |", "|---" * 10 + "|"]
    for name, r in rows.items():
        mags = [r[f"mag{m}"] for m in range(3)]
        # stages mixed
        cons = [] if name.startswith("no detail") else r.get("consistency", {}).get("fake", [])
        get = lambda c, s: c[str(s)]["mae"] if str(s) in c else c[s]["mae"]
        mae = ([np.mean([np.mean(get(c, s)) for c in cons]) for s in (2, 3)] if cons
               else [None, None])
        seams = r.get("seam") or []
        seam = [np.mean([sc[str(s)] if str(s) in sc else sc[s] for sc in seams]) if seams and
                all((str(s) in sc or s in sc) for sc in seams) else None for s in (2, 3)]
        lines.append(f"| {name} | {' / '.join(f(m['fid'], 0) for m in mags)} | "
                     f"{' / '.join(f(kid_e3(m), 0) for m in mags)} | "

                     f"{' / '.join(f(m['ip'], 2) for m in mags)} | "
                     f"{' / '.join(f(m['ir'], 2) for m in mags)} | "
                     f"{f(r['pfid']['pfid'], 0)} | {f(mae[0])} / {f(mae[1])} | {f(seam[0], 2)} / "
                     f"{f(seam[1], 2)} | "
                     f"{f(mean_of(r.get('grey_p90', {}).get('fake')), 0)} | "
                     f"{f(mean_of(r.get('stage1_nearest_real')), 2)} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/eval")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--n", type=int, default=75, help="crops per side and magnification")
    ap.add_argument("--ckpt", default=DEMO_CKPT, help="the demo's models (sample.py's default)")
    ap.add_argument("--old", metavar="DIR", default=None,
                    help="also score the models in DIR (e.g. the previous demo)")
    ap.add_argument("--sample-flags", default="",
                    help="more sample.py flags for the demo row, e.g. '--steps 50 50 40'")
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS),
                    help="which rows to make")
    args = ap.parse_args()
    preset = cascade.get_preset("demo")
    rows, todo = {}, [r for r in args.rows if r != "old" or args.old]
    for seed in args.seeds:
        for r in todo:
            fake = os.path.join(args.out, r, f"s{seed}.tif")
            os.makedirs(os.path.dirname(fake), exist_ok=True)
            if r == "no_detail":
                sample(os.path.join(args.out, "demo", f"s{seed}.tif"), seed, "--ckpt", args.ckpt)
                no_detail(os.path.join(args.out, "demo", f"s{seed}.tif"), fake, preset)
            elif r != "floor":
                more = shlex.split(args.sample_flags) if r == "demo" else []
                sample(fake, seed, "--ckpt",
                       args.old if r == "old" else args.ckpt, *ROWS[r][1], *more)
    for r in todo:
        name = ROWS[r][0] + (f" ({os.path.relpath(args.old, ROOT)})" if r == "old" else "")
        rows[name] = row(r, SLIDE if r == "floor" else os.path.join(args.out, r), args, ROWS[r][2])
    text = (f"{len(args.seeds)} demo slides (seeds {' '.join(map(str, args.seeds))}) against the "
            f"bundled slide; {args.n} crops a side per magnification (128 / 256 / 256 px at mag 0 "
            f"/ 1 / 2; tissue >= {data.MIN_TISSUE} at mag 1-2), {args.n} pFID "
            "crops\n\n" + table(rows))
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(text + "\n")
    files.write_json(os.path.join(args.out, "results.json"), rows, indent=1)
    print(text)


if __name__ == "__main__":
    main()
