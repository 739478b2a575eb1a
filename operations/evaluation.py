"""Evaluation plumbing: what is compared (slides, patch directories, windows runs), feature
caches, how many crops a run takes and how long (said before any work), and the printed table."""
import hashlib
import json
import math
import os
import sys
import time

import numpy as np
from PIL import Image

import cascade
import data
from operations.files import is_temp
from operations.logs import ETA
from operations.slides import list_slides, open_slide

PAPER_N = 10_000  # crops per set and magnification in the paper's evaluation [PAPER]
OVERSAMPLE = 2    # crops by default: this many times the distinct crops (random crops overlap)


class Source:
    """Slides to evaluate (a file or a directory of them), each contributing its square area
    of N3 level-0 px (a real slide's chosen as for training; a generated slide is its area),
    or a directory of PNG / JPEG patches. A generated slide's lower stages are read from the
    OUT.stage{s}.png files sample.py writes beside it (else from the slide, downsampled)."""

    def __init__(self, path, preset):
        self.path, self.preset, self.size = path, preset, cascade.stage_size(preset, 3)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: no such file or directory")
        files = sorted(os.listdir(path)) if os.path.isdir(path) else [os.path.basename(path)]
        files = [f for f in files if not is_temp(f)]  # a killed write is never a result
        folder = path if os.path.isdir(path) else os.path.dirname(path)
        images = [os.path.join(folder, f) for f in files
                  if f.lower().endswith((".png", ".jpg", ".jpeg"))]
        manifests = [os.path.join(folder, f) for f in files if f.endswith(".windows.json")]
        slides = [f for f in files if f.lower().endswith((".svs", ".tif", ".tiff"))]
        self.is_windows = os.path.isdir(path) and bool(manifests)
        if self.is_windows and slides:
            raise ValueError(f"{path}: holds {len(manifests)} windows run(s) and {len(slides)} "
                             f"slide(s) ({slides[0]}, ...); evaluate each kind from its own "
                             "directory")
        if self.is_windows:
            return self._windows(folder, manifests)
        self.is_patches = os.path.isdir(path) and bool(images) and not slides
        self.files = images if self.is_patches else list_slides(path)
        if not self.is_patches:
            self.slides = [open_slide(f) for f in self.files]
            for slide in self.slides:  # beyond a slide smaller than its area: as training pads
                slide.background = preset.background
            self.origins = [data.choose_area(s, self.size,
                                               preset.training.area_choice) for s in self.slides]
            self.stages = [{s: f"{f}.stage{s}.png" for s in (1, 2)
                            if os.path.exists(f"{f}.stage{s}.png")} for f in self.files]
            self.check_generated_stages()

    def check_generated_stages(self):
        """A slide sample.py made is scored at magnifications 0-1 on the stage images it wrote
        beside it; without them its own downsampled pixels would stand in, and the cross-scale
        consistency would read 'identical'. Such a slide is refused in one line."""
        sizes = {cascade.stage_size(self.preset, s): s for s in (2, 3)}
        for f, slide, have in zip(self.files, self.slides, self.stages):
            stage = sizes.get(slide.dimensions[0])
            missing = [f"{f}.stage{s}.png" for s in range(1, stage or 1) if s not in have]
            if slide.synthetic and missing:
                raise ValueError(f"{f}: a slide sample.py made, without {', '.join(missing)} "
                                 "(magnifications 0-1 and the cross-scale consistency are "
                                 "read there); finish its run with sample.py --resume and the "
                                 "same flags, or make it again")

    def _windows(self, folder, manifests):
        """The runs of `sample.py --window / --patches` in a directory: magnification 2 from
        their stage-3 windows, magnifications 0-1 from the lower stages they made whole."""
        self.is_patches, self.files, self.stages, self.windows = False, manifests, [], []
        self.records = []  # (path of the window's PNG, its record, the run's manifest)
        for path in manifests:
            try:
                with open(path) as f:
                    m = json.load(f)
                stages = {int(s): os.path.join(folder, f) for s, f in m["stages"].items()}
                recs = [(os.path.join(folder, w["file"]), w, path) for w in m["windows"]
                        if w["stage"] == 3]
                made_with = m["settings"]["preset"]
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}: not a windows manifest of sample.py "
                                 f"({type(e).__name__}: {e}); remove it or make the run "
                                 "again") from None
            if made_with != self.preset.name:
                raise ValueError(f"{path}: windows made with preset {made_with}, evaluated as "
                                 f"preset {self.preset.name}: another magnification; pass "
                                 f"--preset {made_with} or evaluate them apart")
            self.stages.append(stages)
            self.records += recs
        self.windows = [w for w, _, _ in self.records]
        self.slides = manifests  # one 'slide' per run (its lower stages)

    def fingerprint(self):
        stages = [] if self.is_patches else [p for st in self.stages for p in st.values()]
        files = self.files + stages + (self.windows if self.is_windows else [])
        return [(f, os.path.getsize(f), os.path.getmtime(f)) for f in files]

    def stage_png(self, k, stage):
        """The generated stage image (uint8 array) of slide k, or None (real, or not kept)."""
        path = self.stages[k].get(stage)
        return None if path is None else np.asarray(Image.open(path).convert("RGB"))

    def crop(self, k, stage, s, u, v, out, png=None):
        """Slide k: the square of side s (a fraction of the area) at (u, v) (fractions) of its
        stage-`stage` image, area-resampled to out x out px. uint8 (out, out, 3)."""
        if png is not None:
            N = png.shape[0]
            im = Image.fromarray(png)
            return np.asarray(im.resize((out, out), Image.BOX,
                                        box=(u * N, v * N, (u + s) * N, (v + s) * N)))
        (x, y), size = self.origins[k], self.size
        return self.slides[k].read_region(x + u * size, y + v * size, out, out, s * size / out)


