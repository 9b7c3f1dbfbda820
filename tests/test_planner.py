"""plexus/parallel/pool.py and the sizes in plexus/parallel/plan.py: size parsing, budgets, usable memory, the
fit check and its message, and the ``plexus plan`` command (no MPI, no weights read).

Expected values come from outside the code under test: published parameter counts of
Llama-3.1-8B/70B, transformers' own parameter tensors, and arithmetic written out here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from plexus.commands.plan import make_plan, parse_rank_spec
from plexus.errors import PlexusError
from plexus.models.config import ModelConfig
from plexus.parallel.memory import usable_memory
from plexus.parallel.plan import ShardPlan
from plexus.parallel.pool import PoolPlan, split_weights
from plexus.parallel.sizes import format_size, parse_budgets, parse_size, parse_split

REPO = Path(__file__).resolve().parents[1]
GiB = 2**30

# the published config.json files (meta-llama/Llama-3.1-8B and -70B), as data
LLAMA_31_8B = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 4096,
    "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 131072,
    "mlp_bias": False, "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32,
    "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.43.0.dev0", "use_cache": True, "vocab_size": 128256,
}
LLAMA_31_70B = dict(LLAMA_31_8B, hidden_size=8192, intermediate_size=28672, num_attention_heads=64,
                    num_hidden_layers=80)
PUBLISHED_PARAMS = {"8b": 8.03e9, "70b": 70.6e9}  # model cards: 8.03B and 70.6B


def write_config(d: Path, cfg: dict) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def run_plan(*args: str):
    from plexus.commands.main import main

    return CliRunner().invoke(main, ["plan", *args], catch_exceptions=False)


def plan_json(*args: str) -> dict:
    res = run_plan(*args, "--json")
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


# ---- parsing --------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("6GiB", 6 * 2**30), ("6 GiB", 6 * 2**30), ("512MiB", 512 * 2**20), ("1.5KiB", 1536), ("100B", 100),
    ("8GB", 8 * 10**9), ("600KB", 600_000), ("2MB", 2_000_000), ("12345", 12345), ("1TiB", 2**40),
    ("4gib", 4 * 2**30), ("2G", 2 * 2**30), (1024, 1024),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["", "GiB", "6 parsecs", "-1GiB", "0", "1,5GiB"])
def test_parse_size_rejects(bad):
    with pytest.raises(PlexusError, match="memory size"):
        parse_size(bad)


def test_format_size_round_trips():
    for n in (100, 1536, 6 * 2**30, 512 * 2**20):
        assert parse_size(format_size(n).replace(" ", "")) == pytest.approx(n, rel=1e-3)


def test_parse_split_and_budgets():
    assert parse_split("even") == "even" and parse_split(" Memory ") == "memory" and parse_split(None) == "memory"
    assert parse_split("3,1") == (3.0, 1.0) and parse_split([2, 1, 1]) == (2.0, 1.0, 1.0)
    for bad in ("3,0", "a,b", "1,-1", "nan,1", "uneven"):
        with pytest.raises(PlexusError, match="--split"):
            parse_split(bad)
    assert parse_budgets(None, 3) is None
    assert parse_budgets("6GiB", 3) == [6 * GiB] * 3
    assert parse_budgets("12GiB,8GiB,6GiB", 3) == [12 * GiB, 8 * GiB, 6 * GiB]
    assert parse_budgets([100, 200], 2) == [100, 200]
    with pytest.raises(PlexusError, match="lists 2 sizes but there are 3 ranks"):
        parse_budgets("1GiB,2GiB", 3)
    with pytest.raises(PlexusError, match="3 weights but there are 2 ranks"):
        split_weights((1.0, 2.0, 3.0), [None, None], 2)


def test_parse_rank_spec():
    assert parse_rank_spec("cuda:0=8GiB,cuda:1=6GiB,cpu=16GiB") == [
        ("cuda:0", 8 * GiB), ("cuda:1", 6 * GiB), ("cpu", 16 * GiB)]
    assert parse_rank_spec("3x8GiB") == [("", 8 * GiB)] * 3
    assert parse_rank_spec("2") == [("", None), ("", None)]
    assert parse_rank_spec("12GiB, 8GiB") == [("", 12 * GiB), ("", 8 * GiB)]


# ---- usable memory and weights --------------------------------------------------------------

def test_usable_memory_shares_a_pool_evenly():
    R = 512 * 2**20
    reports = [("a", "cpu", 20 * GiB), ("a", "cpu", 19 * GiB),  # one node's RAM: first measurement, halved
               ("a", "cuda:0", 8 * GiB), ("b", "cuda:0", 6 * GiB), ("b", "cuda:0", 6 * GiB),
               ("b", "xpu:0", None)]
    got = usable_memory(reports, reserve=R)
    assert got == [10 * GiB - R, 10 * GiB - R, 8 * GiB - R, 3 * GiB - R, 3 * GiB - R, None]
    assert usable_memory([("a", "cpu", 100)], reserve=R) == [0]  # never negative


def test_split_weights():
    assert split_weights("even", [5, 1], 2) == [1.0, 1.0]
    assert split_weights("memory", [12, 8, 6], 3) == [12.0, 8.0, 6.0]
    assert split_weights("memory", [12, None, 6], 3) == [12.0, 9.0, 6.0]  # unknown: the mean of the known
    assert split_weights("memory", [None, None], 2) == [1.0, 1.0]
    assert split_weights((3.0, 1.0), [None, None], 2) == [3.0, 1.0]


# ---- sizes against the modules the engine really builds -----------------------------------

class _FakeComm:
    def __init__(self, rank: int, size: int):
        self.rank, self.size, self.local_size = rank, size, size

    def allgather_obj(self, obj):  # every pretend rank answers the same
        return [obj] * self.size


@pytest.mark.parametrize("cfg, weights", [
    (dict(num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False), [3, 1]),
    (dict(num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True), [2, 1, 1]),  # KV copied
    (dict(num_attention_heads=6, num_key_value_heads=6, attention_bias=True,
          architectures=["Qwen2ForCausalLM"]), [5, 3]),
])
def test_plan_sizes_match_the_built_shards(cfg, weights):
    """weight_elements / kv_cache_elements equal the parameters and caches CausalLM allocates."""
    import torch

    from plexus.models.llama import CausalLM

    d = {"architectures": ["LlamaForCausalLM"], "hidden_size": 48, "intermediate_size": 256,
         "num_hidden_layers": 2, "vocab_size": 301, "max_position_embeddings": 64, **cfg}
    config = ModelConfig.from_dict(d)
    plan = ShardPlan.build(config, weights)
    total = 0
    for r in range(len(weights)):
        model = CausalLM(config, plan, _FakeComm(r, len(weights)), 16, torch.float32, "meta")
        model.allocate_cache(blocks=2)  # 32 tokens of KV cache
        params = {id(p): p.numel() for p in model.parameters()}  # a tied head counted once
        assert sum(params.values()) == plan.weight_elements(r)
        cache = sum(layer.self_attn.cache.k.numel() + layer.self_attn.cache.v.numel() for layer in model.layers)
        assert cache == plan.kv_cache_elements(r, 32)
        total += plan.weight_elements(r)
    # every weight held once, plus the replicated norms (and KV heads when copied)
    assert total >= config.num_parameters()


def test_transformers_parameter_count():
    """ModelConfig.num_parameters (what total_weight_bytes uses) against transformers' own model."""
    import torch
    import transformers

    kw = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=8,
              num_key_value_heads=2, vocab_size=333, max_position_embeddings=64)
    for tie in (False, True):
        with torch.device("meta"):
            model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw, tie_word_embeddings=tie))
        hf = sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once
        cfg = ModelConfig.from_dict({"architectures": ["LlamaForCausalLM"], **kw, "tie_word_embeddings": tie})
        assert cfg.num_parameters() == hf
        pool = PoolPlan.build(cfg, 1, "bfloat16", 64, budgets=[None])
        assert pool.total_weight_bytes == pool.weight_bytes(0) == 2 * hf


