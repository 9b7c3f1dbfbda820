"""Plexus: pool the memory of several devices to run one language model with tensor parallelism over MPI."""

__version__ = "0.1.0"
