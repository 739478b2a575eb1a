"""Windows: crops of the final slide made from only the patches they depend on (sample.py
--window, --patches). With per-patch seeds those patches alone give a window exactly the whole
slide's pixels there; a checkerboard window costs a few per cent of a slide."""
import os
import sys

import numpy as np
from PIL import Image

import cascade
import data
import sde
import tiler
from operations.distributed import broadcast
from operations.files import atomic_path, write_json
from operations.journal import json_plain


def cells_over(grid, rect):
    """The patches whose P x P area meets rect = (y0, y1, x0, x1), in stage px."""
    y0, y1, x0, x1 = rect
    span = lambda a, b: range(max(0, -(-(a - grid.patch + 1) // grid.stride)),
                              min(grid.n, -(-b // grid.stride)))
    return {(i, j) for i in span(y0, y1) for j in span(x0, x1)}


def closure(grid, order, rects, batch=1):
    """Every patch that the final pixels of `rects` (stage px) depend on in `order`, generated
    `batch` patches at a time: the patches that write into them and, recursively, each
    earlier-round neighbour of one of those (it wrote pixels the later patch holds fixed, feathers
    or overwrites) and each patch sharing a U-Net batch with one of those (batch mates change a
    patch's floats: matrix products are blocked by the batch). With per-patch seeds, generating
    these alone, in plan order, gives the rects exactly the pixels of the whole stage. Small in
    checkerboard (4 phases: at most 3 steps back), the whole past in raster, wavefront, packed."""
    need = set().union(*(cells_over(grid, r) for r in rects))
    while True:
        need = earlier_neighbours(grid, order, need)
        mates = {c for rnd in tiler.plan(order, grid.n, batch) for b in rnd
                 if need.intersection(b) for c in b}
        if mates <= need:
            return need
        need |= mates


def earlier_neighbours(grid, order, cells):
    """`cells` and, recursively, each earlier-round neighbour of one of them."""
    k = tiler.round_index(order, grid.n)
    need = set(cells)
    todo = list(need)
    while todo:
        i, j = todo.pop()
        for a in (i - 1, i, i + 1):
            for b in (j - 1, j, j + 1):
                if (a, b) in k and k[(a, b)] < k[(i, j)] and (a, b) not in need:
                    need.add((a, b))
                    todo.append((a, b))
    return need


def lower_rects(grid, cells, zoom, lower_size):
    """What `cells` read of the stage below (size lower_size px): each one's context window, its
    region (cascade.region_span) and the field under it (the white test), as (y0, y1, x0, x1)
    clipped to it."""
    P, out = grid.patch, []
    clip = lambda a: min(max(a, 0), lower_size)
    for i, j in cells:
        y0, x0 = grid.origin(i, j)
        cy, cx = cascade.context_origin(y0, x0, P, zoom)
        for r in ((cy, cy + P, cx, cx + P),
                  cascade.region_span((lower_size, lower_size), y0, x0, P, zoom),
                  cascade.field_under(y0, x0, P, P, zoom)):
            r = tuple(map(clip, r))
            if r[0] < r[1] and r[2] < r[3]:
                out.append(r)
    return out


def needed_cells(preset, order, margin, windows, last=3, below=1, batch=1):
    """{stage: the patches that `windows` (stage-`last` px) depend on at `batch` patches a U-Net
    batch} (closure), from the last stage down to the stage above `below`; {} for the whole
    slide. Stage 1 is always whole."""
    need = {}
    rects = [(y, y + h, x, x + w) for x, y, w, h in windows]
    for s in range(last, below, -1) if windows else ():
        grid = cascade.stage_grid(preset, s, margin)
        need[s] = closure(grid, order, rects, batch)
        rects = lower_rects(grid, need[s], cascade.zoom(preset, s),
                            cascade.stage_size(preset, s - 1))
    return need


def tissue_windows(stage2, settings, preset, rank, world, tries=100):
    """--patches: settings.patches windows of settings.patch_size px at random final-stage
    positions, drawn from the seed, kept where the stage-2 field under them is tissue (at least
    --white-threshold, the rule for 'mostly white'): glass is never generated. Rank 0 draws,
    every rank gets them."""
    S, out = settings, []
    if rank == 0:
        rng = np.random.default_rng(sde.derive_seed("windows", S.seed))
        N3, size = cascade.stage_size(preset, 3), S.patch_size
        r = N3 / cascade.stage_size(preset, 2)  # final px per stage-2 px
        for _ in range(tries * S.patches):
            x, y = (int(v) for v in rng.integers(0, N3 - size + 1, 2))
            ya, yb, xa, xb = cascade.field_under(y, x, size, size, r)
            field = np.asarray(stage2[ya:yb, xa:xb])
            if data.tissue_fraction(field) >= max(S.white_threshold, 1e-9):
                out.append((x, y, size, size))
                if len(out) == S.patches:
                    break
        if len(out) < S.patches:
            print(f"--patches {S.patches}: only {len(out)} windows on tissue found in "
                  f"{tries * S.patches} draws", file=sys.stderr)
    return tuple(broadcast(out, world))


def window_files(out, x, y, w, h):
    """The name (without .png) of the w x h window at (x, y) (final-stage px), beside OUT:
    OUT_x<X>_y<Y>_<W>x<H>, one name a window."""
    return f"{os.path.splitext(out)[0]}_x{x}_y{y}_{w}x{h}"


def write_windows(out, images, windows, settings, mpp, lower_windows, whole):
    """Each window of the final stage as a PNG (with --lower-windows, its field in each lower
    stage too), the lower stages generated whole as OUT.stage<s>.png (for metrics.py's
    magnifications 0-1), and OUT.windows.json: a manifest a patch dataset loads (file, x, y, w, h,
    stage, um/px; the run's seed and settings)."""
    last, records = max(images), []
    save = lambda arr, path: Image.fromarray(np.asarray(arr)).save(path, format="PNG")
    for x, y, w, h in windows:
        root = window_files(out, x, y, w, h)
        rec = {"file": os.path.basename(root) + ".png", "x": x, "y": y, "w": w, "h": h,
               "stage": last, "mpp": mpp, "lower": {}}
        with atomic_path(root + ".png") as tmp:
            save(images[last].read(y, x, h, w), tmp)
        for s in sorted(images)[:-1] if lower_windows else ():
            r = images[last].shape[0] / images[s].shape[0]  # final px per stage-s px
            y0, y1, x0, x1 = cascade.field_under(y, x, h, w, r)
            with atomic_path(f"{root}_stage{s}.png") as tmp:
                save(images[s][y0:y1, x0:x1], tmp)
            rec["lower"][str(s)] = {"file": f"{os.path.basename(root)}_stage{s}.png",
                                    "box": [x0, y0, x1 - x0, y1 - y0]}
        records.append(rec)
    stages = {}
    for s in sorted(s for s in whole if s < last):
        with atomic_path(f"{out}.stage{s}.png") as tmp:
            save(images[s][:], tmp)
        stages[str(s)] = f"{os.path.basename(out)}.stage{s}.png"
    write_json(f"{out}.windows.json", {"format": "urcdm-windows-v1", "seed": settings.seed,
                                            "stages": stages, "settings": json_plain(settings),
                                            "windows": records}, indent=1)
    print(f"wrote {len(records)} windows beside {out} and {out}.windows.json", file=sys.stderr)


