"""``plexus bench`` on the tiny demo model: it runs at world sizes 1 and 2 under mpirun (and
without mpirun), prints every field of its JSON report with sane values, runs the transformers
baseline beside Plexus, and fails cleanly on bad usage. Benchmarks are not timed tests: nothing
here asserts a speed, only that the numbers are present, positive and consistent with each
other and with the checkpoint's own sizes (read from the safetensors headers here, not by
Plexus's loader).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT, assert_clean_error, plexus_cmd, run, run_mpi

PROMPT_TOKENS, NEW_TOKENS = 12, 6
FAST = ["--prompt-tokens", PROMPT_TOKENS, "--new-tokens", NEW_TOKENS, "--probe-mib", 8]
REQUIRED = ("world_size", "dtype", "load_s", "ttft_s", "prefill_tok_s", "decode_tok_s", "peak_rss_bytes",
            "weight_bytes_per_rank", "achieved_gbps", "bandwidth_limit_gbps", "bandwidth_fraction")
MiB = 2 ** 20


def checkpoint_sizes(model_dir: Path) -> tuple[int, int]:
    """(bytes a decode step reads in all: every tensor but the untied embedding table; bytes of
    the RMSNorm weights, which every rank holds whole), from the safetensors headers."""
    config = json.loads((model_dir / "config.json").read_text())
    assert not config["tie_word_embeddings"]
    streamed = norms = 0
    for f in model_dir.glob("*.safetensors"):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, info in header.items():
            if name == "__metadata__" or name == "model.embed_tokens.weight":
                continue
            size = info["data_offsets"][1] - info["data_offsets"][0]
            streamed += size
            if name.endswith("norm.weight"):
                norms += size
    return streamed, norms


def bench_report(result) -> dict:
    assert result.rc == 0 and not result.timed_out, result.describe()
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, result.describe()  # one JSON object, from rank 0 only
    return json.loads(lines[0])


def check_report(r: dict, world_size: int, model_dir: Path, baseline: bool) -> None:
    for key in REQUIRED:
        assert key in r, f"missing {key}: {r}"
    assert r["world_size"] == world_size and r["dtype"] == "float32"
    assert r["prompt_tokens"] == PROMPT_TOKENS and r["new_tokens"] == NEW_TOKENS  # EOS never stops the bench
    assert 0 < r["load_s"] < 120 and 0 < r["ttft_s"] < 60
    assert r["prefill_tok_s"] == pytest.approx(PROMPT_TOKENS / r["ttft_s"])
    assert r["decode_tok_s"] > 0
    for key in ("peak_rss_bytes", "rss_growth_bytes", "weight_bytes_per_rank", "threads_per_rank", "devices",
                "bandwidth_limit_gbps_per_rank", "achieved_gbps_per_rank", "peak_device_bytes"):
        assert isinstance(r[key], list) and len(r[key]) == world_size, (key, r[key])
    for peak in r["peak_rss_bytes"]:
        assert 50 * MiB < peak < 16 * 2 ** 30  # a Python + torch process, and no more than the machine
    for growth in r["rss_growth_bytes"]:
        assert abs(growth) < 64 * MiB  # a few tokens of a tiny model allocate nothing that stays
    assert r["devices"] == ["cpu"] * world_size and r["peak_device_bytes"] == [None] * world_size
    # every rank reads its own share of the weights per step; the norms are held by every rank
    streamed, norms = checkpoint_sizes(model_dir)
    assert sum(r["weight_bytes_per_rank"]) == streamed + (world_size - 1) * norms
    for b in r["weight_bytes_per_rank"]:
        assert b >= streamed / world_size * 0.8
    assert r["achieved_gbps"] == pytest.approx(sum(r["weight_bytes_per_rank"]) * r["decode_tok_s"] / 1e9)
    assert all(b > 0 for b in r["bandwidth_limit_gbps_per_rank"])
    assert r["bandwidth_limit_gbps"] == pytest.approx(sum(r["bandwidth_limit_gbps_per_rank"]))
    assert r["bandwidth_fraction"] == pytest.approx(r["achieved_gbps"] / r["bandwidth_limit_gbps"])
    assert r["probe"]["matrix_bytes"] >= 4 * MiB
    assert "torch.nn.functional.linear" in r["probe"]["kernels_gbps_per_rank"][0]
    assert all(cores >= 0 for cores in r["other_load_cores"].values())
    if baseline:
        b = r["baseline"]
        assert b["name"] == "transformers" and b["new_tokens"] == NEW_TOKENS
        assert b["decode_tok_s"] > 0 and b["prefill_tok_s"] > 0 and b["ttft_s"] > 0
        assert r["decode_vs_baseline"] == pytest.approx(r["decode_tok_s"] / b["decode_tok_s"])
        assert r["prefill_vs_baseline"] == pytest.approx(r["prefill_tok_s"] / b["prefill_tok_s"])
        # it runs in a process of its own with every core of the node, not on rank 0's one core
        assert b["threads"] == len(os.sched_getaffinity(0))
    else:
        assert "baseline" not in r and "decode_vs_baseline" not in r


def check_one_rank(r: dict) -> None:
    """--vs-one-rank: the pooled engine and the whole model as one rank (a process of its own,
    every core), in alternating blocks; the ratio is the median of the pairs' ratios."""
    o = r["one_rank"]
    assert o["pairs"] == 8 and o["block_tokens"] == NEW_TOKENS  # blocks of min(--new-tokens, 32)
    assert o["threads"] == len(os.sched_getaffinity(0))
    assert o["decode_tok_s"] > 0 and r["paired_decode_tok_s"] > 0
    lo, hi = r["decode_vs_one_rank_range"]
    assert 0 < lo <= r["decode_vs_one_rank"] <= hi


