"""Reading a Hugging Face checkpoint: each rank reads only its own slices (plexus.engine.build
puts them into the model).

Files are opened with ``safe_open`` and sliced with ``get_slice``, one tensor at a time, and
closed again, so a rank's memory holds its share plus at most one tensor's file pages. Pickle
checkpoints (``*.bin``, ``*.pt``, ``*.pth``) are refused, never unpickled: model files are
untrusted input. Every problem becomes one PlexusError naming the file and tensor, and all
ranks agree on it before anyone moves on, so no rank is left waiting in a collective.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors import safe_open

from plexus.errors import PlexusError
from plexus.quant.qweight import QuantWeight, quantize

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
READ_BLOCK_BYTES = 4 * 2**20  # large slices are copied into place in blocks of about this size


def checkpoint_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of a model directory (single file or sharded index)."""
    d = Path(model_dir)
    index = d / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise PlexusError(f"{index}: not a valid safetensors index ({e})") from None
        names = sorted(set(weight_map.values()))
        bad = [n for n in names if not n.endswith(".safetensors")]
        if bad:
            raise PlexusError(f"{index}: refers to {bad[0]}, which is not a safetensors file "
                              "(Plexus never unpickles model files)")
        files = [d / n for n in names]
    elif (d / "model.safetensors").is_file():
        files = [d / "model.safetensors"]
    else:
        files = sorted(d.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in d.iterdir() if p.suffix in PICKLE_SUFFIXES) if d.is_dir() else []
        if pickles:
            raise PlexusError(f"{d / pickles[0]}: pickle checkpoints are refused (they can run code when "
                              "loaded); convert the model to safetensors")
        raise PlexusError(f"{d}: no model.safetensors or model.safetensors.index.json")
    for f in files:
        if not f.is_file():
            raise PlexusError(f"{f}: listed in the index but missing")
    return files


