"""The paper's evaluation: FID, pFID, improved precision and recall, per magnification.

    python metrics.py --real SLIDES_DIR --fake GENERATED_DIR --mag 0 1 2 --n 10000 \
        --inception pt_inception-2015-12-05.pth --vgg vgg16.pt

Magnifications (paper, Table 3): mag 0 = the whole region zoomed out to N1 (stage 1),
mag 1 = P x P crops of the region at N2 (stage 2), mag 2 = P x P crops at N3 (stage 3, full
resolution). pFID (Chai et al.): crops at random scales and positions, the same list of
transforms replayed on the real and the generated slides, each resized to P.

Network weights are never downloaded: --inception takes a TorchScript file (e.g. the standard
`pt_inception-2015-12-05-6726825d.pth` of StyleGAN2-ADA / clean-fid, which returns 2048-d pool
features with return_features=True); --vgg a TorchScript file or a torchvision VGG16 state dict
(`vgg16-397923af.pth`), of which the 4096-d fc2 activations are used.

References
  [FID]     Heusel et al., 2017.          [pFID] Chai et al., Any-resolution training, ECCV 2022.
  [IPR]     Kynkaanniemi et al., Improved precision and recall, NeurIPS 2019.
  [PAPER]   Cechnicka et al., URCDM, MICCAI 2024 (Tables 1, 3; Metric Implementation).
"""
import argparse
import hashlib
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import cascade
import data


# ----------------------------------------------------------------------------- Frechet distance

def _sqrtm_psd(a):
    """Square root of a symmetric PSD matrix by eigendecomposition; tiny negative eigenvalues
    (round-off, or rank deficiency when there are fewer samples than dimensions) become 0."""
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^1/2)  [FID], numpy only.

    tr((S1 S2)^1/2) = tr((R S2 R)^1/2) with R = S1^1/2: a symmetric PSD matrix, so only
    symmetric eigendecompositions are needed (stable where S1 S2 is not symmetric)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    r = _sqrtm_psd(s1)
    m = r @ s2 @ r
    w = np.linalg.eigvalsh((m + m.T) / 2)
    tr_covmean = np.sqrt(np.clip(w, 0, None)).sum()
    return float(max(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_covmean, 0.0))


def feature_stats(feats):
    feats = np.asarray(feats, np.float64)
    return feats.mean(0), np.cov(feats, rowvar=False)


def fid_from_features(real, fake):
    return frechet_distance(*feature_stats(real), *feature_stats(fake))


# ----------------------------------------------------------------------------- precision / recall

def _sq_dists(a, b):
    """Squared distances (len(a), len(b)) in float64. Values within round-off of 0 are set to
    exactly 0, so duplicated samples are at distance 0 (and inside a radius of 0)."""
    a, b = a.double(), b.double()
    na, nb = (a * a).sum(1, keepdim=True), (b * b).sum(1)[None]
    d = na + nb - 2 * a @ b.T
    return torch.where(d <= 1e-9 * (na + nb), torch.zeros_like(d), d)


def knn_radii(feats, k=3, chunk=4096):
    """Squared distance of each sample to its k-th nearest *other* sample of the same set."""
    x = torch.as_tensor(np.asarray(feats, np.float32))
    n, out = len(x), torch.empty(len(x), dtype=torch.float64)
    if n <= k:
        raise ValueError(f"need more than k = {k} samples, got {n}")
    for i in range(0, n, chunk):
        rows = []
        for j in range(0, n, chunk):  # column blocks bound the memory to chunk x chunk
            d = _sq_dists(x[i:i + chunk], x[j:j + chunk])
            if i == j:
                d.fill_diagonal_(float("inf"))  # not its own neighbour (a duplicate still is)
            rows.append(d.topk(min(k, d.shape[1]), dim=1, largest=False).values)
        out[i:i + chunk] = torch.cat(rows, 1).topk(k, dim=1, largest=False).values[:, -1]
    return out


def _covered(points, ref, ref_radii, chunk):
    """For each point: is it within (<=) the radius of at least one ref sample?"""
    p, r = torch.as_tensor(np.asarray(points, np.float32)), torch.as_tensor(np.asarray(ref, np.float32))
    hit = torch.zeros(len(p), dtype=torch.bool)
    for i in range(0, len(p), chunk):
        for j in range(0, len(r), chunk):
            d = _sq_dists(p[i:i + chunk], r[j:j + chunk])
            hit[i:i + chunk] |= (d <= ref_radii[j:j + chunk][None]).any(1)
    return hit


