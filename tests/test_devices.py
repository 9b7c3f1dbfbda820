"""Device binding, CPU threads and the start-up rank table, with mocked hosts.

Every expected value is derived by hand from the rule the docstrings state (the i-th rank on a
node takes the i-th accelerator; a core shared by k ranks counts 1/k), not read back from the code.
"""

from __future__ import annotations

import io

import pytest

from plexus.engine.runtime import LoadProgress, format_rank_table, plan_bytes, progress_enabled
from plexus.errors import PlexusError
from plexus.parallel.devices import accelerator_slots, cpu_threads, node_local_rank, select_device

CUDA2 = {"cuda": 2, "xpu": 0, "mps": 0}
MPS = {"cuda": 0, "xpu": 0, "mps": 1}
XPU = {"cuda": 0, "xpu": 1, "mps": 0}
CPU = {"cuda": 0, "xpu": 0, "mps": 0}
MIXED = {"cuda": 1, "xpu": 2, "mps": 0}  # e.g. one NVIDIA card and two Intel Arc cards in one box


# ---- which device --------------------------------------------------------------------------------

@pytest.mark.parametrize("devices, ranks, expected", [
    (CUDA2, [0, 1], ["cuda:0", "cuda:1"]),
    (CUDA2, [0, 1, 2, 3], ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]),  # more ranks than GPUs: wrap
    ({"cuda": 1}, [0, 1], ["cuda:0", "cuda:0"]),  # Slurm --gpus-per-task=1: each task sees its own cuda:0
    (MPS, [0, 1], ["mps", "mps"]),
    (XPU, [0], ["xpu:0"]),
    (CPU, [0, 1, 2], ["cpu", "cpu", "cpu"]),
    ({}, [0], ["cpu"]),
    (MIXED, [0, 1, 2], ["cuda:0", "xpu:0", "xpu:1"]),
    ({"cuda": 1, "xpu": 0, "mps": 1}, [0, 1], ["cuda:0", "mps"]),
])
def test_auto_device_by_local_rank(devices, ranks, expected):
    assert [select_device(r, None, devices) for r in ranks] == expected
    assert [select_device(r, "auto", devices) for r in ranks] == expected


def test_accelerator_order():
    assert accelerator_slots({"cuda": 2, "xpu": 1, "mps": 1}) == ["cuda:0", "cuda:1", "xpu:0", "mps"]
    assert accelerator_slots(CPU) == []


@pytest.mark.parametrize("override, local_rank, devices, expected", [
    ("cpu", 1, CUDA2, "cpu"),  # --device cpu on a GPU box
    ("cuda", 1, CUDA2, "cuda:1"),  # kind only: index by local rank
    ("cuda", 3, CUDA2, "cuda:1"),
    ("cuda:0", 1, CUDA2, "cuda:0"),  # explicit index wins over the local rank
    ("xpu", 1, MIXED, "xpu:1"),
    ("cuda", 1, MIXED, "cuda:0"),
    ("mps", 0, MPS, "mps"),
])
def test_device_override(override, local_rank, devices, expected):
    assert select_device(local_rank, override, devices) == expected


@pytest.mark.parametrize("override, devices, needle", [
    ("cuda", CPU, "no cuda device"),
    ("mps", CUDA2, "no mps device"),
    ("cuda:2", CUDA2, "has 2 cuda device"),
    ("tpu", CUDA2, "unknown device"),
    ("cuda:x", CUDA2, "unknown device"),
    ("cpu:1", CUDA2, "unknown device"),
])
def test_device_override_errors(override, devices, needle):
    with pytest.raises(PlexusError, match=needle):
        select_device(0, override, devices)


def test_select_device_on_this_host():
    # No mocks: whatever this host has, the answer is a device torch can allocate on.
    import torch

    dev = select_device(0)
    torch.zeros(1, device=dev)


# ---- node-local rank -----------------------------------------------------------------------------