def shadowing_directory(tmp_path: Path) -> Path:
    """A working directory with a plexus/ folder in it (a user beside their clone): a child
    interpreter that put the current directory first on sys.path would import that folder as a
    namespace package instead of the installed Plexus."""
    (tmp_path / "plexus").mkdir()
    return tmp_path


@pytest.mark.timeout(240)
@pytest.mark.parametrize("world_size", [1, 2])
def test_bench_json_under_mpirun(demo_tiny, world_size, tmp_path):
    """Also: both baselines (child interpreters) start from a directory that holds a plexus/
    folder, with Plexus found through the install alone (no PYTHONPATH)."""
    extra = ["--vs-one-rank"] if world_size > 1 else ["--concurrency", "3"]
    result = run_mpi(world_size, plexus_cmd("bench", "--model", demo_tiny, *FAST, "--baseline", "transformers",
                                            *extra, "--json"), timeout=200,
                     cwd=shadowing_directory(tmp_path), env={"PYTHONPATH": ""})
    r = bench_report(result)
    check_report(r, world_size, demo_tiny, baseline=True)
    if world_size > 1:
        check_one_rank(r)
    else:
        assert "one_rank" not in r and "decode_vs_one_rank" not in r
        assert r["concurrency"] == 3 and r["batched_decode_tok_s"] > 0
        assert r["batched_vs_one_stream"] == r["batched_decode_tok_s"] / r["decode_tok_s"]
    print(f"ws{world_size}: {result.elapsed:.1f}s, decode {r['decode_tok_s']:.0f} tok/s, "
          f"{r['decode_vs_baseline']:.2f}x transformers")


@pytest.mark.timeout(120)
def test_bench_vs_one_rank_needs_several_ranks(demo_tiny):
    result = run(plexus_cmd("bench", "--model", demo_tiny, *FAST, "--vs-one-rank"), timeout=90)
    assert_clean_error(result, "--vs-one-rank compares a pooled run with one rank", "mpirun")


@pytest.mark.timeout(120)
def test_solo_process_failures_are_clear_errors(tmp_path):
    """The baselines' own process: a model it cannot load, and the process dying, each come
    back as one PlexusError naming the cause, not a hang or a traceback."""
    from plexus.bench.baselines import SoloProcess
    from plexus.errors import PlexusError

    solo = SoloProcess()
    try:
        with pytest.raises(PlexusError, match="config.json"):
            solo.ask(op="load", model_dir=str(tmp_path / "nothing"), dtype="float32", device="cpu",
                     max_context=None, prompt_ids=[1, 2])
        solo.proc.kill()
        with pytest.raises(PlexusError, match="the baseline process exited with code -9"):
            solo.ask(op="block", prompt_ids=[1, 2], block_tokens=4)
    finally:
        solo.close()


