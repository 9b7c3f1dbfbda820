"""The fused decode kernel (plexus/models/kernels.py, plexus/models/csrc/decode.c), in each dtype: it builds where
it should, computes what the torch path computes, falls back to the torch path where it cannot
build, and a rank waiting for a node peer that never arrives gives up with one clear error.

Its agreement with transformers, step by step at world sizes 1, 2 and 4, is in
tests/test_model_parity.py (test_every_decode_step_matches_transformers).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time

import pytest
import torch

from tests.helpers import plexus_cmd, run

pytestmark = pytest.mark.timeout(180)

ONCE = "Once upon a time"


def _expected_here() -> bool:
    return (sys.platform.startswith("linux") and platform.machine().lower() in ("x86_64", "amd64")
            and os.environ.get("PLEXUS_KERNELS", "auto") == "auto" and shutil.which("cc") is not None)


@pytest.fixture
def stories_engine(stories_dir):
    from plexus.engine.engine import Engine
    from plexus.parallel.comm import Communicator

    return Engine.load(stories_dir, Communicator.self_only(), "float32", "cpu")


def test_kernel_builds_and_is_cached(tmp_path, monkeypatch):
    """On Linux x86-64 with a C compiler (this machine, CI) the kernel must build; a second
    build finds the cached library instead of compiling again."""
    from plexus.models import kernels

    if not _expected_here():
        pytest.skip("the kernel is built only on Linux x86-64 with a C compiler (cc) and PLEXUS_KERNELS unset")
    monkeypatch.setenv("PLEXUS_CACHE", str(tmp_path))
    t0 = time.monotonic()
    path = kernels.build()
    assert path.parent == tmp_path / "kernels" and path.is_file()
    mtime = path.stat().st_mtime_ns
    assert kernels.build() == path and path.stat().st_mtime_ns == mtime
    assert time.monotonic() - t0 < 60
    assert kernels.library() is not None


@torch.inference_mode()
def cached_keys(model, n: int) -> torch.Tensor:
    """The last layer's cached keys at positions 0 .. n-1 of the solo sequence: (kv heads, n, head_dim)."""
    return model.layers[-1].self_attn.cache.read(model.solo_table, 0, n)[0][0]


@pytest.mark.parametrize("build", ["native", "without AVX2"])
def test_fused_steps_equal_torch_steps(stories_engine, build, tmp_path, monkeypatch):
    """40 one-token steps through the kernel and through the model's torch layers, from the
    same prompt: logits within float32 rounding, the same greedy tokens, the same KV cache.
    Also with the kernel built for a CPU without AVX2 (its plain-C dot product)."""
    from plexus.models import kernels

    model = stories_engine.model
    if model.fused is None:
        assert not _expected_here(), "the fused kernel should be in use on this machine"
        pytest.skip("no fused kernel on this machine (not Linux x86-64 with a C compiler)")
    if build == "without AVX2":
        monkeypatch.setenv("PLEXUS_CACHE", str(tmp_path))
        monkeypatch.setattr(kernels, "FLAGS", [*kernels.FLAGS, "-mno-avx2", "-mno-fma"])
        monkeypatch.setattr(kernels, "_libs", {})
        model.fused = kernels.FusedDecoder.for_model(model)
        assert model.fused.lib._name.startswith(str(tmp_path))  # that build, not the cached native one
    fused, prompt = model.fused, torch.tensor([[1, 403, 407, 261, 378]])
    runs = {}
    for mode in ("fused", "torch"):
        model.fused = fused if mode == "fused" else None
        logits = [model(prompt, 0)]
        for pos in range(prompt.shape[1], prompt.shape[1] + 40):
            logits.append(model(logits[-1][:, -1:].argmax(-1), pos))
        cache = cached_keys(model, prompt.shape[1] + 40).clone()
        runs[mode] = torch.cat(logits, 1), cache
    model.fused = fused
    (a, ka), (b, kb) = runs["fused"], runs["torch"]
    assert torch.equal(a.argmax(-1), b.argmax(-1))
    assert (a - b).abs().max().item() < 1e-4 * max(1.0, b.abs().max().item())
    assert (ka - kb).abs().max().item() < 1e-4


