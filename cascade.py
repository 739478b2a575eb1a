"""cascade.py: presets, stage/level geometry, and how one CDM chains three U-Nets.

To be filled by the issue "cascade.py and tiler.py": presets (paper, demo), stage sizes
and zoom factors, context / region crops, make_lowres, the CDM that samples a batch of
patches through its three U-Nets, and loading the nine models from a checkpoint directory.
"""