def n_crops(source, kind, n, crop):
    """How many crops (network passes) patch_features takes of a source: n, or one whole area
    per slide at magnification 0 without --crop, or the files of a patch directory."""
    if source.is_patches or (source.is_windows and kind == 2):
        return min(n, len(source.windows if source.is_windows else source.files))
    return len(source.slides) if kind == 0 and not crop else n


def distinct_crops(source, kind, crop):
    """How many different crops a source holds at a magnification: the area's size over a
    crop's (how many tile it), summed over the slides; one per slide at mag 0 without --crop
    (whole areas); the files of a patch directory."""
    if source.is_patches or (source.is_windows and kind == 2):
        return len(source.windows if source.is_windows else source.files)
    if kind == 0 and not crop:
        return len(source.slides)
    N = cascade.stage_size(source.preset, kind + 1)
    return len(source.slides) * (N / min(crop or source.preset.patch, N)) ** 2


def feature_cache(source, kind, n, net, *, min_tissue, crop, seed, cache_dir):
    """The cache file of patch_features' result (None: no cache)."""
    if not cache_dir:
        return None
    ident = [source.fingerprint(), str(kind), n, seed, min_tissue, crop, net.digest,
             getattr(net, "input", None), source.preset.model_dict()]
    return os.path.join(cache_dir, hashlib.sha1(json.dumps(ident).encode()).hexdigest()[:20]
                        + ".npy")


def patches_give(source, kind, side):
    """A one-line error when a patch directory's images are not side x side px, the crops of
    magnification `kind`: resized, they would be compared at another magnification."""
    for f in source.files:
        try:
            with Image.open(f) as im:
                size = im.size
        except (OSError, ValueError) as e:
            raise ValueError(f"{f}: not a readable image ({type(e).__name__}); remove it or "
                             "replace it") from None
        if size != (side, side):
            raise ValueError(f"{f}: a {size[0]} x {size[1]} px patch; magnification {kind} "
                             f"compares {side} px crops of preset {source.preset.name}: give "
                             f"patches of that size, or evaluate with --mag and --crop for "
                             f"{size[0]} px")


