"""data.py: reading whole-slide images and the nine training datasets.

To be filled by the issue "data.py": open_slide / read_region with tifffile, tissue
masks, the nine (stage, level) datasets built from cascade.py's geometry, caches.
"""