def test_kv_groups_and_notes():
    cfg = ModelConfig.from_dict({"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
                                 "num_hidden_layers": 1, "num_attention_heads": 8, "num_key_value_heads": 2,
                                 "vocab_size": 100})
    two = ShardPlan.build(cfg, [3, 1])
    assert [s.num_kv_heads for s in two.shards] == [1, 1] and two.notes() == []  # every rank >= 1 group
    three = ShardPlan.build(cfg, [2, 1, 1])
    assert [s.q_heads for s in three.shards] == [(0, 4), (4, 6), (6, 8)]
    (note,) = three.notes()
    assert "3 ranks but only 2 KV heads" in note and "KV head 1 on ranks 1,2" in note


# ---- the fit check and its message --------------------------------------------------------

def _small_config() -> ModelConfig:
    return ModelConfig.from_dict({"architectures": ["LlamaForCausalLM"], "hidden_size": 256,
                                  "intermediate_size": 1024, "num_hidden_layers": 4, "num_attention_heads": 8,
                                  "num_key_value_heads": 4, "vocab_size": 1000})


def test_failure_message_and_smallest_pool_are_right():
    cfg = _small_config()
    weights = cfg.num_parameters() * 4
    kv = 2 * 4 * 4 * 128 * 32 * 4  # 2 (K, V) x layers x KV heads x tokens x head_dim x bytes
    budget = int(0.6 * (weights + kv))
    pool = PoolPlan.build(cfg, 1, "float32", 128, 1, "memory", [budget])
    assert pool.fits is False
    msg = pool.failure()
    assert "\n" not in msg
    assert f"it needs {weights + kv:,} bytes" in msg
    assert f"rank 0 {format_size(weights + kv)} of {format_size(budget)}" in msg
    assert "the smallest pool that would fit: 2 ranks of" in msg
    # the suggestion is right: 2 such ranks fit, and so does 1 rank of the suggested size
    assert PoolPlan.build(cfg, 2, "float32", 128, 1, "memory", [budget] * 2).fits
    bigger = parse_size(msg.rsplit("or 1 rank of ", 1)[1].replace(" ", ""))
    assert PoolPlan.build(cfg, 1, "float32", 128, 1, "memory", [bigger + 2**10]).fits


