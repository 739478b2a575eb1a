"""metrics.py: FID, pFID, improved precision and recall.

To be filled by the issue "metrics.py".
"""
