"""ShardPlan: every head, KV head, MLP column and vocabulary row has an owner, ranges are
contiguous and in rank order, KV groups stay whole while ranks <= KV heads, and the sizes it
reports agree with an independent parameter count (transformers' own model)."""

from __future__ import annotations

import itertools

import pytest

from plexus.errors import PlexusError
from plexus.models.config import ModelConfig
from plexus.parallel.plan import ShardPlan, partition


def config(heads=8, kv=4, hidden=64, inter=172, vocab=512, layers=2, tied=False, bias=False, head_dim=None,
           arch="LlamaForCausalLM") -> ModelConfig:
    d = {"architectures": [arch], "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
         "num_attention_heads": heads, "num_key_value_heads": kv, "vocab_size": vocab,
         "tie_word_embeddings": tied, "attention_bias": bias}
    if head_dim:
        d["head_dim"] = head_dim
    return ModelConfig.from_dict(d)


def covers(ranges, total) -> bool:
    """Contiguous, in order, no gaps or overlaps, from 0 to total."""
    pos = 0
    for a, b in ranges:
        if a != pos or b < a:
            return False
        pos = b
    return pos == total


@pytest.mark.parametrize("total,weights", [(10, [1, 1, 1]), (7, [3, 1]), (5, [1, 1, 1, 1, 1]), (100, [0.5, 2, 7.5]),
                                           (4, [100, 1, 1])])
def test_partition(total, weights):
    counts = partition(total, weights)
    assert sum(counts) == total and all(c >= 1 for c in counts)
    wsum = sum(weights)
    for c, w in zip(counts, weights):
        assert abs(c - total * w / wsum) < len(weights)  # close to proportional


HEAD_LAYOUTS = [(8, 4), (8, 8), (6, 2), (6, 3), (6, 1), (4, 2), (12, 4), (32, 8)]


@pytest.mark.parametrize("heads,kv", HEAD_LAYOUTS)
def test_even_plans_at_every_world_size(heads, kv):
    cfg = config(heads=heads, kv=kv, hidden=heads * 16, inter=200, vocab=1000)
    group = heads // kv
    for n in range(1, heads + 1):
        plan = ShardPlan.even(cfg, n)
        assert plan.world_size == n and [s.rank for s in plan.shards] == list(range(n))
        q = [s.q_heads for s in plan.shards]
        assert covers(q, heads) and all(s.num_heads >= 1 for s in plan.shards)
        for s in plan.shards:
            # a rank stores exactly the KV heads its query heads read
            assert s.kv_heads == (s.q_heads[0] // group, (s.q_heads[1] - 1) // group + 1)
        owners = {h: [s.rank for s in plan.shards if s.kv_heads[0] <= h < s.kv_heads[1]] for h in range(kv)}
        assert all(owners[h] for h in range(kv)), "a KV head nobody stores"
        if n <= kv:
            # KV groups whole: query ranges start at group boundaries, no KV head stored twice
            assert all(a % group == 0 and b % group == 0 for a, b in q)
            assert covers([s.kv_heads for s in plan.shards], kv)
        assert covers([s.mlp_columns for s in plan.shards], 200)
        assert covers([s.vocab_rows for s in plan.shards], 1000)
        assert plan.vocab_sizes == [s.vocab for s in plan.shards]
        # even: shares differ by at most one unit
        assert max(s.intermediate for s in plan.shards) - min(s.intermediate for s in plan.shards) <= 1
        assert max(s.vocab for s in plan.shards) - min(s.vocab for s in plan.shards) <= 1


def test_more_ranks_than_heads_is_refused():
    cfg = config(heads=4, kv=2)
    with pytest.raises(PlexusError, match="cannot split 4 attention heads across 5 ranks"):
        ShardPlan.even(cfg, 5)


def test_mlp_split_in_blocks_of_64_when_possible():
    cfg = config(heads=8, kv=8, hidden=128, inter=64 * 11)
    for n in (2, 3, 4):
        plan = ShardPlan.even(cfg, n)
        assert all(a % 64 == 0 and b % 64 == 0 for a, b in (s.mlp_columns for s in plan.shards))
        assert covers([s.mlp_columns for s in plan.shards], 64 * 11)


def test_weighted_plan_gives_bigger_share_to_bigger_weight():
    cfg = config(heads=16, kv=8, hidden=256, inter=64 * 32, vocab=3000)
    plan = ShardPlan.build(cfg, [3.0, 1.0])
    big, small = plan.shards
    assert (big.num_kv_heads, small.num_kv_heads) == (6, 2)
    assert (big.intermediate, small.intermediate) == (64 * 24, 64 * 8)
    assert (big.vocab, small.vocab) == (2250, 750)
    assert plan.weight_elements(0) > 2.5 * plan.weight_elements(1)


def _hf_param_count(cfg_kwargs: dict, kind: str) -> int:
    import transformers

    cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
           "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[kind]
    model = cls[1](cls[0](**cfg_kwargs))
    return sum(p.numel() for p in model.parameters())  # tied weights counted once


@pytest.mark.parametrize("kind,tied,heads,kv", [("llama", False, 6, 2), ("llama", True, 6, 1), ("qwen2", True, 6, 3),
                                                ("qwen2", False, 4, 4)])
def test_sizes_agree_with_transformers_parameter_count(kind, tied, heads, kv):
    hidden, inter, vocab, layers = 96, 200, 1000, 2
    hf = dict(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
              num_key_value_heads=kv, vocab_size=vocab, tie_word_embeddings=tied)
    total = _hf_param_count(hf, kind)
    cfg = config(heads=heads, kv=kv, hidden=hidden, inter=inter, vocab=vocab, layers=layers, tied=tied,
                 bias=(kind == "qwen2"), arch={"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[kind])
    assert cfg.num_parameters() == total
    assert ShardPlan.even(cfg, 1).weight_elements(0) == total
    replicated_norms = (2 * layers + 1) * hidden  # every rank holds every RMSNorm weight
    d = hidden // heads
    for n in range(2, heads + 1):
        plan = ShardPlan.even(cfg, n)
        # KV heads stored more than once (only when ranks > KV heads)
        extra_kv = sum(s.num_kv_heads for s in plan.shards) - kv
        kv_elems = extra_kv * d * (2 * hidden + (2 if kind == "qwen2" else 0)) * layers
        assert sum(plan.weight_elements(r) for r in range(n)) == total + (n - 1) * replicated_norms + kv_elems


def test_kv_cache_elements():
    cfg = config(heads=8, kv=4, hidden=64, layers=5)
    for n, tokens in itertools.product((1, 2, 4, 8), (16, 48, 512)):
        plan = ShardPlan.even(cfg, n)
        for r in range(n):
            want = 2 * 5 * plan[r].num_kv_heads * tokens * 8
            assert plan.kv_cache_elements(r, tokens) == want
