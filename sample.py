"""sample.py: generate a whole synthetic slide and write it as a pyramidal BigTIFF.

To be completed by the issue "sample.py" (CLI, the three stages, streamed on-disk canvas,
resume, distribution over ranks). The Aperio writer below is already used by the tests.

Output format (DESIGN §6): Aperio-style tiled BigTIFF that OpenSlide (vendor 'aperio'),
QuPath and tifffile read: page 0 = level 0 (tiled), page 1 = stripped thumbnail, then each
x2-smaller level as its own tiled page, ImageDescription 'Aperio Image Library ...|MPP = ..'.

References
  [Aperio]    OpenSlide's Aperio format notes, https://openslide.org/formats/aperio/
  [tifffile]  TiffWriter.write with tile iterators, https://github.com/cgohlke/tifffile
"""
import math
import os

import numpy as np
import tifffile
from PIL import Image


def pyramid_sizes(size, min_side=1024):
    """Level sides: size, ceil(size/2), ... down to the first one <= min_side."""
    sizes = [size]
    while sizes[-1] > min_side:
        sizes.append(math.ceil(sizes[-1] / 2))
    return sizes


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
    """Row-major tiles (tile, tile, 3) of an array-like, edge tiles padded; reads one band at a time."""
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
    temporary memmaps under `workdir` (default: beside `path`), so memory stays bounded.
    compression: 'jpeg' (needs imagecodecs) or 'zlib'."""
    if compression not in ("jpeg", "zlib"):
        raise ValueError(f"compression {compression!r}: use 'jpeg' or 'zlib'")
    H, W = image.shape[:2]
    workdir = workdir or os.path.dirname(os.path.abspath(path))
    levels, temps = [image], []
    while max(levels[-1].shape[:2]) > min_side:
        h, w = (math.ceil(s / 2) for s in levels[-1].shape[:2])
        tmp = os.path.join(workdir, f".{os.path.basename(path)}.level{len(levels)}.npy")
        nxt = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(h, w, 3))
        halve(levels[-1], nxt)
        levels.append(nxt)
        temps.append(tmp)
    small = np.asarray(levels[-1])
    th = max(1, round(small.shape[0] * thumb_side / max(small.shape[:2])))
    tw = max(1, round(small.shape[1] * thumb_side / max(small.shape[:2])))
    thumb = np.asarray(Image.fromarray(small).resize((tw, th), Image.BOX))
    codec = dict(compression=compression, compressionargs={"level": quality if compression == "jpeg" else 6})
    q = f"{compression.upper()}/RGB Q={quality}" if compression == "jpeg" else "ZLIB/RGB"
    props = f"AppMag = {10 / mpp:g}|MPP = {mpp:g}|Software = URCDM"
    head = f"Aperio Image Library v12.0.0 URCDM synthetic slide\r\n{W}x{H} [0,0 {W}x{H}] ({tile}x{tile})"
    try:
        with tifffile.TiffWriter(path, bigtiff=True) as tif:
            for k, lv in enumerate(levels):
                h, w = lv.shape[:2]
                desc = f"{head} {q}|{props}" if k == 0 else f"{head} -> {w}x{h} {q}"
                tif.write(_tiles(lv, tile), shape=(h, w, 3), dtype=np.uint8, tile=(tile, tile), photometric="rgb",
                          description=desc, metadata=None, subfiletype=0, buffersize=tile * tile * 3 * 64, **codec)
                if k == 0:  # page 1: the stripped thumbnail
                    tif.write(thumb, photometric="rgb", description=f"{head} -> {tw}x{th} - |{props}",
                              metadata=None, **codec)
    finally:
        for lv in levels[1:]:
            del lv
        levels.clear()
        for tmp in temps:
            if os.path.exists(tmp):
                os.remove(tmp)
