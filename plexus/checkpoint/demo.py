"""Self-contained demo checkpoints: a random-weight Llama plus a real BPE tokenizer.

Plexus must be runnable (and testable) with no network access and no downloaded
weights, so this module fabricates a complete Hugging Face-layout Llama checkpoint
directory: ``config.json``, safetensors weights (sharded like real checkpoints when
large), a byte-level BPE ``tokenizer.json`` trained on the bundled
``data/corpus.txt``, ``tokenizer_config.json`` with a chat template, and
``generation_config.json``. The output loads unchanged with
``transformers.LlamaForCausalLM`` / ``AutoTokenizer``, which makes it usable as a
reference for correctness tests. Everything is deterministic: the same preset, seed
and dtype give byte-identical files.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from plexus.files import apply_umask

PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, max_position_embeddings=512),
    "small": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=4, vocab_size=2048, max_position_embeddings=1024),
    # ~250M parameters (~1 GB in float32): big enough for meaningful benchmarks.
    "bench": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=16, num_attention_heads=16,
                  num_key_value_heads=8, vocab_size=32000, max_position_embeddings=2048),
}

# Special tokens get ids 0..4 in this order (the BPE trainer places them first).
SPECIAL_TOKENS = ["<|bos|>", "<|eos|>", "<|user|>", "<|assistant|>", "<|system|>"]
BOS_TOKEN, EOS_TOKEN = SPECIAL_TOKENS[0], SPECIAL_TOKENS[1]
BOS_TOKEN_ID, EOS_TOKEN_ID = 0, 1

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}<|eos|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Checkpoints with more parameters than this are split into two shards, like real
# HF checkpoints, so loaders must handle ``model.safetensors.index.json``.
_SHARD_THRESHOLD_PARAMS = 100_000_000


def corpus_path() -> Path:
    """The bundled tokenizer training text (shipped as package data)."""
    return Path(__file__).resolve().parent / "data" / "corpus.txt"


def build_tokenizer(vocab_size: int):
    """Train a byte-level BPE on the bundled corpus.

    Byte-level means every string is encodable (no unknown token); the vocabulary
    ends up as min(vocab_size, what the corpus supports). The post-processor
    prepends BOS exactly once, as Llama tokenizers do.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(corpus_path())], trainer)
    assert tok.token_to_id(BOS_TOKEN) == BOS_TOKEN_ID and tok.token_to_id(EOS_TOKEN) == EOS_TOKEN_ID
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A $B:1",
        special_tokens=[(BOS_TOKEN, BOS_TOKEN_ID)],
    )
    return tok


def _weight_specs(cfg: dict[str, int]) -> list[tuple[str, tuple[int, ...], float]]:
    """(name, shape, std) for every tensor, in a fixed order; std 0 means "all ones".

    Embeddings get std 1.0 and projections std 1/sqrt(fan_in) (rather than the
    usual 0.02) so every layer actually mixes information: with tiny weights a
    random model degenerates into repeating one token under greedy decoding,
    which would make generation tests meaningless.
    """
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    head_dim = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * head_dim
    lin = lambda out, inp: ((out, inp), 1.0 / math.sqrt(inp))  # noqa: E731
    specs = [("model.embed_tokens.weight", (v, h), 1.0)]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        specs.append((p + "input_layernorm.weight", (h,), 0.0))
        for name, (shape, std) in [("q_proj", lin(h, h)), ("k_proj", lin(kv, h)),
                                   ("v_proj", lin(kv, h)), ("o_proj", lin(h, h))]:
            specs.append((p + f"self_attn.{name}.weight", shape, std))
        specs.append((p + "post_attention_layernorm.weight", (h,), 0.0))
        for name, (shape, std) in [("gate_proj", lin(inter, h)), ("up_proj", lin(inter, h)),
                                   ("down_proj", lin(h, inter))]:
            specs.append((p + f"mlp.{name}.weight", shape, std))
    specs.append(("model.norm.weight", (h,), 0.0))
    specs.append(("lm_head.weight", (v, h), 1.0 / math.sqrt(h)))
    return specs


