"""Slides out: the disk-backed stage images (DiskArray) and the Aperio-style pyramidal BigTIFF
streamed from them (write_aperio), which OpenSlide (vendor 'aperio'), QuPath and tifffile open.
A 41344^2 slide never sits in memory.

References
  [Aperio]    OpenSlide's Aperio format notes, https://openslide.org/formats/aperio/
  [tifffile]  TiffWriter.write with tile iterators, https://github.com/cgohlke/tifffile
"""
import math
import os

import numpy as np
import tifffile
from PIL import Image

from operations.slides import SYNTHETIC


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
                 workdir=None, thumb_side=768, synthetic=False):
    """Write an (N, M, 3) uint8 array-like (array or memmap, read band by band) as an
    Aperio-style pyramidal tiled BigTIFF at `path`. Lower levels are built x2 at a time into
    temporary files under `workdir` (default: beside `path`), so memory stays bounded.
    compression: 'jpeg' (needs imagecodecs) or 'zlib'. synthetic: say in the description that
    sample.py made it (Slide.synthetic; metrics.py then reads its stage images)."""
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
    head = (f"Aperio Image Library v12.0.0{' ' + SYNTHETIC if synthetic else ''}\r\n"
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


