"""Plexus's quantized decode side by side with llama.cpp's, on the same model.

    python benchmarks/llamacpp_ab.py [--model DIR] [--rounds 5] [--threads 2] [--prompt-tokens 128]
                                     [--new-tokens 128] [--llama-python PATH] [--json OUT]

The model (default: the ``bench`` demo preset, ~250M parameters) is converted to GGUF Q8_0, Q4_0
and BF16 with the ``gguf`` package (the converter of llama.cpp's own project: tensors renamed,
Q/K rows permuted as convert_hf_to_gguf.py does, the byte-level BPE vocabulary written as
"gpt2"). Then, in interleaved rounds (the machine's bandwidth drifts by +-25% between runs),
each of these decodes the same prompt ids:

- Plexus: ``plexus bench`` in bfloat16, with ``--quantize int8``, with ``--quantize int4``, and
  on the Q8_0 and Q4_0 GGUF files;
- llama.cpp: llama-cpp-python on the BF16, Q8_0 and Q4_0 files, the prompt in one batch, then
  one token a step (greedy from its logits), the same threads.

llama-cpp-python is never a Plexus dependency: it lives in a venv of its own, made on first use
(``benchmarks/.venv-llamacpp``, built from PyPI's source package with -DGGML_NATIVE=ON: this
machine's vector units, as Plexus's kernel is built) unless --llama-python names an
interpreter that has it. Prints min/median/max tok/s per engine and the ratios of medians; the
table in docs/benchmarks.md comes from this script.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
VENV = HERE / ".venv-llamacpp"
LLAMA_CPP_VERSION = "0.3.36"

LLAMA_CHILD = r"""
import json, sys, time
import numpy as np
from llama_cpp import Llama
path, threads, prompt, new = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4])
ctx = len(prompt) + new + 8
llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=ctx, n_batch=ctx, verbose=False)
llm.eval(prompt[:8]); llm.reset()  # warm up
t0 = time.perf_counter()
llm.eval(prompt)
t1 = time.perf_counter()
tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
times = [time.perf_counter()]
for _ in range(new - 1):
    llm.eval([tok])
    tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    times.append(time.perf_counter())
print(json.dumps({"prefill_tok_s": len(prompt) / (t1 - t0),
                  "decode_tok_s": (len(times) - 1) / (times[-1] - times[0])}))
"""


def llama_python(given: str | None) -> str:
    if given:
        return given
    py = VENV / "bin" / "python"
    if not py.exists():
        print(f"building llama-cpp-python {LLAMA_CPP_VERSION} into {VENV} (several minutes)", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        env = {**os.environ, "CMAKE_ARGS": "-DGGML_NATIVE=ON -DGGML_OPENMP=ON"}
        subprocess.run([str(py), "-m", "pip", "install", "-q", f"llama-cpp-python=={LLAMA_CPP_VERSION}", "numpy"],
                       check=True, env=env)
    return str(py)


# ---- Hugging Face safetensors -> GGUF ---------------------------------------------------------

def _permute(w, n_head: int, n_head_kv: int | None):
    """convert_hf_to_gguf.py's LlamaModel.permute: rotate-half rows -> llama.cpp's interleaved RoPE."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def to_gguf(model_dir: Path, out: Path, qtype_name: str) -> Path:
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    c = json.loads((model_dir / "config.json").read_text())
    q = gguf.GGMLQuantizationType[qtype_name]
    w = gguf.GGUFWriter(str(out), "llama")
    heads, kv = c["num_attention_heads"], c.get("num_key_value_heads") or c["num_attention_heads"]
    w.add_context_length(c["max_position_embeddings"])
    w.add_embedding_length(c["hidden_size"])
    w.add_block_count(c["num_hidden_layers"])
    w.add_feed_forward_length(c["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(c.get("rms_norm_eps", 1e-5))
    w.add_rope_freq_base(float(c.get("rope_theta", 10000.0)))
    w.add_rope_dimension_count(c["hidden_size"] // heads)
    w.add_vocab_size(c["vocab_size"])
    t = json.loads((model_dir / "tokenizer.json").read_text())
    tokens = [None] * len(t["model"]["vocab"])
    for tok, i in t["model"]["vocab"].items():
        tokens[i] = tok
    for a in t["added_tokens"]:
        tokens[a["id"]] = a["content"]
    tokens += [f"[PAD{i}]" for i in range(len(tokens), c["vocab_size"])]
    special = {a["id"] for a in t["added_tokens"] if a["special"]}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if i in special else 1 for i in range(len(tokens))])
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in t["model"]["merges"]])
    if c.get("bos_token_id") is not None:
        w.add_bos_token_id(c["bos_token_id"])
    if c.get("eos_token_id") is not None:
        w.add_eos_token_id(c["eos_token_id"] if isinstance(c["eos_token_id"], int) else c["eos_token_id"][0])
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, c["num_hidden_layers"])
    tensors = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    for hf, a in tensors.items():
        a = a.astype(np.float32)
        if ".q_proj." in hf or ".k_proj." in hf:
            a = _permute(a, heads, heads if ".q_proj." in hf else kv)
        name = names.get_name(hf, try_suffixes=(".weight", ".bias"))
        if a.ndim == 2 and q != gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, gguf.quants.quantize(a, q), raw_dtype=q)
        else:
            w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


