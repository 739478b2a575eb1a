"""train.py: train one (stage, level) model, single process or DDP under torchrun.

To be filled by the issue "train.py": CLI, training loop, EMA, atomic checkpoints.
"""
