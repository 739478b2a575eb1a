"""Benchmark: embedding speed and precision/recall memory of metrics.py.

Not a test (pytest does not collect it). Embeds N crops of the bundled slide with the installed
FID Inception (else a small random TorchScript stand-in with 2048-d output, and says so) and
runs improved precision/recall on M x M random 4096-d features, reporting time and peak RSS
growth, with a linear (time: quadratic) extrapolation to 50k x 50k.
    python tests/bench_metrics.py --crops 1000 --pr 5000
"""
import argparse
import os
import resource
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cascade  # noqa: E402
import metrics  # noqa: E402
from operations import evaluation, features  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rss_gib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--crops", type=int, default=1000)
    ap.add_argument("--pr", type=int, default=5000,
                    help="features per set for the precision/recall run")
    args = ap.parse_args()
    path = features.installed_inception()
    if path:
        fnet = metrics.FeatureNet(path, "inception", "--inception")
    else:
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 5, stride=4), torch.nn.ReLU(),
                                  torch.nn.Conv2d(16, 2048, 3, stride=2), torch.nn.ReLU(),
                                  torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        path = os.path.join(tempfile.mkdtemp(), "net.pt")
        torch.jit.script(net).save(path)
        fnet = metrics.FeatureNet(path, "inception", "--inception", inception_input="0-255")
    print(f"network: {fnet.label()}")
    src = evaluation.Source(os.path.join(ROOT, "tests", "data", "cmu_small_region.svs"),
                         cascade.get_preset("demo"))
    t0 = time.time()
    f = metrics.patch_features(src, 2, args.crops, fnet, min_tissue=0.0)
    dt = time.time() - t0
    print(f"embedded {len(f)} crops (256 px, resized to 299) in {dt:.1f} s: {len(f) / dt:.1f} "
          "crops/s")
    rng = np.random.default_rng(0)
    real = rng.normal(size=(args.pr, 4096)).astype(np.float32)
    fake = rng.normal(0.1, 1.0, size=(args.pr, 4096)).astype(np.float32)
    base = rss_gib()
    t0 = time.time()
    p, r = metrics.precision_recall(real, fake, k=3)
    dt = time.time() - t0
    grow = rss_gib() - base
    scale = 50000 / args.pr
    print(f"precision/recall {args.pr} x {args.pr} x 4096: {dt:.1f} s, peak RSS growth {grow:.2f} "
          f"GiB (features themselves {2 * real.nbytes / 2 ** 30:.2f} GiB) -> P={p:.3f} R={r:.3f}")
    print(f"extrapolated to 50k x 50k: features {2 * 50000 * 4096 * 4 / 2 ** 30:.1f} GiB + chunk "
          f"blocks (4096^2 x 8 B x ~4 = 0.5 GiB), time ~{dt * scale ** 2 / 60:.0f} min on this CPU")


if __name__ == "__main__":
    main()