@pytest.mark.timeout(180)
def test_bench_preset_without_mpirun_prints_a_table(tmp_path):
    """Plain ``plexus bench`` is world size 1 on every core; --preset writes the demo model into
    the cache once (here a temporary PLEXUS_CACHE) and reuses it."""
    cache = tmp_path / "cache"
    args = plexus_cmd("bench", "--preset", "tiny", *FAST)
    first = run(args, timeout=150, env={"PLEXUS_CACHE": str(cache)})
    assert first.rc == 0 and not first.timed_out, first.describe()
    model_dir = cache / "demo-tiny"
    assert (model_dir / "config.json").is_file()
    for label in ("load", "time to first", "decode", "bandwidth", "peak RSS", "tok/s", str(model_dir)):
        assert label in first.stdout, first.describe()
    again = run([*args, "--json"], timeout=150, env={"PLEXUS_CACHE": str(cache)})
    r = bench_report(again)
    assert r["model"] == str(model_dir) and "writing" not in again.stderr
    check_report(r, 1, model_dir, baseline=False)


@pytest.mark.timeout(120)
def test_bench_baseline_without_transformers_is_a_clear_error(demo_tiny, tmp_path):
    shim = tmp_path / "shim" / "transformers"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError(\"No module named 'transformers'\")\n")
    result = run_mpi(2, plexus_cmd("bench", "--model", demo_tiny, *FAST, "--baseline", "transformers"),
                     timeout=90, env={"PYTHONPATH": f"{shim.parent}:{REPO_ROOT}"})
    assert_clean_error(result, "--baseline transformers needs the transformers package", "pip install")


@pytest.mark.timeout(120)
def test_bench_prompt_over_the_context_fails_before_loading(demo_tiny, copy_model, tmp_path):
    """--prompt-tokens + --new-tokens past the context is decided by config.json alone: the
    error comes before the (here unreadable) weights are touched."""
    model = copy_model(demo_tiny, tmp_path / "no-weights")
    (model / "model.safetensors").write_bytes(b"not a safetensors file")
    result = run_mpi(2, plexus_cmd("bench", "--model", model, "--prompt-tokens", 500, "--new-tokens", 20),
                     timeout=90)
    assert_clean_error(result, "prompt (500 tokens) plus max tokens (20)", "context length of 512")


@pytest.mark.timeout(120)
def test_bench_model_and_preset_together_is_a_usage_error(demo_tiny):
    result = run(plexus_cmd("bench", "--model", demo_tiny, "--preset", "tiny", *FAST), timeout=90)
    assert_clean_error(result, "--model or --preset, not both")


def test_processes_vs_threads_script_runs():
    """benchmarks/processes_vs_threads.py (quoted in docs/benchmarks.md) runs and reports both
    rates; the figures themselves are the benchmark's, not the test's."""
    import re

    from plexus.models import kernels
    from tests.helpers import python_cmd

    if kernels.library() is None:
        pytest.skip("no fused kernel on this machine (not Linux x86-64 with a C compiler)")
    r = run_mpi(2, python_cmd(REPO_ROOT / "benchmarks" / "processes_vs_threads.py", "--rounds", "2", "--mib", "8"),
                timeout=120)
    assert r.rc == 0 and not r.timed_out, r.describe()
    m = re.fullmatch(r"one process, \d+ threads: ([\d.]+) GB/s; 2 processes, 1 thread each: ([\d.]+) GB/s; "
                     r"processes / one process: median ([\d.]+) \(rounds [\d.]+-[\d.]+\); "
                     r"each rank alone: ([\d.]+), ([\d.]+) GB/s", r.stdout.strip())
    assert m, r.stdout
    assert all(float(v) > 0 for v in m.groups())