@pytest.mark.parametrize("env, split, expected", [
    ({"OMPI_COMM_WORLD_LOCAL_RANK": "1"}, (0, 2), 1),
    ({"SLURM_LOCALID": "1"}, (0, 2), 1),
    ({"MPI_LOCALRANKID": "1"}, (0, 2), 1),
    ({}, (1, 2), 1),  # no launcher variable: the shared-memory split
    # mpirun inside an sbatch script: the script's SLURM_LOCALID=0 leaks into every rank
    ({"SLURM_LOCALID": "0", "OMPI_COMM_WORLD_LOCAL_RANK": "1"}, (1, 2), 1),
    ({"SLURM_LOCALID": "5"}, (1, 2), 1),  # inconsistent with the split: ignored
    ({"OMPI_COMM_WORLD_LOCAL_RANK": "x"}, (1, 2), 1),
])
def test_node_local_rank(env, split, expected):
    assert node_local_rank(*split, env=env) == expected


# ---- CPU threads -----------------------------------------------------------------------------------

ALL4 = frozenset(range(4))


@pytest.mark.parametrize("cpus, node_cpus, expected", [
    (ALL4, [ALL4, ALL4], 2),  # unbound: cores / ranks on the node
    (ALL4, [ALL4], 4),
    (ALL4, [ALL4, ALL4, ALL4], 1),  # 4 // 3
    (frozenset({1}), [frozenset({0}), frozenset({1})], 1),  # mpirun's default bind-to-core
    (frozenset({2, 3}), [frozenset({0, 1}), frozenset({2, 3})], 2),  # --map-by slot:PE=2
    (frozenset({0, 1}), [frozenset({0, 1}), frozenset({0, 1})], 1),  # one cgroup shared by 2 ranks
    (frozenset({0}), [frozenset({0}), frozenset({0}), frozenset({0})], 1),  # never 0
])
def test_cpu_threads_share(cpus, node_cpus, expected):
    assert cpu_threads(len(node_cpus), None, cpus, node_cpus, env={}) == expected


def test_cpu_threads_explicit_settings():
    assert cpu_threads(2, 3, ALL4, [ALL4, ALL4], env={"OMP_NUM_THREADS": "1"}) == 3  # --threads first
    assert cpu_threads(2, None, ALL4, [ALL4, ALL4], env={"OMP_NUM_THREADS": "3"}) == 3
    assert cpu_threads(1, None, ALL4, [ALL4], env={"SLURM_CPUS_PER_TASK": "2"}) == 2  # caps the share
    assert cpu_threads(2, None, ALL4, [ALL4, ALL4], env={"SLURM_CPUS_PER_TASK": "8"}) == 2
    assert cpu_threads(2, None, ALL4, None, env={}) == 2  # no peer sets: divide by local size


# ---- rank table and progress ------------------------------------------------------------------------

def test_rank_table():
    gib = 2**30
    rows = [dict(rank=0, host="tower", device="cuda:0", name="RTX 3090", total=24 * gib, free=20 * gib,
                 threads=4, weight_bytes=3 * gib),
            dict(rank=1, host="nuc", device="cpu", name=None, total=64 * gib, free=60 * gib, threads=8,
                 weight_bytes=1 * gib)]
    lines = format_rank_table(rows).splitlines()
    assert len(lines) == 3
    assert lines[0].split() == ["rank", "host", "device", "memory", "free", "/", "total", "threads", "weights"]
    assert lines[1].split() == ["0", "tower", "cuda:0", "(RTX", "3090)", "20.0", "GiB", "/", "24.0", "GiB",
                                "4", "3.0", "GiB", "(75.0%)"]
    assert lines[2].split() == ["1", "nuc", "cpu", "60.0", "GiB", "/", "64.0", "GiB", "RAM", "8", "1.0", "GiB",
                                "(25.0%)"]
    # columns line up
    assert lines[1].index("tower") == lines[2].index("nuc") == lines[0].index("host")


class _Stream(io.StringIO):
    def __init__(self, tty):
        super().__init__()
        self.tty = tty

    def isatty(self):
        return self.tty


def test_progress_only_on_a_terminal_unless_forced():
    assert progress_enabled({}, _Stream(True))
    assert not progress_enabled({}, _Stream(False))  # CI logs stay clean
    assert progress_enabled({"PLEXUS_PROGRESS": "1"}, _Stream(False))  # mpirun: stderr is a pipe
    assert not progress_enabled({"PLEXUS_PROGRESS": "0"}, _Stream(True))


