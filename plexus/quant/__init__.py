"""Quantized weights: one representation (qweight) that every format converts into."""
