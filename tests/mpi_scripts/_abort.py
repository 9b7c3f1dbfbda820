"""Shared entry point for the scripts in this folder, which run under ``mpirun``."""

import sys
import traceback


def run(main) -> None:
    """Call ``main(*argv[1:])``; any exception aborts the whole MPI job, so no rank is left
    waiting in a collective for one that died."""
    try:
        main(*sys.argv[1:])
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        from mpi4py import MPI

        MPI.COMM_WORLD.Abort(1)
