"""The overlapping patch grid of stages 2 and 3, generation orders, and stitching.

A stage image of n x n patches (cascade.Grid: P px, overlap o = P/8, stride S = P - o) is
generated patch by patch. When patch (i, j) is generated, the pixels already written by finished
overlapping neighbours are held fixed (inpainting by replacement) [PAPER Sec. 2]. Which
neighbours are finished depends on the order:
  raster       the paper's: one patch after another, (i-1, j-1), (i-1, j), (i-1, j+1),
               (i, j-1) are finished; n^2 sequential rounds.
  wavefront    round k = 2i + j. A round's patches are independent and see exactly the
               neighbours raster gives them, so with per-patch seeds the slide is
               bit-identical to raster, in 3(n-1) + 1 rounds.
  checkerboard the 4 parity phases (i % 2, j % 2); later phases see neighbours on all
               sides. 4 rounds, a different (not identical) result.

The caller runs the loop: plan() gives the rounds of batches, batch_inputs() reads one batch's
inputs (read_batch from the files on rank 0, float_inputs on the rank that generates it),
run_batch() generates it; a round is written to the canvas after all its batches.
generate_stage() is that loop in one process. closure() is what a window of a stage's final image
depends on: with per-patch seeds, those patches alone give the window's exact pixels.

References
  [PAPER]    Cechnicka et al., URCDM, MICCAI 2024 (overlap 12.5 %, inpainting, white skip).
  [RePaint]  Lugmayr et al., 2022 (inpainting by replacement).
"""
import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

import cascade
import sde

ORDERS = ("raster", "wavefront", "checkerboard")


# ---------------------------------------------------------------------- orders

def rounds(order, n):
    """The patches of an n x n grid grouped into rounds: all patches of a round are
    independent (they do not overlap) and every neighbour they depend on is in an
    earlier round. Returns a list of lists of (i, j)."""
    cells = [(i, j) for i in range(n) for j in range(n)]
    if order == "raster":
        return [[c] for c in cells]
    if order == "wavefront":
        return [[(i, k - 2 * i) for i in range(n) if 0 <= k - 2 * i < n]
                for k in range(3 * (n - 1) + 1)]
    if order == "checkerboard":
        phases = [[(i, j) for i, j in cells if (i % 2, j % 2) == ph]
                  for ph in ((0, 0), (0, 1), (1, 0), (1, 1))]
        return [ph for ph in phases if ph]
    raise ValueError(f"unknown order {order!r}; use one of {ORDERS}")


@functools.lru_cache(maxsize=8)
def round_index(order, n):
    """{(i, j): index of its round} (cached: do not modify)."""
    return {c: k for k, rnd in enumerate(rounds(order, n)) for c in rnd}


def trusted_span(grid, a):
    """[lo, hi) along one axis of the pixels of patch index a that later neighbours hold
    fixed: the whole patch less `grid.margin` px on each side that is not the stage's border.
    deviation: the paper holds the whole overlap. A U-Net's outermost output pixels carry an
    edge artefact (ours: the last 2-4 columns ~20-40 grey levels darker, zero padding and
    stride-2 convolutions are not symmetric); held fixed, they become a line at every patch
    border. Leaving them unknown lets the next patch redraw them from its interior."""
    # deviation: the paper holds the whole overlap fixed (Sampling.edge_margin = 0 in `paper`).
    lo = a * grid.stride
    m_lo = grid.margin if a > 0 else 0
    m_hi = grid.margin if a < grid.n - 1 else 0
    return lo + m_lo, lo + grid.patch - m_hi


def known_rects(grid, i, j, finished):
    """Rectangles (y0, y1, x0, x1), in patch (i, j)'s own pixels, that finished neighbours
    fixed (their trusted_span, so without their inner-edge margins). finished(i, j) -> bool.
    No full-size mask is ever built."""
    y0, x0 = grid.origin(i, j)
    P, rects = grid.patch, []
    for di in (-1, 0, 1):
        for dj in (-1, 0, 1):
            a, b = i + di, j + dj
            inside = 0 <= a < grid.n and 0 <= b < grid.n
            if (di, dj) == (0, 0) or not inside or not finished(a, b):
                continue
            (ty0, ty1), (tx0, tx1) = trusted_span(grid, a), trusted_span(grid, b)
            ry0, ry1 = max(y0, ty0) - y0, min(y0 + P, ty1) - y0
            rx0, rx1 = max(x0, tx0) - x0, min(x0 + P, tx1) - x0
            if ry0 < ry1 and rx0 < rx1:
                rects.append((ry0, ry1, rx0, rx1))
    return rects


