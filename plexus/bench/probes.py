"""What the bench measures besides time: resident and device memory, CPU time, the bytes a decode
step streams, and the memory bandwidth every rank gets at once (the floor of a decode step)."""

from __future__ import annotations

import os
import resource
import statistics
import sys
import time

import torch
import torch.nn.functional as F

PROBE_MIB = 512  # per rank: well past any CPU's last-level cache
PROBE_REPS = 15


# ---- memory and time --------------------------------------------------------------------------

def current_rss() -> int | None:
    """Resident bytes of this process now (Linux /proc; psutil elsewhere if installed)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        return None


def peak_rss() -> int:
    """This process's high-water resident bytes: Linux's VmHWM (which reset_peak_rss can reset),
    else ru_maxrss (KiB on Linux, bytes on macOS)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def reset_peak_rss() -> bool:
    """Restart the high-water mark at the current RSS (Linux), so that the bandwidth probe's
    matrix does not count as the engine's memory. False where the OS does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cpu_seconds() -> tuple[float | None, float]:
    """(busy seconds of every CPU of this host so far, or None where /proc/stat is missing;
    CPU seconds this process has used). Their difference over the timed run is the load other
    programs put on the node, which the report shows: a benchmark on a shared machine is only
    as good as that number is small."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        busy = (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # all but idle, iowait
    except (OSError, ValueError, IndexError):
        busy = None
    return busy, own.ru_utime + own.ru_stime


def peak_device_bytes(device: str) -> int | None:
    kind = device.split(":")[0]
    if kind == "cuda":
        return int(torch.cuda.max_memory_allocated(torch.device(device)))
    if kind == "xpu" and hasattr(torch.xpu, "max_memory_allocated"):
        return int(torch.xpu.max_memory_allocated(torch.device(device)))
    if kind == "mps" and hasattr(torch.mps, "driver_allocated_memory"):
        return int(torch.mps.driver_allocated_memory())
    return None


def reset_peak_device_bytes(device: str) -> None:
    kind = device.split(":")[0]
    if kind == "cuda":
        torch.cuda.reset_peak_memory_stats(torch.device(device))
    elif kind == "xpu" and hasattr(torch.xpu, "reset_peak_memory_stats"):
        torch.xpu.reset_peak_memory_stats(torch.device(device))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "xpu":
        torch.xpu.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _quantized_bytes(model) -> int:
    """Bytes of the quantized weights (codes, scales, mins), which are not parameters; a tied
    LM head's (the embedding's) counted once."""
    held = {id(m.qweight): m.qweight for m in model.modules() if getattr(m, "qweight", None) is not None}
    return sum(q.nbytes for q in held.values())


def decode_weight_bytes(model) -> int:
    """Bytes of weights one decode step reads on this rank: every parameter and quantized
    weight except the embedding table, of which a step reads one row (tied embeddings are read
    by the LM head)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters()) + _quantized_bytes(model)
    if not model.config.tie_word_embeddings:
        e = model.embed_tokens
        total -= e.qweight.nbytes if e.qweight is not None else e.weight.numel() * e.weight.element_size()
    return int(total)


def resident_weight_bytes(model) -> int:
    return int(sum(p.numel() * p.element_size() for p in model.parameters()) + _quantized_bytes(model))


# ---- bandwidth probe ----------------------------------------------------------------------------

def matvec_kernels(dtype: torch.dtype, device: torch.device) -> dict:
    """The matrix-vector products the probe times: torch's stock ``F.linear``, the kernel the
    engine's layers use (the same function where the engine has no kernel of its own), and the
    fused decode kernel's loop where the engine decodes with it. The limit is the fastest of
    them, so an engine kernel cannot flatter itself."""
    from plexus.models import layers

    kernels = {"torch.nn.functional.linear": lambda x, w: F.linear(x, w)}
    engine_linear = getattr(layers, "linear", None)  # report labels as named before plexus/models/
    if engine_linear is not None:
        kernels["plexus.layers.linear"] = lambda x, w: engine_linear(x, w)
    if device.type == "cpu":
        from plexus.models import kernels as fused
        if fused.library(dtype) is not None:  # the fused decode kernel's own streaming loop
            outs = {}

            def fused_matvec(x, w):
                if w.shape[0] not in outs:  # its input and output are float32 in every dtype
                    outs[w.shape[0]] = torch.empty(w.shape[0]), x.float().contiguous()
                out, xf = outs[w.shape[0]]
                fused.matvec(w, xf, out)
            kernels["plexus.kernels.matvec"] = fused_matvec
    return kernels


@torch.inference_mode()
def measure_bandwidth(dtype: torch.dtype, device: torch.device, nbytes: int, width: int,
                      reps: int = PROBE_REPS) -> dict:
    """GB/s of y = W x over one (nbytes / width, width) matrix W of ``dtype``, per kernel: the
    median of ``reps`` products (decode speed is an average too, and a machine's bandwidth
    drifts; the best single product would be a peak no sustained run reaches). On the CPU W is
    allocated as the engine allocates its weights (huge pages where the OS allows), so the
    engine gets no advantage the probe lacks. Every rank runs it at once, after a barrier:
    ranks that share memory share its bandwidth."""
    from plexus.parallel.hostmem import host_empty

    rows = max(1, nbytes // (width * dtype.itemsize))
    if device.type == "cpu":
        w = host_empty((rows, width), dtype).fill_(0.01)
    else:
        w = torch.full((rows, width), 0.01, dtype=dtype, device=device)
    x = torch.ones((1, width), dtype=dtype, device=device)
    size = w.numel() * w.element_size()
    result = {"matrix_bytes": int(size), "shape": [rows, width], "kernels": {}}
    for name, kernel in matvec_kernels(dtype, device).items():
        kernel(x, w)
        synchronize(device)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            kernel(x, w)
            synchronize(device)
            times.append(time.perf_counter() - t0)
        result["kernels"][name] = size / statistics.median(times) / 1e9
    result["gbps"] = max(result["kernels"].values())
    result["kernel"] = max(result["kernels"], key=result["kernels"].get)
    del w
    return result
