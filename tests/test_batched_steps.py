"""Several sequences' decode steps at once (plexus/models/csrc/rows.h): one weight stream for
all of them, and each sequence's logits bitwise what stepping it alone gives, whatever else is
in the batch (issue 18's batch invariance), for dense and quantized weights."""

from __future__ import annotations

import pytest
import torch

from plexus.engine.engine import Engine
from plexus.parallel.comm import Communicator

# seven sequences: (first step, tokens); they start at different steps, so positions differ, and
# 1 to 6 run at once (the kernel takes dense rows four at a time, the rest one by one)
SEQUENCES = [(0, [5, 9, 33, 7, 12, 400, 1, 2]), (1, [17, 3, 250]), (2, [8, 8, 8, 8, 8]), (4, [100, 200, 300]),
             (0, [44, 45, 46, 47, 48, 49]), (1, [2, 3, 5, 7, 11, 13]), (3, [60, 61, 62, 63])]
# prompts for the runner (the demo vocabulary's ids): shorter and longer than a few chunks of 16
PROMPTS = [[1, 5, 9], [1, *range(17, 40)], [1, 100], [1, *range(60, 95)], [1, 7], [1, *range(300, 345)]]
# then prompts that start like earlier ones (the prefix cache): the second turn of a chat
# (PROMPTS[5] and more), a prompt that leaves the other mid-chunk, and one of a single chunk
SECOND_TURNS = [PROMPTS[5] + [9, 10, 11], PROMPTS[3][:20] + [7, 7, 7, 7], PROMPTS[1][:16] + [5]]
MAX_CONTEXT = 64


def scattered_tables(n: int, blocks_each: int) -> list[torch.Tensor]:
    """Block tables for n sequences, interleaved and backwards (sequence i's block j is
    j n + n - 1 - i): no sequence's blocks are consecutive, so paging is exercised."""
    return [torch.tensor([j * n + n - 1 - i for j in range(blocks_each)]) for i in range(n)]


def test_the_batch_sizes_tried():
    live = [sum(0 <= step - s < len(t) for s, t in SEQUENCES) for step in range(8)]
    assert min(live) == 1 and max(live) >= 6 and 4 in live and 5 in live


def solo(engine, tokens: list[int]) -> list[torch.Tensor]:
    """Logits of each step of one sequence stepped alone (plexus_step, in the first blocks in
    order), from position 0."""
    model = engine.model
    return [model.step(t, p)[0, -1].clone() for p, t in enumerate(tokens)]


def batched(model, sequences) -> dict[int, list[torch.Tensor]]:
    """Every sequence stepped together, one row each while it runs, in scattered blocks."""
    out = {i: [] for i in range(len(sequences))}
    tables = scattered_tables(len(sequences), MAX_CONTEXT // 16)
    for step in range(max(s + len(toks) for s, toks in sequences)):
        live = [(i, step - s) for i, (s, toks) in enumerate(sequences) if 0 <= step - s < len(toks)]
        logits = model.fused.rows([sequences[i][1][p] for i, p in live], [tables[i] for i, _ in live],
                                  [p for _, p in live])
        for row, (i, _) in enumerate(live):
            out[i].append(logits[row].clone())
    return out


@torch.inference_mode()
@pytest.mark.parametrize("dtype,quantize,act8", [("float32", None, False), ("bfloat16", None, False),
                                                 ("bfloat16", "int4", False), ("float32", "int8", False),
                                                 ("bfloat16", "int4", True)])
def test_batched_steps_equal_solo_steps_bitwise(demo_tiny, dtype, quantize, act8, monkeypatch):
    if act8:  # PLEXUS_INT8_ACTIVATIONS: each input rounded to 8 bits a group, per row
        monkeypatch.setenv("PLEXUS_INT8_ACTIVATIONS", "1")
    engine = Engine.load(demo_tiny, Communicator.self_only(), dtype, max_context=MAX_CONTEXT, quantize=quantize,
                         quant_group=32, max_batch=len(SEQUENCES))
    model = engine.model
    if model.fused is None:
        pytest.skip("no fused kernel on this machine (not Linux x86-64 with a C compiler)")
    alone = [solo(engine, toks) for _, toks in SEQUENCES]
    together = batched(model, SEQUENCES)
    for i, (_, toks) in enumerate(SEQUENCES):
        for p in range(len(toks)):
            assert torch.equal(together[i][p], alone[i][p]), (dtype, quantize, "sequence", i, "step", p)
    # and a batch of one is the solo step too, in blocks of its own (the last ones, backwards)
    table = torch.arange(model.solo_table.numel() * 2).flip(0)
    first = [model.fused.rows([t], [table], [p])[0].clone() for p, t in enumerate(SEQUENCES[0][1])]
    assert all(torch.equal(a, b) for a, b in zip(first, alone[0]))


@pytest.mark.parametrize("ranks,dtype,quantize,kernels", [
    (2, "float32", None, "auto"), (2, "bfloat16", "int4", "auto"), (3, "float32", None, "auto"),
    (2, "float32", None, "0")])
def test_batched_steps_across_ranks(demo_tiny, tmp_path, ranks, dtype, quantize, kernels):
    """Across ranks (the kernel's rows with the partial sums in rank order; or, PLEXUS_KERNELS=0,
    torch's forward per row) a sequence's logits are bitwise the same in any batch and equal to
    its solo step; the continuous-batching runner, with sequences joining while others decode
    and prompts cut into chunks, gives each prompt the tokens it gets alone."""
    import json
    import os

    from tests.helpers import MPI_SCRIPTS, python_cmd, run_mpi

    out = tmp_path / "out.json"
    env = {**os.environ, "PLEXUS_KERNELS": kernels}
    r = run_mpi(ranks, python_cmd(MPI_SCRIPTS / "batch_steps.py", demo_tiny, out, dtype, *([quantize] if quantize else [])),
                timeout=300, env=env)
    assert r.rc == 0 and not r.timed_out, r.describe()
    got = json.loads(out.read_text())
    assert got["fused"] == (kernels != "0")
    assert len(got["solo"]) == len(SEQUENCES) and all(len(s) == len(t) for s, (_, t) in zip(got["solo"], SEQUENCES))
    assert got["batched"] == got["alone"]  # whatever else is in the step
    assert got["batched"] == got["solo"]  # and the one-sequence step's bits
    assert got["runner"] == got["complete"] and sum(map(len, got["runner"])) > 2 * len(PROMPTS)
    # prompts that start like earlier ones reuse their blocks, and get the tokens they get cold
    assert got["second"] == got["second_cold"]
    assert got["reused"] == [32, 16, 16], got["reused"]  # the whole chunks each shares with an earlier prompt
