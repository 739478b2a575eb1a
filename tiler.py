"""The overlapping patch grid of stages 2 and 3, generation orders, and stitching.

A stage image of n x n patches (cascade.Grid: P px, overlap o = P/8, stride S = P - o) is
generated patch by patch. When patch (i, j) is generated, the pixels already written by finished
overlapping neighbours are held fixed (inpainting by replacement) [PAPER Sec. 2]. Which
neighbours are finished depends on the order:
  raster       the paper's: one patch after another, (i-1, j-1), (i-1, j), (i-1, j+1),
               (i, j-1) are finished; n^2 sequential rounds.
  wavefront    round k = 2i + j. A round's patches are independent and see exactly the
               neighbours raster gives them, so with per-patch seeds the slide is
               bit-identical to raster, in 3(n-1) + 1 rounds (1 to n/2 patches each).
  packed       wavefront's patches (its batches) regrouped into rounds of as many as the ranks
               take, each of those whose earlier neighbours are finished (pack): raster's slide
               in about n^2 / ranks rounds, every rank busy while enough is ready.
  checkerboard the 4 parity phases (i % 2, j % 2); later phases see neighbours on all
               sides. 4 rounds, a different (not identical) result.

The loop: plan() gives the rounds of batches, batch_inputs() reads one batch's inputs from the
canvas and the stage below, run_batch() generates it; a round is written to the canvas after
all its batches. generate_stage() is that loop in one process (operations/runs.py shares it
across ranks).

References
  [PAPER]    Cechnicka et al., URCDM, MICCAI 2024 (overlap 12.5 %, inpainting, white skip).
  [RePaint]  Lugmayr et al., 2022 (inpainting by replacement).
"""
import functools
from dataclasses import dataclass

import numpy as np
import torch

import cascade
import sde

ORDERS = ("raster", "wavefront", "packed", "checkerboard")


# ---------------------------------------------------------------------- orders

def rounds(order, n):
    """The patches of an n x n grid grouped into rounds: all patches of a round are
    independent (they do not overlap) and every neighbour they depend on is in an
    earlier round. Returns a list of lists of (i, j)."""
    cells = [(i, j) for i in range(n) for j in range(n)]
    if order == "raster":
        return [[c] for c in cells]
    if order in ("wavefront", "packed"):  # packed: these are its patches' dependencies
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


def known_masks(grid, cells, order):
    """(B, 1, P, P) bool: each patch's pixels that its neighbours of earlier rounds fixed."""
    k = round_index(order, grid.n)
    return torch.stack([rects_mask(known_rects(grid, i, j, lambda a, b: k[(a, b)] < k[(i, j)]),
                                   grid.patch) for i, j in cells])


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


def plan(order, n, batch, done=(), world=1):
    """The work of a stage: rounds, each a list of batches (lists of (i, j)) that the ranks share
    (each takes every world-th batch), leaving out the patches in `done` (resume, windows).
    Batches are cut from a whole round of rounds() first, so a batch's content, and with it every
    floating-point result, depends on neither the ranks nor what is left out. 'packed': those
    batches regrouped into rounds of up to `world` (pack)."""
    done = set(map(tuple, done))
    cut = [[rnd[a:a + batch] for a in range(0, len(rnd), batch)] for rnd in rounds(order, n)]
    if order == "packed":
        return pack([b for rnd in cut for b in rnd], world, done)
    out = [[[c for c in b if c not in done] for b in rnd if not set(b) <= done] for rnd in cut]
    return [rnd for rnd in out if rnd]


