"""Run under ``mpirun -n K``: measure each rank's resident memory while ``Engine.load`` reads
its slice of a checkpoint.

    mpirun -n K python tests/mpi_scripts/load_memory.py MODEL_DIR OUT.json

Right before the load each rank writes "5" to /proc/self/clear_refs, which resets the kernel's
peak-RSS counter (VmHWM) to the current RSS; after the load VmHWM is the peak during the load.
Rank 0 writes [{"rank", "rss_before", "hwm_after", "rss_after", "hwm_reset"} ...] in bytes.
"""

import json

from _abort import run  # this folder (the script's own) is on sys.path


def status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def main(model_dir: str, out_path: str) -> None:
    import torch

    from plexus.engine.engine import Engine
    from plexus.parallel.comm import Communicator

    comm = Communicator()
    torch.set_num_threads(1)
    comm.barrier()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        reset = True
    except OSError:
        reset = False
    rss_before = status_kb("VmRSS")
    if not reset:
        rss_before = status_kb("VmHWM")  # without a reset the peak can only be bounded from above
    engine = Engine.load(model_dir, comm, max_context=64, weights=[1.0] * comm.size)  # even shares
    report = {"rank": comm.rank, "rss_before": rss_before, "hwm_after": status_kb("VmHWM"),
              "rss_after": status_kb("VmRSS"), "hwm_reset": reset,
              "param_bytes": sum(p.numel() * p.element_size() for p in engine.model.parameters())}
    reports = comm.allgather_obj(report)
    if comm.rank == 0:
        with open(out_path, "w") as f:
            json.dump(reports, f)


if __name__ == "__main__":
    run(main)