def windows_give(source, kind, side):
    """A one-line error when the windows runs of `source` cannot give magnification `kind` with
    crops of `side` px: a lower stage not made whole, or a window of another size (it would be
    resized to `side`, at another magnification), naming the file."""
    for png, rec, manifest in source.records if kind == 2 else ():
        size = Image.open(png).size if os.path.exists(png) else None
        if (rec["w"], rec["h"]) != (side, side) or size != (side, side):
            raise ValueError(f"{png}: a {rec['w']} x {rec['h']} px window (file: "
                             f"{'missing' if size is None else '%d x %d px' % size}; "
                             f"{os.path.basename(manifest)}); magnification 2 compares "
                             f"{side} px crops: sample windows of that size (--patch-size "
                             f"{side}) or evaluate with --crop ... {rec['w']}")
    if kind == "pfid":
        raise ValueError(f"{source.path}: pFID needs whole slides, not windows; leave --n-pfid 0")
    if kind in (0, 1) and any(kind + 1 not in st for st in source.stages):
        raise ValueError(f"{source.path}: not every run made stage {kind + 1} whole (--window "
                         "runs make only stage 1 whole); evaluate with --mag 2, or sample with "
                         "--patches")


def read_image(path):
    """An image file as (h, w, 3) uint8; a one-line error if it cannot be read."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except Exception as e:  # noqa: BLE001 - PIL raises many kinds
        raise ValueError(f"{path}: not a readable image ({type(e).__name__}); "
                         "remove or replace it") from None


class AreaView:
    """Slide k's area at level 0 as an array-like (shape, [y0:y1, x0:x1]) for metrics.seam_score."""

    def __init__(self, source, k):
        self.slide, (self.x, self.y), n = source.slides[k], source.origins[k], source.size
        self.shape = (n, n, 3)

    def __getitem__(self, idx):
        ys, xs = idx
        return self.slide.read_region(self.x + xs.start, self.y + ys.start,
                                      xs.stop - xs.start, ys.stop - ys.start)


def crop_counts(args, real, fake, nets, kw, kw_fake):
    """Crops per magnification: --n, or OVERSAMPLE x the distinct crops the smaller side holds, at
    most the paper's 10k. Prints, before any work, the crops per side with the reason, the network
    passes still to run (cached features cost none) and the time they take at a rate timed here.
    Returns ({kind: (n, crop)}, an ETA of the run's network passes)."""
    p, todo, lines, passes = real.preset, {}, [], 0
    for kind in list(args.mag) + (["pfid"] if args.n_pfid else []):
        crop = None if kind == "pfid" else (args.crop[kind] if args.crop else None)
        if kind == "pfid" or args.n:
            n = args.n_pfid if kind == "pfid" else args.n
            why = "--n-pfid" if kind == "pfid" else "--n"
        else:
            d = min(distinct_crops(real, kind, crop), distinct_crops(fake, kind, crop))
            n = min(PAPER_N, max(2, math.ceil(OVERSAMPLE * d)))
            why = (f"the smaller side holds {d:.1f} distinct crops; {OVERSAMPLE} x that, at most "
                   f"the paper's {PAPER_N}; --n overrides")
        todo[kind] = (n, crop)
        counts = []
        for src, k in ((real, kw), (fake, kw_fake)):
            counts.append(n_crops(src, kind, n, crop))
            for net in nets[:1 if kind == "pfid" else None]:
                passes += 0 if os.path.exists(feature_cache(src, kind, n, net, crop=crop, **k)
                                              or "") else counts[-1]
        N = cascade.stage_size(p, 3 if kind == "pfid" else kind + 1)
        what = ("crops of P to N3 px" if kind == "pfid" else f"whole {N} px areas"
                if kind == 0 and not crop else f"{min(crop or p.patch, N)} px crops")
        lines.append(f"  {'pFID' if kind == 'pfid' else f'mag {kind}'}: {counts[0]} real / "
                     f"{counts[1]} generated {what} ({why})")
    rate = time_network(nets[0], p.patch) if passes else float("inf")
    print("plan:\n" + "\n".join(lines) + f"\n  {passes} network passes to run (cached features "
          f"are reused), about {passes / rate / 60:.1f} min at {rate:.1f} crops/s (timed here)",
          file=sys.stderr, flush=True)
    return todo, ETA(passes)