def rects_mask(rects, P):
    """(1, P, P) bool mask of a patch's known rectangles."""
    m = torch.zeros(1, P, P, dtype=torch.bool)
    for y0, y1, x0, x1 in rects:
        m[:, y0:y1, x0:x1] = True
    return m


class MemoryCanvas:
    """An (N, N, 3) uint8 stage image in RAM, for tests and small stages. data.DiskArray is the
    disk-backed canvas with the same two methods, read and write."""

    def __init__(self, size, background=255):
        self.size = size
        self.array = np.full((size, size, 3), background, dtype=np.uint8)

    def read(self, y0, x0, h, w):
        return self.array[y0:y0 + h, x0:x0 + w].copy()

    def write(self, y0, x0, patch):
        self.array[y0:y0 + patch.shape[0], x0:x0 + patch.shape[1]] = patch


def plan(order, n, batch, done=()):
    """The work of a stage: its rounds (tiler.rounds), each cut into batches of up to `batch`
    patches, leaving out the patches in `done` (resume) and rounds with nothing left.
    Batches are cut from a whole round before ranks take their share, so a batch's content
    (and with it every floating-point result) does not depend on the number of ranks.
    Returns a list of rounds, each a list of batches, each a list of (i, j)."""
    done = set(map(tuple, done))
    out = []
    for rnd in rounds(order, n):
        todo = [c for c in rnd if c not in done]
        if todo:
            out.append([todo[a:a + batch] for a in range(0, len(todo), batch)])
    return out


# ---------------------------------------------------------------------- one batch of patches

def patch_seed(seed, stage, i, j):
    """A 63-bit seed for patch (i, j) of a stage, derived from the run's seed only, so a
    patch's noise does not depend on batch size, order of generation or rank count."""
    return sde.derive_seed("urcdm", seed, stage, i, j)


def patch_generator(seed, stage, i, j, device="cpu"):
    """The generator of patch (i, j), on `device` (a CUDA generator draws its noise on the GPU;
    the pixels then depend on the device type, not on batch or rank). 'meta' (no data, for
    benchmarks and tests) takes a CPU generator."""
    device = torch.device(device)
    at = device if device.type not in ("cpu", "meta") else "cpu"
    return torch.Generator(at).manual_seed(patch_seed(seed, stage, i, j))


@dataclass(frozen=True)
class Lower:
    """The stage below, which a patch zooms into: its (H, W, 3) uint8 image (array-like), the
    zoom r_s from it to this stage, and the grey level padded outside it."""
    image: object
    zoom: float
    background: int = 255

    def read(self, y0, x0, P):
        """What a patch at (y0, x0) needs of the stage below, uint8: its context (P, P, 3) (the
        P x P lower px around it) and the Cutout its region is upsampled from (float_inputs)."""
        ya, yb, xa, xb = cascade.region_span(self.image.shape, y0, x0, P, self.zoom)
        cut = Cutout(np.asarray(self.image[ya:yb, xa:xb]), ya, xa, tuple(self.image.shape))
        return cascade.context_crop(self.image, y0, x0, P, self.zoom, self.background), cut

    def region_window(self, y0, x0, P):  # uint8: the lower px under the patch, not resampled
        return cascade.region_window(self.image, y0, x0, P, self.zoom)


@dataclass(frozen=True)
class WhiteTest:
    """Which patches are filled from the stage below instead of generated: those whose region
    is less tissue than `threshold` [PAPER: mostly white patches are ignored]."""
    threshold: float
    tissue_fraction: object  # callable(uint8 (h, w, 3)) -> float in [0, 1], e.g.
                             #   data.tissue_fraction

    def __call__(self, lower, y0, x0, P):
        window = lower.region_window(y0, x0, P)
        return self.threshold > 0 and self.tissue_fraction(window) < self.threshold


@dataclass(frozen=True)
class Cutout:
    """image[ya:yb, xa:xb] of an image of `shape`, sliced in the image's coordinates: the part of
    the stage below that cascade.region_crop reads for one patch, sent in place of the image."""
    pixels: np.ndarray
    ya: int
    xa: int
    shape: tuple

    def __getitem__(self, idx):
        ys, xs = idx
        y, x = self.ya, self.xa
        return self.pixels[ys.start - y:ys.stop - y, xs.start - x:xs.stop - x]


@dataclass
class RawBatch:
    """A batch's inputs as the files give them, uint8 (what rank 0 sends a rank: a quarter of
    the floats' bytes, and numpy pickles fast): known (B, P, P, 3); context (B, P, P, 3) and
    cutouts (list of Cutout), None for outpainting; white: list of bool; zoom: r_s."""
    cells: list
    known: np.ndarray
    context: object
    cutouts: object
    white: list
    zoom: object