@pytest.mark.parametrize("build", ["native", "without AVX2"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_16_bit_steps_match_transformers(stories_dir, dtype, build, tmp_path, monkeypatch):
    """The kernel's bfloat16 and float16 builds (16-bit weights and KV cache, float32 in between)
    over 40 one-token steps of a greedy continuation, each step's logits against transformers'
    at that position: in float32 (on the same checkpoint) and in the same 16-bit dtype. The
    kernel must be at least about as close to float32 as transformers' own 16-bit run, pick the
    same token wherever float32's choice is clear, and write a KV cache close to the torch
    path's. "without AVX2" is the plain-C build (float16 then converted by the compiler, not F16C)."""
    from plexus.engine.engine import Engine
    from plexus.models import kernels
    from plexus.parallel.comm import Communicator
    from tests.helpers import hf_reference, hf_sequence_logits

    if not _expected_here():
        pytest.skip("the kernel is built only on Linux x86-64 with a C compiler (cc) and PLEXUS_KERNELS unset")
    if build == "without AVX2":
        monkeypatch.setenv("PLEXUS_CACHE", str(tmp_path))
        monkeypatch.setattr(kernels, "FLAGS", [*kernels.FLAGS, "-mno-avx2", "-mno-fma", "-mno-f16c"])
        monkeypatch.setattr(kernels, "_libs", {})
    model = Engine.load(stories_dir, Communicator.self_only(), dtype, "cpu").model
    fused = model.fused
    assert fused is not None and fused.dtype == getattr(torch, dtype) and dtype in fused.lib._name
    if build == "without AVX2":
        assert fused.lib._name.startswith(str(tmp_path))
    prompt = [1, 403, 407, 261, 378]
    ids = prompt + hf_reference(stories_dir, prompt, 40)["tokens"]  # transformers' greedy continuation, float32
    with torch.inference_mode():
        runs = {}
        for mode in ("fused", "torch"):
            model.fused = fused if mode == "fused" else None
            steps = [model(torch.tensor([prompt]), 0)[0, -1]]
            for pos in range(len(prompt), len(ids) - 1):
                steps.append(model(torch.tensor([[ids[pos]]]), pos)[0, -1])
            runs[mode] = torch.stack(steps), cached_keys(model, len(ids) - 1).float().clone()
        model.fused = fused
    want = hf_sequence_logits(stories_dir, ids[:-1])[len(prompt) - 1:]
    theirs = (hf_sequence_logits(stories_dir, ids[:-1], dtype)[len(prompt) - 1:] - want).abs().max().item()
    (got, k_fused), (_, k_torch) = runs["fused"], runs["torch"]
    assert got.shape == want.shape == (40, model.config.vocab_size)
    ours, scale = (got - want).abs().max().item(), want.abs().max().item()
    assert 1e-4 < ours <= 0.05 * scale, (ours, scale)  # it ran in 16 bits, and not far off
    assert ours <= 1.5 * theirs, f"kernel {ours:.3g} off float32, transformers in {dtype} {theirs:.3g}"
    top2 = want.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * theirs
    assert clear.sum() >= 20 and torch.equal(got.argmax(-1)[clear], want.argmax(-1)[clear])
    assert (k_fused - k_torch).abs().max().item() <= 0.02 * k_torch.abs().max().item()


@torch.inference_mode()
@pytest.mark.parametrize("peer", ["stalled", "exited"])
@pytest.mark.parametrize("where", ["meeting", "taking rows"])
def test_waiting_for_a_node_peer_gives_up(stories_engine, peer, where):
    """A node group whose other rank never posts its share (at the first meeting), or never
    publishes the input of the rows this rank would take from it (after the first meeting): the
    step raises one MeshBroken (the server's "a rank died" path) instead of spinning forever:
    after the group's timeout when the peer's process is alive, at once when it is gone."""
    from plexus.errors import MeshBroken
    from plexus.models import cstructs, node_group

    model = stories_engine.model
    if model.fused is None:
        pytest.skip("no fused kernel on this machine (not Linux x86-64 with a C compiler)")

    class OneRankComm:  # rank 0 of a pretend 2-rank node group
        size, rank = 2, 0

    hidden, vocab = model.config.hidden_size, model.config.vocab_size
    memory = torch.zeros(node_group._offsets(2, hidden, vocab, hidden)["size"], dtype=torch.uint8)
    pid = os.getpid()  # alive
    if peer == "exited":
        p = subprocess.Popen(["true"])
        p.wait()
        pid = p.pid  # reaped: no such process
    memory[node_group.LINE + 8:node_group.LINE + 16].view(torch.int64)[0] = pid
    group = node_group._NodeGroup(memory, OneRankComm, hidden, vocab, hidden)
    if where == "taking rows":
        memory[node_group.LINE:node_group.LINE + 8].view(torch.int64)[0] = 1  # the peer met us at the embedding
        layer, width = model.fused.layers[0], model.layers[0].self_attn.num_heads_per_rank * model.config.head_dim
        tail = torch.zeros(8 * width)
        layer.o_tail, layer.tail_rows, layer.o_tail_cols = cstructs._Mat(tail.data_ptr(), None, None, None, 0, 0,
                                                                         None, 0, 0), 8, width
    group.struct.timeout_s = 0.5 if peer == "stalled" else 60
    model.fused.group = group
    t0 = time.monotonic()
    want = "stopped answering for 0.5 s" if peer == "stalled" else "another rank on this node exited"
    with pytest.raises(MeshBroken, match=want):
        model(torch.tensor([[1]]), 0)
    assert time.monotonic() - t0 < 10
    flags = memory[:2 * node_group.LINE].view(torch.int64)[::node_group.LINE // 8].tolist()
    ready = memory[node_group._offsets(2, hidden, vocab, hidden)["lines"]:][:8].view(torch.int64).item()
    # where it waited: for the peer at meeting 1 (the embedding's sum), or for the peer's input
    # after publishing its own for meeting 2 (without the taken rows it would have met there)
    assert (flags, ready) == (([1, 0], 0) if where == "meeting" else ([1, 1], 2))


def generate_tokens(model, env_extra: dict, tmp_path) -> tuple[list[int], str]:
    env = dict(os.environ, **env_extra)
    r = run(plexus_cmd("generate", "--model", model, "--prompt", ONCE, "--max-tokens", "40", "--json",
                       "--dtype", "float32"), timeout=120, env=env)
    assert r.rc == 0 and not r.timed_out, r.describe()
    return r.json_lines()[0]["token_ids"], r.stderr


def test_torch_path_when_off_or_unbuildable(stories_dir, tmp_path):
    """PLEXUS_KERNELS=0, and a machine without a working compiler (CC pointing nowhere, nothing
    cached), decode with torch: the same 40 greedy tokens as the default, and the second says
    once why it fell back."""
    default, _ = generate_tokens(stories_dir, {}, tmp_path)
    off, err_off = generate_tokens(stories_dir, {"PLEXUS_KERNELS": "0"}, tmp_path)
    missing, err_missing = generate_tokens(
        stories_dir, {"PLEXUS_KERNELS": "1", "CC": str(tmp_path / "no-such-cc"), "PLEXUS_CACHE": str(tmp_path)},
        tmp_path)
    assert default == off == missing
    assert "fused decode kernel" not in err_off
    assert err_missing.count("fused decode kernel unavailable") == 1, err_missing
    assert "Traceback" not in err_missing


@torch.inference_mode()
def test_step_equals_forward_and_reuses_its_buffer(stories_engine):
    """``CausalLM.step`` (the engine's decode call) gives the logits ``forward`` gives for the
    same token and position; with the kernel it returns one buffer that the next step reuses."""
    model = stories_engine.model
    if model.fused is None:
        pytest.skip("no fused kernel on this machine (not Linux x86-64 with a C compiler)")
    prompt = torch.tensor([[1, 403, 407, 261, 378]])
    model(prompt, 0)
    want = model(torch.tensor([[42]]), 5).clone()
    model(prompt, 0)
    first = model.step(42, 5)
    assert torch.equal(first, want)
    second = model.step(7, 6)
    assert second is first  # reused: valid until the next step
    model(prompt, 0)
    model(torch.tensor([[42]]), 5)
    assert torch.equal(second, model(torch.tensor([[7]]), 6))


@pytest.fixture(scope="module")
def llama_3_to_1(tmp_path_factory):
    """A random float32 Llama written by transformers, for a 3:1 split at world size 2."""
    import transformers

    torch.manual_seed(3)
    cfg = transformers.LlamaConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                                   num_attention_heads=8, num_key_value_heads=4, vocab_size=512,
                                   max_position_embeddings=128, initializer_range=0.1, dtype="float32")
    out = tmp_path_factory.mktemp("take") / "llama"
    transformers.LlamaForCausalLM(cfg).save_pretrained(out)
    return out


@pytest.mark.timeout(240)
@pytest.mark.parametrize("dtype,quantize", [("float32", None), ("bfloat16", None), ("float16", None),
                                            ("bfloat16", "int4"), ("float32", "int8")])
def test_a_waiting_rank_takes_rows_and_the_logits_do_not_change(llama_3_to_1, tmp_path, dtype, quantize):
    """Split 3:1 on one node, the light rank finishes its rows first and takes rows of the heavy
    rank's o_proj, down_proj and LM head (decode.c, "Taking rows"). Every step's logits are the
    same bits as a decoder that takes none: the same dot products, only done by another rank;
    also where each rank leaves its own last rows to the other, so taking is certain.
    In each of the kernel's builds: float32, bfloat16 and float16 (whose copies are 16-bit), and
    with quantized layers (the copies are quantized rows: codes, scales and mins).
    (That decoder's logits against transformers: tests/test_model_parity.py.)"""
    from plexus.models import kernels
    from tests.helpers import MPI_SCRIPTS, python_cmd, run_mpi

    if kernels.library(getattr(torch, dtype)) is None:
        pytest.skip("no fused kernel on this machine (not Linux x86-64 with a C compiler)")
    out = tmp_path / "out.json"
    r = run_mpi(2, python_cmd(MPI_SCRIPTS / "take_rows.py", llama_3_to_1, out, dtype, *([quantize] if quantize else [])),
                timeout=200)
    assert r.rc == 0 and not r.timed_out, r.describe()
    got = json.loads(out.read_text())
    assert got["group"], "the two ranks did not form a node group"
    assert got["dtype"] == f"torch.{dtype}"
    assert len(got["taking"]) == len(got["not_taking"]) == 40
    assert got["taking"] == got["not_taking"]  # bit for bit, whatever rows were taken
    assert got["left"] == got["not_taking"]  # and where every tail row was computed by the taker
    assert len(set(got["tokens"])) > 1  # a real continuation, not one repeated id
    # leaving its own tails, each rank took every tail block of the next rank, every step (how
    # many the engine's decoder took depends on the ranks' speeds: none on a loaded machine)
    assert got["taken_left"] == [40 * n for n in got["blocks_per_step"]] and min(got["blocks_per_step"]) > 0, got
    assert got["taken_off"] == [0, 0]
    # the copies are made only where every rank has room for them, and not under PLEXUS_TAKE_ROWS=0
    assert got["tail_rows"] == {"engine": [8, 8], "no_room": [0, 0], "off": [0, 0]}
    log = r.stderr
    assert "node group: each rank holds a copy of" in log
    assert "node group: ranks do not take rows from one another (rank 0 has 0 bytes to spare, not" in log
    assert "node group: ranks do not take rows from one another (PLEXUS_TAKE_ROWS=0)" in log
