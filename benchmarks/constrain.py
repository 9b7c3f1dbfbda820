"""What grammar-constrained decoding costs per token (engine/constrain.py, llguidance), on rank 0.

    python benchmarks/constrain.py [--rounds 5] [--tokens 64]

Two figures, medians over interleaved rounds, world size 1:

* ``mask_us``: the mask alone (compute the allowed tokens, apply them to the logits, advance the
  matcher) per generated token, for a JSON schema with strings, integers and an enum, on the
  bench preset's tokenizer (32,000 tokens) and on the tiny demo model's (512);
* end to end on the bench preset (bfloat16): the decode tokens per second of one request with
  ``response_format``'s schema against the same request unconstrained, through the batch runner
  as ``plexus serve`` runs it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from plexus.bench.runner import ensure_preset_model
from plexus.engine.batch import BatchRunner
from plexus.engine.constrain import Constraint, json_grammar
from plexus.engine.engine import Engine
from plexus.engine.sampling import SamplingParams
from plexus.engine.tokenizer import load_tokenizer
from plexus.log import setup_logging
from plexus.parallel.comm import Communicator

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 40}, "age": {"type": "integer"},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 8},
    "kind": {"enum": ["person", "place", "thing"]}}, "required": ["name", "age", "tags", "kind"],
    "additionalProperties": False}


def mask_cost(tokenizer, tokens: int, seed: int) -> float:
    """Microseconds per token of mask + advance, sampling from random logits until done."""
    grammar, gen = json_grammar(SCHEMA), torch.Generator().manual_seed(seed)
    spent, made = 0.0, 0
    while made < tokens:
        c = Constraint(tokenizer, grammar)
        while not c.finished and made < tokens:
            logits = torch.randn(tokenizer.vocab_size, generator=gen)
            t0 = time.perf_counter()
            masked = c.mask(logits)
            token = int(torch.multinomial(masked.softmax(-1), 1, generator=gen))
            c.advance(token)
            spent += time.perf_counter() - t0
            made += 1
    return 1e6 * spent / made


def decode_rate(engine, tokenizer, constrained: bool, tokens: int, seed: int) -> float:
    runner = BatchRunner(engine, tokenizer, prefix_cache=False)
    grammar = json_grammar(SCHEMA) if constrained else None
    seq = runner.add(tokenizer.encode("Describe someone as JSON:"),
                     SamplingParams(max_tokens=tokens, temperature=1.0, seed=seed, grammar=grammar))
    while not seq.result.token_ids:
        runner.step()
    t0, n0 = time.perf_counter(), len(seq.result.token_ids)
    while runner.running:
        runner.step()
    return (len(seq.result.token_ids) - n0) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()
    setup_logging()
    bench = str(ensure_preset_model("bench", lambda *a: None))
    tiny = str(ensure_preset_model("tiny", lambda *a: None))
    toks = {"bench (32000)": load_tokenizer(bench), "tiny (512)": load_tokenizer(tiny)}
    out = {}
    for name, tok in toks.items():
        out[f"mask_us {name}"] = statistics.median(mask_cost(tok, args.tokens, r) for r in range(args.rounds))
    engine = Engine.load(bench, Communicator.self_only(), "bfloat16", "cpu", max_context=256)
    engine.eos_token_ids = frozenset()  # unconstrained runs go the whole way; constrained ones stop at the schema's end
    free, held = [], []
    with torch.inference_mode():
        for r in range(args.rounds):
            for constrained in ((False, True) if r % 2 == 0 else (True, False)):
                rate = decode_rate(engine, toks["bench (32000)"], constrained, args.tokens, r)
                (held if constrained else free).append(rate)
    out["decode tok/s unconstrained"] = statistics.median(free)
    out["decode tok/s constrained"] = statistics.median(held)
    out["constrained / unconstrained"] = out["decode tok/s constrained"] / out["decode tok/s unconstrained"]
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
