"""Operations: what runs URCDM for a day at paper scale (files, ranks, checkpoints, logs, flags,
estimates, windows, evaluation reports); the algorithm lives in the eight component files."""
