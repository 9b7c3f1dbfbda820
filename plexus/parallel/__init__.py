"""Ranks and what they hold: the Communicator (the only mpi4py import), each rank's device and threads,
the shard plan, memory-weighted pool planning, host memory helpers."""
