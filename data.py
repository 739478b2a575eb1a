"""What a training example is: the nine training datasets, and the tissue rules they share with
sampling.

A training example of (stage, level) is a crop of one slide at that stage's scale. Each slide
contributes a square *area* of N3 level-0 px (paper: ~40000, the centre crop) that stands for a
whole generated slide: stage 1 = the area resized to N1; stages 2-3 = P x P fields at stage scale,
either anywhere in the area (Training.positions 'area') or at the authors' tissue grid over the
whole slide ('grid'), with the context (and region input: the field below) of the stage below;
level l > 0 adds make_lowres(level l-1). The geometry is cascade.py's, so training sees exactly
what sampling feeds. The stage images are built once per slide into a cache (operations/caches.py);
slides are read with operations/slides.py. What training sees of a slide, as a picture:
python -m operations.previews SLIDE.

References
  [PAPER]     Cechnicka et al., URCDM, MICCAI 2024 ("Datasets and Preprocessing").
"""
import copy
import json
import os
import warnings

import numpy as np
import torch

import cascade
import tiler
from operations import caches
from operations.files import LRU, atomic_path, open_budget, write_json
from operations.pyramid import box_pyramid
from operations.slides import SlideError, open_slide, redraw_unreadable

# Tissue = saturated and not black: H&E stains are coloured (HSV saturation >= 0.07), glass
# background is white/grey (low saturation), pen marks and dust can be black (value < 0.1).
TISSUE_MIN_SATURATION = 0.07
TISSUE_MIN_VALUE = 0.10
# [PAPER] "patches that are mostly white are ignored in both training and sampling": one rule for
# both. Training redraws crops whose field below is less tissue than this; sampling fills those
# from the stage below (sample.py --white-threshold); metrics leave them out of patch features.
MIN_TISSUE = 0.3  # deviation: the paper does not quantify "mostly white"
# The authors' training grid (Training.positions 'grid') keeps a block whose mean colour has HSV
# hue > 0.5 (purple to pink on skimage's 0-1 scale), saturation > 0.1, value < 0.9 [their
# patient_dataset.py].
GRID_HUE, GRID_SATURATION, GRID_VALUE = 0.5, 0.1, 0.9


def tissue_mask(rgb):
    """(h, w, 3) uint8 -> (h, w) bool, True on tissue (HSV saturation / value thresholds)."""
    rgb = np.asarray(rgb, dtype=np.float32) / 255.0
    v = rgb.max(axis=-1)
    s = (v - rgb.min(axis=-1)) / np.maximum(v, 1e-6)
    return (s >= TISSUE_MIN_SATURATION) & (v >= TISSUE_MIN_VALUE)


def tissue_fraction(rgb):
    """Share of tissue pixels in an (h, w, 3) uint8 image."""
    return float(tissue_mask(rgb).mean())