def precision_recall(real_features, fake_features, k=3, chunk=4096):
    """Improved precision and recall [IPR]: precision = share of generated samples inside the
    real manifold (union of balls around real samples, radius = distance to the k-th nearest
    other real sample); recall = share of real samples inside the generated manifold.
    Distances are computed in chunk x chunk blocks (memory ~ chunk^2 x 8 bytes)."""
    real_r, fake_r = knn_radii(real_features, k, chunk), knn_radii(fake_features, k, chunk)
    precision = _covered(fake_features, real_features, real_r, chunk).double().mean()
    recall = _covered(real_features, fake_features, fake_r, chunk).double().mean()
    return float(precision), float(recall)


# ----------------------------------------------------------------------------- feature networks

class VGG16Features(nn.Module):
    """torchvision's VGG16 layout (its state-dict keys load as they are), returning fc2
    activations (after ReLU: classifier[:5]), 4096-d, for 224 x 224 ImageNet-normalised input."""

    def __init__(self):
        super().__init__()
        layers, c = [], 3
        for v in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"):
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU(inplace=True)]
                c = v
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(7)
        self.classifier = nn.Sequential(nn.Linear(512 * 49, 4096), nn.ReLU(True), nn.Dropout(),
                                        nn.Linear(4096, 4096), nn.ReLU(True), nn.Dropout(), nn.Linear(4096, 1000))

    def forward(self, x):
        return self.classifier[:5](self.avgpool(self.features(x)).flatten(1))


class FeatureNet:
    """A feature extractor loaded from a local file. kind: 'inception' (input resized to 299)
    or 'vgg' (224). TorchScript files get [0, 255] RGB (the convention of the standard FID
    Inception); a VGG16 state dict gets ImageNet-normalised [0, 1] RGB."""

    SIZES = {"inception": 299, "vgg": 224}

    def __init__(self, path, kind, flag, device="cpu"):
        if not path or not os.path.isfile(path):
            raise FileNotFoundError(
                f"{flag} {path}: no such file. Weights cannot be downloaded here; give a local file: "
                + ("the TorchScript Inception 'pt_inception-2015-12-05-6726825d.pth' (StyleGAN2-ADA / clean-fid)"
                   if kind == "inception" else "a TorchScript VGG16 or torchvision's 'vgg16-397923af.pth' state dict"))
        self.kind, self.size, self.device, self.flag = kind, self.SIZES[kind], device, flag
        with open(path, "rb") as f:
            self.digest = hashlib.sha1(f.read(1 << 20)).hexdigest()[:12] + f"-{os.path.getsize(path)}"
        try:
            self.net, self.scripted = torch.jit.load(path, map_location=device).eval(), True
        except Exception:  # noqa: BLE001 - not TorchScript: a state dict
            if kind != "vgg":
                raise ValueError(f"{flag} {path}: not a TorchScript file") from None
            self.net, self.scripted = VGG16Features(), False
            try:
                self.net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            except Exception as e:  # noqa: BLE001 - unreadable, or another network's weights
                raise ValueError(f"{flag} {path}: neither a TorchScript file nor torchvision's VGG16 state dict "
                                 f"({type(e).__name__})") from None
            self.net = self.net.to(device).eval()

    @torch.no_grad()
    def __call__(self, images):
        """(B, H, W, 3) uint8 -> (B, D) float32 numpy."""
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().to(self.device)
        x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        if self.scripted:
            try:
                f = self.net(x, return_features=True)
            except (RuntimeError, TypeError):
                f = self.net(x)
        else:
            mean = torch.tensor([0.485, 0.456, 0.406], device=self.device).view(1, 3, 1, 1)
            std = torch.tensor([0.229, 0.224, 0.225], device=self.device).view(1, 3, 1, 1)
            f = self.net((x / 255 - mean) / std)
        return f.flatten(1).float().cpu().numpy()


# ----------------------------------------------------------------------------- patch sets

