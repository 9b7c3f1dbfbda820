"""Model configuration: a frozen dataclass read from a Hugging Face ``config.json``."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from plexus.errors import PlexusError

# architecture name in config.json -> (q/k/v bias by default, ...); all share one model file
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1-style frequency scaling of RoPE (``rope_type: llama3``)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int  # < num_heads means grouped-query attention
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None
    tie_word_embeddings: bool
    attention_bias: bool  # Qwen2 has q/k/v bias
    sliding_window: int | None  # Mistral; None = full attention
    torch_dtype: str
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...] = field(default=())
    # config.json's quantization_config as written (a pre-quantized checkpoint), else None
    quantization_config: dict | None = field(default=None, compare=False, hash=False)

    @property
    def group_size(self) -> int:
        """Query heads that share one KV head."""
        return self.num_heads // self.num_kv_heads

    def num_parameters(self) -> int:
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        attn = h * (q + 2 * kv) + q * h + (q + 2 * kv if self.attention_bias else 0)
        layer = attn + 3 * h * i + 2 * h
        return v * h * (1 if self.tie_word_embeddings else 2) + self.num_layers * layer + h

    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json") -> "ModelConfig":
        archs = d.get("architectures") or []
        arch = archs[0] if archs else {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                                         "qwen2": "Qwen2ForCausalLM"}.get(d.get("model_type", ""), "")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise PlexusError(f"{source}: unsupported architecture {arch or d.get('model_type')!r}; "
                              f"Plexus runs {', '.join(SUPPORTED_ARCHITECTURES)}")
        try:
            heads = int(d["num_attention_heads"])
            hidden = int(d["hidden_size"])
            kv = int(d.get("num_key_value_heads") or heads)
            cfg_fields = dict(
                vocab_size=int(d["vocab_size"]), hidden_size=hidden,
                intermediate_size=int(d["intermediate_size"]), num_layers=int(d["num_hidden_layers"]),
                max_position_embeddings=int(d.get("max_position_embeddings", 2048)))
        except KeyError as e:
            raise PlexusError(f"{source}: missing field {e.args[0]!r}") from None
        if heads <= 0 or kv <= 0 or heads % kv:
            raise PlexusError(f"{source}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}")
        head_dim = int(d.get("head_dim") or hidden // heads)
        # transformers >= 5 writes rope_parameters; older checkpoints rope_theta + rope_scaling
        rope = dict(d.get("rope_parameters") or {})
        theta = float(rope.get("rope_theta", d.get("rope_theta", 10000.0)))
        scaling = d.get("rope_scaling") or rope
        rope_type = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
        rope_scaling = None
        if rope_type == "llama3":
            rope_scaling = RopeScaling(float(scaling["factor"]), float(scaling["low_freq_factor"]),
                                       float(scaling["high_freq_factor"]),
                                       int(scaling["original_max_position_embeddings"]))
        elif rope_type not in ("default", None):
            raise PlexusError(f"{source}: unsupported rope scaling type {rope_type!r} (supported: llama3)")
        if d.get("hidden_act", "silu") != "silu":
            raise PlexusError(f"{source}: unsupported hidden_act {d.get('hidden_act')!r} (supported: silu)")
        window = d.get("sliding_window")
        if arch == "Qwen2ForCausalLM" and not d.get("use_sliding_window", False):
            window = None
        eos = d.get("eos_token_id")
        return cls(
            architecture=arch, num_heads=heads, num_kv_heads=kv, head_dim=head_dim,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_scaling=rope_scaling,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=bool(d.get("attention_bias", arch == "Qwen2ForCausalLM")),
            sliding_window=int(window) if window else None,
            torch_dtype=str(d.get("torch_dtype") or d.get("dtype") or "float32"),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=tuple(eos if isinstance(eos, list) else [] if eos is None else [eos]),
            quantization_config=d.get("quantization_config") or None, **cfg_fields)

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "ModelConfig":
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise PlexusError(f"{model_dir}: no config.json (is this a Hugging Face model directory?)")
        try:
            d = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise PlexusError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(d, str(path))


DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16", "half": "float16"}


def resolve_dtype(name: str | None, config: ModelConfig):
    """The torch dtype to run in: ``name`` if given, else the checkpoint's own."""
    import torch

    key = DTYPES.get((name or config.torch_dtype).lower())
    if key is None:
        where = "--dtype" if name else "torch_dtype in config.json"
        raise PlexusError(f"unsupported dtype {name or config.torch_dtype!r} ({where}; "
                          "use float32, bfloat16 or float16)")
    return getattr(torch, key)


def dtype_size(dtype) -> int:
    return int(math.ceil(dtype.itemsize)) if hasattr(dtype, "itemsize") else 4