def pack(batches, world, done=frozenset()):
    """Rounds of up to `world` batches (wavefront's, in its order): each round takes, of the
    batches not done, those whose patches' earlier neighbours in raster order ((i-1, j-1),
    (i-1, j), (i-1, j+1), (i, j-1)) are all finished, longest chain of batches waiting on it
    first. A patch runs after exactly the neighbours raster has finished before it and before
    any other (each of those waits on it), so it sees raster's known pixels: raster's slide."""
    owner = {c: u for u, b in enumerate(batches) for c in b}
    before = lambda i, j: ((i - 1, j - 1), (i - 1, j), (i - 1, j + 1), (i, j - 1))
    waits = [{owner[c] for i, j in b for c in before(i, j) if c in owner} for b in batches]
    chain = [1] * len(batches)  # the longest chain of batches that waits on u, u included
    for u in reversed(range(len(batches))):  # a batch's dependents come after it
        for d in waits[u]:
            chain[d] = max(chain[d], chain[u] + 1)
    finished = {u for u, b in enumerate(batches) if set(b) <= done}
    left, out = [u for u in range(len(batches)) if u not in finished], []
    while left:
        ready = sorted((u for u in left if waits[u] <= finished), key=lambda u: (-chain[u], u))
        out.append([[c for c in batches[u] if c not in done] for u in ready[:world]])
        finished |= set(ready[:world])
        left = [u for u in left if u not in finished]
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

    def field(self, y0, x0, P):
        """The stage-below px under the patch (cascade.field_under), uint8, not resampled."""
        ya, yb, xa, xb = cascade.field_under(y0, x0, P, P, self.zoom, self.image.shape[0])
        return np.asarray(self.image[ya:yb, xa:xb])


@dataclass(frozen=True)
class WhiteTest:
    """Which patches are filled from the stage below instead of generated: those whose field below
    is less tissue than `threshold` [PAPER: mostly white patches are ignored]."""
    threshold: float
    tissue_fraction: object  # callable(uint8 (h, w, 3)) -> float in [0, 1]: data.tissue_fraction

    def __call__(self, lower, y0, x0, P):
        return self.threshold > 0 and self.tissue_fraction(lower.field(y0, x0, P)) < self.threshold


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


def batch_inputs(grid, canvas, cells, *, order, lower=None, white=None):
    """Everything a batch of independent patches needs: the pixels their finished neighbours
    fixed (read from the canvas, masked by the geometry: known_rects), the context and region
    crops of the stage below (None for the outpainting baseline), and which patches are glass
    (white: a WhiteTest, or None to generate every patch). operations/transfer.py gets the same
    floats for many ranks: rank 0 reads uint8, each rank makes its batch's floats."""
    P, origins = grid.patch, [grid.origin(i, j) for i, j in cells]
    known = cascade.to_float(np.stack([canvas.read(y0, x0, P, P) for y0, x0 in origins]))
    mask = known_masks(grid, cells, order)
    context = region = None
    if lower is not None:  # the stage below: around the patch (context), under it (region)
        context = cascade.to_float(np.stack([cascade.context_crop(
            lower.image, y0, x0, P, lower.zoom, lower.background) for y0, x0 in origins]))
        region = torch.cat([cascade.region_crop(lower.image, y0, x0, P, lower.zoom)
                            for y0, x0 in origins])
    glass = [lower is not None and white is not None and white(lower, y0, x0, P)
             for y0, x0 in origins]
    return BatchInputs(list(cells), known, mask, context, region, glass)


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
                   white=None, feather=0, done=(), device="cpu", on_round=None):
    """Every patch of a stage into `canvas`, in one process (operations/runs.py runs the same plan
    split across ranks, with a journal). on_round(results): called after each round (progress).
    Returns [((i, j), uint8 (P, P, 3), filled)]."""
    results = []
    for rnd in plan(order, grid.n, batch, done):
        new = []
        for cells in rnd:
            inputs = batch_inputs(grid, canvas, cells, order=order, lower=lower, white=white)
            new += run_batch(sample_fn, inputs, stage=stage, seed=seed, feather=feather,
                             device=device)
        for (i, j), pixels, _ in new:  # a round is written after all its batches
            canvas.write(*grid.origin(i, j), pixels)
        results += new
        if on_round:
            on_round(new)
    return results
