"""What rank 0 sends a rank: a batch's inputs as the files give them (uint8: a quarter of the
floats' bytes, and numpy pickles fast), made on that rank into the floats tiler.batch_inputs
gives. The stage below is read ahead (lower_inputs) while the round before computes."""
from dataclasses import dataclass

import numpy as np
import torch

import cascade
from tiler import BatchInputs, known_masks


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


def lower_read(lower, y0, x0, P):
    """What a patch at (y0, x0) needs of the stage below (a tiler.Lower), uint8: its context
    (P, P, 3) (the P x P lower px around it) and the Cutout its region is upsampled from."""
    ya, yb, xa, xb = cascade.region_span(lower.image.shape, y0, x0, P, lower.zoom)
    cut = Cutout(np.asarray(lower.image[ya:yb, xa:xb]), ya, xa, tuple(lower.image.shape))
    return cascade.context_crop(lower.image, y0, x0, P, lower.zoom, lower.background), cut


def lower_inputs(grid, cells, lower=None, white=None):
    """What a batch reads from the stage below: (context (B, P, P, 3) uint8, cutouts, white
    flags); None, None, flags for outpainting. It does not depend on the stage being generated,
    so it can be read ahead, while earlier rounds compute."""
    P, contexts, cutouts, white_flags = grid.patch, [], [], []
    for i, j in cells:
        y0, x0 = grid.origin(i, j)
        if lower is not None:
            context, cut = lower_read(lower, y0, x0, P)
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
    region = context = None
    if raw.cutouts is not None:
        context = cascade.to_float(raw.context)
        region = torch.cat([cascade.region_crop(cut, *grid.origin(i, j), grid.patch, raw.zoom)
                            for (i, j), cut in zip(raw.cells, raw.cutouts)])
    return BatchInputs(raw.cells, cascade.to_float(raw.known), known_masks(grid, raw.cells, order),
                       context, region, raw.white)
