"""Slides in: Aperio SVS, pyramidal tiled TIFF, OME-TIFF (tifffile + imagecodecs for JPEG tiles) and
plain PNG / JPEG, read region by region as OpenSlide does (read_region(x, y, w, h, downsample)
covers w * downsample x h * downsample level-0 px), never decoding more than a window.

References
  [OpenSlide] read_region / downsample conventions, https://openslide.org/api/python/
"""
import math
import os
import re
import sys

import numpy as np
import tifffile
from PIL import Image

from operations.files import is_temp

SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ome.tif", ".ome.tiff", ".png", ".jpg", ".jpeg")
# what we write beside slides: never taken for slides
OUTPUT_SUFFIXES = (".preview.png", ".thumbnail.png", ".datasets.png", "loss_curves.png",
                   ".stage1.png", ".stage2.png")
MAX_READ_PIXELS = 2 ** 28  # the largest window one read decodes (768 MiB of RGB)


SYNTHETIC = "URCDM synthetic slide"  # in the description of every slide sample.py writes


class SlideError(Exception):
    """A slide that cannot be used; the message is one line naming the file and the reason."""


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
    `mpp` (microns per pixel or None), `background`, `synthetic` (written by sample.py: its
    description says so), and read_region()."""

    def __init__(self, path, mpp, make_levels):
        # make_levels: callable(slide) -> list of levels (objects with height, width, read())
        self.path, self.mpp = path, mpp
        self._fdesc, self._pid, self._cache = None, None, {}
        self._levels = levels = make_levels(self)
        self.dimensions = (levels[0].width, levels[0].height)
        self.level_dimensions = [(lv.width, lv.height) for lv in levels]
        self.level_downsamples = [levels[0].width / lv.width for lv in levels]
        self.background, self.synthetic = 255, False

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
        win = _read_padded(lv, iy0, ix0, iy1 - iy0, ix1 - ix0, self.background)
        if (ix1 - ix0, iy1 - iy0) == (w, h) and f == 1:
            return win
        img = Image.fromarray(win)  # BOX = exact area average over the fractional source box
        return np.asarray(img.resize((w, h), Image.BOX,
                                     box=(bx0 - ix0, by0 - iy0, bx1 - ix0, by1 - iy0)))

    def thumbnail(self, max_side=1024):
        ds = max(self.dimensions) / max_side
        w, h = (max(1, round(s / ds)) for s in self.dimensions)
        return self.read_region(0, 0, w, h, ds)


def _read_padded(lv, y0, x0, h, w, background):
    """Pixels [y0, y0 + h) x [x0, x0 + w) of a level (uint8 (h, w, 3)): the part inside the level
    read, the rest `background` (a grey level or an RGB triple)."""
    inside_y = slice(max(y0, 0), min(y0 + h, lv.height))
    inside_x = slice(max(x0, 0), min(x0 + w, lv.width))
    canvas = np.empty((h, w, 3), np.uint8)
    canvas[...] = background
    if inside_y.start < inside_y.stop and inside_x.start < inside_x.stop:
        canvas[inside_y.start - y0:inside_y.stop - y0, inside_x.start - x0:inside_x.stop - x0] = \
            lv.read(inside_y.start, inside_x.start, inside_y.stop - inside_y.start,
                    inside_x.stop - inside_x.start)
    return canvas


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
            slide.synthetic = SYNTHETIC in (pages[0].description or "")
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
        and not f.lower().endswith(OUTPUT_SUFFIXES) and not f.startswith(".") and not is_temp(f))
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


def slides_mpp(paths, area_size, N3):
    """Microns per stage-3 pixel of training slides: their level-0 MPP times the area's
    downsample to N3 px (the median when slides differ; None when no slide says)."""
    mpps = []
    for path in paths:
        with open_slide(path) as slide:
            mpps += [slide.mpp] if slide.mpp else []
    return float(np.median(mpps)) * (area_size or N3) / N3 if mpps else None


def redraw_unreadable(example, seed, tries):
    """example(rng) with rng = numpy.random.default_rng(seed); when a slide cannot be read there
    (SlideError: a corrupt tile) it is drawn again from seed + [attempt], up to `tries` times, so
    a training run passes an unreadable example, and a resumed run the same way. Returns the
    example's dict with `skipped`: why the earlier draws failed ('' if none)."""
    skipped = []
    for attempt in range(tries):
        rng = np.random.default_rng(list(seed) + ([attempt] if attempt else []))
        try:
            return dict(example(rng), skipped="\n".join(skipped))
        except SlideError as e:
            skipped.append(str(e))
    raise SlideError(f"{tries} draws in a row unreadable; the last: {skipped[-1]}")