def test_even_split_that_does_not_fit_suggests_memory_split():
    cfg = _small_config()
    need = cfg.num_parameters() * 4
    budgets = [int(need * 0.75), int(need * 0.4)]
    assert PoolPlan.build(cfg, 2, "float32", 16, 1, "memory", budgets).fits
    even = PoolPlan.build(cfg, 2, "float32", 16, 1, "even", budgets)
    assert even.fits is False and even.rank_fits(0) and not even.rank_fits(1)
    assert "rank 1 would get more than it has" in even.failure()
    assert even.failure().endswith("the smallest pool that would fit: these 2 ranks with --split memory")


def test_no_budgets_means_nothing_to_check():
    pool = PoolPlan.build(_small_config(), 2, "float32", 16, budgets=None)
    assert pool.fits is None and pool.failure() is None and "nothing to check" in pool.verdict()


# ---- plexus plan --------------------------------------------------------------------------

@pytest.mark.parametrize("name, cfg, fits", [("8b", LLAMA_31_8B, True), ("70b", LLAMA_31_70B, False)])
def test_plan_llama_31(tmp_path, name, cfg, fits):
    d = write_config(tmp_path / name, cfg)  # a directory holding only config.json
    out = plan_json("--model", str(d), "--ranks", "3x8GiB", "--dtype", "bfloat16")
    params = PUBLISHED_PARAMS[name]
    assert out["total_weight_bytes"] == pytest.approx(params * 2, rel=0.01)
    assert sum(r["weight_bytes"] for r in out["ranks"]) == pytest.approx(params * 2, rel=0.01)
    # independently: a third of the weights plus a third of the KV cache (4096 tokens, 8 KV heads
    # of 128, bf16) must fit in 8 GiB for the verdict to be "fits" (8B: ~5.5 GB; 70B: ~47 GB)
    kv_total = 2 * cfg["num_hidden_layers"] * 8 * 4096 * 128 * 2
    assert ((params * 2 + kv_total) / 3 <= 8 * GiB) is fits
    assert out["fits"] is fits
    assert [r["fits"] for r in out["ranks"]] == [fits] * 3
    assert all(r["budget_bytes"] == 8 * GiB for r in out["ranks"])
    assert [r["kv_cache_bytes"] for r in out["ranks"]] == [
        2 * cfg["num_hidden_layers"] * n * 4096 * 128 * 2 for n in (3, 3, 2)]  # 8 KV heads: 3+3+2
    assert out["max_context"] == 4096 and out["dtype"] == "bfloat16"

    text = run_plan("--model", str(d), "--ranks", "3x8GiB", "--dtype", "bfloat16")
    assert text.exit_code == 0
    verdict = text.stdout.strip().splitlines()[-1]
    assert verdict.startswith("verdict: fits" if fits else "verdict: does not fit")
    if not fits:
        assert "the smallest pool that would fit: " in verdict