# ---- the runs ---------------------------------------------------------------------------------

def plexus_run(model: Path, threads: int, prompt_tokens: int, new_tokens: int, *extra: str) -> dict:
    cmd = [str(Path(sys.executable).with_name("plexus")), "bench", "--model", str(model), "--threads", str(threads),
           "--prompt-tokens", str(prompt_tokens), "--new-tokens", str(new_tokens), "--json", *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
    out = json.loads(r.stdout)
    return {"prefill_tok_s": out["prefill_tok_s"], "decode_tok_s": out["decode_tok_s"],
            "bandwidth_fraction": out["bandwidth_fraction"], "bandwidth_gbps": out["bandwidth_limit_gbps"]}


def llama_run(python: str, gguf_path: Path, threads: int, prompt: list[int], new_tokens: int) -> dict:
    r = subprocess.run([python, "-c", LLAMA_CHILD, str(gguf_path), str(threads), json.dumps(prompt), str(new_tokens)],
                       capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        raise SystemExit(f"llama.cpp on {gguf_path} failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="HF model directory (default: the bench demo preset)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--llama-python", default=None, help="a Python with llama_cpp installed")
    ap.add_argument("--json", default=None, help="write every round's figures here")
    args = ap.parse_args()

    from plexus.bench.runner import ensure_preset_model, prompt_token_ids
    from plexus.models.config import ModelConfig

    model = Path(args.model) if args.model else ensure_preset_model("bench", lambda *a: None)
    python = llama_python(args.llama_python)
    config = ModelConfig.from_dir(model)
    prompt = prompt_token_ids(args.prompt_tokens, config.vocab_size)  # the ids plexus bench feeds
    work = Path(tempfile.mkdtemp(prefix="plexus-llamacpp-"))
    files = {q: to_gguf(model, work / f"model-{q}.gguf", q) for q in ("BF16", "Q8_0", "Q4_0")}
    t, p, n = args.threads, args.prompt_tokens, args.new_tokens
    runs = {
        "plexus bf16": lambda: plexus_run(model, t, p, n, "--dtype", "bfloat16"),
        "plexus --quantize int8": lambda: plexus_run(model, t, p, n, "--dtype", "bfloat16", "--quantize", "int8"),
        "plexus --quantize int4": lambda: plexus_run(model, t, p, n, "--dtype", "bfloat16", "--quantize", "int4"),
        "plexus on Q8_0 GGUF": lambda: plexus_run(files["Q8_0"], t, p, n, "--dtype", "bfloat16"),
        "plexus on Q4_0 GGUF": lambda: plexus_run(files["Q4_0"], t, p, n, "--dtype", "bfloat16"),
        "llama.cpp BF16": lambda: llama_run(python, files["BF16"], t, prompt, n),
        "llama.cpp Q8_0": lambda: llama_run(python, files["Q8_0"], t, prompt, n),
        "llama.cpp Q4_0": lambda: llama_run(python, files["Q4_0"], t, prompt, n),
    }
    results: dict[str, list[dict]] = {k: [] for k in runs}
    for r in range(args.rounds):
        for name, run in runs.items():
            results[name].append(run())
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    med = {k: {m: statistics.median(x[m] for x in v) for m in ("decode_tok_s", "prefill_tok_s")}
           for k, v in results.items()}
    print(f"{'engine':<24} {'decode tok/s min/median/max':>30} {'prefill tok/s median':>22}")
    for name, v in results.items():
        d = sorted(x["decode_tok_s"] for x in v)
        print(f"{name:<24} {d[0]:>9.1f} {med[name]['decode_tok_s']:>9.1f} {d[-1]:>9.1f} "
              f"{med[name]['prefill_tok_s']:>22.1f}")
    pairs = [("plexus --quantize int8", "plexus bf16"), ("plexus --quantize int4", "plexus bf16"),
             ("plexus --quantize int8", "llama.cpp Q8_0"), ("plexus on Q8_0 GGUF", "llama.cpp Q8_0"),
             ("plexus --quantize int4", "llama.cpp Q4_0"), ("plexus on Q4_0 GGUF", "llama.cpp Q4_0"),
             ("plexus bf16", "llama.cpp BF16")]
    print("ratios of medians (decode, prefill):")
    for a, b in pairs:
        print(f"  {a} / {b}: {med[a]['decode_tok_s'] / med[b]['decode_tok_s']:.2f}x, "
              f"{med[a]['prefill_tok_s'] / med[b]['prefill_tok_s']:.2f}x")
    fractions = {k: statistics.median(x["bandwidth_fraction"] for x in v) for k, v in results.items()
                 if k.startswith("plexus")}
    print("plexus decode as a fraction of the measured bandwidth (median):",
          ", ".join(f"{k} {v:.2f}" for k, v in fractions.items()))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
