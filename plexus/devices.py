"""Which device each rank runs on, and how many CPU threads it uses.

A rank picks its device from its node-local rank: the i-th rank on a node takes the i-th
accelerator there (CUDA covers NVIDIA and ROCm builds of torch), else Apple ``mps``, Intel
``xpu``, else the CPU. ``--device`` overrides.
"""

from __future__ import annotations

import os

import torch

from plexus.errors import PlexusError

LOCAL_RANK_VARS = ("OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID", "MPI_LOCALRANKID", "PMI_LOCAL_RANK")


def local_rank_from_env(default: int) -> int:
    for var in LOCAL_RANK_VARS:
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return default


def available_devices() -> dict[str, int]:
    """Accelerators torch can see: {"cuda": n, "xpu": n, "mps": 0|1}."""
    found = {"cuda": torch.cuda.device_count() if torch.cuda.is_available() else 0}
    xpu = getattr(torch, "xpu", None)
    found["xpu"] = xpu.device_count() if xpu is not None and xpu.is_available() else 0
    mps = getattr(torch.backends, "mps", None)
    found["mps"] = 1 if mps is not None and mps.is_available() else 0
    return found


def select_device(local_rank: int, override: str | None = None, devices: dict[str, int] | None = None) -> str:
    """The device string for this rank, e.g. "cuda:1", "mps", "xpu:0" or "cpu"."""
    devices = available_devices() if devices is None else devices
    if override and override != "auto":
        kind = override.split(":")[0]
        if kind not in ("cpu", "cuda", "mps", "xpu"):
            raise PlexusError(f"unknown device {override!r} (use auto, cpu, cuda[:i], mps, xpu[:i])")
        if kind != "cpu" and not devices.get(kind):
            raise PlexusError(f"device {override!r} requested but torch sees no {kind} device on this host")
        if kind in ("cuda", "xpu") and ":" not in override:
            return f"{kind}:{local_rank % devices[kind]}"
        return override
    for kind in ("cuda", "xpu"):
        if devices.get(kind):
            return f"{kind}:{local_rank % devices[kind]}"
    if devices.get("mps"):
        return "mps"
    return "cpu"


def cpu_threads(local_size: int, override: int | None = None) -> int:
    """Threads for a CPU rank: this node's cores shared evenly among its ranks."""
    if override:
        return max(1, override)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, local_size))