class Source:
    """Images to evaluate: slides (a file or a directory of them; each contributes its square
    region of N3 level-0 px, chosen as for training) or a directory of PNG/JPEG patches."""

    def __init__(self, path, preset):
        self.path, self.preset, self.size = path, preset, cascade.stage_size(preset, 3)
        files = sorted(os.listdir(path)) if os.path.isdir(path) else [os.path.basename(path)]
        folder = path if os.path.isdir(path) else os.path.dirname(path)
        images = [os.path.join(folder, f) for f in files if f.lower().endswith((".png", ".jpg", ".jpeg"))]
        self.is_patches = os.path.isdir(path) and images and not any(
            f.lower().endswith((".svs", ".tif", ".tiff")) for f in files)
        if self.is_patches:
            self.files = images
        else:
            self.files = data.list_slides(path)
            self.slides = [data.open_slide(f) for f in self.files]
            self.origins = [data.choose_region(s, self.size) for s in self.slides]

    def fingerprint(self):
        return [(f, os.path.getsize(f), os.path.getmtime(f)) for f in self.files]

    def crop(self, k, s, u, v, out):
        """Slide k % count: the square of side s (fraction of the region) at (u, v) (fractions),
        area-resampled to out x out. uint8 (out, out, 3)."""
        k %= len(self.slides)
        (x, y), size = self.origins[k], self.size
        return self.slides[k].read_region(x + u * size, y + v * size, out, out, s * size / out)


def transforms(kind, n, preset, seed=0):
    """The list of crops, replayed identically on the real and the generated side: tuples
    (slide index, scale s, u, v). kind 0, 1, 2: the magnifications (s = P / N_(kind+1));
    'pfid': scales log-uniform in [P / N3, 1] [pFID]."""
    rng = np.random.default_rng([seed, {"pfid": 99}.get(kind, kind)])
    P, N3 = preset.patch, cascade.stage_size(preset, 3)
    out = []
    for k in range(n):
        s = P / cascade.stage_size(preset, kind + 1) if kind != "pfid" else float(np.exp(rng.uniform(np.log(P / N3), 0)))
        u, v = rng.uniform(0, 1 - s, size=2) if s < 1 else (0.0, 0.0)
        out.append((k, s, float(u), float(v)))
    return out


def patch_features(source, kind, n, net, *, min_tissue=data.MIN_TISSUE, seed=0, batch=32, cache_dir=None, label=""):
    """Features of up to n patches of a source: replayed transforms on slides (white crops,
    tissue < min_tissue, left out the same way on both sides), or the PNG files themselves."""
    key = hashlib.sha1(json.dumps([source.fingerprint(), str(kind), n, seed, min_tissue, net.digest, net.kind,
                                   source.preset.model_dict()]).encode()).hexdigest()[:20]
    path = os.path.join(cache_dir, f"{key}.npy") if cache_dir else None
    if path and os.path.exists(path):
        return np.load(path)
    P = source.preset.patch
    if source.is_patches:
        jobs = [lambda f=f: read_image(f) for f in source.files[:n]]
    else:
        count = len(source.slides) if kind == 0 else n  # one whole region per slide at mag 0
        jobs = [lambda t=t: source.crop(*t, P) for t in transforms(kind, count, source.preset, seed)]
    feats, buf, t0 = [], [], time.time()
    for i, job in enumerate(jobs):
        img = job()
        if source.is_patches or data.tissue_fraction(img) >= min_tissue:
            # slide crops are read at P already; patch files of other sizes are area-resized to P
            buf.append(img if img.shape[:2] == (P, P) else np.asarray(Image.fromarray(img).resize((P, P), Image.BOX)))
        if len(buf) == batch or (i == len(jobs) - 1 and buf):
            feats.append(net(np.stack(buf)))
            buf = []
            rate = (i + 1) / (time.time() - t0)
            print(f"  {label}: {i + 1}/{len(jobs)} patches, {rate:.1f}/s, ETA {(len(jobs) - i - 1) / rate:.0f} s",
                  file=sys.stderr, flush=True)
    feats = np.concatenate(feats) if feats else np.zeros((0, 1), np.float32)
    if path:
        os.makedirs(cache_dir, exist_ok=True)
        with data.atomic_path(path) as tmp:
            np.save(tmp, feats)
    return feats


