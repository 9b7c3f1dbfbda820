"""GGUF checkpoints (llama.cpp's files): ``--model file.gguf`` or a directory holding one.

- ``find_gguf(path)``: the .gguf file ``path`` names (or the one in directory ``path``);
- ``gguf_config(path)``: a Hugging Face-style config dict from the metadata (llama -- which
  is also how llama.cpp stores Mistral -- and qwen2), for ModelConfig.from_dict;
- ``GGUFCheckpoint(path, config)``: a reader with CheckpointReader's interface, by Hugging Face
  tensor names; quantized tensors come out of ``read_linear`` as QuantWeights holding the file's
  values exactly (plexus.checkpoint.gguf_quants), and dense (dequantized) out of ``read``.

llama.cpp's converter permutes the rows of a llama model's Q and K projections (its RoPE pairs
neighbouring dimensions, Hugging Face's pairs the two halves of a head); reading undoes it, row by
row, which is exact on quantized rows too. A rank reads only the rows (and whole blocks of
columns) of its slice, through a memory map.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import torch

from plexus.checkpoint.gguf_file import TYPES, GGUFFile, TensorInfo, open_gguf
from plexus.checkpoint.gguf_quants import to_weight
from plexus.checkpoint.reader import READ_BLOCK_BYTES, expected_shapes
from plexus.errors import PlexusError
from plexus.quant.qweight import QuantWeight, quantize

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
PERMUTED = ("llama",)  # architectures whose Q/K rows llama.cpp permutes
SUPPORTED_TYPES = tuple(t[0] for t in TYPES.values())

_LAYER = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
          "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
          "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
_GLOBAL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_HF_LAYER = {v: k for k, v in _LAYER.items()}
_HF_GLOBAL = {v: k for k, v in _GLOBAL.items()}
_HF_NAME = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)$")


def find_gguf(path: str | Path) -> Path | None:
    """``path`` if it is a .gguf file; the one .gguf file in directory ``path``; else None."""
    p = Path(path)
    if p.is_file():
        return p if p.suffix.lower() == ".gguf" else None
    if not p.is_dir():
        return None
    found = sorted(f for f in p.iterdir() if f.suffix.lower() == ".gguf" and f.is_file())
    if len(found) > 1:
        raise PlexusError(f"{p}: holds {len(found)} .gguf files ({', '.join(f.name for f in found[:4])}); "
                          "name the one to run with --model DIR/FILE.gguf")
    return found[0] if found else None


def gguf_name(hf_name: str) -> str | None:
    """model.layers.3.self_attn.q_proj.weight -> blk.3.attn_q.weight (None: no such tensor)."""
    m = _HF_NAME.match(hf_name)
    if m:
        part = _HF_LAYER.get(m.group(2))
        return None if part is None else f"blk.{m.group(1)}.{part}.{m.group(3)}"
    stem, _, kind = hf_name.rpartition(".")
    part = _HF_GLOBAL.get(stem)
    return None if part is None or kind not in ("weight", "bias") else f"{part}.{kind}"


def _meta(g: GGUFFile, key: str, kind=int, default=None, required: bool = False):
    if key not in g.metadata:
        if required:
            raise PlexusError(f"{g.path}: metadata {key} is missing (expected {kind.__name__})")
        return default
    v = g.metadata[key]
    if isinstance(v, np.ndarray) and v.size and kind is int:  # per-layer counts: must all agree
        if (v != v.flat[0]).any():
            raise PlexusError(f"{g.path}: metadata {key} differs between layers ({v.tolist()[:8]}...); "
                              "Plexus needs one value for every layer")
        v = v.flat[0].item()
    try:
        if kind is str:
            if not isinstance(v, str):
                raise TypeError
            return v
        if isinstance(v, (str, list, np.ndarray)):
            raise TypeError
        out = kind(v)
        if kind is float:
            if not math.isfinite(out):
                raise ValueError
            if float(np.float32(out)) == out:  # a float32 in the file: 1e-06, not 9.99999997e-07
                out = float(str(np.float32(out)))
        return out
    except (TypeError, ValueError):
        raise PlexusError(f"{g.path}: metadata {key} is {v!r}, expected {kind.__name__}") from None


def architecture(g: GGUFFile) -> str:
    arch = _meta(g, "general.architecture", str, required=True)
    if arch not in ARCHITECTURES:
        raise PlexusError(f"{g.path}: unsupported GGUF architecture {arch!r}; Plexus runs "
                          f"{', '.join(ARCHITECTURES)} (Mistral models are stored as llama)")
    return arch


def _tensor(g: GGUFFile, name: str) -> TensorInfo:
    t = g.tensors.get(name)
    if t is None:
        raise PlexusError(f"{g.path}: tensor {name} not found")
    return t


def _rope_scaling(g: GGUFFile, arch: str, theta: float, head_dim: int) -> dict | None:
    """llama3 rope scaling: llama.cpp writes no parameters, only ``rope_freqs`` (one factor per
    frequency); recover the parameters and check they give those factors back."""
    kind = _meta(g, f"{arch}.rope.scaling.type", str)
    if kind not in (None, "none"):
        return {"rope_type": kind, "factor": _meta(g, f"{arch}.rope.scaling.factor", float, 1.0),
                "original_max_position_embeddings": _meta(g, f"{arch}.rope.scaling.original_context_length")}
    t = g.tensors.get("rope_freqs.weight")
    if t is None:
        return None
    if t.type_name != "F32" or t.dims != (head_dim // 2,):
        raise PlexusError(f"{g.path}: tensor rope_freqs.weight is {t.type_name} {list(t.shape)}, "
                          f"expected F32 [{head_dim // 2}]")
    factors = g.rows(t, 0, 1).view(np.float32).reshape(-1).astype(np.float64)
    if np.allclose(factors, 1.0):
        return None
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / freqs
    factor, orig = float(factors.max()), 8192  # llama.cpp's converter defaults the latter too
    smooth = [(w, f) for w, f in zip(wavelen, factors) if not (np.isclose(f, 1) or np.isclose(f, factor))]
    low, high = 1.0, 4.0
    if len(smooth) >= 2:  # 1/f = (1 - s)/factor + s, s = orig/wavelen * a - b: two points give a, b
        (w1, f1), (w2, f2) = smooth[0], smooth[-1]
        s1, s2 = ((1 / f - 1 / factor) / (1 - 1 / factor) for f in (f1, f2))
        a = (s1 - s2) / (orig / w1 - orig / w2)  # = 1 / (high - low)
        b = orig / w1 * a - s1                    # = low / (high - low)
        low, high = b / a, b / a + 1 / a
    scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
               "original_max_position_embeddings": orig}
    if not np.allclose(_llama3_factors(wavelen, scaling), factors, rtol=1e-4, atol=1e-6):
        raise PlexusError(f"{g.path}: tensor rope_freqs.weight holds frequency factors that are not llama3 "
                          "rope scaling (the only kind Plexus runs)")
    return scaling


def _llama3_factors(wavelen: np.ndarray, s: dict) -> np.ndarray:
    orig, factor = s["original_max_position_embeddings"], s["factor"]
    low, high = s["low_freq_factor"], s["high_freq_factor"]
    smooth = (orig / wavelen - low) / (high - low)
    mid = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < orig / high, 1.0, np.where(wavelen > orig / low, factor, mid))


def gguf_config(path: str | Path) -> dict:
    """A Hugging Face config dict (what ModelConfig.from_dict reads) from the GGUF's metadata
    and tensor shapes."""
    g = open_gguf(find_gguf(path) or path)
    arch = architecture(g)
    m = lambda key, kind=int, default=None, required=False: _meta(g, f"{arch}.{key}", kind, default, required)  # noqa: E731
    heads = m("attention.head_count", required=True)
    kv = m("attention.head_count_kv", default=heads)
    hidden = m("embedding_length", required=True)
    embd = _tensor(g, "token_embd.weight")
    q = _tensor(g, "blk.0.attn_q.weight")
    if heads <= 0 or q.shape[0] % heads:
        raise PlexusError(f"{g.path}: tensor blk.0.attn_q.weight has {q.shape[0]} rows, not a multiple of "
                          f"{arch}.attention.head_count = {heads}")
    head_dim = q.shape[0] // heads
    for key in ("attention.key_length", "rope.dimension_count"):
        stated = m(key)
        if stated is not None and stated != head_dim:
            raise PlexusError(f"{g.path}: metadata {arch}.{key} = {stated}, expected the head size {head_dim} "
                              "(partial rotary embeddings are not supported)")
    theta = m("rope.freq_base", float, 10000.0)
    dense = [t.type_name for t in g.tensors.values() if len(t.dims) == 2 and not t.quantized]
    dtype = max(set(dense), key=dense.count) if dense else "F16"
    eos = [_meta(g, f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    d = {
        "architectures": [ARCHITECTURES[arch]], "model_type": arch,
        "hidden_size": hidden, "intermediate_size": m("feed_forward_length", required=True),
        "num_hidden_layers": m("block_count", required=True),
        "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": head_dim,
        "vocab_size": embd.shape[0], "max_position_embeddings": m("context_length", default=2048),
        "rms_norm_eps": m("attention.layer_norm_rms_epsilon", float, required=True),
        "rope_theta": theta, "rope_scaling": _rope_scaling(g, arch, theta, head_dim),
        "tie_word_embeddings": "output.weight" not in g.tensors,
        "attention_bias": "blk.0.attn_q.bias" in g.tensors,
        "torch_dtype": {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}[dtype],
        "bos_token_id": _meta(g, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": list(dict.fromkeys(e for e in eos if e is not None)) or None,
        "hidden_act": "silu",
    }
    return d


# (bits, group) of the QuantWeight each quantized type becomes (plexus.checkpoint.gguf_quants)
QUANT_FORMATS = {"Q4_0": (4, 32), "Q4_1": (4, 32), "Q5_0": (8, 32), "Q5_1": (8, 32), "Q8_0": (8, 32),
                 "Q4_K": (4, 32), "Q5_K": (8, 32), "Q6_K": (8, 16)}


def gguf_layout(path: str | Path) -> dict | None:
    """For the planner, from the header alone: how the decoder layers' linear weights will be
    held -- {"bits": the widest codes, "group": the smallest group, "align": the input columns
    a row-parallel split must land on (256 where a K-quant is), "types": {type: count},
    "embed" and "head": (bits, group) of the embedding table and of an untied LM head where
    they are stored quantized, else None} -- or None when the layers are all dense
    (F32/F16/BF16)."""
    g = open_gguf(find_gguf(path) or path)
    layer = [t for n, t in g.tensors.items() if n.startswith("blk.") and n.endswith(".weight") and len(t.dims) == 2]
    quant = [t for t in layer if t.type_name in QUANT_FORMATS]
    if not quant:
        return None
    ends = {n: QUANT_FORMATS[g.tensors[n].type_name] for n in ("token_embd.weight", "output.weight")
            if n in g.tensors and g.tensors[n].type_name in QUANT_FORMATS}
    types: dict[str, int] = {}
    for t in layer:
        types[t.type_name] = types.get(t.type_name, 0) + 1
    return {"bits": max(QUANT_FORMATS[t.type_name][0] for t in quant),
            "group": min(QUANT_FORMATS[t.type_name][1] for t in quant),
            "align": max(t.block for t in quant), "types": types,
            "embed": ends.get("token_embd.weight"), "head": ends.get("output.weight")}


class GGUFCheckpoint:
    """CheckpointReader's interface over a GGUF file (see the module docstring). ``quant`` =
    (bits, group) quantizes the file's dense (F16/BF16/F32) linear weights as they are read
    (--quantize); quantized ones are kept as stored."""

    def __init__(self, path: str | Path, config, quant: tuple[int, int] | None = None):
        self.path = find_gguf(path) or Path(path)
        self.g = open_gguf(self.path)
        self.arch = architecture(self.g)
        self.config, self.quant = config, quant
        self.bytes_read = 0
        self.expected = expected_shapes(config)
        self.tied = "output.weight" not in self.g.tensors
        for name in self.expected:  # every tensor the model reads: present, readable, the right shape
            self._info(name)

    # ---- names, types, units -------------------------------------------------------------

    def _info(self, hf_name: str) -> TensorInfo:
        name = gguf_name(hf_name)
        if name == "output.weight" and self.tied:
            name = "token_embd.weight"  # the LM head of a tied model is the embedding table
        t = self.g.tensors.get(name) if name else None
        if t is None:
            raise PlexusError(f"{self.path}: tensor {name or hf_name} (for {hf_name}) not found")
        if not t.supported:
            raise PlexusError(f"{self.path}: tensor {t.name} has type {t.type_name}, which Plexus does not read "
                              f"(expected one of {', '.join(SUPPORTED_TYPES)})")
        want = self.expected.get(hf_name) or self.expected.get(hf_name.replace("lm_head", "model.embed_tokens"))
        if want is not None and tuple(t.shape) != tuple(want):
            raise PlexusError(f"{self.path}: tensor {t.name} has shape {list(t.shape)}, expected {list(want)} "
                              "from the metadata")
        return t

    def tensor_type(self, prefix: str) -> str:
        """The GGUF type of ``prefix``.weight: F32, F16, BF16, Q8_0, Q4_K, ..."""
        return self._info(f"{prefix}.weight").type_name

    def block_unit(self, prefix: str) -> int:
        """Input columns of ``prefix``.weight that a slice must start (and end) on: the type's
        block (32; 256 for K-quants; 1 for dense tensors, or the --quant-group)."""
        t = self._info(f"{prefix}.weight")
        if t.quantized:
            return t.block
        return self.quant[1] if self.quant else 1

    # ---- rows: the Q/K permutation ----------------------------------------------------------

    def _row_map(self, hf_name: str, t: TensorInfo) -> np.ndarray | None:
        """For Q/K of a llama-arch file: file row of each Hugging Face row; None: the identity."""
        if self.arch not in PERMUTED or not re.search(r"\.attn_[qk]\.", t.name):
            return None
        heads = self.config.num_heads if ".attn_q." in t.name else self.config.num_kv_heads
        rows = t.shape[0]
        if rows % (2 * heads):
            raise PlexusError(f"{self.path}: tensor {t.name} has {rows} rows, not 2 x a multiple of {heads} heads")
        # llama.cpp's permute: file row g holds HF row p[g]; invert it
        p = np.arange(rows).reshape(heads, 2, rows // heads // 2).swapaxes(1, 2).reshape(-1)
        return np.argsort(p)

    def _raw(self, t: TensorInfo, hf_name: str, r0: int, r1: int, b0: int = 0, b1: int | None = None) -> np.ndarray:
        """Raw blocks of HF rows [r0, r1) (Q/K un-permuted), blocks [b0, b1) of each."""
        rmap = self._row_map(hf_name, t) if len(t.shape) == 2 else None
        if rmap is None:
            raw = self.g.rows(t, r0, r1, b0, b1)
        else:
            want = rmap[r0:r1]
            lo, hi = (int(want.min()), int(want.max()) + 1) if len(want) else (0, 0)
            raw = self.g.rows(t, lo, hi, b0, b1)[want - lo]
        self.bytes_read += raw.nbytes
        return raw

    def _rows_of(self, t: TensorInfo, dim: int | None, start: int, end: int | None) -> tuple[int, int, int, int]:
        """(r0, r1, c0, c1): the rows and columns a read along ``dim`` covers."""
        rows, cols = (t.shape[0], t.shape[1]) if len(t.shape) == 2 else (1, t.shape[0])
        if dim not in (None, 0, 1) or (dim == 1 and len(t.shape) != 2):
            raise PlexusError(f"{self.path}: tensor {t.name} {list(t.shape)} cannot be cut along dimension {dim}")
        r0, r1, c0, c1 = 0, rows, 0, cols
        size = cols if dim == 1 or len(t.shape) == 1 else rows
        end = size if end is None else end
        if dim is not None and not 0 <= start <= end <= size:
            raise PlexusError(f"{self.path}: tensor {t.name}: slice {start}-{end} is outside its {size}")
        if dim == 0:
            r0, r1 = start, end
            if len(t.shape) == 1:
                r0, r1, c0, c1 = 0, 1, start, end
        elif dim == 1:
            c0, c1 = start, end
        return r0, r1, c0, c1

    # ---- the reader interface --------------------------------------------------------------

    def _dense(self, t: TensorInfo, hf_name: str, r0, r1, c0, c1) -> torch.Tensor:
        b0, b1 = c0 // t.block, -(-c1 // t.block)
        w = to_weight(t.type_name, self._raw(t, hf_name, r0, r1, b0, b1))
        if isinstance(w, QuantWeight):
            w = w.dequantize(torch.float32)
        return w[:, c0 - b0 * t.block:c1 - b0 * t.block]

    def read(self, name: str, dim: int | None = None, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Tensor ``name`` (a Hugging Face name), or [start, end) along ``dim``: dense, in the
        stored dtype (quantized tensors dequantized to float32)."""
        t = self._info(name)
        r0, r1, c0, c1 = self._rows_of(t, dim, start, end)
        if len(t.shape) == 1:
            rmap = self._row_map(name, t)  # a permuted Q/K bias: its elements are the rows
            if rmap is None:
                return self._dense(t, name, 0, 1, c0, c1).reshape(-1)
            return self._dense(t, name, 0, 1, 0, t.shape[0]).reshape(-1)[torch.from_numpy(rmap[c0:c1])]
        return self._dense(t, name, r0, r1, c0, c1)

    def read_into(self, dest: torch.Tensor, name: str, dim: int | None = None, start: int = 0,
                  end: int | None = None) -> None:
        """``dest.copy_(read(...))``, a block of rows at a time (never a second full copy)."""
        t = self._info(name)
        r0, r1, c0, c1 = self._rows_of(t, dim, start, end)
        if len(t.shape) == 1:
            dest.copy_(self.read(name, dim, start, end))
            return
        step = max(1, READ_BLOCK_BYTES // max(1, t.row_bytes))
        for a in range(r0, r1, step):
            b = min(r1, a + step)
            dest[a - r0:b - r0].copy_(self._dense(t, name, a, b, c0, c1))

    def read_linear(self, prefix: str, dim: int | None = None, start: int = 0,
                    end: int | None = None) -> "torch.Tensor | QuantWeight":
        """Linear weight ``prefix``.weight (also ``lm_head``, and ``model.embed_tokens`` for the
        embedding table), or its rows (dim 0) / input columns (dim 1) [start, end): a QuantWeight
        for a quantized type, else the dense tensor (quantized now under ``quant``). Columns must
        fall on block_unit(prefix)."""
        name = f"{prefix}.weight"
        t = self._info(name)
        if len(t.shape) != 2:
            raise PlexusError(f"{self.path}: tensor {t.name} {list(t.shape)} is not a matrix")
        r0, r1, c0, c1 = self._rows_of(t, dim, start, end)
        unit = self.block_unit(prefix)
        if dim == 1 and (c0 % unit or (c1 % unit and c1 != t.shape[1])):
            raise PlexusError(f"{self.path}: tensor {t.name} ({t.type_name}): input columns {c0}-{c1} do not "
                              f"fall on its blocks of {unit} columns")
        if t.quantized:
            return to_weight(t.type_name, self._raw(t, name, r0, r1, c0 // t.block, c1 // t.block))
        w = self._dense(t, name, r0, r1, c0, c1)
        return w if self.quant is None else quantize(w, *self.quant)