def _write_weights(out: Path, cfg: dict[str, int], seed: int, dtype: torch.dtype, n_tokens: int) -> None:
    """Generate and save weights one shard at a time so peak memory is ~one shard.

    ``lm_head`` rows for ids the tokenizer never produces (>= ``n_tokens``; the
    bench vocab exceeds what the corpus supports) are zeroed, so greedy decoding
    only picks decodable tokens.
    """
    specs = _weight_specs(cfg)
    total = sum(math.prod(s) for _, s, _ in specs)
    num_shards = 2 if total > _SHARD_THRESHOLD_PARAMS else 1
    # Assign tensors to shards by cumulative size, keeping the global order.
    shard_of, seen = [], 0
    for _, shape, _ in specs:
        shard_of.append(min(num_shards - 1, seen * num_shards // total))
        seen += math.prod(shape)
    files = (["model.safetensors"] if num_shards == 1 else
             [f"model-{k + 1:05d}-of-{num_shards:05d}.safetensors" for k in range(num_shards)])

    gen = torch.Generator().manual_seed(seed)  # one stream, consumed in global order
    weight_map = {}
    for k, fname in enumerate(files):
        tensors = {}
        for (name, shape, std), s in zip(specs, shard_of):
            if s != k:
                continue
            t = torch.ones(shape) if std == 0.0 else torch.randn(shape, generator=gen).mul_(std)
            if name == "lm_head.weight":
                t[n_tokens:] = 0.0
            tensors[name] = t.to(dtype)
            weight_map[name] = fname
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        del tensors
    if num_shards > 1:
        index = {"metadata": {"total_size": total * dtype.itemsize}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def write_demo_model(out_dir: str | Path, preset: str = "tiny", seed: int = 0,
                     dtype: str = "float32") -> Path:
    """Write a complete HF-layout Llama checkpoint for ``preset`` into ``out_dir``."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    if dtype not in _DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; choose from {sorted(_DTYPES)}")
    sizes = PRESETS[preset]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def dump(name: str, obj: dict) -> None:
        (out / name).write_text(json.dumps(obj, indent=2) + "\n")

    dump("config.json", {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", **sizes,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "rope_scaling": None, "hidden_act": "silu",
        "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
        "bos_token_id": BOS_TOKEN_ID, "eos_token_id": EOS_TOKEN_ID, "initializer_range": 0.02,
        "use_cache": True, "torch_dtype": dtype,
    })
    tokenizer = build_tokenizer(sizes["vocab_size"])
    tokenizer.save(str(out / "tokenizer.json"))
    _write_weights(out, sizes, seed, _DTYPES[dtype], tokenizer.get_vocab_size())
    dump("tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN,
        "model_max_length": sizes["max_position_embeddings"], "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    })
    dump("generation_config.json",
         {"bos_token_id": BOS_TOKEN_ID, "eos_token_id": EOS_TOKEN_ID, "do_sample": False})
    for f in out.iterdir():
        apply_umask(f)  # safetensors writes its files 0600
    return out


def ensure_demo_model(preset: str, target: Path, log: Callable[[str], None] | None = None) -> Path:
    """``target`` holding the ``preset`` demo model, written once (into a temp dir renamed into
    place, so a crash never leaves half a model and ranks racing to create it are safe: the
    loser discards its copy and uses the winner's)."""
    if not (target / "config.json").is_file():
        if log:
            log(f"writing the {preset} demo model to {target} (once)")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            write_demo_model(tmp, preset)
            apply_umask(tmp)  # mkdtemp made it 0700
            os.rename(tmp, target)  # atomic; fails if target already exists
        except OSError:
            if not (target / "config.json").is_file():
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def default_model_dir() -> Path:
    """Where the embedded tiny model is cached: $PLEXUS_CACHE, $XDG_CACHE_HOME/plexus or ~/.cache/plexus."""
    base = os.environ.get("PLEXUS_CACHE")
    if not base:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = os.path.join(xdg, "plexus") if xdg else os.path.join(Path.home(), ".cache", "plexus")
    return Path(base) / "demo-tiny"


def print_to_stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def ensure_default_model(log: Callable[[str], None] = print_to_stderr) -> Path:
    """Return the cached tiny demo model, creating it on first use (ensure_demo_model)."""
    target = ensure_demo_model("tiny", default_model_dir())
    log(f"using the embedded tiny demo model (random weights) at {target}")
    return target


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="Write a random-weight demo Llama checkpoint.")
    ap.add_argument("out_dir")
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="float32", choices=sorted(_DTYPES))
    a = ap.parse_args()
    print(write_demo_model(a.out_dir, a.preset, a.seed, a.dtype))