@dataclass
class BatchInputs:
    """Everything a batch of independent patches needs, read from the canvas and the stage below:
    known (B, 3, P, P) float and mask (B, 1, P, P) bool (pixels finished neighbours fixed),
    context and region (B, 3, P, P) or None (outpainting), white: list of bool (to be filled)."""
    cells: list
    known: torch.Tensor
    mask: torch.Tensor
    context: object
    region: object
    white: list


def lower_inputs(grid, cells, lower=None, white=None):
    """What a batch reads from the stage below: (context (B, P, P, 3) uint8, cutouts, white
    flags); None, None, flags for outpainting. It does not depend on the stage being generated,
    so it can be read ahead, while earlier rounds compute."""
    P, contexts, cutouts, white_flags = grid.patch, [], [], []
    for i, j in cells:
        y0, x0 = grid.origin(i, j)
        if lower is not None:
            context, cut = lower.read(y0, x0, P)
            contexts.append(context), cutouts.append(cut)
        white_flags.append(lower is not None and white is not None and white(lower, y0, x0, P))
    return (np.stack(contexts) if contexts else None), (cutouts or None), white_flags


def read_batch(grid, canvas, cells, *, lower=None, white=None, below=None):
    """A batch's inputs from the files, as a RawBatch. cells: independent patches of one round;
    canvas: the stage image (read(y0, x0, h, w) -> uint8), holding every earlier round; lower: a
    Lower, None for the outpainting baseline; white: a WhiteTest or None (generate every
    patch); below: lower_inputs(grid, cells, lower, white) when already read, else None."""
    P = grid.patch
    known = np.stack([canvas.read(*grid.origin(i, j), P, P) for i, j in cells])
    context, cutouts, white_flags = below or lower_inputs(grid, cells, lower, white)
    return RawBatch(list(cells), known, context, cutouts, white_flags,
                    lower.zoom if lower is not None else None)


def float_inputs(grid, raw, order):
    """A RawBatch as the model takes it (on the rank that generates it): floats in [-1, 1], the
    known masks from the geometry, each region upsampled from its cutout."""
    P, finished_round = grid.patch, round_index(order, grid.n)
    masks = []
    for i, j in raw.cells:
        k = finished_round[(i, j)]
        masks.append(rects_mask(known_rects(grid, i, j,
                                            lambda a, b: finished_round[(a, b)] < k), P))
    region = context = None
    if raw.cutouts is not None:
        context = cascade.to_float(raw.context)
        region = torch.cat([cascade.region_crop(cut, *grid.origin(i, j), P, raw.zoom)
                            for (i, j), cut in zip(raw.cells, raw.cutouts)])
    return BatchInputs(raw.cells, cascade.to_float(raw.known), torch.stack(masks), context,
                       region, raw.white)


def batch_inputs(grid, canvas, cells, *, order, lower=None, white=None):
    """read_batch then float_inputs, in one process."""
    return float_inputs(grid, read_batch(grid, canvas, cells, lower=lower, white=white), order)




def run_batch(sample_fn, inputs, *, stage, seed, feather=0, device="cpu"):
    """Generate (or fill, if white) a batch of patches.

    sample_fn: callable(generators, known=, mask=, context=, region=) -> (B, 3, P, P) float,
               e.g. cascade.CDM.sample, or a closed-form stand-in in tests.
    feather:   px over which a filled patch's known pixels fade into its fill, as sample_fn does
               for generated ones (cascade.feather_weight).
    device:    where the patches' generators draw (the model's device).
    Returns [((i, j), uint8 (P, P, 3), filled: bool)] in the order of inputs.cells."""
    cells, white = inputs.cells, inputs.white
    out = [None] * len(cells)
    gen_idx = [b for b in range(len(cells)) if not white[b]]
    if gen_idx:
        sel = lambda x: None if x is None else x[gen_idx]
        x = sample_fn([patch_generator(seed, stage, *cells[b], device) for b in gen_idx],
                      known=inputs.known[gen_idx],
                      mask=inputs.mask[gen_idx], context=sel(inputs.context),
                      region=sel(inputs.region))
        for b, pixels in zip(gen_idx, cascade.to_uint8(x)):
            out[b] = pixels
    for b in range(len(cells)):
        if white[b]:  # filled from the stage below, keeping pixels its neighbours already fixed
            w = cascade.feather_weight(inputs.mask[b:b + 1], feather)[0]
            out[b] = cascade.to_uint8((w * inputs.known[b] + (1 - w) * inputs.region[b])[None])[0]
    return [(c, out[b], white[b]) for b, c in enumerate(cells)]