@pytest.mark.parametrize("world", [1, 2])
def test_progress_total_is_the_bytes_loaded(demo_tiny, world):
    # The bar's total (from the plan) must equal what the loader reports reading for rank 0:
    # sum the slice sizes rank 0 reads, independently, from the checkpoint's own tensors.
    from safetensors import safe_open

    from plexus.models.config import ModelConfig
    from plexus.parallel.plan import ShardPlan

    config = ModelConfig.from_dir(demo_tiny)
    shard = ShardPlan.even(config, world)[0]
    h, d = config.hidden_size, config.head_dim
    expected = 0
    with safe_open(str(demo_tiny / "model.safetensors"), framework="pt") as f:
        for name in f.keys():
            t = f.get_slice(name)
            rows, *rest = t.get_shape()
            n = rows * (rest[0] if rest else 1)
            if name.endswith(("q_proj.weight", "o_proj.weight")):
                n = n * shard.num_heads // config.num_heads
            elif name.endswith(("k_proj.weight", "v_proj.weight")):
                n = n * shard.num_kv_heads // config.num_kv_heads
            elif name.endswith(("gate_proj.weight", "up_proj.weight", "down_proj.weight")):
                n = n * shard.intermediate // config.intermediate_size
            elif name.endswith(("embed_tokens.weight", "lm_head.weight")):
                n = n * shard.vocab // config.vocab_size
            expected += n * 4  # float32 checkpoint
    assert d * config.num_heads == h
    assert plan_bytes(ShardPlan.even(config, world), 0) == expected


def test_progress_callback_reaches_the_total(demo_tiny):
    # Engine.load gives the bar its plan, then reports bytes that add up to that plan's total.
    from plexus.engine.engine import Engine
    from plexus.parallel.comm import Communicator

    class Bar:
        n, total, refreshed = 0, None, 0

        def update(self, k):
            assert k >= 0
            self.n += k

        def refresh(self):
            self.refreshed += 1

    bar = Bar()
    progress = LoadProgress(bar)
    calls = []
    progress.set_plan = lambda plan, _set=progress.set_plan: (calls.append(plan), _set(plan))
    Engine.load(demo_tiny, Communicator.self_only(), progress=progress)
    assert len(calls) == 1 and calls[0].world_size == 1
    assert bar.total == plan_bytes(calls[0], 0) > 0
    assert bar.n == bar.total


def test_log_rank_table_gathers_rows_and_warns_on_a_shared_gpu(caplog):
    # Rank 0 of a fake 3-rank job: the other rows come back from allgather_obj as if from ranks
    # on other processes; two of them report the same GPU of the same host.
    import logging
    from types import SimpleNamespace

    import torch

    from plexus.engine.runtime import Runtime, log_rank_table
    from plexus.log import setup_logging
    from plexus.models.config import ModelConfig
    from plexus.parallel.plan import ShardPlan

    config = ModelConfig.from_dict(dict(architectures=["LlamaForCausalLM"], vocab_size=512, hidden_size=64,
                                        intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2))
    plan = ShardPlan.even(config, 3)
    gib = 2**30
    others = [dict(rank=1, host="tower", device="cuda:0", name="GPU", total=8 * gib, free=4 * gib, threads=2,
                   uuid="GPU-a", weight_bytes=plan.weight_elements(1) * 2),
              dict(rank=2, host="tower", device="cuda:0", name="GPU", total=8 * gib, free=4 * gib, threads=2,
                   uuid="GPU-a", weight_bytes=plan.weight_elements(2) * 2)]
    gathered = []

    class Comm:
        rank, size, hostname = 0, 3, "tower"

        def allgather_obj(self, row):
            gathered.append(row)
            return [row, *others]

    engine = SimpleNamespace(plan=plan, model=SimpleNamespace(
        embed_tokens=SimpleNamespace(dtype=torch.bfloat16)))
    setup_logging(0)
    logger = logging.getLogger("plexus")
    logger.addHandler(caplog.handler)
    try:
        log_rank_table(Runtime(Comm(), "cpu", 4), engine)
    finally:
        logger.removeHandler(caplog.handler)
    mine = gathered[0]
    assert (mine["rank"], mine["host"], mine["device"], mine["threads"]) == (0, "tower", "cpu", 4)
    assert mine["weight_bytes"] == plan.weight_elements(0) * 2  # bfloat16
    assert mine["total"] and mine["free"]  # host RAM for a CPU rank
    text = caplog.text
    assert "3 rank(s)" in text and "bfloat16" in text
    assert "ranks 1 and 2 share cuda:0 on tower" in text
