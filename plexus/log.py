"""A rank-aware logger: rank 0 speaks plainly on stderr, other ranks prefix their rank."""

from __future__ import annotations

import logging
import sys

_logger = logging.getLogger("plexus")


def setup_logging(rank: int = 0, verbose: bool = False) -> logging.Logger:
    prefix = "plexus" if rank == 0 else f"plexus[rank {rank}]"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{prefix}: %(message)s"))
    _logger.handlers[:] = [handler]
    _logger.propagate = False
    # other ranks only report warnings and errors: rank 0 owns the output
    _logger.setLevel(logging.DEBUG if verbose else logging.INFO if rank == 0 else logging.WARNING)
    return _logger


def get_logger() -> logging.Logger:
    return _logger
