"""Which device each rank runs on, how many CPU threads it uses, and how much memory it has.

A rank picks its device from its node-local rank: the i-th rank on a node takes the i-th
accelerator there (CUDA covers NVIDIA and ROCm builds of torch, then Intel ``xpu``, then Apple
``mps``), wrapping around when a node has more ranks than accelerators, which is also what makes
Slurm's ``--gpus-per-task=1`` work (each task sees one GPU, ``cuda:0``). A node with no
accelerator runs its ranks on the CPU. ``--device`` overrides.

Everything here is a plain function of its inputs (device counts, CPU sets, environment), so it
is unit-tested without the hardware; ``plexus.engine.runtime`` feeds it the real values.
"""

from __future__ import annotations

import os
from typing import Mapping, Sequence

import torch

from plexus.errors import PlexusError

# Launchers' node-local rank, most specific first. SLURM_LOCALID comes last: a batch script's
# own SLURM_LOCALID=0 leaks into ranks started by mpirun/mpiexec inside the allocation.
LOCAL_RANK_VARS = ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "PMI_LOCAL_RANK", "SLURM_LOCALID")
DEVICE_KINDS = ("cpu", "cuda", "xpu", "mps")


def node_local_rank(split_rank: int, split_size: int, env: Mapping[str, str] = os.environ) -> int:
    """This rank's index among the ranks on its node.

    ``split_rank``/``split_size`` come from a shared-memory split of the communicator, which is
    always right; a launcher's variable is preferred (it follows the launcher's own mapping) but
    only when it is consistent with the split, so a value leaked from an outer launcher is ignored.
    """
    for var in LOCAL_RANK_VARS:
        value = env.get(var, "")
        if value.isdigit() and int(value) < max(1, split_size):
            return int(value)
    return split_rank


def available_devices() -> dict[str, int]:
    """Accelerators torch can see on this host: {"cuda": n, "xpu": n, "mps": 0|1}."""
    found = {"cuda": torch.cuda.device_count() if torch.cuda.is_available() else 0}
    xpu = getattr(torch, "xpu", None)
    found["xpu"] = xpu.device_count() if xpu is not None and xpu.is_available() else 0
    mps = getattr(torch.backends, "mps", None)
    found["mps"] = 1 if mps is not None and mps.is_available() else 0
    return found


def accelerator_slots(devices: Mapping[str, int]) -> list[str]:
    """This host's accelerators in the order node-local ranks take them."""
    slots = [f"cuda:{i}" for i in range(devices.get("cuda", 0))]
    slots += [f"xpu:{i}" for i in range(devices.get("xpu", 0))]
    if devices.get("mps"):
        slots.append("mps")
    return slots


def select_device(local_rank: int, override: str | None = None, devices: Mapping[str, int] | None = None) -> str:
    """The device string for this rank, e.g. "cuda:1", "mps", "xpu:0" or "cpu"."""
    devices = available_devices() if devices is None else devices
    if override and override != "auto":
        kind, _, index = override.partition(":")
        if kind not in DEVICE_KINDS or (index and not index.isdigit()) or (index and kind in ("cpu", "mps")):
            raise PlexusError(f"unknown device {override!r} (use auto, cpu, cuda[:i], xpu[:i] or mps)")
        if kind == "cpu":
            return "cpu"
        count = devices.get(kind, 0)
        if not count:
            raise PlexusError(f"--device {override} requested but torch sees no {kind} device on this host")
        if kind == "mps":
            return "mps"
        if not index:
            return f"{kind}:{local_rank % count}"
        if int(index) >= count:
            raise PlexusError(f"--device {override} requested but this host has {count} {kind} device(s)")
        return f"{kind}:{int(index)}"
    slots = accelerator_slots(devices)
    return slots[local_rank % len(slots)] if slots else "cpu"


# ---- CPU threads ------------------------------------------------------------------------------

def allowed_cpus() -> frozenset[int]:
    """The cores this process may run on (a launcher's binding or a cgroup restricts them)."""
    if hasattr(os, "sched_getaffinity"):
        return frozenset(os.sched_getaffinity(0))
    return frozenset(range(os.cpu_count() or 1))


def cpu_threads(local_size: int, override: int | None = None, cpus: frozenset[int] | None = None,
                node_cpus: Sequence[frozenset[int]] | None = None,
                env: Mapping[str, str] = os.environ) -> int:
    """Threads for a rank: its fair share of the cores it may use.

    ``cpus`` is this rank's allowed core set and ``node_cpus`` the sets of every rank on its
    node (itself included). Each allowed core counts 1/k when k ranks of the node may use it, so
    unbound ranks split the node evenly (cores / ranks), while ranks that a launcher already
    bound to their own cores (mpirun's default bind-to-core, ``--map-by ...:PE=n``, Slurm's
    task affinity) use all of theirs. Explicit settings win: ``--threads``, then
    ``OMP_NUM_THREADS``; Slurm's ``SLURM_CPUS_PER_TASK`` caps the share.
    """
    if override:
        return max(1, override)
    omp = env.get("OMP_NUM_THREADS", "")
    if omp.isdigit() and int(omp) > 0:
        return int(omp)
    cpus = allowed_cpus() if cpus is None else cpus
    if node_cpus:
        share = sum(1.0 / max(1, sum(1 for other in node_cpus if c in other)) for c in cpus)
    else:
        share = len(cpus) / max(1, local_size)
    n = int(share + 1e-6)
    slurm = env.get("SLURM_CPUS_PER_TASK", "")
    if slurm.isdigit() and int(slurm) > 0:
        n = min(n, int(slurm))
    return max(1, n)


# ---- memory -----------------------------------------------------------------------------------

def host_memory() -> tuple[int | None, int | None]:
    """(total, available) bytes of host RAM, None where the OS does not say."""
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.split()[1:2]}
        return info.get("MemTotal"), info.get("MemAvailable", info.get("MemFree"))
    except (OSError, ValueError, IndexError):
        pass
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        total = os.sysconf("SC_PHYS_PAGES") * page
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * page
        except (ValueError, OSError):
            avail = None
        return total, avail
    except (ValueError, OSError, AttributeError):
        return None, None


def device_info(device: str) -> dict:
    """{"name", "total", "free", "uuid"} of a device (bytes; None where unknown). For the CPU
    the memory is the host's RAM."""
    kind, _, index = device.partition(":")
    i = int(index or 0)
    info = {"name": None, "total": None, "free": None, "uuid": None}
    try:
        if kind == "cuda":
            props = torch.cuda.get_device_properties(i)
            free, total = torch.cuda.mem_get_info(i)
            info.update(name=props.name, total=total, free=free, uuid=str(getattr(props, "uuid", "")) or None)
        elif kind == "xpu":
            props = torch.xpu.get_device_properties(i)
            info.update(name=props.name, total=props.total_memory)
            if hasattr(torch.xpu, "mem_get_info"):
                info["free"] = torch.xpu.mem_get_info(i)[0]
        elif kind == "mps":
            total = torch.mps.recommended_max_memory()
            info.update(name="Apple GPU", total=total, free=max(0, total - torch.mps.driver_allocated_memory()))
        else:
            info["total"], info["free"] = host_memory()
    except (RuntimeError, AttributeError, AssertionError):
        pass  # a backend too old to say: the table shows "?"
    return info