def test_plan_heterogeneous_ranks_and_table(tmp_path):
    d = write_config(tmp_path / "8b", LLAMA_31_8B)
    res = run_plan("--model", str(d / "config.json"), "--ranks", "cuda:0=8GiB,cuda:1=6GiB,cpu=16GiB",
                   "--max-context", "8192", "--max-batch", "2")
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert lines[1].split()[:5] == ["rank", "device", "kv", "heads", "q"]
    rows = [ln.split() for ln in lines[2:5]]
    assert [r[1] for r in rows] == ["cuda:0", "cuda:1", "cpu"]
    out = plan_json("--model", str(d), "--ranks", "cuda:0=8GiB,cuda:1=6GiB,cpu=16GiB",
                    "--max-context", "8192", "--max-batch", "2")
    ranks = out["ranks"]
    # shares follow the budgets 8:6:16 — the 16 GiB CPU rank holds the most
    assert ranks[2]["intermediate"] > ranks[0]["intermediate"] > ranks[1]["intermediate"]
    assert sum(r["intermediate"] for r in ranks) == 14336 and all(r["intermediate"] % 64 == 0 for r in ranks)
    assert sum(r["vocab"] for r in ranks) == 128256 and sum(r["num_kv_heads"] for r in ranks) == 8
    assert all(r["num_kv_heads"] >= 1 for r in ranks)
    assert ranks[0]["kv_cache_bytes"] == 2 * 32 * ranks[0]["num_kv_heads"] * 8192 * 2 * 128 * 2
    assert out["fits"] is True