def read_header(path: Path) -> dict:
    """The JSON header of a safetensors file: {name: {"dtype", "shape", "data_offsets"}}."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError("file shorter than its 8-byte header length")
            (n,) = struct.unpack("<Q", raw)
            if n > 100 * 2**20:
                raise ValueError(f"header length {n} is implausible")
            header = json.loads(f.read(n))
            size = path.stat().st_size
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise PlexusError(f"{path}: not a readable safetensors file ({e})") from None
    header.pop("__metadata__", None)
    for name, info in header.items():
        if info["data_offsets"][1] + 8 + n > size:
            raise PlexusError(f"{path}: tensor {name} runs past the end of the file (truncated download?)")
    return header


def expected_shapes(config) -> dict[str, tuple[int, ...]]:
    """Every tensor Plexus reads, with its full (unsharded) shape, from the sizes in ``config``
    (a plexus.models.config.ModelConfig: this package reads checkpoints and never imports the
    models)."""
    c = config
    h, d, i = c.hidden_size, c.head_dim, c.intermediate_size
    shapes = {"model.embed_tokens.weight": (c.vocab_size, h), "model.norm.weight": (h,)}
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, h)
    for n in range(c.num_layers):
        p = f"model.layers.{n}"
        shapes.update({
            f"{p}.self_attn.q_proj.weight": (c.num_heads * d, h),
            f"{p}.self_attn.k_proj.weight": (c.num_kv_heads * d, h),
            f"{p}.self_attn.v_proj.weight": (c.num_kv_heads * d, h),
            f"{p}.self_attn.o_proj.weight": (h, c.num_heads * d),
            f"{p}.mlp.gate_proj.weight": (i, h), f"{p}.mlp.up_proj.weight": (i, h),
            f"{p}.mlp.down_proj.weight": (h, i),
            f"{p}.input_layernorm.weight": (h,), f"{p}.post_attention_layernorm.weight": (h,)})
        if c.attention_bias:
            shapes.update({f"{p}.self_attn.q_proj.bias": (c.num_heads * d,),
                           f"{p}.self_attn.k_proj.bias": (c.num_kv_heads * d,),
                           f"{p}.self_attn.v_proj.bias": (c.num_kv_heads * d,)})
    return shapes


class CheckpointReader:
    """Finds each tensor's file from the headers and reads slices of it.

    ``read_linear`` is how a parallel layer reads a linear weight (``prefix`` without
    ``.weight``): as the checkpoint stores it — a dense tensor, or a pre-quantized one converted
    into a QuantWeight by ``quant_format`` (from config.json's quantization_config) — or, with
    ``quant`` = (bits, group) (--quantize), a dense slice quantized as soon as it is read, so a
    rank never holds more than one tensor's slice in 16 or 32 bits."""

    def __init__(self, model_dir: str | Path, config, quant: tuple[int, int] | None = None, quant_format=None):
        self.files = checkpoint_files(model_dir)
        self.location: dict[str, tuple[Path, list[int]]] = {}
        self.nbytes: dict[str, int] = {}  # in the file
        for f in self.files:
            for name, info in read_header(f).items():
                self.location[name] = (f, info["shape"])
                self.nbytes[name] = info["data_offsets"][1] - info["data_offsets"][0]
        self.expected = expected_shapes(config)
        self.bytes_read = 0
        self.quant, self.quant_format = quant, quant_format

    def read_linear(self, prefix: str, dim: int | None = None, start: int = 0,
                    end: int | None = None) -> "torch.Tensor | QuantWeight":
        """Linear weight ``prefix``.weight, or rows (dim 0) / input columns (dim 1) [start, end)
        of it."""
        if self.quant_format is not None:
            return self.quant_format.read_linear(self, prefix, dim, start, end)
        w = self.read(f"{prefix}.weight", dim, start, end)
        if self.quant is None:
            return w
        bits, group = self.quant
        if dim == 1 and start % group:
            raise PlexusError(f"{prefix}.weight: columns from {start} do not start a quantization group of {group}")
        return quantize(w, bits, group)

    def _locate(self, name: str) -> tuple[Path, list[int]]:
        if name not in self.location:
            files = ", ".join(f.name for f in self.files)
            raise PlexusError(f"{self.files[0].parent}: tensor {name} not found in {files}")
        path, shape = self.location[name]
        want = self.expected.get(name)
        if want is not None and tuple(shape) != want:
            raise PlexusError(f"{path.name}: tensor {name} has shape {list(shape)}, expected {list(want)} "
                              "from config.json")
        return path, shape

    def read(self, name: str, dim: int | None = None, start: int = 0, end: int | None = None) -> torch.Tensor:
        path, shape = self._locate(name)
        index = [slice(None)] * len(shape)
        if dim is not None:
            index[dim] = slice(start, end)
        return self._read_piece(path, name, tuple(index))

    def read_into(self, dest: torch.Tensor, name: str, dim: int | None = None, start: int = 0,
                  end: int | None = None) -> None:
        """Copy tensor ``name`` (or [start, end) along ``dim``) into ``dest``, a block of rows at
        a time: peak memory is ``dest`` plus one block, never ``dest`` plus a whole temporary
        copy of a large slice (an embedding shard would otherwise briefly count twice)."""
        path, shape = self._locate(name)
        if len(shape) < 2:
            dest.copy_(self.read(name, dim, start, end))
            return
        index = [slice(None)] * len(shape)
        if dim is not None:
            index[dim] = slice(start, end)
        first, last, _ = index[0].indices(shape[0])
        step = max(1, READ_BLOCK_BYTES * shape[0] // max(1, self.nbytes[name]))  # rows per block
        for a in range(first, last, step):
            b = min(last, a + step)
            index[0] = slice(a, b)
            dest[a - first:b - first].copy_(self._read_piece(path, name, tuple(index)))

    def _read_piece(self, path: Path, name: str, index: tuple) -> torch.Tensor:
        try:
            # opened per piece: the file's pages it mapped are released with it
            with safe_open(str(path), framework="pt") as f:
                t = f.get_slice(name)[index]
        except Exception as e:  # safetensors raises its own error types
            raise PlexusError(f"{path.name}: cannot read tensor {name} ({e})") from None
        self.bytes_read += t.numel() * t.element_size()
        return t
