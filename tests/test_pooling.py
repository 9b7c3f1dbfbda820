"""Heterogeneous pooling end to end, under mpirun: uneven splits compute the same model, and
memory budgets are checked before any weight is read and respected while loading.

Each run is a subprocess (``mpirun --oversubscribe -n K``) with a timeout. References are
independent of the split under test: world size 1, transformers' own forward pass, and the
published greedy continuation of stories260K.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import STORIES_DIR as STORIES

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "pooling_logits.py"
PROMPT = "Once upon a time"
STORIES_IDS = [1, 403, 407, 261, 378]  # PROMPT in stories260K's tokenizer (its README)
STORIES_GREEDY = [432, 383, 286, 261, 376, 298, 315, 421, 395, 317]  # published continuation (its README)
SYNTH_IDS = [1, 17, 300, 4, 99, 250]
TIMEOUT = 180

needs_stories = pytest.mark.skipif(not (STORIES / "model.safetensors").is_file(),
                                   reason=f"stories260K not found at {STORIES}")


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMIX_", "PRTE_", "PMI_"))}
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", PLEXUS_PROGRESS="0")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


def launch(n: int, argv: list[str]) -> subprocess.CompletedProcess:
    """``argv`` on n ranks (a plain process for n == 1); never hangs past TIMEOUT."""
    mpirun = Path(sys.executable).parent / "mpirun"
    cmd = argv if n == 1 else [str(mpirun if mpirun.exists() else "mpirun"), "-n", str(n), "--oversubscribe",
                               "--bind-to", "none", *argv]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=_env(), cwd=REPO)


def run_script(n: int, model: Path, ids: list[int], *args: str, ok: bool = True) -> dict:
    res = launch(n, [sys.executable, str(SCRIPT), "--model", str(model), "--ids", ",".join(map(str, ids)), *args])
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    assert (res.returncode == 0) is ok and len(lines) == 1, f"rc={res.returncode}\n{res.stdout[-2000:]}\n{res.stderr}"
    out = json.loads(lines[0])
    out["stderr"] = res.stderr
    return out


def plexus_generate(n: int, model: Path, *args: str) -> subprocess.CompletedProcess:
    plexus = str(Path(sys.executable).parent / "plexus")
    return launch(n, [plexus, "generate", "--model", str(model), "--device", "cpu", *args])


def max_diff(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b)
    return max(abs(x - y) for x, y in zip(a, b))


def make_llama(out: Path, seed: int = 0, tokenizer_from: Path | None = None, **kw) -> Path:
    """A random-weight Llama written by transformers (float32), with the tokenizer files of
    ``tokenizer_from`` (so `plexus generate` can run it)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(dtype="float32", **kw))
    model.save_pretrained(out)
    if tokenizer_from is not None:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tokenizer_from / name, out / name)
    return out


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory, demo_tiny) -> Path:
    # 8 query heads on 2 KV heads: at world size 3 the KV heads must be copied (the plan says so);
    # MLP 256 = 4 blocks of 64, so 3:1 and 2:1:1 land on block boundaries. The demo model's
    # tokenizer (512 ids at most, like this vocabulary)
    return make_llama(tmp_path_factory.mktemp("pool") / "synthetic", seed=1, tokenizer_from=demo_tiny, hidden_size=64,
                      intermediate_size=256,
                      num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, vocab_size=512,
                      max_position_embeddings=128, initializer_range=0.1)


# ---- uneven splits compute the same model ------------------------------------------------------