def read_image(path):
    """An image file as (h, w, 3) uint8; a one-line error if it cannot be read."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except Exception as e:  # noqa: BLE001 - PIL raises many kinds
        raise ValueError(f"{path}: not a readable image ({type(e).__name__}); remove or replace it") from None


# ----------------------------------------------------------------------------- CLI

def evaluate(args):
    preset = cascade.get_preset(args.preset)
    inception = FeatureNet(args.inception, "inception", "--inception", args.device)
    vgg = FeatureNet(args.vgg, "vgg", "--vgg", args.device) if args.vgg else None
    real, fake = Source(args.real, preset), Source(args.fake, preset)
    kw = dict(min_tissue=args.min_tissue, seed=args.seed, cache_dir=args.cache)
    results = {}
    for kind in list(args.mag) + (["pfid"] if args.pfid else []):
        row = {}
        fr = patch_features(real, kind, args.n, inception, label=f"real mag {kind} inception", **kw)
        ff = patch_features(fake, kind, args.n, inception, label=f"fake mag {kind} inception", **kw)
        row["n_real"], row["n_fake"] = len(fr), len(ff)
        row["pfid" if kind == "pfid" else "fid"] = fid_from_features(fr, ff) if min(len(fr), len(ff)) > 1 else None
        if vgg is not None and kind != "pfid":
            vr = patch_features(real, kind, args.n, vgg, label=f"real mag {kind} vgg", **kw)
            vf = patch_features(fake, kind, args.n, vgg, label=f"fake mag {kind} vgg", **kw)
            ok = min(len(vr), len(vf)) > args.k
            row["ip"], row["ir"] = precision_recall(vr, vf, k=args.k) if ok else (None, None)
        results[f"mag{kind}" if kind != "pfid" else "pfid"] = row
    return results


def format_table(results):
    fmt = lambda v, d: "n.a." if v is None else f"{v:.{d}f}"
    lines = [f"{'':8s} {'FID/pFID':>9s} {'IP':>6s} {'IR':>6s} {'n real':>7s} {'n fake':>7s}"]
    for name, r in results.items():
        lines.append(f"{name:8s} {fmt(r.get('fid', r.get('pfid')), 2):>9s} {fmt(r.get('ip'), 3):>6s} "
                     f"{fmt(r.get('ir'), 3):>6s} {r['n_real']:7d} {r['n_fake']:7d}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--real", required=True, help="real slides (file or directory) or a directory of PNG patches")
    ap.add_argument("--fake", required=True, help="generated slides (file or directory) or a directory of PNG patches")
    ap.add_argument("--mag", type=int, nargs="+", default=[0, 1, 2], choices=[0, 1, 2], help="magnifications")
    ap.add_argument("--n", type=int, default=10000, help="patches per set and magnification (paper: 10k)")
    ap.add_argument("--pfid", action="store_true", help="also pFID over random-scale crops (paper: 50k)")
    ap.add_argument("--inception", required=True, help="TorchScript Inception-v3 file (2048-d pool features)")
    ap.add_argument("--vgg", default=None, help="VGG16 file (TorchScript or torchvision state dict) for IP / IR")
    ap.add_argument("--k", type=int, default=3, help="neighbourhood size of precision / recall")
    ap.add_argument("--preset", default="demo", help="geometry of the magnifications (cascade.PRESETS)")
    ap.add_argument("--min-tissue", type=float, default=data.MIN_TISSUE, help="crops with less tissue are left out (both sides)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the crop positions")
    ap.add_argument("--cache", default=".urcdm_cache/metrics", help="feature cache directory ('' = off)")
    ap.add_argument("--json", default="metrics.json", help="where to write the results")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    args.cache = args.cache or None
    for flag, value, ok in (("--k", args.k, args.k >= 1), ("--n", args.n, args.n >= 2),
                            ("--min-tissue", args.min_tissue, 0 <= args.min_tissue <= 1)):
        if not ok:
            sys.exit(f"error: {flag} {value}: out of range (--k >= 1, --n >= 2, --min-tissue in [0, 1])")
    try:
        results = evaluate(args)
    except (FileNotFoundError, ValueError, data.SlideError) as e:
        sys.exit(f"error: {e}")
    print(format_table(results))
    data.write_json(args.json, results, indent=1)
    print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