def test_plan_reads_dtype_from_safetensors_headers(tmp_path):
    """No dtype in config.json: the stored dtype comes from the headers (no tensor data read)."""
    import torch
    from safetensors.torch import save_file

    d = write_config(tmp_path / "m", {"architectures": ["LlamaForCausalLM"], "hidden_size": 32,
                                      "intermediate_size": 64, "num_hidden_layers": 1,
                                      "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 50})
    save_file({"model.embed_tokens.weight": torch.zeros(50, 32, dtype=torch.bfloat16),
               "model.norm.weight": torch.zeros(32, dtype=torch.bfloat16)}, str(d / "model.safetensors"))
    out = plan_json("--model", str(d), "--ranks", "2")
    assert out["dtype"] == "bfloat16" and out["checkpoint"]["dtype"] == "bfloat16"
    assert out["checkpoint"]["parameters"] == 50 * 32 + 32 and out["fits"] is None
    assert plan_json("--model", str(d), "--ranks", "2", "--dtype", "float32")["dtype"] == "float32"


def test_plan_hostfile_with_yaml_pool(tmp_path):
    d = write_config(tmp_path / "8b", LLAMA_31_8B)
    hostfile = tmp_path / "homelab"
    hostfile.write_text("# three boxes\ntower slots=2\nnuc slots=1  # the small one\n")
    cfg = tmp_path / "plexus.yaml"
    cfg.write_text("pool:\n  nuc: 6GiB\n  tower: [cuda:0=12GiB, {device: cuda:1, memory: 8GiB}]\n")
    out = plan_json("--model", str(d), "--hostfile", str(hostfile), "--config", str(cfg), "--dtype", "bfloat16")
    assert [r["device"] for r in out["ranks"]] == ["tower:cuda:0", "tower:cuda:1", "nuc:0"]
    assert [r["budget_bytes"] for r in out["ranks"]] == [12 * GiB, 8 * GiB, 6 * GiB]
    assert out["fits"] is True
    # the YAML alone (ranks in its order), given as --hostfile
    alone = plan_json("--model", str(d), "--hostfile", str(cfg), "--dtype", "bfloat16")
    assert [r["budget_bytes"] for r in alone["ranks"]] == [6 * GiB, 12 * GiB, 8 * GiB]
    # the hostfile's slot count and the YAML must agree
    cfg.write_text("pool:\n  tower: [12GiB]\n  nuc: 6GiB\n")
    res = run_plan("--model", str(d), "--hostfile", str(hostfile), "--config", str(cfg))
    assert res.exit_code == 1 and "gives tower 2 slots" in res.stderr


def test_plan_errors_are_one_line(tmp_path):
    d = write_config(tmp_path / "8b", LLAMA_31_8B)
    for args, needle in [(["--ranks", "2", "--split", "1,2,3"], "3 weights but there are 2 ranks"),
                         (["--ranks", "8GiB,lots"], None),
                         ([], "say which ranks"),
                         (["--ranks", "65"], "cannot split 32 attention heads across 65 ranks")]:
        res = run_plan("--model", str(d), *args)
        assert res.exit_code == 1, res.output
        err = res.stderr.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("plexus: error: "), res.stderr
        if needle:
            assert needle in err[0]


@pytest.mark.timeout(60)
def test_plan_starts_no_mpi(tmp_path):
    d = write_config(tmp_path / "70b", LLAMA_31_70B)
    code = ("import sys; from plexus.commands.main import main\n"
            "try:\n    main(['plan', '--model', sys.argv[1], '--ranks', '3x8GiB'])\n"
            "except SystemExit:\n    pass\n"
            "assert 'mpi4py.MPI' not in sys.modules, 'plexus plan imported MPI'\n")
    res = subprocess.run([sys.executable, "-c", code, str(d)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "verdict: does not fit" in res.stdout


def test_make_plan_matches_engine_default_context(tmp_path):
    from plexus.engine.engine import DEFAULT_MAX_CONTEXT

    d = write_config(tmp_path / "8b", LLAMA_31_8B)
    pool, info = make_plan(str(d), ranks="2")
    assert info is None and pool.max_context == DEFAULT_MAX_CONTEXT and pool.dtype == "bfloat16"


def test_the_kv_cache_is_counted_in_tokens_and_fitted_to_the_budget():
    """The pool is --kv-tokens (whole blocks of 16) or max_context x max_batch; fit_kv lowers the
    default to what each rank's budget holds beside its weights, never below one context, and
    kv_room says how many tokens that is."""
    cfg = _small_config()  # 4 layers, 4 KV heads of 32: 2 x 4 x 4 x 32 x 4 bytes = 4 KiB a token in float32
    per_token = 2 * 4 * 4 * 32 * 4
    weights = cfg.num_parameters() * 4
    pool = PoolPlan.build(cfg, 1, "float32", 128, 4, "memory", [None])
    assert pool.kv_tokens == 512 and pool.kv_blocks == 32 and pool.kv_cache_bytes(0) == 512 * per_token
    assert PoolPlan.build(cfg, 1, "float32", 128, 4, kv_tokens=100).kv_tokens == 112  # 7 blocks
    assert pool.kv_room() is None and pool.fit_kv() is pool
    budget = weights + 300 * per_token
    fitted = PoolPlan.build(cfg, 1, "float32", 128, 4, "memory", [budget]).fit_kv()
    assert fitted.kv_room() == 288 and fitted.kv_tokens == 288 and fitted.fits  # 18 blocks: 300 tokens' worth, whole
    assert fitted.max_batch == 4  # the batch's places stay; long requests share the tokens
    roomy = PoolPlan.build(cfg, 1, "float32", 128, 4, "memory", [weights + 10**4 * per_token]).fit_kv()
    assert roomy.kv_tokens == 512  # never raised
    tight = PoolPlan.build(cfg, 1, "float32", 128, 4, "memory", [weights + 140 * per_token]).fit_kv()
    assert tight.kv_tokens == 128 and tight.fits is True  # one context's worth...
    tight = PoolPlan.build(cfg, 1, "float32", 128, 4, "memory", [weights + 100 * per_token]).fit_kv()
    assert tight.kv_tokens == 128 and tight.fits is False and "for 128 tokens" in tight.failure()  # ...not less
    assert fitted.to_json()["kv_tokens"] == 288 and fitted.to_json()["kv_tokens_that_fit"] == 288


def test_plan_shows_the_kv_cache_in_tokens(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 256,
                                               "intermediate_size": 1024, "num_hidden_layers": 4,
                                               "num_attention_heads": 8, "num_key_value_heads": 4,
                                               "vocab_size": 1000, "max_position_embeddings": 1024}))
    res = run_plan("--model", str(d), "--ranks", "2x64MiB", "--kv-tokens", "5000", "--dtype", "float32")
    assert res.exit_code == 0, res.output
    assert "KV cache for 5,008 tokens (313 blocks of 16; 4.89 x the 1024-token context)" in res.output
    per_rank_token = 2 * 4 * 2 * 32 * 4  # two of the four KV heads per rank
    weights = max(ShardPlan.build(ModelConfig.from_dir(d), [1, 1]).weight_bytes(r, 4) for r in range(2))
    room = (64 * 2**20 - weights) // per_rank_token // 16 * 16
    assert f"the budgets hold up to {room:,} tokens of it beside the weights" in res.output
