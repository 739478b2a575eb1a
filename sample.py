"""sample.py: generate a whole synthetic slide and write it as a pyramidal BigTIFF.

To be filled by the issue "sample.py": CLI, the three stages, streamed on-disk canvas,
resume, distribution over ranks.
"""
