"""The table in docs/benchmarks.md: ``plexus bench --preset bench`` at float32 and bfloat16, world
size 1 (plain ``plexus bench``: one rank, every core) and 2 (``mpirun -n 2``: one core each),
each run several times in interleaved rounds, reduced to medians of ratios.

    python benchmarks/table.py [--runs 3] [--new-tokens 128] [--jsonl results.jsonl]
    python benchmarks/table.py --from a.jsonl [b.jsonl ...]   # the table of earlier runs' reports, pooled

Before every run it waits (up to --idle-wait seconds) for the machine to be idle, since other
programs on the node change every figure; each report also says how busy the node was.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

DTYPES = ("float32", "bfloat16")
WORLD_SIZES = (1, 2)


def busy_fraction(seconds: float = 2.0) -> float:
    """Fraction of all CPU time spent busy over ``seconds`` (Linux /proc/stat; 0 elsewhere)."""
    def sample():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v) - v[3] - v[4], sum(v)

    try:
        b0, t0 = sample()
        time.sleep(seconds)
        b1, t1 = sample()
    except OSError:
        return 0.0
    return (b1 - b0) / max(1, t1 - t0)


def wait_idle(limit_s: float) -> None:
    end = time.time() + limit_s
    while busy_fraction() > 0.1 and time.time() < end:
        pass


def command(dtype: str, world_size: int, new_tokens: int, baseline: bool) -> list[str]:
    bench = ["plexus", "bench", "--preset", "bench", "--dtype", dtype, "--new-tokens", str(new_tokens), "--json"]
    if baseline:
        bench += ["--baseline", "transformers"]
    if world_size == 1:
        return bench  # one rank, unbound: every core of the machine
    mpirun = shutil.which("mpirun") or os.path.join(os.path.dirname(sys.executable), "mpirun")
    # mpirun binds each rank to its own core; --vs-one-rank adds the same-run ratio to one rank
    return [mpirun, "-n", str(world_size), *bench, "--vs-one-rank"]


def run(cmd: list[str]) -> dict:
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def median(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--idle-wait", type=float, default=300)
    ap.add_argument("--jsonl", default=None, help="Also append every report to this file.")
    ap.add_argument("--from", dest="sources", nargs="+", default=None,
                    help="Print the table of the reports in these --jsonl files instead of running.")
    a = ap.parse_args()
    reports: dict[tuple[str, int], list[dict]] = {(d, n): [] for d in DTYPES for n in WORLD_SIZES}
    for i, path in enumerate(a.sources or []):
        with open(path) as f:
            for line in f:
                r = json.loads(line)
                r["round"] = (i, r["round"])  # rounds of different files are different rounds
                reports[(r["dtype"], r["world_size"])].append(r)
    for round_ in range(0 if a.sources else a.runs):
        for dtype in DTYPES:
            for n in WORLD_SIZES:  # ws1 and ws2 back to back, so their ratio sees the same machine
                for _ in range(3):  # a run another program disturbed is run again
                    wait_idle(a.idle_wait)
                    r = run(command(dtype, n, a.new_tokens, not a.no_baseline))
                    if max(r["other_load_cores"].values(), default=0.0) <= 0.1:
                        break
                r["round"] = round_
                reports[(dtype, n)].append(r)
                print(f"round {round_} {dtype} ws{n}: decode {r['decode_tok_s']:.2f} tok/s, "
                      f"fraction {r['bandwidth_fraction']:.2f}, other load {r['other_load_cores']}", file=sys.stderr)
                if a.jsonl:
                    with open(a.jsonl, "a") as f:
                        f.write(json.dumps({"dtype": dtype, **r}) + "\n")
    print("| dtype | ranks x threads | decode / bandwidth limit | decode vs transformers | prefill vs transformers "
          "| decode vs 1 rank, same run | decode vs 1 rank, separate runs | RSS growth over the run "
          "| peak RSS / rank weights |")
    print("|---|---|---|---|---|---|---|---|---|")
    for dtype in DTYPES:
        for n in WORLD_SIZES:
            rs = reports[(dtype, n)]
            ws1 = {r["round"]: r for r in reports[(dtype, 1)]}
            vs1 = median(r["decode_tok_s"] / ws1[r["round"]]["decode_tok_s"] for r in rs)
            growth = max(max(abs(g) for g in r["rss_growth_bytes"]) for r in rs)
            peak = median(max(p / w for p, w in zip(r["peak_rss_bytes"], r["resident_weight_bytes_per_rank"]))
                          for r in rs)
            fmt = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
            fraction = median(r["bandwidth_fraction"] for r in rs)
            print(f"| {dtype} | {n} x {rs[0]['threads_per_rank'][0]} | {fmt(fraction)} "
                  f"| {fmt(median(r.get('decode_vs_baseline') for r in rs))} "
                  f"| {fmt(median(r.get('prefill_vs_baseline') for r in rs))} "
                  f"| {fmt(median(r.get('decode_vs_one_rank') for r in rs))} | {fmt(vs1)} "
                  f"| {growth / 2**20:.1f} MiB | {fmt(peak)} |")


if __name__ == "__main__":
    main()
