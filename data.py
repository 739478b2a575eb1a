"""data.py: reading whole-slide images and the nine training datasets.

To be filled by the issue "data.py": open_slide / read_region with tifffile, tissue
masks, the nine (stage, level) datasets built from cascade.py's geometry, caches.
"""

import numpy as np

# Tissue = saturated and not black: H&E stains are coloured (HSV saturation >= 0.07), glass
# background is white/grey (low saturation), pen marks and dust can be black (value < 0.1).
TISSUE_MIN_SATURATION = 0.07
TISSUE_MIN_VALUE = 0.10


def tissue_mask(rgb):
    """(h, w, 3) uint8 -> (h, w) bool, True on tissue (HSV saturation / value thresholds)."""
    rgb = np.asarray(rgb, dtype=np.float32) / 255.0
    v = rgb.max(axis=-1)
    s = (v - rgb.min(axis=-1)) / np.maximum(v, 1e-6)
    return (s >= TISSUE_MIN_SATURATION) & (v >= TISSUE_MIN_VALUE)


def tissue_fraction(rgb):
    """Share of tissue pixels in an (h, w, 3) uint8 image."""
    return float(tissue_mask(rgb).mean())