def grid_tissue(rgb):
    """(h, w, 3) uint8 -> (h, w) bool: the authors' test of a grid block's mean colour, with hue,
    saturation and value as skimage.color.rgb2hsv computes them (ties: blue, then green wins)."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    r, g, b = c[..., 0], c[..., 1], c[..., 2]
    v = c.max(axis=-1)
    delta = v - c.min(axis=-1)
    d = np.where(delta > 0, delta, 1.0)
    hue = np.where(v == b, 4 + (r - g) / d, np.where(v == g, 2 + (b - r) / d, (g - b) / d))
    hue = np.where(delta > 0, (hue / 6) % 1, 0.0)
    sat = np.where(v > 0, delta / np.where(v > 0, v, 1.0), 0.0)
    return (hue > GRID_HUE) & (sat > GRID_SATURATION) & (v < GRID_VALUE)


def white_test(sampling, stage, threshold):
    """Which patches of `stage` sampling fills from the stage below instead of generating: those
    with less tissue than `threshold` (the rule training applies to its crops), on the stages
    sampling.fill_white names [PAPER: mostly white patches at the highest magnification are
    ignored]; None where every patch is generated."""
    return tiler.WhiteTest(threshold, tissue_fraction) if stage in sampling.fill_white else None


# ---------------------------------------------------------------------- areas and stage images

def training_fields(preset, area_size=None):
    """Level-0 px of a training field at stages 1, 2 and 3 (stage 1's: the whole area): the
    preset's (Training.fields; `paper`: the authors' 40000, 6500, 1024 [their patient_dataset.py],
    1.8-3.4 % smaller than sampling's: docs/design.md), else sampling's geometry, an area of N3
    (or area_size) cut into P px fields at N2 and N3. area_size replaces stage 1's. Stages 2-3
    use theirs at grid positions; anywhere in the area, the area's stage images set the scale."""
    N3, P = cascade.stage_size(preset, 3), preset.patch
    f = preset.training.fields or (None,) * 3
    area = area_size or f[0] or N3
    return area, f[1] or P * area / cascade.stage_size(preset, 2), f[2] or P * area / N3


def choose_area(slide, size, mode="tissue"):
    """Level-0 top-left (x, y) of the size x size training area of a slide: centred on the
    tissue (centroid of the thumbnail's tissue mask) or on the slide, kept inside the slide
    when it fits. A slide smaller than the area is padded with background (warned)."""
    W, H = slide.dimensions
    if W < size or H < size:
        warnings.warn(f"{slide.path}: slide {W}x{H} is smaller than the {size} px area; padding "
                      "with background")
    cx, cy = W / 2, H / 2
    if mode == "tissue":  # deviation: the paper takes the centre crop ('centre', the paper preset)
        thumb = slide.thumbnail(512)
        m = tissue_mask(thumb)
        if m.any():
            ys, xs = np.nonzero(m)
            cy, cx = (ys.mean() + 0.5) * H / thumb.shape[0], (xs.mean() + 0.5) * W / thumb.shape[1]
    elif mode != "centre":
        raise ValueError(f"unknown area choice {mode!r}; use 'tissue' or 'centre'")
    clamp = lambda c, n: (int(round(min(max(c - size / 2, 0), n - size))) if n >= size
                          else int(round((n - size) / 2)))
    return clamp(cx, W), clamp(cy, H)


def tissue_grid(slide, block):
    """The authors' training grid [their patient_dataset.py]: level-0 top-left corners (x, y) of
    the block x block squares tiling the slide whose mean colour passes grid_tissue. (n, 2) int64"""
    (W, H) = slide.dimensions
    band = caches.band_rows(slide, block, max(1, W // block))
    cols, rows = W // block, H // block
    means = [slide.read_region(0, r0 * block, cols, min(band, rows - r0), block)
             for r0 in range(0, rows, band)]
    ys, xs = np.nonzero(grid_tissue(np.concatenate(means))) if cols and rows else ((), ())
    return np.stack([np.asarray(xs), np.asarray(ys)], axis=1).astype(np.int64).reshape(-1, 2) \
        * block


def stage_images(preset):
    """The stage images training reads: the area at stage 1 (stage 1's examples, stage 2's
    contexts) and, anywhere in the area, at stage 2 (stage 2's targets, stage 3's contexts); at
    grid positions stages 2-3 read the slide (and the overview, with the grid: build_cache)."""
    return ("stage1",) if preset.training.positions == "grid" else ("stage1", "stage2")


def build_cache(slide_path, preset, base, area_size=None, images=None):
    """What a slide's stage images are: its area (chosen by the preset's training.area_choice)
    resized to N_s for each stage image asked (images: ('stage1', 'stage2') or part of it); by
    default what training reads (stage_images) and, at grid positions, the whole slide at stage-1
    scale (`overview`, the stage-2 contexts) and the tissue grid (its block: a stage-3 patch's
    field). Written atomically, the metadata (BASE.json) last."""
    fields, tag = training_fields(preset, area_size), caches.machine_tag()
    size, grid_too, images = fields[0], images is None, list(images or stage_images(preset))
    meta = {"size": size, "slide": os.path.abspath(slide_path), "arrays": images}
    with open_slide(slide_path) as slide:
        slide.background = preset.background  # beyond a slide smaller than its area
        x, y = choose_area(slide, size, preset.training.area_choice)
        for s in (int(name[-1]) for name in images):
            n = cascade.stage_size(preset, s)
            caches.build_image(slide, x, y, n, n, size / n, f"{base}.stage{s}.npy", tag)
        if preset.training.positions == "grid" and grid_too:
            ds1, (W, H) = size / cascade.stage_size(preset, 1), slide.dimensions
            caches.build_image(slide, 0, 0, max(1, round(W / ds1)), max(1, round(H / ds1)), ds1,
                               f"{base}.overview.npy", tag)
            block = round(fields[2])  # the stage-3 field
            grid = tissue_grid(slide, block)
            with atomic_path(f"{base}.grid.npy", tag) as tmp, open(tmp, "wb") as f:
                np.save(f, grid)
            meta.update(block=block, grid_n=len(grid), arrays=meta["arrays"] + ["overview", "grid"])
    stage = np.load(f"{base}.{images[0]}.npy", mmap_mode="r")  # the whole area zoomed out
    write_json(base + ".json", dict(meta, x=x, y=y, tissue=tissue_fraction(stage)), tag=tag)


def slide_caches(paths, preset, area_size=None, cache_dir=None, rank=0, world=1, images=None):
    """Every slide's stage images (build_cache; images: those asked, default what training
    reads), built once into CACHE_DIR (default: .urcdm_cache beside each slide) by this machine's
    `world` local ranks. Returns {path: base} of the slides whose images could be built
    (caches.build_missing leaves the others out, saying so)."""
    ident = [list(training_fields(preset, area_size)), preset.training.area_choice,
             preset.training.positions, preset.patch, preset.background, list(images or ()),
             [cascade.stage_size(preset, s) for s in (1, 2, 3)]]  # what the files depend on
    bases = [caches.cache_base(p, ident, cache_dir) for p in paths]
    nbytes = 3 * sum(cascade.stage_size(preset, int(n[-1])) ** 2
                     for n in images or stage_images(preset))
    build = lambda path, base: build_cache(path, preset, base, area_size, images)
    failed = caches.build_missing(paths, bases, build, nbytes, rank, world)
    if failed and len(failed) == len(paths):
        with open(bases[0] + ".failed") as f:
            raise SlideError(f"none of the {len(paths)} slide(s) can be read; {f.read()}")
    return {p: b for i, (p, b) in enumerate(zip(paths, bases)) if i not in failed}


def slide_cache(slide_path, preset, area_size=None, cache_dir=None, images=None):
    """One slide's stage images (slide_caches), memory-mapped: caches.open_cache's dict."""
    built = slide_caches([slide_path], preset, area_size, cache_dir, images=images)
    return caches.open_cache(built[slide_path])


# ---------------------------------------------------------------------- the nine datasets

def dihedral(x, k):
    """The k-th of the 8 symmetries of the square (k in 0..7) on the last two dims."""
    x = torch.rot90(x, k % 4, dims=(-2, -1))
    return x.flip(-1) if k >= 4 else x


FAST_RESIZE = True  # resized's integer factors by operations/pyramid.py (same values, faster)


def resized(u8, size, k=0, mode="area", window=None):
    """A uint8 (H, W, 3) crop as a level's U-Net sees it: float (1, 3, size, size) in [-1, 1], the
    symmetry k, resized the way sampling resizes (cascade.downsample), then the window (y, x, c)
    if given (the top level's training crop). With FAST_RESIZE, integer factors take
    operations/pyramid.py's exact integer block sums, equal up to float rounding (tested)."""
    if FAST_RESIZE and u8.shape[0] % size == 0:
        return box_pyramid(u8, [size], k, window, mode)[size]
    x = cascade.downsample(dihedral(cascade.to_float(u8), k), size, mode)
    return x if window is None else x[..., window[0]:window[0] + window[2],
                                      window[1]:window[1] + window[2]]


MAX_OPEN = 64  # slides (with their cache maps) a process keeps open, at most (files.open_budget)
DESCRIPTORS_PER_SLIDE = 4  # an open slide: tifffile's handle and the pread one; its cache: 2 maps
MAX_REDRAW = 10  # draws of one example before its unreadable slides stop training


class StageLevelDataset(torch.utils.data.Dataset):
    """Training samples of one (stage, level) model. Item idx is a pure function of (seed, idx):
    slide, crop position, symmetry and top-level crop all come from a generator seeded with them,
    so any rank/worker split and any resume point reproduces the same samples. Returns
    dict(x0=(3, L, L), cond=(C, L, L)) in [-1, 1] (C = 0 for stage 1's base model) and `skipped`:
    why earlier draws were unreadable ('' if none: a corrupt tile's example is drawn again from
    (seed, idx, attempt), so a run passes it, and a resumed run the same way).

    slides: slide paths. area_size: level-0 side of each slide's area (None: training_fields).
    The examples held out for a validation loss (held_out; Training.holdout [the authors'
    2.5 %]: the last grid blocks, or the last slides; none where the share rounds to 0) are never
    drawn. Stage 2-3 positions (Training.positions): 'area': anywhere in the area (glass-only
    areas left out), a crop redrawn (up to 10 times) while its field below has less tissue than
    min_tissue (the paper ignores mostly white patches); 'grid': the authors' (_grid_crop), every
    tissue block of every slide equally likely. rank, world: this machine's local ranks (the
    cache build's split). max_open: slides (and their cache maps) kept open, least recently used
    closed first, and never more than the descriptor limit allows (files.open_budget).
    """

    def __init__(self, slides, preset, stage, level, *, area_size=None, cache_dir=None,
                 seed=0, length=100_000, min_tissue=MIN_TISSUE, conditioned=True,
                 augment=True, rank=0, world=1, max_open=MAX_OPEN):
        self.preset, self.stage, self.level = preset, stage, level
        fields = training_fields(preset, area_size)
        self.px = {s: fields[s - 1] / (cascade.stage_size(preset, 1) if s == 1 else preset.patch)
                   for s in (1, 2, 3)}  # level-0 px per stage-s px (grid positions)
        self.seed, self.length, self.min_tissue = seed, length, min_tissue
        self.conditioned, self.augment = conditioned, augment
        bases = slide_caches(slides, preset, area_size, cache_dir, rank, world)
        if stage > 1 and preset.training.positions == "area":  # glass-only areas teach nothing
            bases = {p: b for p, b in bases.items() if caches.open_cache(b)["tissue"] >= 1e-3}
        if not bases:
            raise SlideError(f"{slides[0]}: none of the {len(slides)} slide(s) has tissue in its "
                             "area; give slides with tissue (or --positions grid)")
        self.paths, bases = list(bases), list(bases.values())
        # The held-out examples (held_out) share these: one bound for the whole process.
        max_open = open_budget(max_open, DESCRIPTORS_PER_SLIDE)
        self.caches = LRU(max_open, lambda k: caches.open_cache(bases[k]))
        self.slides = LRU(max_open, lambda k: self._open(k), lambda s: s.close())
        self.blocks = None  # grid: cumulative tissue blocks over the slides
        if stage > 1 and preset.training.positions == "grid":
            counts = []
            for b in bases:
                with open(b + ".json") as f:
                    counts.append(json.load(f)["grid_n"])
            if not sum(counts):
                raise SlideError(f"{self.paths[0]}: no block of any of the {len(self.paths)} "
                                 "slide(s) passes the authors' tissue test (data.grid_tissue); "
                                 "use --positions area")
            self.blocks = np.cumsum(counts)
        n = int(self.blocks[-1]) if self.blocks is not None else len(self.paths)
        self.n_val = round(preset.training.holdout * n)  # held out: the last blocks or slides
        self.examples = range(n - self.n_val)  # the blocks (grid) or slides an example is of

    def held_out(self):
        """The same dataset over the held-out examples instead (None when there are none)."""
        if not self.n_val:
            return None
        val, n = copy.copy(self), len(self.examples) + self.n_val
        val.examples = range(n - self.n_val, n)
        return val

    def _open(self, k):
        slide = open_slide(self.paths[k])
        slide.background = self.preset.background  # what reads pad beyond the slide
        return slide

    def __len__(self):
        return self.length

    def _crop(self, rng, k, j=None):
        """uint8 P x P crops at stage `self.stage`: the target, the context (None at stage 1 and
        for the outpainting baseline), and the region as cascade.region_crop gives it (float;
        None unless the preset conditions on it). j: the grid block of positions 'grid'."""
        p, cache, P = self.preset, self.caches[k], self.preset.patch
        N = cascade.stage_size(p, self.stage)
        if self.stage == 1:
            return np.asarray(cache["stage1"]), None, None
        if j is not None:
            return self._grid_crop(rng, k, j)
        stage_below = cache[f"stage{self.stage - 1}"]  # the area at the stage below's scale
        r = cascade.zoom(p, self.stage)
        for _ in range(10):  # a field mostly on tissue [PAPER: mostly white patches are ignored]
            y0, x0 = (int(v) for v in rng.integers(0, N - P + 1, size=2))
            ya, yb, xa, xb = cascade.field_under(y0, x0, P, P, r, stage_below.shape[0])
            if tissue_fraction(stage_below[ya:yb, xa:xb]) >= self.min_tissue:
                break
        if self.stage == 2:
            target = np.asarray(cache["stage2"][y0:y0 + P, x0:x0 + P])
        else:
            px = cache["size"] / N  # level-0 px per stage-3 px
            target = self.slides[k].read_region(cache["x"] + x0 * px,
                                                cache["y"] + y0 * px, P, P, px)
        if not self.conditioned:
            return target, None, None
        context = cascade.context_crop(stage_below, y0, x0, P, r, p.background)
        region = cascade.region_crop(stage_below, y0, x0, P, r) if p.region else None
        return target, context, region

    def _grid_crop(self, rng, k, j):
        """_crop at the authors' positions [their patient_dataset.py]: a tissue block of slide k
        (grid_tissue; the block is a stage-3 patch's field; j drawn in __getitem__), its corner
        shifted by 0 or half a block in x and in y; the target is the stage-s field (P ds_s
        level-0 px) from that corner, the context the stage s-1 field around its centre, both
        read from the whole slide (padded beyond it with the preset's background), the stage-2
        contexts from the cached overview. Not re-tested for tissue."""
        p, cache, P, s = self.preset, self.caches[k], self.preset.patch, self.stage
        x, y = (int(v) for v in cache["grid"][j] + rng.integers(2, size=2) * (cache["block"] // 2))
        px, px_below = self.px[s], self.px[s - 1]  # level-0 px per px of stage s, of stage s-1
        target = self.slides[k].read_region(x, y, P, P, px)
        if not self.conditioned:
            return target, None, None
        cx, cy = x + P * px / 2, y + P * px / 2  # the target's centre, level-0 px
        if s == 2:  # the overview is the whole slide at stage-1 scale: context_crop's rounding
            context = cascade.window(cache["overview"], round(cy / px_below - P / 2),
                                     round(cx / px_below - P / 2), P, P, p.background)
        else:
            context = self.slides[k].read_region(cx - P * px_below / 2, cy - P * px_below / 2,
                                                  P, P, px_below)
        r = px_below / px  # the target is the centre P / r px of its context
        region = cascade.region_crop(context, P * (r - 1) / 2, P * (r - 1) / 2, P, r) \
            if p.region else None
        return target, context, region

    def __getitem__(self, idx):
        """Example idx, a pure function of (seed, idx); a corrupt tile's example is drawn again
        from (seed, idx, attempt), so every run passes it the same way (`skipped` says why)."""
        return redraw_unreadable(self.example, [self.seed, idx], MAX_REDRAW)

    def example(self, rng):
        """One training example of (stage, level) from the generator rng: which slide (grid: which
        tissue block), the crops of _crop, one of the 8 symmetries for all of them, each resized to
        the size the U-Net sees it, and the conditioning channels as sampling builds them
        (cascade.level_inputs). Returns dict(x0=(3, L, L) or (3, c, c), cond=(C, ...))."""
        j, n = None, self.examples[int(rng.integers(len(self.examples)))]  # one of this split's
        if self.blocks is not None:  # every tissue block of every slide equally likely
            k = int(np.searchsorted(self.blocks, n, side="right"))
            j = n - (int(self.blocks[k - 1]) if k else 0)
        else:
            k = n
        target, context, region = self._crop(rng, k, j)
        sym = int(rng.integers(8)) if self.augment else 0  # one symmetry for every input
        p, L = self.preset, self.preset.level_sizes[self.level]
        # The top level trains on a random c x c window of its size [Imagen]; its low-res input is
        # cut to the same window (level_inputs), its context (and region) is the whole crop
        # resized onto the window as imagen-pytorch does (`paper`: the authors' 1024 px model
        # sees its context at 1/4 scale in training, full scale at sampling).
        # deviation (training.crop_context 'window': paper_plus, demo): the context's same window,
        # one scale in training and sampling (the U-Net is fully convolutional).
        c, mode = p.training.crop, p.resize
        top = self.level == len(p.level_sizes) - 1 and c < L
        window = (*(int(v) for v in rng.integers(0, L - c + 1, size=2)), c) if top else None
        context_side = c if window and p.training.crop_context == "whole" else L
        x0 = resized(target, L, sym, mode, window)
        lower_level = resized(target, p.level_sizes[self.level - 1], sym, mode) \
            if self.level else None  # level l-1's image, the low-res input's source
        if context is not None:
            context = resized(context, context_side, sym, mode)
        if region is not None:
            region = cascade.downsample(dihedral(region, sym), context_side, mode)
        cond = cascade.level_inputs(p, self.stage, self.level, lower_level, context, region,
                                    self.conditioned, window)
        cond = torch.zeros(1, 0, *x0.shape[-2:]) if cond is None else cond
        return {"x0": x0[0].contiguous(), "cond": cond[0].contiguous()}
