"""Plexus reproduces transformers: last-position logits to 1e-4 and 24 greedy tokens, at world
sizes 1, 2 and 4, for random checkpoints that transformers itself builds and saves.

The checkpoints cover, between them: Llama with tied embeddings and GQA, Llama 3.1 rope
scaling with a single KV head (replicated on every rank), Mistral with an explicit head_dim (76,
not hidden / heads) and a sliding window shorter than the sequence, Qwen2 with q/k/v bias and
an odd KV head count, multi-head attention loaded from a sharded checkpoint
(model.safetensors.index.json), and sizes that are not powers of two (hidden 96, intermediate
200, vocab 1000, 6 heads / 3 or 2 KV heads, so shards are uneven). One mpirun launch per world size loads them all
(tests/mpi_scripts/parity.py). bfloat16 and float16 run at world size 2.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import MPI_SCRIPTS, hf_reference, python_cmd, run_mpi

MAX_NEW_TOKENS = 24
TOL = 1e-4
# ids on both sides of every vocab shard boundary at 2 and 4 ranks (vocab 1000), and both ends
PROMPT = [0, 249, 250, 17, 499, 500, 642, 749, 750, 999, 3, 333, 901, 128, 64, 400]

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               # small so that the 16-dim head's wavelengths fall in all three llama3 bands
               "original_max_position_embeddings": 64, "rope_theta": 10000.0}

CHECKPOINTS = {
    "llama_tied_gqa": dict(kind="llama", tie_word_embeddings=True),
    "llama3_rope_one_kv": dict(kind="llama", num_key_value_heads=1, rope_parameters=LLAMA3_ROPE,
                               max_position_embeddings=512),
    # uneven vocab shards; head_dim 76 = 64 + 8 + 4, so the kernel's weighted sum of V takes each
    # of its loops (64-float strips, 8-float strips, the rest one by one), and its scores the
    # row-by-row dot (not a multiple of 8); the 16-float heads of the others take its
    # eight-positions-at-once path
    "mistral_window_head_dim": dict(kind="mistral", sliding_window=12, vocab_size=1003, head_dim=76),
    "qwen2_bias_tied": dict(kind="qwen2"),
    "llama_mha_sharded": dict(kind="llama", num_attention_heads=6, num_key_value_heads=6, num_hidden_layers=3,
                              max_shard_size="300KB"),
}
# run at world size 2: name -> (checkpoint, Plexus --dtype (None: the checkpoint's own), reference dtype)
LOW_PRECISION = {"llama_tied_gqa@bfloat16": ("llama_tied_gqa", "bfloat16", "bfloat16"),
                 "qwen2_bias_tied@float16": ("qwen2_bias_tied", "float16", "float16"),
                 "qwen2_bias_tied@bfloat16": ("qwen2_bias_tied", "bfloat16", "bfloat16"),  # q/k/v bias in the kernel
                 "mistral_window_head_dim@bfloat16": ("mistral_window_head_dim", "bfloat16", "bfloat16"),
                 "mistral_window_head_dim@float16": ("mistral_window_head_dim", "float16", "float16"),
                 "llama_saved_in_bfloat16": ("llama_saved_in_bfloat16", None, "bfloat16")}
BF16_CHECKPOINT = dict(kind="llama", tie_word_embeddings=True, dtype="bfloat16", seed=1)
WORLD_SIZES = (1, 2, 4)
# also run at world sizes 2 and 4 with the fused kernel's sums through MPI (ranks on several machines)
MPI_SUMS = ("llama_tied_gqa", "qwen2_bias_tied")


@pytest.fixture(scope="module")
def references(hf_checkpoint):
    """{name: (model_dir, transformers' float32 logits and greedy tokens)}."""
    refs = {}
    for name, spec in CHECKPOINTS.items():
        spec = dict(spec)
        d = hf_checkpoint(spec.pop("kind"), name=name, **spec)
        refs[name] = (d, hf_reference(d, PROMPT, MAX_NEW_TOKENS))
    return refs


@pytest.fixture(scope="module")
def bf16_checkpoint(hf_checkpoint):
    """A checkpoint saved in bfloat16: Plexus runs it in bfloat16 unless told otherwise."""
    spec = dict(BF16_CHECKPOINT)
    return hf_checkpoint(spec.pop("kind"), name="llama_saved_in_bfloat16", **spec)


@pytest.fixture(scope="module")
def plexus_runs(references, bf16_checkpoint, tmp_path_factory):
    """``plexus_runs(world_size)``: Plexus's results for every checkpoint, one mpirun per world size."""
    cache = {}

    def get(n: int) -> dict:
        if n not in cache:
            tmp = tmp_path_factory.mktemp(f"parity{n}")
            jobs = [{"name": name, "dir": str(d), "prompt_ids": PROMPT, "max_new_tokens": MAX_NEW_TOKENS}
                    for name, (d, _) in references.items()]
            if n > 1:
                jobs += [{"name": f"{name}@mpi_sums", "dir": str(references[name][0]), "prompt_ids": PROMPT,
                          "max_new_tokens": MAX_NEW_TOKENS, "mpi_sums": True} for name in MPI_SUMS]
            if n == 2:
                dirs = {**{name: d for name, (d, _) in references.items()}, bf16_checkpoint.name: bf16_checkpoint}
                jobs += [{"name": name, "dir": str(dirs[src]), "prompt_ids": PROMPT,
                          "max_new_tokens": MAX_NEW_TOKENS, "dtype": dtype}
                         for name, (src, dtype, _) in LOW_PRECISION.items()]
                jobs.append({"name": f"{bf16_checkpoint.name}@mpi_sums", "dir": str(bf16_checkpoint),
                             "prompt_ids": PROMPT, "max_new_tokens": MAX_NEW_TOKENS, "mpi_sums": True})
            (tmp / "jobs.json").write_text(json.dumps(jobs))
            r = run_mpi(n, python_cmd(MPI_SCRIPTS / "parity.py", tmp / "jobs.json", tmp / "out.json"), timeout=240)
            assert r.rc == 0 and not r.timed_out, r.describe()
            cache[n] = json.loads((tmp / "out.json").read_text())
            cache[n]["_elapsed"] = r.elapsed
        return cache[n]

    return get


def test_checkpoints_cover_what_they_claim(references):
    """The fixtures really contain the features the parity tests are meant to cover."""
    cfg = {name: json.loads((d / "config.json").read_text()) for name, (d, _) in references.items()}
    assert cfg["llama_tied_gqa"]["tie_word_embeddings"] is True
    assert not (references["llama_tied_gqa"][0] / "model.safetensors.index.json").exists()
    assert cfg["llama3_rope_one_kv"]["num_key_value_heads"] == 1
    rope = cfg["llama3_rope_one_kv"].get("rope_parameters") or cfg["llama3_rope_one_kv"].get("rope_scaling")
    assert rope["rope_type"] == "llama3"
    assert cfg["mistral_window_head_dim"]["architectures"] == ["MistralForCausalLM"]
    assert cfg["mistral_window_head_dim"]["sliding_window"] < len(PROMPT) + MAX_NEW_TOKENS
    mistral = cfg["mistral_window_head_dim"]
    assert mistral["head_dim"] == 76 != mistral["hidden_size"] // mistral["num_attention_heads"]
    assert cfg["qwen2_bias_tied"]["architectures"] == ["Qwen2ForCausalLM"]
    sharded = references["llama_mha_sharded"][0]
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (sharded / "model.safetensors").exists()
    from safetensors import safe_open

    with safe_open(str(references["qwen2_bias_tied"][0] / "model.safetensors"), "pt") as f:
        assert "model.layers.0.self_attn.q_proj.bias" in f.keys()
    for name, (_, ref) in references.items():
        # greedy decoding of a degenerate model repeats one token: that would prove little
        assert len(set(ref["tokens"])) > 3, (name, ref["tokens"])


@pytest.mark.timeout(600)
@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_last_position_logits_match_transformers(plexus_runs, references, world_size, name):
    got = torch.tensor(plexus_runs(world_size)[name]["logits"])
    want = torch.tensor(references[name][1]["logits"])
    assert got.shape == want.shape
    assert want.abs().max() > 1.0, "reference logits too small to make 1e-4 meaningful"
    diff = (got - want).abs().max().item()
    assert diff <= TOL, f"{name} at {world_size} ranks: max abs logit difference {diff:.3g}"


@pytest.mark.timeout(600)
@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_greedy_tokens_match_transformers_generate(plexus_runs, references, world_size, name):
    got = plexus_runs(world_size)[name]["tokens"]
    want = references[name][1]["tokens"]
    assert len(want) == MAX_NEW_TOKENS
    assert got == want, f"{name} at {world_size} ranks"


@pytest.mark.timeout(600)
@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_every_decode_step_matches_transformers(plexus_runs, references, world_size, name):
    """The logits of each one-token decode step (on the CPU in float32: the fused C kernel,
    plexus/models/kernels.py), against the logits transformers' generate chose each token from."""
    run = plexus_runs(world_size)[name]
    want = torch.tensor(references[name][1]["step_logits"][1:])
    got = torch.tensor(run["step_logits"])
    assert got.shape == want.shape == (MAX_NEW_TOKENS - 1, want.shape[1])
    diff = (got - want).abs().max().item()
    assert diff <= TOL, f"{name} at {world_size} ranks: max abs decode-step logit difference {diff:.3g}"
    from plexus.models import kernels

    if kernels.library() is not None:  # this machine builds the kernel (test_kernels.py checks where it must)
        assert all(run["fused"]), f"the fused decode kernel was not used: {run['fused']}"
        # every rank on this one machine: the per-layer sums go through shared memory, not MPI
        assert all(run["node_group"]) == (world_size > 1), run["node_group"]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("world_size", [n for n in WORLD_SIZES if n > 1])
@pytest.mark.parametrize("name", MPI_SUMS)
def test_decode_steps_with_sums_through_mpi(plexus_runs, references, world_size, name):
    """The fused kernel as ranks on several machines run it: each half-layer one C call, the
    sums through MPI between them, the residual added by the next call."""
    run = plexus_runs(world_size)[f"{name}@mpi_sums"]
    want = references[name][1]
    assert run["tokens"] == want["tokens"]
    diff = (torch.tensor(run["step_logits"]) - torch.tensor(want["step_logits"][1:])).abs().max().item()
    assert diff <= TOL, f"{name} at {world_size} ranks, sums through MPI: {diff:.3g}"
    from plexus.models import kernels

    if kernels.library() is not None:
        assert all(run["fused"]) and not any(run["node_group"]), run


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", list(LOW_PRECISION))
def test_half_precision_at_two_ranks(plexus_runs, references, bf16_checkpoint, name):
    """bfloat16/float16 weights and activations, sums reduced across 2 ranks: close to
    transformers in float32 and about as close to it as transformers itself in the same dtype."""
    src, _, ref_dtype = LOW_PRECISION[name]
    d = bf16_checkpoint if src == bf16_checkpoint.name else references[src][0]
    if src == bf16_checkpoint.name:
        assert json.loads((d / "config.json").read_text()).get("dtype") == "bfloat16"
    want = torch.tensor(hf_reference(d, PROMPT, 1, dtype="float32")["logits"])
    ref_low = torch.tensor(hf_reference(d, PROMPT, 1, dtype=ref_dtype)["logits"])
    got = torch.tensor(plexus_runs(2)[name]["logits"])
    assert got.isfinite().all()
    ours = (got - want).abs().max().item()
    theirs = (ref_low - want).abs().max().item()
    scale = want.abs().max().item()
    # bf16 keeps 8 significant bits: a few percent of the logit range after two layers
    assert ours <= 0.05 * scale, f"{name}: max abs difference {ours:.3g} vs float32 (logit scale {scale:.3g})"
    assert ours <= 2 * theirs + 1e-3, f"{name}: {ours:.3g} off float32, transformers in {ref_dtype}: {theirs:.3g}"
    # and it really ran in low precision (for the bf16-saved checkpoint: its own dtype by default)
    assert ours > 1e-4, f"{name}: Plexus matches float32 to {ours:.3g}: did it run in float32?"


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", list(LOW_PRECISION))
def test_16_bit_decode_steps_at_two_ranks(plexus_runs, references, bf16_checkpoint, name):
    """The one-token decode steps in bfloat16 and float16 at 2 ranks of one node: the fused
    kernel's 16-bit builds, sums through shared memory. Each step's logits against
    transformers' at that position (one forward pass over the same tokens), in float32 and in
    the same dtype: as for the prompt above, close to float32 and about as close to it as
    transformers in that dtype."""
    from plexus.models import kernels
    from tests.helpers import hf_sequence_logits

    src, _, ref_dtype = LOW_PRECISION[name]
    d = bf16_checkpoint if src == bf16_checkpoint.name else references[src][0]
    run = plexus_runs(2)[name]
    ids = PROMPT + run["tokens"][:-1]
    want = hf_sequence_logits(d, ids)[len(PROMPT):]
    theirs = (hf_sequence_logits(d, ids, ref_dtype)[len(PROMPT):] - want).abs().max().item()
    got = torch.tensor(run["step_logits"])
    assert got.shape == want.shape == (MAX_NEW_TOKENS - 1, want.shape[1])
    ours, scale = (got - want).abs().max().item(), want.abs().max().item()
    assert 1e-4 < ours <= 0.05 * scale, f"{name}: {ours:.3g} off float32 (logit scale {scale:.3g})"
    assert ours <= 2 * theirs + 1e-3, f"{name}: {ours:.3g} off float32, transformers in {ref_dtype}: {theirs:.3g}"
    if kernels.library(getattr(torch, ref_dtype)) is not None:
        assert all(run["fused"]) and all(run["node_group"]), run


@pytest.mark.timeout(600)
def test_bfloat16_decode_steps_with_sums_through_mpi(plexus_runs, bf16_checkpoint):
    """The bfloat16 kernel as ranks on several machines run it (each half-layer one C call,
    float32 sums through MPI between them): the same tokens and, to float32 rounding, the same
    step logits as the node group's shared-memory sums above."""
    from plexus.models import kernels

    runs = plexus_runs(2)
    via_mpi, via_shm = runs[f"{bf16_checkpoint.name}@mpi_sums"], runs[bf16_checkpoint.name]
    assert via_mpi["tokens"] == via_shm["tokens"]
    got, want = torch.tensor(via_mpi["step_logits"]), torch.tensor(via_shm["step_logits"])
    assert got.shape == want.shape == (MAX_NEW_TOKENS - 1, want.shape[1])
    assert (got - want).abs().max().item() <= 1e-4 * want.abs().max().item()
    if kernels.library(torch.bfloat16) is not None:
        assert all(via_mpi["fused"]) and not any(via_mpi["node_group"]), via_mpi
