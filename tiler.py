"""tiler.py: the overlapping patch grid of stages 2 and 3.

To be filled by the issue "cascade.py and tiler.py": grid geometry, known neighbours,
generation orders (raster, wavefront, checkerboard), per-patch seeds, white-patch skip,
stitching into a canvas, and the seam score.
"""