def time_network(net, size, batch=4):
    """Crops per second through `net` (resize included), timed on one batch after a warm-up."""
    imgs = np.full((batch, size, size, 3), 200, np.uint8)
    net(imgs)
    t0 = time.time()
    net(imgs)
    return batch / max(time.time() - t0, 1e-9)


# ---------------------------------------------------------------------- the table

def format_table(results):
    fmt = lambda v, d: "n.a." if v is None else f"{v:.{d}f}"
    pm = lambda v, sd, scale=1: ("n.a." if v is None else
                                 f"{scale * v:.1f} +- {fmt(None if sd is None else scale * sd, 1)}")
    lines = [f"features: {results['network']}; IP / IR on {results['ip_ir_features']}",
             f"{'':6s} {'FID/pFID':>15s} {'KID x1e3':>15s} {'IP':>6s} {'IR':>6s} {'n real':>7s} "
             f"{'n fake':>7s}"]
    for name, r in results.items():
        if name.startswith("mag") or name == "pfid":
            lines.append(f"{name:6s} {pm(r.get('fid', r.get('pfid')), r.get('fid_std')):>15s} "
                         f"{pm(r['kid'], r['kid_std'], 1e3):>15s} {fmt(r.get('ip'), 3):>6s} "
                         f"{fmt(r.get('ir'), 3):>6s} {r['n_real']:7d} {r['n_fake']:7d}")
    lines.append("+- : standard deviation over 10 bootstrap redraws of both sides' crops; two "
                 "models differ\n     only by more than about twice it")

    if results.get("table1_ip_ir"):
        mags = results.get("table1_mags", [0, 1, 2])
        lines.append(f"IP / IR averaged over magnifications {', '.join(map(str, mags))} (the "
                     "paper's Table 1): " + " / ".join(f"{v:.3f}" for v in results["table1_ip_ir"]))
        if len(mags) < 3:
            lines.append(f"warning: the paper's Table 1 averages magnifications 0, 1 and 2; this "
                         f"average has only {len(mags)} (too few crops, or --mag): not comparable")
    for side in ("fake", "real"):
        for k, c in enumerate(results.get("consistency", {}).get(side, [])):
            lines.append(f"consistency {side} slide {k}: " + "; ".join(
                f"stage {s} vs {int(s) - 1}: MAE {'/'.join(f'{v:.1f}' for v in c[s]['mae'])} "
                f"(RGB), " + ("identical" if c[s]["psnr"] is None else f"{c[s]['psnr']:.1f} dB")
                for s in sorted(c)))
    for side, values in results.get("grey_p90", {}).items():
        lines.append(f"grey level, 90th percentile ({side}): "
                     + ", ".join(f"{v:.0f}" for v in values))
    if results.get("stage1_nearest_real"):
        lines.append("stage 1, nearest real stage-1 image (correlation over 8 symmetries, 2 px "
                     "blur; 1 = a copy): "
                     + ", ".join(f"{v:.3f}" for v in results["stage1_nearest_real"]))
    for k, sc in enumerate(results.get("seam", [])):
        lines.append(f"seam score slide {k}: "
                     + ", ".join(f"stage {s} " + ("n.a. (no gradient near the seams)" if v is None
                                                  else f"{v:.3f}") for s, v in sorted(sc.items())))
    return "\n".join(lines)
