"""The training loader's fast resize (data.resized's route for integer factors): a uint8 crop to
the sizes a level uses as exact integer block sums (area) or picks (nearest), the symmetry applied
on the small array, one conversion to float. Equal to data.resized's reference (floats, the
symmetry, cascade.downsample) up to float rounding (~1e-7; tests/test_data.py) at a fraction of
its cost."""
import warnings

import numpy as np
import torch

# Cache maps are read-only and only ever read here: torch's warning about wrapping them is noise.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


def box_pyramid(u8, sizes, k=0, window=None, mode="area"):
    """(H, W, 3) uint8 -> {size: (1, 3, size, size) float in [-1, 1]} for sizes that divide H:
    the area resize as exact integer block sums (halving the image while f = H / size is even),
    then symmetry k and, if given, the window (y, x, c), then one conversion to float; one pass
    serves several sizes. mode 'nearest': the symmetry first (it does not commute with picking),
    then every f-th px, as F.interpolate picks them."""
    if any(u8.shape[0] % size for size in sizes):
        raise ValueError(f"box_pyramid: sizes {sizes} must divide {u8.shape[0]}")
    if mode == "nearest":
        return _nearest_pyramid(u8, sizes, k, window)
    x, f, out = torch.from_numpy(np.ascontiguousarray(u8)), 1, {}
    for size in sorted(sizes, reverse=True):
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
    """box_pyramid's 'nearest' route: pixel (i f, j f) of the symmetric image."""
    a = np.rot90(np.asarray(u8), k % 4, axes=(0, 1))  # views: nothing is copied at full size
    a = a[:, ::-1] if k >= 4 else a
    y, xx, c = window or (0, 0, None)
    out = {}
    for size in sizes:
        f = u8.shape[0] // size
        picked = a[::f, ::f] if window is None else a[::f, ::f][y:y + c, xx:xx + c]
        picked = torch.from_numpy(np.ascontiguousarray(picked))
        out[size] = picked.permute(2, 0, 1)[None].float() / 127.5 - 1
    return out
