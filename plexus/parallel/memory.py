"""What each rank can use: free memory per device (accelerator, unified, host), shared evenly by
the ranks that draw on the same memory, less a reserve."""

from __future__ import annotations

from typing import Sequence

# Left free on every rank for activations, the allocator and the runtime (CUDA context, MPI
# buffers, Python); measured memory minus this is what a rank offers to the pool.
RESERVE_BYTES = 512 * 2**20


def host_available_bytes() -> int | None:
    """Memory the OS can hand out without swapping (MemAvailable), or None if unknown."""
    from plexus.parallel.devices import host_memory

    available = host_memory()[1]  # /proc/meminfo, else the OS's count of free pages
    if available is not None:
        return available
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        return None


def device_free_bytes(device: str) -> int | None:
    """Free bytes in the memory ``device`` allocates from: the accelerator's own (CUDA/ROCm, xpu),
    Apple's unified memory for mps, the host's for cpu. None if it cannot be measured."""
    kind = device.split(":")[0]
    try:
        import torch

        if kind == "cuda":
            return int(torch.cuda.mem_get_info(torch.device(device))[0])
        if kind == "xpu":
            dev = torch.device(device)
            if hasattr(torch.xpu, "mem_get_info"):
                return int(torch.xpu.mem_get_info(dev)[0])
            return int(torch.xpu.get_device_properties(dev).total_memory - torch.xpu.memory_reserved(dev))
        if kind == "mps":
            return int(torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory())
    except Exception:  # an old torch or a busy device: fall back below / report unknown
        if kind in ("cuda", "xpu"):
            return None
    return host_available_bytes()


def _pool_key(host: str, device: str) -> tuple[str, str]:
    kind = device.split(":")[0]
    if kind in ("cuda", "xpu") and ":" not in device:
        device = f"{kind}:0"
    return host, device


def usable_memory(reports: Sequence[tuple[str, str, int | None]], reserve: int = RESERVE_BYTES) -> list[int | None]:
    """Each rank's usable bytes from every rank's (host, device, free bytes): ranks that draw on
    the same memory (same host and device, e.g. CPU ranks on one node) share it evenly — one
    measurement for all of them, so they get equal shares — minus a reserve each."""
    groups: dict[tuple[str, str], list[int]] = {}
    for r, (host, device, _) in enumerate(reports):
        groups.setdefault(_pool_key(host, device), []).append(r)
    out: list[int | None] = [None] * len(reports)
    for ranks in groups.values():
        free = reports[ranks[0]][2]
        if free is not None:
            for r in ranks:
                out[r] = max(0, free // len(ranks) - reserve)
    return out
