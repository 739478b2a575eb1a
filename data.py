"""Slides in and out: what a training example is, the nine training datasets, slide files.

A training example of (stage, level) is a crop of one slide's square *region* (paper: ~40000
level-0 px) at that stage's scale: stage 1 = the region resized to N1; stage 2 = P x P crops of
the region resized to N2; stage 3 = P x P crops at full resolution; stages 2-3 with context
(and region) crops of the stage below, level l > 0 with make_lowres(level l-1). The geometry is
cascade.py's, so training sees exactly what sampling feeds.

Slide files: read with tifffile (+ imagecodecs for JPEG / JPEG 2000 tiles), Aperio SVS, generic
pyramidal tiled TIFF, OME-TIFF, plain PNG / JPEG / TIFF for small data; regions are read tile by
tile, OpenSlide-style (read_region(x, y, w, h, downsample) covers w*downsample x h*downsample
level-0 px). Written: an Aperio-style pyramidal BigTIFF (write_aperio) streamed from a
disk-backed image (DiskArray), so a 41344^2 slide never sits in memory.

Usage: python data.py SLIDE [--preset demo] [--out preview.png]

References
  [PAPER]     Cechnicka et al., URCDM, MICCAI 2024 ("Datasets and Preprocessing").
  [OpenSlide] read_region / downsample conventions, https://openslide.org/api/python/
  [Aperio]    OpenSlide's Aperio format notes, https://openslide.org/formats/aperio/
  [tifffile]  TiffWriter.write with tile iterators, https://github.com/cgohlke/tifffile
"""
import argparse
import collections
import contextlib
import hashlib
import json
import math
import os
import re
import socket
import sys
import time
import warnings

import numpy as np
import tifffile
import torch
from PIL import Image

import cascade

# Tissue = saturated and not black: H&E stains are coloured (HSV saturation >= 0.07), glass
# background is white/grey (low saturation), pen marks and dust can be black (value < 0.1).
TISSUE_MIN_SATURATION = 0.07
TISSUE_MIN_VALUE = 0.10
# [PAPER] "patches that are mostly white are ignored in both training and sampling": one rule for
# both. Training redraws crops whose region is less tissue than this; sampling fills such patches
# from the stage below (sample.py --white-threshold); metrics leave them out of patch features.
MIN_TISSUE = 0.3  # deviation: the paper does not quantify "mostly white"
# The authors' training grid (Training.positions 'grid') keeps a block whose mean colour has HSV
# hue > 0.5 (purple to pink on skimage's 0-1 scale), saturation > 0.1, value < 0.9 [their
# patient_dataset.py].
GRID_HUE, GRID_SATURATION, GRID_VALUE = 0.5, 0.1, 0.9
SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ome.tif", ".ome.tiff", ".png", ".jpg", ".jpeg")
# what we write beside slides: never taken for slides
OUTPUT_SUFFIXES = (".preview.png", ".thumbnail.png", ".datasets.png", "loss_curves.png",
                   ".stage1.png", ".stage2.png")
MAX_READ_PIXELS = 2 ** 28  # the largest window one read decodes (768 MiB of RGB)


class SlideError(Exception):
    """A slide that cannot be used; the message is one line naming the file and the reason."""


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


# ---------------------------------------------------------------------- regions and caches

def choose_region(slide, size, mode="tissue"):
    """Level-0 top-left (x, y) of the size x size training region of a slide: centred on the
    tissue (centroid of the thumbnail's tissue mask) or on the slide, kept inside the slide
    when it fits. A slide smaller than the region is padded with background (warned)."""
    W, H = slide.dimensions
    if W < size or H < size:
        warnings.warn(f"{slide.path}: slide {W}x{H} is smaller than the {size} px region; padding "
                      "with background")
    cx, cy = W / 2, H / 2
    if mode == "tissue":  # deviation: the paper takes the centre crop ('centre', the paper preset)
        thumb = slide.thumbnail(512)
        m = tissue_mask(thumb)
        if m.any():
            ys, xs = np.nonzero(m)
            cy, cx = (ys.mean() + 0.5) * H / thumb.shape[0], (xs.mean() + 0.5) * W / thumb.shape[1]
    elif mode != "centre":
        raise ValueError(f"unknown region mode {mode!r}; use 'tissue' or 'centre'")
    clamp = lambda c, n: (int(round(min(max(c - size / 2, 0), n - size))) if n >= size
                          else int(round((n - size) / 2)))
    return clamp(cx, W), clamp(cy, H)


