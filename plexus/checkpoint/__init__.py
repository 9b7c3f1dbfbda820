"""Checkpoints on disk: finding and validating files, reading tensors and slices (never building a
model), and writing the demo checkpoints."""