def check_uneven_splits(model: Path, ids: list[int], *args: str) -> dict:
    """3:1 at world size 2 and 2:1:1 at world size 3 against world size 1; returns the latter."""
    ref = run_script(1, model, ids, *args)
    three_one = run_script(2, model, ids, *args, "--split", "3,1")
    two_one_one = run_script(3, model, ids, *args, "--split", "2,1,1")
    for out in (three_one, two_one_one):
        assert max_diff(out["logits"], ref["logits"]) < 1e-5
        assert out["tokens"] == ref["tokens"]
        assert out["stderr"].count("plan: ") == 1  # rank 0 logs the plan table once
    # the shares really are uneven: 3:1 of the vocabulary, 2:1:1 of it at world size 3
    vocab = len(ref["logits"])
    widths = [b - a for a, b in (r["vocab_rows"] for r in three_one["ranks"])]
    assert widths == [vocab * 3 // 4, vocab // 4]
    widths = [b - a for a, b in (r["vocab_rows"] for r in two_one_one["ranks"])]
    assert widths == [vocab // 2, vocab // 4, vocab // 4]
    return ref


@pytest.mark.timeout(240)
def test_uneven_splits_synthetic(synthetic):
    import torch
    import transformers

    ref = check_uneven_splits(synthetic, SYNTH_IDS, "--max-context", "64")
    # world size 1 itself against transformers
    hf = transformers.LlamaForCausalLM.from_pretrained(synthetic, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = hf(torch.tensor([SYNTH_IDS])).logits[0, -1].tolist()
        hf_tokens = hf.generate(torch.tensor([SYNTH_IDS]), max_new_tokens=8, do_sample=False)[0, len(SYNTH_IDS):]
    assert max_diff(ref["logits"], logits) < 1e-4
    assert ref["tokens"] == hf_tokens.tolist()


@needs_stories
@pytest.mark.timeout(240)
def test_uneven_splits_stories260k():
    ref = check_uneven_splits(STORIES, STORIES_IDS, "--max-context", "128", "--max-tokens", "10")
    assert ref["tokens"] == STORIES_GREEDY


@needs_stories
@pytest.mark.timeout(240)
def test_generate_cli_splits_stories260k():
    """`plexus generate --split ...` gives the published greedy tokens at every split; the
    default memory split of CPU ranks on one node comes out even, and rank 0 logs the plan."""
    args = ["--prompt", PROMPT, "--max-tokens", "10", "--max-context", "128", "--json"]

    def tokens(res):
        assert res.returncode == 0, res.stderr
        (line,) = res.stdout.splitlines()
        out = json.loads(line)
        assert out["prompt_token_ids"] == STORIES_IDS
        return out["token_ids"]

    for n, split in ((2, "3,1"), (3, "2,1,1")):
        res = plexus_generate(n, STORIES, *args, "--split", split)
        assert tokens(res) == STORIES_GREEDY
        assert f"split {split}: shares {'75/25' if n == 2 else '50/25/25'}%" in res.stderr
    memory = plexus_generate(2, STORIES, *args)  # --split memory is the default
    assert tokens(memory) == STORIES_GREEDY
    assert "split memory (by usable memory): shares 50/50%" in memory.stderr
    table = [ln for ln in memory.stderr.splitlines() if ln.startswith(("0 ", "1 "))][:2]
    assert [ln.split()[2:4] for ln in table] == [["2", "(0-1)"], ["2", "(2-3)"]]  # 2 KV groups each


@pytest.mark.timeout(120)
def test_split_errors_stop_every_rank(synthetic):
    res = plexus_generate(2, synthetic, "--prompt", PROMPT, "--max-tokens", "8", "--split", "1,2,3")
    assert res.returncode == 1
    errors = [ln for ln in res.stderr.splitlines() if "error" in ln]
    assert errors == ["plexus: error: --split gives 3 weights but there are 2 ranks"], res.stderr


# ---- budgets ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def budget_model(tmp_path_factory, demo_tiny) -> Path:
    # ~98 MB: large next to the load's fixed costs, small tensors (<= 2.4 MB) so the one
    # transient slice a load holds is small next to the budgets' headroom
    return make_llama(tmp_path_factory.mktemp("pool") / "budget", seed=2, tokenizer_from=demo_tiny, hidden_size=384,
                      intermediate_size=1536, num_hidden_layers=10, num_attention_heads=6, num_key_value_heads=6,
                      vocab_size=1024, max_position_embeddings=256)


@pytest.mark.timeout(300)
def test_budgets(budget_model):
    from safetensors import safe_open

    size = (budget_model / "model.safetensors").stat().st_size
    with safe_open(str(budget_model / "model.safetensors"), "pt") as f:  # independent of plexus' sums
        weight_bytes = sum(math.prod(f.get_slice(k).get_shape()) * 4 for k in f.keys())
    ctx = 64
    kv_bytes = 2 * 10 * 6 * ctx * 64 * 4  # K and V x layers x KV heads x tokens x head_dim x float32
    ids = [1, 5, 9, 33, 200]

    # world size 1 with 0.6 S: one clear line, before any weight is read
    small = str(int(0.6 * size))
    res = plexus_generate(1, budget_model, "--prompt", PROMPT, "--max-tokens", "8", "--max-context", str(ctx),
                          "--max-memory", small)
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    err = lines[-1]
    assert err.startswith("plexus: error: the model does not fit in the budget of 1 rank: ")
    assert f"it needs {weight_bytes + kv_bytes:,} bytes" in err
    assert "rank 0 would get more than it has" in err and "the smallest pool that would fit: 2 ranks of" in err
    assert not any("error" in ln for ln in lines[:-1]) and "loaded" not in res.stderr
    failed = run_script(1, budget_model, ids, "--max-context", str(ctx), "--max-memory", small, ok=False)
    assert failed["error"] in err
    assert failed["peak_growth_bytes"][0] < 0.02 * size  # nothing of the ~98 MB was read

    # world size 2 with 0.7 S and 0.45 S: fits, each rank stays within its budget, same output
    budgets = [int(0.7 * size), int(0.45 * size)]
    ref = run_script(1, budget_model, ids, "--max-context", str(ctx))
    pooled = run_script(2, budget_model, ids, "--max-context", str(ctx), "--max-memory", ",".join(map(str, budgets)))
    assert pooled["tokens"] == ref["tokens"]
    assert max_diff(pooled["logits"], ref["logits"]) < 1e-5
    for rank, budget in zip(pooled["ranks"], budgets):
        assert rank["peak_growth_bytes"] <= budget, (rank, budget)
    # rank 0 took the larger share, and the plan was logged with the budgets
    r0, r1 = pooled["ranks"]
    assert r0["mlp_columns"][1] - r0["mlp_columns"][0] > r1["mlp_columns"][1] - r1["mlp_columns"][0]
    assert "split memory (by budget): shares 61/39%" in pooled["stderr"]
    assert ref["ranks"][0]["peak_growth_bytes"] > 0.9 * size  # the measurement does see a whole load