def generate_stage(sample_fn, grid, canvas, *, stage, seed, order="raster", batch=1, lower=None,
                   white=None, feather=0, done=(), device="cpu"):
    """Every patch of a stage into `canvas`, in one process (sample.py runs the same plan
    split across ranks, with a journal). Returns [((i, j), uint8 (P, P, 3), filled)]."""
    results = []
    for rnd in plan(order, grid.n, batch, done):
        for cells in rnd:
            inputs = batch_inputs(grid, canvas, cells, order=order, lower=lower, white=white)
            results += run_batch(sample_fn, inputs, stage=stage, seed=seed, feather=feather,
                                 device=device)

        # a round is written after all its batches
        for (i, j), pixels, _ in results[-sum(map(len, rnd)):]:
            canvas.write(*grid.origin(i, j), pixels)
    return results


# ---------------------------------------------------------------------- windows: what a crop needs

def cells_over(grid, rect):
    """The patches whose P x P area meets rect = (y0, y1, x0, x1), in stage px."""
    y0, y1, x0, x1 = rect
    span = lambda a, b: range(max(0, -(-(a - grid.patch + 1) // grid.stride)),
                              min(grid.n, -(-b // grid.stride)))
    return {(i, j) for i in span(y0, y1) for j in span(x0, x1)}


def closure(grid, order, rects):
    """Every patch that the final pixels of `rects` (stage px) depend on in `order`: the patches
    that write into them and, recursively, each earlier-round neighbour of one of those (it wrote
    pixels the later patch holds fixed, feathers or overwrites). With per-patch seeds, generating
    these alone, in plan order, gives the rects exactly the pixels of the whole stage. Small in
    checkerboard (4 phases: at most 3 steps back), the whole past in raster and wavefront."""
    k = round_index(order, grid.n)
    need = set().union(*(cells_over(grid, r) for r in rects))
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
    region (cascade.region_span) and its white-test window, as (y0, y1, x0, x1) clipped to it."""
    P, out = grid.patch, []
    clip = lambda a: min(max(a, 0), lower_size)
    for i, j in cells:
        y0, x0 = grid.origin(i, j)
        cy, cx = cascade.context_origin(y0, x0, P, zoom)
        ya, yb, xa, xb = cascade.region_span((lower_size, lower_size), y0, x0, P, zoom)
        wy, wx = math.floor(y0 / zoom), math.floor(x0 / zoom)
        wy1, wx1 = math.ceil((y0 + P) / zoom), math.ceil((x0 + P) / zoom)
        for r in ((cy, cy + P, cx, cx + P), (ya, yb, xa, xb), (wy, wy1, wx, wx1)):
            r = tuple(map(clip, r))
            if r[0] < r[1] and r[2] < r[3]:
                out.append(r)
    return out


# ---------------------------------------------------------------------- seams


def seam_lines(grid, order, transpose=False):
    """Where a patch's content can meet its earlier neighbour's across vertical lines. For every
    pair of neighbours (i, j-1), (i, j), with the later one's rows [r0, r1): q_known, the later
    one's first own pixel past the known ones (origin + o - m when the right one is later,
    origin + m when the left one is), and q_write, the first pixel past the later one's write
    (its left edge, or the left one's right edge: origin + o). transpose: the same for horizontal
    lines, in the transposed image (q a row, [r0, r1) columns).
    Returns [(q_known, q_write, r0, r1)]."""
    k, m, o = round_index(order, grid.n), grid.margin, grid.overlap
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
    img: (N, N) or (N, N, C) array-like, read one band per line (a DiskArray, a slide view)."""
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
                band = band.transpose(1, 0, 2) if transpose else band  # rows along the line,
                                                                       #   columns across it
                # d[:, j] = |a[:, lo + j + 1] - a[:, lo + j]|
                d = np.abs(np.diff(band, axis=1)).mean(-1)

                seam[c].append(d[:, q - 1 - lo].mean())
                ref[c].extend(d[:, q - 1 + e - lo].mean() for e in offsets
                              if 0 <= q - 1 + e - lo < d.shape[1])
    return float(max(np.mean(s) / np.mean(r) for s, r in zip(seam, ref)))


def rank_loads(work, world):
    """For each round of a plan (tiler.plan), the patches on its busiest rank when each rank takes
    every world-th batch (as sample.py shares a round): the round's length in patch times."""
    return [max(sum(map(len, rnd[r::world])) for r in range(world)) for rnd in work]
