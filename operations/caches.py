"""Stage-image caches: each slide's stage images built once into .npy files (this machine's ranks
share the work), written atomically with their metadata last, memory-mapped when read."""
import hashlib
import json
import os
import socket
import sys
import time

import numpy as np

from operations.aperio import DiskArray
from operations.files import atomic_path
from operations.logs import ETA
from operations.slides import MAX_READ_PIXELS, SlideError


def band_rows(slide, ds, w):
    """Rows of a w px wide read at downsample ds that take at most a quarter of MAX_READ_PIXELS
    from the level they come from."""
    f = ds / slide.level_downsamples[slide.best_level(ds)]  # source px per output px at that level
    return int(min(256, max(1, MAX_READ_PIXELS // (4 * w * f * f))))


def build_image(slide, x, y, w, h, ds, path, tag=""):
    """Level-0 px [x, x + w ds) x [y, y + h ds) resized to h x w, written band by band into a
    .npy file (atomically)."""
    band = band_rows(slide, ds, w)
    with atomic_path(path, tag) as tmp:
        arr = DiskArray(tmp, (h, w, 3))
        for r0 in range(0, h, band):
            arr.write(r0, 0, slide.read_region(x, y + r0 * ds, w, min(band, h - r0), ds))
        arr.close()


def machine_tag():
    """'-' and 8 hex digits of this machine's name: temp names of machines that share a cache
    directory never collide."""
    return "-" + hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def cache_base(slide_path, ident, cache_dir=None):
    """Where a slide's cached files live: CACHE_DIR/<file name>.<key>.*, the key a digest of the
    file (path, size, time) and of `ident` (what the files depend on: geometry, choices)."""
    st = os.stat(slide_path)
    ident = [os.path.abspath(slide_path), st.st_size, st.st_mtime_ns] + list(ident)
    key = hashlib.sha1(json.dumps(ident).encode()).hexdigest()[:16]
    cache_dir = cache_dir or os.path.join(os.path.dirname(os.path.abspath(slide_path)),
                                          ".urcdm_cache")
    return os.path.join(cache_dir, f"{os.path.basename(slide_path)}.{key}")


def build_missing(paths, bases, build, nbytes, rank=0, world=1, timeout=3600):
    """Every slide's cache, built once: build(path, base) writes one (its BASE.json last). This
    machine's `world` local ranks each build every world-th missing one, then wait for the others'
    (safe when several machines share the directory). nbytes: a slide's bytes, for the notice.
    A slide that cannot be read (SlideError: a corrupt tile of a lower level) is left out, said on
    stderr and recorded (BASE.failed) so that no rank waits for it and no rerun tries it again.
    Returns the indices of the slides left out."""
    done = lambda i: os.path.exists(bases[i] + ".json") or os.path.exists(bases[i] + ".failed")
    missing = [i for i in range(len(bases)) if not done(i)]
    if missing:
        _build(paths, bases, build, nbytes, missing, rank, world, timeout)
    failed = [i for i in range(len(bases)) if os.path.exists(bases[i] + ".failed")]
    for i in failed if rank == 0 else ():
        with open(bases[i] + ".failed") as f:
            print(f"skipping slide: {f.read().strip()} (delete {bases[i]}.failed to try it "
                  "again)", file=sys.stderr)
    return failed


def _build(paths, bases, build, nbytes, missing, rank, world, timeout):
    os.makedirs(os.path.dirname(bases[0]), exist_ok=True)
    if rank == 0:
        print(f"building the stage images of {len(missing)} slide(s) into "
              f"{os.path.dirname(bases[0])}: about {len(missing) * nbytes / 1e9:.2f} GB "
              f"({nbytes / 1e6:.0f} MB a slide), {world} local rank(s) in parallel",
              file=sys.stderr, flush=True)
    mine, t0 = missing[rank::world], time.time()
    eta = ETA(len(mine))
    for j, i in enumerate(mine):
        try:
            build(paths[i], bases[i])
        except SlideError as e:
            with atomic_path(bases[i] + ".failed") as tmp, open(tmp, "w") as f:
                f.write(str(e))
        if rank == 0 and (j + 1) % max(1, len(mine) // 10) == 0:
            print(f"  {j + 1}/{len(mine)} of rank 0's share, {eta.text(j + 1)}",
                  file=sys.stderr, flush=True)
    for i in missing:  # the other ranks' shares
        while not (os.path.exists(bases[i] + ".json") or os.path.exists(bases[i] + ".failed")):
            if time.time() - t0 > timeout:
                raise TimeoutError(f"{bases[i]}.json: not built within {timeout} s by the "
                                   "rank whose share it is")
            time.sleep(0.5)


def open_cache(base):
    """A built cache: its metadata (BASE.json) and its arrays, BASE.<name>.npy for each name the
    metadata lists under 'arrays' (memory-mapped; 'grid' loaded)."""
    with open(base + ".json") as f:
        meta = json.load(f)
    names = meta["arrays"]
    load = lambda k: np.load(f"{base}.{k}.npy", mmap_mode=None if k == "grid" else "r")
    return dict(meta, **{k: load(k) for k in names})
