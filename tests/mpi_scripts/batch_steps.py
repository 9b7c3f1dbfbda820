"""Run under ``mpirun -n N``: batched decode steps across ranks (CausalLM.step_rows) against each
sequence stepped alone, and the continuous-batching runner against solo completions.

    mpirun -n N python tests/mpi_scripts/batch_steps.py MODEL_DIR OUT.json DTYPE [QUANTIZE]

OUT.json (rank 0): {"solo": [[logits of each step] per sequence], "batched": [...], "alone": [...]
(each sequence in a batch of one), "runner": [token ids per prompt], "complete": [...], "second":
[token ids of SECOND_TURNS, run after PROMPTS], "second_cold": [...], "reused": [prompt tokens
each found in the prefix cache], "fused": bool}.
"""

import json
import sys
from pathlib import Path

import torch
from _abort import run  # this folder (the script's own) is on sys.path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.test_batched_steps import MAX_CONTEXT, PROMPTS, SECOND_TURNS, SEQUENCES, scattered_tables  # noqa: E402

from plexus.engine.batch import BatchRunner  # noqa: E402
from plexus.engine.engine import Engine  # noqa: E402
from plexus.engine.sampling import SamplingParams  # noqa: E402
from plexus.log import setup_logging  # noqa: E402
from plexus.parallel.comm import Communicator  # noqa: E402


def stepped(model, schedule) -> list[list[list[float]]]:
    """Every sequence of ``schedule`` stepped in batches (in scattered blocks) -> logits per step."""
    out = [[] for _ in schedule]
    tables = scattered_tables(len(SEQUENCES), MAX_CONTEXT // 16)[-len(schedule):]
    for step in range(max(s + len(toks) for s, toks in schedule)):
        live = [(i, step - s) for i, (s, toks) in enumerate(schedule) if 0 <= step - s < len(toks)]
        logits = model.step_rows([schedule[i][1][p] for i, p in live], [tables[i] for i, _ in live],
                                 [p for _, p in live])
        for row, (i, _) in enumerate(live):
            if logits is not None:
                out[i].append(logits[row].tolist())
    return out


def main(model_dir: str, out_path: str, dtype: str, quantize: str | None = None) -> None:
    comm = Communicator()
    setup_logging(comm.rank)
    torch.set_num_threads(1)
    engine = Engine.load(model_dir, comm, dtype=dtype, max_context=MAX_CONTEXT, max_batch=len(SEQUENCES),
                         quantize=quantize, quant_group=32)
    model = engine.model
    with torch.inference_mode():
        solo = []
        for _, toks in SEQUENCES:  # the one-sequence step (plexus_step, or the torch forward), first blocks
            # (a buffer the next step reuses: read at once)
            solo.append([s for s in (model.step(t, p) for p, t in enumerate(toks)) for s in
                         ([] if s is None else [s[0, -1].tolist()])])
        batched = stepped(model, SEQUENCES)
        alone = [stepped(model, [(0, toks)])[0] for _, toks in SEQUENCES]
    runner = complete = second = cold = reused = None
    if comm.rank == 0:
        params = SamplingParams(max_tokens=12)
        complete = [list(engine.generate(ids, params)) for ids in PROMPTS]
        cold = [list(engine.generate(ids, params)) for ids in SECOND_TURNS]
        batch = BatchRunner(engine, None, prefill_chunk=16)
        seqs = [batch.add(ids, params) for ids in PROMPTS[:2]]
        for n in range(1, 200):
            if not batch.running:
                break
            batch.step()
            if n in (2, 5):  # join while others decode
                seqs += [batch.add(ids, params) for ids in PROMPTS[len(seqs):len(seqs) + 2]]
        runner = [s.result.token_ids for s in seqs]
        again = [batch.add(ids, params) for ids in SECOND_TURNS]
        while batch.running:
            batch.step()
        second, reused = [s.result.token_ids for s in again], [s.reused for s in again]
        engine.shutdown()
    else:
        engine.worker_loop()
    if comm.rank == 0:
        Path(out_path).write_text(json.dumps({"solo": solo, "batched": batched, "alone": alone, "runner": runner,
                                              "complete": complete, "second": second, "second_cold": cold,
                                              "reused": reused, "fused": model.fused is not None}))


if __name__ == "__main__":
    run(main)
