"""Run under ``mpirun -n 2``: a node group split 3:1 decodes the same greedy steps twice, once
with the engine's decoder (the light rank takes rows of the heavy one's row-parallel products,
plexus/csrc/decode.c) and once with a decoder that takes none (one made without ``take_rows``).

    mpirun -n 2 python tests/mpi_scripts/take_rows.py MODEL_DIR OUT.json [DTYPE [QUANTIZE]]

(QUANTIZE: int8 or int4, groups of 32: the copies are then quantized rows.)

Which rows the light rank gets to take depends on the ranks' speeds (on a loaded machine, none),
so a third decoder leaves every rank's own last rows to the previous rank (Group.leave_own_tail):
there every tail row is computed by the rank that holds the copy, whatever the timing.

OUT.json (rank 0): {"taking": [[logits of each step], ...], "not_taking": [...], "left": [...],
"tokens": [...], "taken": [blocks taken per rank, taking], "taken_off": [the same, not taking],
"taken_left": [the same, leaving], "blocks_per_step": [tail blocks each rank takes a step, leaving],
"group": bool,
"tail_rows": {"engine" | "no_room" | "off": [rows each rank's first layer may take]}}: "no_room" is a
decoder given no memory to spare for the copies, "off" one made under PLEXUS_TAKE_ROWS=0.
"""

import json
import os

import torch
from _abort import run  # this folder (the script's own) is on sys.path

from plexus.engine.engine import Engine
from plexus.log import setup_logging
from plexus.models import kernels
from plexus.parallel.comm import Communicator

STEPS = 40
ROWS_PER_BLOCK = 8  # decode.c's ROWS: the unit ranks claim
PROMPT = [1, 17, 300, 4, 99, 250]


def decode(model, decoder) -> tuple[list[list[float]], list[int]]:
    """Prefill, then STEPS greedy one-token steps through ``decoder``: each step's logits."""
    model.fused = decoder
    logits = model(torch.tensor([PROMPT]), 0)
    steps, tokens = [], []
    token = int(logits[0, -1].argmax()) if logits is not None else 0
    for i in range(STEPS):
        token = model.comm.bcast_obj(token)
        tokens.append(token)
        out = model.step(token, len(PROMPT) + i)
        if out is not None:
            steps.append(out[0, -1].tolist())
            token = int(out[0, -1].argmax())
    return steps, tokens


def main(model_dir: str, out_path: str, dtype: str = "float32", quantize: str | None = None) -> None:
    comm = Communicator()
    setup_logging(comm.rank)
    torch.set_num_threads(1)
    engine = Engine.load(model_dir, comm, dtype=dtype, split="3,1", quantize=quantize, quant_group=32)
    model = engine.model
    taking = model.fused  # Engine.load has given it the rows to take
    not_taking = kernels.FusedDecoder.for_model(model)
    leaving = kernels.FusedDecoder.for_model(model)
    leaving.take_rows(model, spare_bytes=None)  # copies of the next rank's rows, then:
    leaving.group.struct.leave_own_tail = 1  # (only sound where every rank holds such copies)
    with torch.inference_mode():
        a, tokens = decode(model, taking)
        b, _ = decode(model, not_taking)
        c, _ = decode(model, leaving)
    rows = ROWS_PER_BLOCK
    per_step = (len(model.layers) * 2 * -(-leaving.layers[0].tail_rows // rows)
                + -(-leaving.ends.tail_rows // rows))
    no_room = kernels.FusedDecoder.for_model(model)
    no_room.take_rows(model, spare_bytes=0)
    os.environ["PLEXUS_TAKE_ROWS"] = "0"
    off = kernels.FusedDecoder.for_model(model)
    off.take_rows(model, spare_bytes=None)
    tail_rows = {k: comm.allgather_obj(d.layers[0].tail_rows) for k, d in
                 (("engine", taking), ("no_room", no_room), ("off", off))}
    taken = comm.allgather_obj(taking.rows_taken)
    taken_off = comm.allgather_obj(not_taking.rows_taken)
    taken_left, blocks_per_step = comm.allgather_obj(leaving.rows_taken), comm.allgather_obj(per_step)
    if comm.rank == 0:
        with open(out_path, "w") as f:
            json.dump({"taking": a, "not_taking": b, "left": c, "tokens": tokens, "taken": taken,
                       "taken_off": taken_off, "taken_left": taken_left, "blocks_per_step": blocks_per_step,
                       "group": taking.group is not None, "tail_rows": tail_rows,
                       "dtype": str(taking.dtype)}, f)


run(main)