def test_kernel_and_take_rows_ab_scripts_run():
    """benchmarks/kernel_ab.py (against a revision, and bfloat16 against the torch ops) and
    benchmarks/take_rows_ab.py (quoted in docs/benchmarks.md) run on a small model and print
    their comparison; the figures are the benchmarks', not the test's."""
    import re
    import shutil

    from plexus.models import kernels
    from tests.helpers import STORIES_DIR, python_cmd

    if kernels.library() is None or shutil.which("git") is None:
        pytest.skip("needs the fused kernel (Linux x86-64 with a C compiler) and git")
    if not (STORIES_DIR / "model.safetensors").is_file():
        pytest.skip(f"stories260K not found at {STORIES_DIR}")
    r = run(python_cmd(REPO_ROOT / "benchmarks" / "kernel_ab.py", "--rev", "HEAD", "--model", STORIES_DIR,
                       "--rounds", "2", "--steps", "4"), timeout=120)
    assert r.rc == 0 and not r.timed_out, r.describe()
    assert re.fullmatch(r"step: working tree [\d.]+ ms, HEAD [\d.]+ ms; working tree speed / HEAD: median [\d.]+ "
                        r"\(rounds [\d.]+-[\d.]+\), \d+ threads, 2 rounds, float32", r.stdout.strip()), r.stdout
    r = run(python_cmd(REPO_ROOT / "benchmarks" / "kernel_ab.py", "--rev", "torch", "--dtype", "bfloat16", "--model",
                       STORIES_DIR, "--rounds", "2", "--steps", "4", "--prompt-tokens", "40"), timeout=120)
    assert r.rc == 0 and not r.timed_out, r.describe()
    assert re.fullmatch(r"step: working tree [\d.]+ ms, torch [\d.]+ ms; working tree speed / torch: median [\d.]+ "
                        r"\(rounds [\d.]+-[\d.]+\), \d+ threads, 2 rounds, bfloat16", r.stdout.strip()), r.stdout
    r = run_mpi(2, python_cmd(REPO_ROOT / "benchmarks" / "take_rows_ab.py", "--model", STORIES_DIR,
                              "--rounds", "2", "--steps", "4"), timeout=120)
    assert r.rc == 0 and not r.timed_out, r.describe()
    assert re.fullmatch(r"step: taking rows [\d.]+ ms, not [\d.]+ ms; speed taking / not: median [\d.]+ "
                        r"\(rounds [\d.]+-[\d.]+\); blocks taken per step by rank: \d+, \d+", r.stdout.strip()), r.stdout


def test_table_pools_saved_reports(tmp_path):
    """benchmarks/table.py --from prints the docs' table from reports saved by earlier runs
    (--jsonl), pooling files: each file's rounds stay its own, so a world-size-2 run is compared
    with the world-size-1 run of its own round and file."""
    from tests.helpers import python_cmd

    def report(dtype, n, decode, fraction):
        return {"dtype": dtype, "world_size": n, "round": 0, "decode_tok_s": decode, "bandwidth_fraction": fraction,
                "threads_per_rank": [3 - n] * n, "rss_growth_bytes": [MiB] * n, "peak_rss_bytes": [2] * n,
                "resident_weight_bytes_per_rank": [1] * n, "decode_vs_baseline": 2.0, "prefill_vs_baseline": 1.5,
                **({"decode_vs_one_rank": fraction + 0.2} if n == 2 else {})}

    files = []
    for i, (ws1, ws2) in enumerate(((10.0, 12.0), (20.0, 20.0))):
        path = tmp_path / f"run{i}.jsonl"
        rows = [report(d, 1, ws1, 0.9 - 0.2 * i) for d in ("float32", "bfloat16")]
        rows += [report(d, 2, ws2, 0.8 - 0.2 * i) for d in ("float32", "bfloat16")]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        files.append(path)
    r = run(python_cmd(REPO_ROOT / "benchmarks" / "table.py", "--from", *files), timeout=60)
    assert r.rc == 0, r.describe()
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 6 and lines[0].startswith("| dtype |")
    # ws1: fraction median(0.9, 0.7); ws2: median(0.8, 0.6), vs one rank median(1.0, 0.8), separate
    # runs median(12/10, 20/20)
    assert lines[2] == "| float32 | 1 x 2 | 0.80 | 2.00 | 1.50 | n/a | 1.00 | 1.0 MiB | 2.00 |"
    assert lines[3] == "| float32 | 2 x 1 | 0.70 | 2.00 | 1.50 | 0.90 | 1.10 | 1.0 MiB | 2.00 |"


def test_bench_help_names_the_model_it_runs_by_default(monkeypatch, tmp_path):
    """--model's help says what bench runs without it: the preset resolve_bench_model picks."""
    from plexus.bench import runner
    from plexus.commands.bench import bench
    from plexus.parallel.comm import Communicator

    written = []
    monkeypatch.setattr(runner, "ensure_preset_model", lambda preset, log: written.append(preset) or tmp_path)
    runner.resolve_bench_model(None, None, Communicator.self_only(), print)
    (help_text,) = [p.help for p in bench.params if p.name == "model"]
    assert written == ["bench"] and f"the '{written[0]}' demo preset" in help_text, help_text