def _band(slide, ds, w):
    """Rows of a w px wide read at downsample ds that take at most a quarter of MAX_READ_PIXELS
    from the level they come from."""
    f = ds / slide.level_downsamples[slide.best_level(ds)]  # source px per output px at that level
    return int(min(256, max(1, MAX_READ_PIXELS // (4 * w * f * f))))


def _build_stage_image(slide, x, y, w, h, ds, path, tag=""):
    """Level-0 px [x, x + w ds) x [y, y + h ds) resized to h x w, written band by band into a
    .npy file (atomically)."""
    band = _band(slide, ds, w)
    with atomic_path(path, tag) as tmp:
        arr = DiskArray(tmp, (h, w, 3))
        for r0 in range(0, h, band):
            arr.write(r0, 0, slide.read_region(x, y + r0 * ds, w, min(band, h - r0), ds))
        arr.close()


def tissue_grid(slide, block):
    """The authors' training grid [their patient_dataset.py]: level-0 top-left corners (x, y) of
    the block x block squares tiling the slide whose mean colour passes grid_tissue. (n, 2) int64"""
    (W, H), band = slide.dimensions, _band(slide, block, max(1, slide.dimensions[0] // block))
    cols, rows = W // block, H // block
    means = [slide.read_region(0, r0 * block, cols, min(band, rows - r0), block)
             for r0 in range(0, rows, band)]
    ys, xs = np.nonzero(grid_tissue(np.concatenate(means))) if cols and rows else ((), ())
    return np.stack([np.asarray(xs), np.asarray(ys)], axis=1).astype(np.int64).reshape(-1, 2) \
        * block


def cache_base(slide_path, preset, region_size=None, cache_dir=None):
    """Where a slide's stage images live: CACHE_DIR/<file name>.<key>{.stage1.npy, .stage2.npy,
    .json}, the key a digest of the file (path, size, time) and of the geometry."""
    size = region_size or cascade.stage_size(preset, 3)
    st = os.stat(slide_path)
    ident = [os.path.abspath(slide_path), st.st_size, st.st_mtime_ns, size,
             preset.training.region_choice, [cascade.stage_size(preset, s) for s in (1, 2, 3)]]
    if preset.training.positions == "grid":  # its own files (older keys unchanged)
        ident += ["grid", preset.patch]
    key = hashlib.sha1(json.dumps(ident).encode()).hexdigest()[:16]
    cache_dir = cache_dir or os.path.join(os.path.dirname(os.path.abspath(slide_path)),
                                          ".urcdm_cache")
    return os.path.join(cache_dir, f"{os.path.basename(slide_path)}.{key}")


def build_cache(slide_path, preset, base, region_size=None):
    """A slide's region (chosen by the preset's training.region_choice) resized to N1 and N2;
    positions 'grid': also the whole slide at stage-1 scale (`overview`, the stage-2 contexts) and
    the tissue grid (its block: a stage-3 patch's field). Written atomically, the metadata last
    (its presence means the files are complete); temp names carry this machine's tag, so machines
    sharing the directory never write one file."""
    size, tag = region_size or cascade.stage_size(preset, 3), "-" + hashlib.sha1(
        socket.gethostname().encode()).hexdigest()[:8]
    meta = {"size": size, "slide": os.path.abspath(slide_path)}
    with open_slide(slide_path) as slide:
        x, y = choose_region(slide, size, preset.training.region_choice)
        for s in (1, 2):
            n = cascade.stage_size(preset, s)
            _build_stage_image(slide, x, y, n, n, size / n, f"{base}.stage{s}.npy", tag)
        if preset.training.positions == "grid":
            ds1, (W, H) = size / cascade.stage_size(preset, 1), slide.dimensions
            _build_stage_image(slide, 0, 0, max(1, round(W / ds1)), max(1, round(H / ds1)), ds1,
                               f"{base}.overview.npy", tag)
            block = round(preset.patch * size / cascade.stage_size(preset, 3))
            grid = tissue_grid(slide, block)
            with atomic_path(f"{base}.grid.npy", tag) as tmp:
                with open(tmp, "wb") as f:
                    np.save(f, grid)
            meta.update(block=block, grid_n=len(grid))
    write_json(base + ".json", dict(meta, x=x, y=y), tag=tag)


def build_caches(paths, preset, region_size=None, cache_dir=None, rank=0, world=1, timeout=3600):
    """Every slide's stage images, built once. This machine's `world` local ranks each build
    every world-th missing one, then wait for the others' (safe when several machines share the
    directory: atomic writes, metadata last). Returns the bases (cache_base)."""
    bases = [cache_base(p, preset, region_size, cache_dir) for p in paths]
    missing = [i for i, b in enumerate(bases) if not os.path.exists(b + ".json")]
    if missing:
        os.makedirs(os.path.dirname(bases[0]), exist_ok=True)
        each = 3 * sum(cascade.stage_size(preset, s) ** 2 for s in (1, 2))
        if rank == 0:
            print(f"building the stage images of {len(missing)} slide(s) into "
                  f"{os.path.dirname(bases[0])}: about {len(missing) * each / 1e9:.2f} GB "
                  f"({each / 1e6:.0f} MB a slide), {world} local rank(s) in parallel",
                  file=sys.stderr, flush=True)
        mine, t0 = missing[rank::world], time.time()
        for j, i in enumerate(mine):
            if not os.path.exists(bases[i] + ".json"):
                build_cache(paths[i], preset, bases[i], region_size)
            if rank == 0 and (j + 1) % max(1, len(mine) // 10) == 0:
                eta = (time.time() - t0) / (j + 1) * (len(mine) - j - 1)
                print(f"  {j + 1}/{len(mine)} of rank 0's share, ETA {eta / 60:.1f} min",
                      file=sys.stderr, flush=True)
        for i in missing:  # the other ranks' shares
            while not os.path.exists(bases[i] + ".json"):
                if time.time() - t0 > timeout:
                    raise TimeoutError(f"{bases[i]}.json: not built within {timeout} s by the "
                                       "rank whose share it is")
                time.sleep(0.5)
    return bases


def open_cache(base):
    """A built cache: dict(x, y, size, slide, stage1=memmap (N1, N1, 3), stage2=memmap); with a
    grid also block, grid_n, overview=memmap, grid=(grid_n, 2) level-0 corners."""
    with open(base + ".json") as f:
        meta = json.load(f)
    files = {k: np.load(f"{base}.{k}.npy", mmap_mode="r") for k in ("stage1", "stage2")}
    if "block" in meta:
        files.update(overview=np.load(f"{base}.overview.npy", mmap_mode="r"),
                     grid=np.load(f"{base}.grid.npy"))
    return dict(meta, **files)


def slide_cache(slide_path, preset, region_size=None, cache_dir=None, rank=0):
    """Stage-1 and stage-2 images of one slide's region, built once, memory-mapped."""
    return open_cache(build_caches([slide_path], preset, region_size, cache_dir, rank)[0])


class LRU:
    """At most `size` open things (slides, memory maps) by key, the least recently used closed
    first: a process's file descriptors stay bounded whatever the number of slides."""

    def __init__(self, size, open_fn, close_fn=None):
        self.size, self.open_fn, self.close_fn = size, open_fn, close_fn
        self.items = collections.OrderedDict()

    def __getitem__(self, key):
        if key in self.items:
            self.items.move_to_end(key)
        else:
            if len(self.items) >= self.size:
                _, old = self.items.popitem(last=False)
                if self.close_fn:
                    self.close_fn(old)
            self.items[key] = self.open_fn(key)
        return self.items[key]


# ---------------------------------------------------------------------- the nine datasets

def dihedral(x, k):
    """The k-th of the 8 symmetries of the square (k in 0..7) on the last two dims."""
    x = torch.rot90(x, k % 4, dims=(-2, -1))
    return x.flip(-1) if k >= 4 else x


# Cache maps are read-only and only ever read here: torch's warning about wrapping them is noise.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


def box_pyramid(u8, sizes, k=0, window=None, mode="area"):
    """(H, W, 3) uint8 -> {size: (1, 3, size, size) float in [-1, 1]} for each integer factor
    f = H / size: the area resize as exact integer block sums (halving the image while f is even),
    then symmetry k and, if given, the window (y, x, c), then one conversion to float. Equal to
    cascade.downsample(dihedral(to_float(u8), k), size, mode) (windowed) up to float rounding
    (~1e-7; tests/test_data.py) at a fraction of its cost; one pass serves several sizes.
    mode 'nearest': the symmetry first (it does not commute with picking), then every f-th px."""
    if mode == "nearest":
        return _nearest_pyramid(u8, sizes, k, window)
    x, f, out = torch.from_numpy(np.ascontiguousarray(u8)), 1, {}
    for size in sorted(sizes, reverse=True):
        if u8.shape[0] % size:  # not an integer factor: the float route
            out[size] = dihedral(cascade.downsample(cascade.to_float(u8), size), k)
            continue
        while (u8.shape[0] // size) // f % 2 == 0:  # 2 x 2 block sums, in int32 (exact)
            x, f = x[0::2].to(torch.int32) + x[1::2], 2 * f
            x = x[:, 0::2] + x[:, 1::2]
        g = u8.shape[0] // size // f
        sums = x if g == 1 else x.to(torch.int32).view(size, g, size, g, 3).sum((1, 3))
        sums = torch.rot90(sums, k % 4, dims=(0, 1))  # the symmetry, on the small array
        sums = sums.flip(1) if k >= 4 else sums
        if window:
            sums = sums[window[0]:window[0] + window[2], window[1]:window[1] + window[2]]
        out[size] = sums.permute(2, 0, 1)[None].float() / (127.5 * (f * g) ** 2) - 1
    return out


def _nearest_pyramid(u8, sizes, k, window):
    """box_pyramid's 'nearest' route: pixel (i f, j f) of the symmetric image, as F.interpolate's
    'nearest' picks it; non-integer factors through the float route."""
    a = np.rot90(np.asarray(u8), k % 4, axes=(0, 1))  # views: nothing is copied at full size
    a = a[:, ::-1] if k >= 4 else a
    y, xx, c = window or (0, 0, None)
    out = {}
    for size in sizes:
        if u8.shape[0] % size:
            small = cascade.downsample(dihedral(cascade.to_float(u8), k), size, "nearest")
            out[size] = small if window is None else small[..., y:y + c, xx:xx + c]
            continue
        f = u8.shape[0] // size
        picked = a[::f, ::f] if window is None else a[::f, ::f][y:y + c, xx:xx + c]
        out[size] = cascade.to_float(np.ascontiguousarray(picked))
    return out



MAX_OPEN = 64  # slides, and slides' cache maps, a process keeps open (each: 1-2 descriptors)


class StageLevelDataset(torch.utils.data.Dataset):
    """Training samples of one (stage, level) model.

    Item idx is a pure function of (seed, idx): slide, crop position, symmetry and top-level
    crop all come from a generator seeded with them, so any rank/worker split and any resume
    point reproduces the same samples. Returns dict(x0=(3, L, L), cond=(C, L, L)) in [-1, 1]
    (C = 0 for the unconditional stage-1 base model).

    slides: list of slide paths. region_size: level-0 side of each slide's region (None:
    N3, so stage 3 is at full resolution). Stage 2-3 positions (preset.training.positions):
    'region': anywhere in the region; crops whose region has less tissue than min_tissue are
    redrawn (up to 10 times), as the paper ignores mostly white patches. 'grid': the authors'
    (_grid_crop), every tissue block of every slide equally likely.
    rank, world: this machine's local rank and rank count (the cache build's split).
    max_open: slides and cache maps kept open per process (least recently used closed first).
    """

    def __init__(self, slides, preset, stage, level, *, region_size=None, cache_dir=None,
                 seed=0, length=100_000, min_tissue=MIN_TISSUE, conditioned=True,
                 augment=True, rank=0, world=1, max_open=MAX_OPEN):
        self.preset, self.stage, self.level = preset, stage, level
        self.seed, self.length, self.min_tissue = seed, length, min_tissue
        self.conditioned, self.augment = conditioned, augment
        self.paths = list(slides)
        bases = build_caches(self.paths, preset, region_size, cache_dir, rank, world)
        self.caches = LRU(max_open, lambda k: open_cache(bases[k]))
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
                                 "use --positions region")
            self.blocks = np.cumsum(counts)

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
        lower = cache[f"stage{self.stage - 1}"]
        r = cascade.zoom(p, self.stage)
        for _ in range(10):
            y0, x0 = (int(v) for v in rng.integers(0, N - P + 1, size=2))
            if tissue_fraction(cascade.region_window(lower, y0, x0, P, r)) >= self.min_tissue:
                break
        if self.stage == 2:
            target = np.asarray(cache["stage2"][y0:y0 + P, x0:x0 + P])
        else:
            ds = cache["size"] / N
            target = self.slides[k].read_region(cache["x"] + x0 * ds,
                                                cache["y"] + y0 * ds, P, P, ds)
        if not self.conditioned:
            return target, None, None
        context = cascade.context_crop(lower, y0, x0, P, r, p.background)
        region = cascade.region_crop(lower, y0, x0, P, r) if p.region else None
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
        ds, ds_low = (cache["size"] / cascade.stage_size(p, t) for t in (s, s - 1))
        target = self.slides[k].read_region(x, y, P, P, ds)
        if not self.conditioned:
            return target, None, None
        cx, cy = x + P * ds / 2, y + P * ds / 2  # the target's centre, level-0 px
        if s == 2:  # the overview is the whole slide at stage-1 scale: context_crop's rounding
            context = cascade.window(cache["overview"], round(cy / ds_low - P / 2),
                                     round(cx / ds_low - P / 2), P, P, p.background)
        else:
            context = self.slides[k].read_region(cx - P * ds_low / 2, cy - P * ds_low / 2, P, P,
                                                  ds_low)
        r = cascade.zoom(p, s)  # the target is the centre P / r px of its context
        region = cascade.region_crop(context, P * (r - 1) / 2, P * (r - 1) / 2, P, r) \
            if p.region else None
        return target, context, region

    def __getitem__(self, idx):
        rng = np.random.default_rng([self.seed, idx])
        j = None
        if self.blocks is not None:  # every tissue block of every slide equally likely
            n = int(rng.integers(self.blocks[-1]))
            k = int(np.searchsorted(self.blocks, n, side="right"))
            j = n - (int(self.blocks[k - 1]) if k else 0)
        else:
            k = int(rng.integers(len(self.paths)))
        target, context, region = self._crop(rng, k, j)
        sym = int(rng.integers(8)) if self.augment else 0  # one symmetry for every input
        p, L = self.preset, self.preset.level_sizes[self.level]
        # Each input reduced to the size it is used at while still uint8 (box sums in integers),
        # the symmetry on the small array, one conversion to float [same as sampling's float
        # route up to rounding]; then the conditioning channels of (stage, level) [cascade].
        # Top level: a random crop, the same window of target and low-res input; the context
        # (and region) whole, resized onto the crop, as imagen-pytorch does (`paper`), so the
        # authors' 1024 px model sees its context at 1/4 scale in training, full scale at sampling.
        # deviation (training.crop_context 'window': paper_plus, demo): the same window of them
        # too, one scale in training and sampling (the U-Net is fully convolutional).
        c = p.training.crop
        top = self.level == len(p.level_sizes) - 1 and c < L
        window = (*(int(v) for v in rng.integers(0, L - c + 1, size=2)), c) if top else None
        below = p.level_sizes[self.level - 1] if self.level else None  # the lowres input's size
        m = p.resize
        if window:  # the target's window apart (its full size is never converted)
            small = {**box_pyramid(target, [L], sym, window, m), below: None}
            small.update(box_pyramid(target, [below], sym, mode=m))
        else:
            small = box_pyramid(target, [L] + ([below] if below else []), sym, mode=m)
        cs = c if window and p.training.crop_context == "whole" else L  # the context's size
        ctx = None if context is None else box_pyramid(context, [cs], sym, mode=m)[cs]
        reg = None if region is None else cascade.downsample(dihedral(region, sym), cs, m)

        x0 = small[L]
        cond = cascade.level_inputs(p, self.stage, self.level, small.get(below), ctx, reg,
                                    self.conditioned, window)
        cond = torch.zeros(1, 0, *x0.shape[-2:]) if cond is None else cond
        return {"x0": x0[0].contiguous(), "cond": cond[0].contiguous()}


# ---------------------------------------------------------------------- slide files in

def _to_rgb(arr, path):
    """Explicit colour-layout handling: 16-bit -> 8-bit (x * 255 / 65535, rounded), gray -> RGB,
    RGBA -> RGB over white, others rejected."""
    if arr.dtype == np.uint16:
        arr = ((arr.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    if arr.dtype != np.uint8:
        raise SlideError(f"{path}: {arr.dtype} pixels are not supported; convert the slide to "
                         "8-bit RGB")
    if arr.ndim == 2:
        return np.repeat(arr[..., None], 3, axis=-1)
    if arr.shape[-1] == 3:
        return arr
    if arr.shape[-1] == 4:
        a = arr[..., 3:].astype(np.float32) / 255
        return np.round(arr[..., :3] * a + 255 * (1 - a)).astype(np.uint8)
    raise SlideError(f"{path}: {arr.shape[-1]} colour channels are not supported; convert the "
                     "slide to RGB")


class _TiffLevel:
    """One pyramid level of a tiled (or stripped) TIFF page; reads only the tiles it needs."""

    def __init__(self, slide, page):
        self.slide, self.page, self.key = slide, page, page.keyframe
        self.height, self.width = self.key.imagelength, self.key.imagewidth
        key = self.key
        if key.photometric not in (tifffile.PHOTOMETRIC.RGB, tifffile.PHOTOMETRIC.YCBCR,
                                   tifffile.PHOTOMETRIC.MINISBLACK):
            raise SlideError(f"{slide.path}: photometric {key.photometric.name} (e.g. CMYK) is not "
                             "supported; convert the slide to RGB")
        if key.planarconfig == tifffile.PLANARCONFIG.SEPARATE and key.samplesperpixel > 1:
            raise SlideError(f"{slide.path}: planar (separate) samples are not supported; rewrite "
                             "as contiguous RGB")

    def read(self, y0, x0, h, w):
        """Pixels [y0, y0+h) x [x0, x0+w) of this level (inside it), uint8 (h, w, 3)."""
        key = self.key
        if not key.is_tiled:  # stripped page: small images only, decoded whole once
            return self.slide._whole(self.page)[y0:y0 + h, x0:x0 + w]
        th, tw = key.tilelength, key.tilewidth
        across = math.ceil(self.width / tw)
        out = np.empty((h, w, key.samplesperpixel if key.samplesperpixel > 1 else 1), key.dtype)
        for ty in range(y0 // th, (y0 + h - 1) // th + 1):
            for tx in range(x0 // tw, (x0 + w - 1) // tw + 1):
                tile = self._tile(ty * across + tx)  # (th, tw, spp)
                ya, yb = max(y0, ty * th), min(y0 + h, (ty + 1) * th)
                xa, xb = max(x0, tx * tw), min(x0 + w, (tx + 1) * tw)
                out[ya - y0:yb - y0, xa - x0:xb - x0] = tile[ya - ty * th:yb - ty * th,
                                                             xa - tx * tw:xb - tx * tw]
        return _to_rgb(out[..., 0] if out.shape[-1] == 1 else out, self.slide.path)

    def _tile(self, index):
        offset, count = self.page.dataoffsets[index], self.page.databytecounts[index]
        key = self.key
        if count == 0:
            return np.full((key.tilelength, key.tilewidth, key.samplesperpixel), 255, np.uint8)
        data = os.pread(self.slide._fd(), count, offset)
        if len(data) != count:
            raise SlideError(f"{self.slide.path}: truncated file (tile {index} ends past the end "
                             "of the file)")
        try:
            seg = key.decode(data, index, jpegtables=key.jpegtables)[0]
        except Exception as e:  # noqa: BLE001 - codec errors come in many types
            raise SlideError(f"{self.slide.path}: corrupt tile {index} "
                             f"({type(e).__name__}: {e})") from None
        return seg.reshape(key.tilelength, key.tilewidth, -1)


class _ArrayLevel:
    """A level held as an in-memory array (plain PNG / JPEG images)."""

    def __init__(self, arr):
        self.arr, (self.height, self.width) = arr, arr.shape[:2]

    def read(self, y0, x0, h, w):
        return self.arr[y0:y0 + h, x0:x0 + w]


class Slide:
    """An opened slide: `dimensions` (width, height) of level 0, `levels`, `level_downsamples`,
    `mpp` (microns per pixel or None), `background`, and read_region()."""

    def __init__(self, path, mpp, make_levels):
        # make_levels: callable(slide) -> list of levels (objects with height, width, read())
        self.path, self.mpp = path, mpp
        self._fdesc, self._pid, self._cache = None, None, {}
        self._levels = levels = make_levels(self)
        self.dimensions = (levels[0].width, levels[0].height)
        self.level_dimensions = [(lv.width, lv.height) for lv in levels]
        self.level_downsamples = [levels[0].width / lv.width for lv in levels]
        self.background = 255

    def close(self):
        """Close the file descriptors (this process's and the TIFF reader's)."""
        if self._fdesc is not None and self._pid == os.getpid():
            os.close(self._fdesc)
        self._fdesc, self._pid = None, None
        if getattr(self, "tif", None) is not None:
            self.tif.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _fd(self):  # one descriptor per process: pread is safe across threads and forks
        if self._pid != os.getpid():
            self._fdesc, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return self._fdesc

    def _whole(self, page):
        if id(page) not in self._cache:
            self._cache[id(page)] = _to_rgb(page.asarray(), self.path)
        return self._cache[id(page)]

    def best_level(self, downsample):
        """The smallest level whose downsample is <= the requested one (OpenSlide's choice)."""
        ok = [k for k, d in enumerate(self.level_downsamples) if d <= downsample * (1 + 1e-9)]
        return max(ok, key=lambda k: self.level_downsamples[k]) if ok else 0

    def read_region(self, x, y, w, h, downsample=1.0):
        """RGB uint8 (h, w, 3) covering level-0 pixels [x, x + w*ds) x [y, y + h*ds); pixels
        outside the slide are background. Reads from the best level, then area-resamples."""
        k = self.best_level(downsample)
        lv, d = self._levels[k], self.level_downsamples[k]
        f = downsample / d  # remaining factor, >= 1
        # Source box in level-k pixels (float), and the integer window that contains it.
        bx0, by0, bx1, by1 = x / d, y / d, (x + w * downsample) / d, (y + h * downsample) / d
        ix0, iy0 = math.floor(bx0), math.floor(by0)
        ix1, iy1 = math.ceil(bx1), math.ceil(by1)
        if (ix1 - ix0) * (iy1 - iy0) > MAX_READ_PIXELS:  # bounded memory, whatever a header claims
            raise SlideError(f"{self.path}: reading {w}x{h} px at downsample {downsample:g} needs "
                             f"{ix1 - ix0}x{iy1 - iy0} px of level {k} (more than "
                             f"{MAX_READ_PIXELS} px): the slide has no pyramid level near that "
                             "scale; save it with a pyramid (e.g. vips tiffsave --pyramid --tile)")
        win = cascade.window(_LevelView(lv), iy0, ix0, iy1 - iy0, ix1 - ix0, self.background)
        if (ix1 - ix0, iy1 - iy0) == (w, h) and f == 1:
            return win
        img = Image.fromarray(win)  # BOX = exact area average over the fractional source box
        return np.asarray(img.resize((w, h), Image.BOX,
                                     box=(bx0 - ix0, by0 - iy0, bx1 - ix0, by1 - iy0)))

    def thumbnail(self, max_side=1024):
        ds = max(self.dimensions) / max_side
        w, h = (max(1, round(s / ds)) for s in self.dimensions)
        return self.read_region(0, 0, w, h, ds)


class _LevelView:
    """Array-like facade of a level for cascade.window (shape + 2-D slicing)."""

    def __init__(self, lv):
        self.lv, self.shape = lv, (lv.height, lv.width, 3)

    def __getitem__(self, idx):
        ys, xs = idx
        return self.lv.read(ys.start, xs.start, ys.stop - ys.start, xs.stop - xs.start)


def _mpp(tif, page):
    m = re.search(r"MPP\s*=\s*([0-9.]+)", page.description or "")
    if m:
        return float(m.group(1))
    if tif.is_ome:
        m = re.search(r'PhysicalSizeX="([0-9.eE+-]+)"', tif.ome_metadata or "")
        if m:
            return float(m.group(1))
    tags = page.tags
    if "XResolution" in tags and "ResolutionUnit" in tags:
        num, den = tags["XResolution"].value
        unit = {2: 25400.0, 3: 10000.0}.get(int(tags["ResolutionUnit"].value))
        if unit and num:
            return unit * den / num
    return None


def open_slide(path):
    """Open a slide or image; raises SlideError with a one-line reason."""
    if not os.path.exists(path):
        raise SlideError(f"{path}: no such file")
    if os.path.isdir(path):
        raise SlideError(f"{path}: is a directory, not a slide")
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:2] in (b"II", b"MM"):
        try:
            tif = tifffile.TiffFile(path)
            series = tif.series[0]
            pages = [lvl.pages[0] for lvl in series.levels]
            slide = Slide(path, _mpp(tif, pages[0].keyframe),
                          lambda sl: [_TiffLevel(sl, p) for p in pages])
            slide.tif = tif  # closed with the slide
            return slide
        except SlideError:
            raise
        except Exception as e:  # noqa: BLE001
            if "tif" in locals():
                tif.close()
            raise SlideError(f"{path}: not a readable TIFF ({type(e).__name__}: {e})") from None
    try:
        with Image.open(path) as im:
            if im.mode == "CMYK":
                raise SlideError(f"{path}: CMYK images are not supported; convert to RGB")
            arr = np.asarray(im if im.mode.startswith("I;16") else im.convert(
                "RGBA" if "A" in im.getbands() else ("L" if im.mode == "L" else "RGB")))
            arr = arr.astype(np.uint16) if im.mode.startswith("I;16") else arr
    except SlideError:
        raise
    except Exception as e:  # noqa: BLE001
        raise SlideError(f"{path}: not an image ({type(e).__name__})") from None
    return Slide(path, None, lambda sl: [_ArrayLevel(_to_rgb(arr, path))])


def list_slides(path):
    """Open every slide in a directory (or the one file given). A bad file is reported on
    stderr and skipped, with a count at the end; returns the usable paths."""
    if not os.path.exists(path):
        raise SlideError(f"{path}: no such file or directory")
    paths = [path] if os.path.isfile(path) else sorted(  # our own outputs are never slides
        os.path.join(path, f) for f in os.listdir(path) if f.lower().endswith(SLIDE_SUFFIXES)
        and not f.lower().endswith(OUTPUT_SUFFIXES) and not f.startswith("."))
    good = []
    for p in paths:
        try:
            open_slide(p).close()
            good.append(p)
        except SlideError as e:
            print(f"skipping slide: {e}", file=sys.stderr)
    if len(good) < len(paths):
        print(f"{len(good)} of {len(paths)} slides usable, {len(paths) - len(good)} skipped",
              file=sys.stderr)
    if not good:
        raise SlideError(f"{path}: no usable slides (looked for {', '.join(SLIDE_SUFFIXES)})")
    return good


# ---------------------------------------------------------------------- slide files out

class DiskArray:
    """An (H, W, 3) uint8 image in a .npy file, read and written with pread / pwrite.

    Unlike np.memmap, touched pages do not stay mapped into the process, so the resident
    memory stays at the size of the windows in flight however large the image is. It is the
    tiler's canvas (read / write) and slices like an array, img[r0:r1] and img[y0:y1, x0:x1]
    (what cascade.window, region_crop and write_aperio use)."""

    def __init__(self, path, shape=None, fill=None):
        # shape given: create the file (sparse, zero-filled; `fill` writes a grey level).
        if shape is not None:
            np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=tuple(shape))
        header = np.load(path, mmap_mode="r")  # maps the file, reads no pixels
        if header.dtype != np.uint8 or header.ndim != 3 or header.shape[2] != 3:
            raise ValueError(f"{path}: not an (H, W, 3) uint8 image file")
        self.shape, self.offset, self.path = header.shape, header.offset, path
        del header
        self.fd, self.row_bytes = os.open(path, os.O_RDWR), self.shape[1] * 3
        if fill is not None:
            band = np.full((min(256, self.shape[0]), self.shape[1], 3), fill, np.uint8)
            for r0 in range(0, self.shape[0], band.shape[0]):
                self.write(r0, 0, band[:self.shape[0] - r0])

    def _spans(self, y0, x0, h, w):  # (file offset, bytes) per row, or one span for whole rows
        if x0 == 0 and w == self.shape[1]:
            return [(self.offset + y0 * self.row_bytes, h * self.row_bytes)]
        return [(self.offset + (y0 + r) * self.row_bytes + x0 * 3, w * 3) for r in range(h)]

    def read(self, y0, x0, h, w):
        buf = b"".join(os.pread(self.fd, n, off) for off, n in self._spans(y0, x0, h, w))
        return np.frombuffer(buf, np.uint8).reshape(h, w, 3).copy()

    def write(self, y0, x0, arr):
        arr = np.ascontiguousarray(arr, dtype=np.uint8)
        data, pos = arr.tobytes(), 0
        for off, n in self._spans(y0, x0, *arr.shape[:2]):
            if os.pwrite(self.fd, data[pos:pos + n], off) != n:  # a short write: the disk is full
                raise OSError(28, f"short write to {self.path} (disk full?)")
            pos += n

    def _box(self, idx):
        ys, xs = idx if isinstance(idx, tuple) else (idx, slice(None))
        (y0, y1, _), (x0, x1, _) = ys.indices(self.shape[0]), xs.indices(self.shape[1])
        return y0, x0, max(y1 - y0, 0), max(x1 - x0, 0)

    def __getitem__(self, idx):
        return self.read(*self._box(idx))

    def __setitem__(self, idx, value):
        self.write(*self._box(idx)[:2], value)

    def flush(self):
        os.fsync(self.fd)

    def close(self):
        os.close(self.fd)


def halve(src, dst, band=512):
    """dst = 2x2 area average of src (edge-replicated when odd), band by band.
    src: (H, W, 3) uint8 array-like; dst: (ceil(H/2), ceil(W/2), 3) uint8 array-like."""
    H, W = src.shape[:2]
    for r0 in range(0, H, band):
        b = np.asarray(src[r0:r0 + band], dtype=np.float32)
        b = np.pad(b, ((0, b.shape[0] % 2), (0, W % 2), (0, 0)), mode="edge")
        avg = b.reshape(b.shape[0] // 2, 2, b.shape[1] // 2, 2, 3).mean(axis=(1, 3))
        dst[r0 // 2:r0 // 2 + avg.shape[0]] = np.round(avg).astype(np.uint8)


def _tiles(src, tile):
    """Row-major tiles (tile, tile, 3) of an array-like, edge tiles padded; one band at a time."""
    H, W = src.shape[:2]
    for r0 in range(0, H, tile):
        band = np.asarray(src[r0:r0 + tile])
        band = np.pad(band, ((0, tile - band.shape[0]), (0, (-W) % tile), (0, 0)), mode="edge")
        for c0 in range(0, band.shape[1], tile):
            yield band[:, c0:c0 + tile]


def write_aperio(path, image, *, tile=256, mpp=0.25, compression="jpeg", quality=90, min_side=1024,
                 workdir=None, thumb_side=768):
    """Write an (N, M, 3) uint8 array-like (array or memmap, read band by band) as an
    Aperio-style pyramidal tiled BigTIFF at `path`. Lower levels are built x2 at a time into
    temporary files under `workdir` (default: beside `path`), so memory stays bounded.
    compression: 'jpeg' (needs imagecodecs) or 'zlib'."""
    if compression not in ("jpeg", "zlib"):
        raise ValueError(f"compression {compression!r}: use 'jpeg' or 'zlib'")
    H, W = image.shape[:2]
    workdir = workdir or os.path.dirname(os.path.abspath(path))
    levels, temps = [image], []
    while max(levels[-1].shape[:2]) > min_side:
        h, w = (math.ceil(s / 2) for s in levels[-1].shape[:2])
        tmp = os.path.join(workdir, f".{os.path.basename(path)}.level{len(levels)}.npy")
        nxt = DiskArray(tmp, (h, w, 3))
        halve(levels[-1], nxt)
        levels.append(nxt)
        temps.append(tmp)
    small = np.asarray(levels[-1][:])
    th = max(1, round(small.shape[0] * thumb_side / max(small.shape[:2])))
    tw = max(1, round(small.shape[1] * thumb_side / max(small.shape[:2])))
    thumb = np.asarray(Image.fromarray(small).resize((tw, th), Image.BOX))
    codec = dict(compression=compression,
                 compressionargs={"level": quality if compression == "jpeg" else 6})
    q = f"{compression.upper()}/RGB Q={quality}" if compression == "jpeg" else "ZLIB/RGB"
    props = f"AppMag = {10 / mpp:g}|MPP = {mpp:g}|Software = URCDM"
    head = (f"Aperio Image Library v12.0.0 URCDM synthetic slide\r\n"
            f"{W}x{H} [0,0 {W}x{H}] ({tile}x{tile})")
    try:
        with tifffile.TiffWriter(path, bigtiff=True) as tif:
            for k, lv in enumerate(levels):
                h, w = lv.shape[:2]
                desc = f"{head} {q}|{props}" if k == 0 else f"{head} -> {w}x{h} {q}"
                tif.write(_tiles(lv, tile), shape=(h, w, 3), dtype=np.uint8, tile=(tile, tile),
                          photometric="rgb",
                          description=desc, metadata=None, subfiletype=0,
                          buffersize=tile * tile * 3 * 64, **codec)
                if k == 0:  # page 1: the stripped thumbnail
                    tif.write(thumb, photometric="rgb",
                              description=f"{head} -> {tw}x{th} - |{props}",
                              metadata=None, **codec)
    finally:
        for lv in levels[1:]:
            lv.close()
        for tmp in temps:
            if os.path.exists(tmp):
                os.remove(tmp)


# ---------------------------------------------------------------------- files written whole

@contextlib.contextmanager
def atomic_path(path, tag=""):
    """`with atomic_path(p) as tmp:` write tmp; on success it is synced and renamed to p, so a
    reader (or a resumed run) sees the old file or the new one, never half of one; on failure
    it is removed. The temp name keeps p's extension (np.save, np.load need it) and holds the pid
    (and `tag`, e.g. the machine's, where several machines write into one directory)."""
    root, ext = os.path.splitext(path)
    tmp = f"{root}.tmp{os.getpid()}{tag}{ext}"
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def file_digest(path, algorithm="sha256"):
    """Hex digest of a file's content, read in 1 MiB blocks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_json(path, obj, indent=None, tag=""):
    with atomic_path(path, tag) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=indent)


# ---------------------------------------------------------------------- CLI

def _preview(ds, n=1):
    """One row per sample: target, then each 3-channel conditioning group, at 128 px."""
    item = ds[0]
    tiles = [item["x0"]] + (list(item["cond"].split(3)) if item["cond"].shape[0] else [])
    tiles = [torch.nn.functional.interpolate(t[None],
                                             size=(128, 128), mode="nearest")[0] for t in tiles]
    return cascade.to_uint8(torch.cat(tiles, dim=2)[None])[0]


def main(argv=None):
    ap = argparse.ArgumentParser(description="Inspect a slide and preview the nine URCDM training "
                                             "datasets.")
    ap.add_argument("slide", help="slide file (.svs, .tif, OME-TIFF, .png, .jpg)")
    ap.add_argument("--preset", default="demo", help="preset whose geometry to use (default: demo)")
    ap.add_argument("--region-size", type=int, default=None,
                    help="level-0 side of the region (default: N3)")
    ap.add_argument("--out", default=None,
                    help="preview PNG (default: SLIDE_NAME.datasets.png in the current directory, "
                         "not beside the slide)")
    ap.add_argument("--cache", default=".urcdm_cache",
                    help="cache directory (default: .urcdm_cache here, never beside the slide)")
    args = ap.parse_args(argv)
    try:
        slide = open_slide(args.slide)
        preset = cascade.get_preset(args.preset)
        print(f"{args.slide}: {slide.dimensions[0]} x {slide.dimensions[1]} px, MPP {slide.mpp}")
        for k, (dim, d) in enumerate(zip(slide.level_dimensions, slide.level_downsamples)):
            print(f"  level {k}: {dim[0]} x {dim[1]} (downsample {d:g})")
        print(f"  tissue fraction (thumbnail): {tissue_fraction(slide.thumbnail(1024)):.3f}")
        rows = []
        for stage in (1, 2, 3):
            for level in range(3):
                ds = StageLevelDataset([args.slide], preset, stage, level,
                                       region_size=args.region_size,
                                       cache_dir=args.cache, length=1)
                row = _preview(ds)
                rows.append(np.pad(row, ((2, 2), (0, 128 * 4 - row.shape[1]), (0, 0)),
                                   constant_values=255))
    except (SlideError, ValueError) as e:
        sys.exit(f"error: {e}")
    out = args.out or os.path.basename(args.slide) + ".datasets.png"
    with atomic_path(out) as tmp:
        Image.fromarray(np.concatenate(rows)).save(tmp, format="PNG")
    print("preview of the nine datasets (rows: stage 1-3 x level 0-2; target, then lowres (levels "
          f"1-2), context and region (stages 2-3)): {out}")


if __name__ == "__main__":
    main()
