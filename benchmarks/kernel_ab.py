"""Two builds of the fused decode kernel (plexus/models/csrc/decode.c) side by side in one process:
the working tree's and the one at a git revision, on the same loaded model (world size 1, every
core), in alternating blocks of decode steps (ABBA), so that the machine's drift falls on both.
``--rev torch`` compares the kernel with the engine's torch ops instead.

    python benchmarks/kernel_ab.py --rev 896538e [--model DIR | --preset bench] [--rounds 16] [--steps 32]
                                   [--prompt-tokens 128] [--threads N] [--dtype float32 | bfloat16 | float16]

Prints each build's median step time and the median of the per-round speed ratios (the working
tree's speed over the revision's), with the lowest and highest round. The two builds must share
the struct layouts that plexus/models/kernels.py passes (a revision from before a layout change will
not run). Needs git and a C compiler.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def build_at(rev: str, out_dir: Path, dtype) -> Path:
    from plexus.models import kernels

    src = out_dir / "decode.c"
    for folder in ("plexus/models/csrc", "plexus/csrc"):  # (where it was before plexus/models/)
        shown = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:{folder}/decode.c"], capture_output=True)
        if shown.returncode == 0:
            break
    else:
        sys.exit(f"no decode.c at {rev}: {shown.stderr.decode().strip()}")
    names = subprocess.run(["git", "-C", str(REPO), "ls-tree", "--name-only", f"{rev}:{folder}"], capture_output=True,
                           text=True, check=True).stdout.split()
    for name in names:  # decode.c and the headers it includes (csrc/qdot.h)
        (out_dir / name).write_bytes(subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:{folder}/{name}"],
                                                    capture_output=True, check=True).stdout)
    lib = out_dir / "decode.so"
    subprocess.run(["cc", *kernels.FLAGS, *kernels.DTYPE_FLAGS[dtype], "-o", str(lib), str(src), "-lm"], check=True)
    return lib


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rev", required=True, help="git revision of the build to compare against, or 'torch'")
    ap.add_argument("--model", default=None)
    ap.add_argument("--preset", default="bench")
    ap.add_argument("--rounds", type=int, default=16)
    ap.add_argument("--steps", type=int, default=32, help="decode steps per block")
    ap.add_argument("--prompt-tokens", type=int, default=128,
                    help="positions in the KV cache before the first step (the attention's share grows with it)")
    ap.add_argument("--threads", type=int, default=None, help="default: every core")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = ap.parse_args()

    import torch

    from plexus.bench.runner import ensure_preset_model
    from plexus.engine.engine import Engine
    from plexus.log import setup_logging
    from plexus.models import kernels
    from plexus.parallel.comm import Communicator
    from plexus.parallel.devices import cpu_threads

    log = setup_logging()
    torch.set_num_threads(args.threads or cpu_threads(1))
    model_dir = args.model or str(ensure_preset_model(args.preset, log))
    model = Engine.load(model_dir, Communicator.self_only(), args.dtype, "cpu").model
    if model.fused is None:
        sys.exit("the fused kernel is not available here (see plexus/models/kernels.py)")
    with tempfile.TemporaryDirectory() as tmp:
        decoders = {"working tree": model.fused}
        if args.rev == "torch":  # the model's own layers, as without the kernel
            def torch_ops(token, pos, table, reuse):
                model.fused = None
                model(torch.tensor([[token]]), pos)
                model.fused = decoders["working tree"]
            decoders["torch"] = torch_ops
        else:
            old = ctypes.CDLL(str(build_at(args.rev, Path(tmp), getattr(torch, args.dtype))))
            old.plexus_step.argtypes, old.plexus_step.restype = model.fused.lib.plexus_step.argtypes, ctypes.c_int
            decoders[args.rev] = kernels.FusedDecoder(model)
            decoders[args.rev].lib = old
        prompt = torch.randint(2, model.config.vocab_size, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
        times = {k: [] for k in decoders}
        with torch.inference_mode():
            model(prompt, 0)
            for r in range(args.rounds):
                order = list(decoders) if r % 2 == 0 else list(decoders)[::-1]
                for k in order:
                    d, t0 = decoders[k], time.perf_counter()
                    for s in range(args.steps):
                        d(7, args.prompt_tokens + s, model.solo_table, reuse=True)
                    times[k].append((time.perf_counter() - t0) / args.steps)
    new, ref = times["working tree"], times[args.rev]
    ratios = sorted(b / a for a, b in zip(new, ref))
    print(f"step: working tree {1e3 * statistics.median(new):.2f} ms, {args.rev} {1e3 * statistics.median(ref):.2f} ms; "
          f"working tree speed / {args.rev}: median {statistics.median(ratios):.3f} "
          f"(rounds {ratios[0]:.3f}-{ratios[-1]:.3f}), {torch.get_num_threads()} threads, {args.rounds} rounds, "
          f"{args.dtype}")


if __name__ == "__main__":
    main()
