"""Each rank holds about its share: loading a >= 400 MB float32 checkpoint at world size 2,
every rank's peak RSS growth during the load is at most 0.6 x the checkpoint size (measured
with the kernel's VmHWM, reset right before the load; tests/mpi_scripts/load_memory.py)."""

from __future__ import annotations

import json

import pytest

from tests.helpers import MPI_SCRIPTS, python_cmd, run_mpi

MB = 2 ** 20
# Llama shape of a 1B-class model cut down: 32000 x 1024 embeddings and LM head (untied) plus
# four layers of a 1024-wide, 2816-MLP, 16-head / 8-KV-head decoder: about 451 MB in float32
BIG = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
           num_key_value_heads=8, vocab_size=32000, max_position_embeddings=512, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory):
    """Written by transformers, without its slow random init (weights are irrelevant here)."""
    import torch
    import transformers

    out = tmp_path_factory.mktemp("big") / "llama-451mb"
    config = transformers.LlamaConfig(**BIG)
    with torch.device("cpu"):
        model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(str(out), max_shard_size="10GB")
    del model
    return out


@pytest.mark.timeout(300)
def test_peak_rss_growth_during_load_is_about_one_share(big_checkpoint, tmp_path):
    size = sum(f.stat().st_size for f in big_checkpoint.glob("*.safetensors"))
    assert size >= 400 * MB
    out = tmp_path / "memory.json"
    r = run_mpi(2, python_cmd(MPI_SCRIPTS / "load_memory.py", big_checkpoint, out), timeout=240)
    assert r.rc == 0 and not r.timed_out, r.describe()
    reports = json.loads(out.read_text())
    assert len(reports) == 2
    for rep in reports:
        growth = rep["hwm_after"] - rep["rss_before"]
        print(f"rank {rep['rank']}: checkpoint {size / MB:.0f} MB, params {rep['param_bytes'] / MB:.0f} MB, "
              f"peak growth {growth / MB:.0f} MB ({growth / size:.2f}x), reset={rep['hwm_reset']}")
        # the rank really loaded about half (so the bound below is not met by loading nothing)
        assert 0.45 * size <= rep["param_bytes"] <= 0.55 * size
        assert rep["rss_after"] - rep["rss_before"] >= 0.4 * size
        assert growth <= 0.6 * size, f"rank {rep['rank']}: peak RSS grew {growth / MB:.0f} MB during the load " \
                                     f"of a {size / MB:.0f} MB checkpoint (limit {0.6 * size / MB:.0f} MB)"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_block_reads_equal_whole_slices(tmp_path, monkeypatch, dtype):
    """Slices copied into place a few rows at a time equal the slices read whole (rows, columns,
    whole tensors, and a checkpoint dtype converted to the run's dtype)."""
    import torch
    from safetensors.torch import save_file

    from plexus.checkpoint import reader as loader
    from plexus.models.config import ModelConfig

    g = torch.Generator().manual_seed(0)
    tensors = {"w": torch.randn(37, 23, generator=g).to(getattr(torch, dtype)),
               "v": torch.randn(37, generator=g).to(getattr(torch, dtype))}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    config = ModelConfig.from_dict({"architectures": ["LlamaForCausalLM"], "hidden_size": 8, "intermediate_size": 8,
                                    "num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 8})
    monkeypatch.setattr(loader, "READ_BLOCK_BYTES", 150)  # a couple of rows per block
    reader = loader.CheckpointReader(tmp_path, config)
    w = tensors["w"].float()
    for dim, start, end, want in [(0, 5, 30, w[5:30]), (1, 3, 20, w[:, 3:20]), (None, 0, None, w),
                                  (0, 36, 37, w[36:])]:
        dest = torch.full(want.shape, float("nan"))
        reader.read_into(dest, "w", dim, start, end)
        assert torch.equal(dest, want), (dim, start, end)
    dest = torch.empty(10)
    reader.read_into(dest, "v", 0, 27, 37)
    assert torch.equal(dest, tensors["v"][27:].float())
    assert reader.bytes_read == (25 * 23 + 37 * 17 + 37 * 23 + 23 + 10) * tensors["w"].element_size()
