"""Sampling: the Sampler against transformers' own logits warpers, and seeded sampling through
``plexus generate`` giving the same tokens at world sizes 1, 2 and 4."""

from __future__ import annotations

import json

import pytest
import torch

from plexus.engine.sampling import Sampler, SamplingParams
from tests.helpers import plexus_cmd, run, run_mpi

SEED_ARGS = ["--temperature", "0.8", "--top-p", "0.9", "--top-k", "50", "--seed", "1234"]


def reference_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """The distribution transformers' generate samples from (its warpers, in its order)."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    scores = logits.unsqueeze(0).clone()
    ids = torch.zeros((1, 1), dtype=torch.long)
    scores = TemperatureLogitsWarper(temperature)(ids, scores)
    if top_k:
        scores = TopKLogitsWarper(top_k)(ids, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(ids, scores)
    return scores[0].softmax(-1)


def seeded_logits(n: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g) * 1.5


def test_greedy_is_argmax():
    logits = seeded_logits(50)
    assert Sampler(SamplingParams(temperature=0.0))(logits) == int(logits.argmax())


def test_logit_bias_is_added_before_the_choice():
    logits = torch.tensor([0.0, 3.0, 1.0, 2.5])
    assert Sampler(SamplingParams(logit_bias=((3, 1.0),)))(logits) == 3  # 3.5 beats 3.0
    assert Sampler(SamplingParams(logit_bias=((1, -100.0),)))(logits) == 3  # the top one banned
    assert Sampler(SamplingParams())(logits) == 1  # and the logits themselves are not changed
    banned = SamplingParams(temperature=1.0, seed=7, logit_bias=((1, -100.0), (3, -100.0)))
    sampler = Sampler(banned)
    picks = [sampler(logits) for _ in range(100)]
    assert set(picks) == {0, 2}  # never a banned one; both others (p = 0.27 and 0.73)
    s = Sampler(SamplingParams(temperature=1.0, seed=1, logit_bias=((0, 100.0),)))
    assert [s(logits) for _ in range(20)] == [0] * 20


def test_top_k_one_is_argmax_whatever_the_seed():
    logits = seeded_logits(50)
    for seed in range(20):
        assert Sampler(SamplingParams(temperature=1.5, top_k=1, seed=seed))(logits) == int(logits.argmax())


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.8, 0, 1.0), (0.8, 5, 1.0), (0.8, 0, 0.7), (1.3, 6, 0.8),
                                                     (0.5, 50, 0.9)])
def test_distribution_matches_transformers_warpers(temperature, top_k, top_p):
    """Frequencies over many draws match the distribution transformers' temperature, top-k and
    top-p warpers define, and no token they exclude is ever drawn."""
    logits = seeded_logits()
    want = reference_probs(logits, temperature, top_k, top_p)
    if top_p < 1.0:  # no cumulative probability right at the cut, so the kept set is unambiguous
        kept = reference_probs(logits, temperature, top_k, 1.0).sort(descending=True).values.cumsum(0)
        assert (kept - top_p).abs().min() > 0.005
    sampler = Sampler(SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=7))
    draws = 20000
    counts = torch.bincount(torch.tensor([sampler(logits) for _ in range(draws)]), minlength=logits.numel())
    freq = counts.float() / draws
    assert set(torch.nonzero(counts).flatten().tolist()) <= set(torch.nonzero(want).flatten().tolist())
    # 5 standard errors of a binomial frequency (plus a little slack)
    bound = 5 * torch.sqrt(want * (1 - want) / draws) + 2e-3
    assert torch.all((freq - want).abs() <= bound), (freq, want)


def test_same_seed_same_tokens_other_seed_other_tokens():
    logits = torch.zeros(1000)  # uniform: every draw is up to the generator
    s1 = Sampler(SamplingParams(temperature=1.0, seed=42))
    s2 = Sampler(SamplingParams(temperature=1.0, seed=42))
    s3 = Sampler(SamplingParams(temperature=1.0, seed=43))
    a, b, c = ([s(logits) for _ in range(20)] for s in (s1, s2, s3))
    assert a == b
    assert a != c


# ---- end to end: plexus generate at several world sizes ---------------------------------------

@pytest.fixture(scope="module")
def sampling_prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("sampling") / "prompts.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": p}) for p in ["The quick brown fox", "Once upon a time"]) + "\n")
    return path


@pytest.fixture(scope="module")
def seeded_runs(demo_tiny, sampling_prompts):
    """``seeded_runs(world_size, *extra_args)``: the --json results, cached per arguments."""
    cache = {}

    def get(n: int, *args: str) -> list[dict]:
        key = (n, args)
        if key not in cache:
            cmd = plexus_cmd("generate", "--model", demo_tiny, "--prompts-file", sampling_prompts,
                             "--max-tokens", "32", "--json", *args)
            r = run(cmd, timeout=90) if n == 1 else run_mpi(n, cmd, timeout=90)
            assert r.rc == 0 and not r.timed_out, r.describe()
            cache[key] = r.json_lines()
        return cache[key]

    return get


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world_size", [2, 4])
def test_seeded_sampling_same_tokens_at_every_world_size(seeded_runs, world_size):
    single = seeded_runs(1, *SEED_ARGS)
    assert [r["token_ids"] for r in seeded_runs(world_size, *SEED_ARGS)] == [r["token_ids"] for r in single]
    assert [r["text"] for r in seeded_runs(world_size, *SEED_ARGS)] == [r["text"] for r in single]


@pytest.mark.timeout(300)
def test_seeded_sampling_really_samples(seeded_runs):
    """The seed matters and the tokens are not the greedy ones, so the test above compares
    sampled sequences, not two greedy runs."""
    seeded = [r["token_ids"] for r in seeded_runs(1, *SEED_ARGS)]
    other_seed = [r["token_ids"] for r in seeded_runs(1, *SEED_ARGS[:-1], "99")]
    greedy = [r["token_ids"] for r in seeded_runs(1, "--temperature", "0")]
    assert seeded != other_seed
    assert seeded != greedy


@pytest.mark.timeout(300)
def test_sampled_tokens_lie_in_transformers_nucleus(seeded_runs, demo_tiny):
    """Each sampled token is one transformers' warpers keep (top-k 50, top-p 0.9 at temperature
    0.8), given transformers' logits for the sequence so far: an independent check of the
    logits and the filtering Plexus sampled from, at every step."""
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(str(demo_tiny), dtype=torch.float32).eval()
    for result in seeded_runs(1, *SEED_ARGS):
        seq = result["prompt_token_ids"] + result["token_ids"]
        n = len(result["prompt_token_ids"])
        with torch.no_grad():
            logits = model(torch.tensor([seq])).logits[0]  # (T, vocab)
        for step, token in enumerate(result["token_ids"]):
            probs = reference_probs(logits[n - 1 + step], 0.8, 50, 0.9)
            assert probs[token] > 0, f"step {step}: token {token} is outside transformers' top-k/top-p set"
