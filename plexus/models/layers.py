"""Tensor-parallel building blocks (Megatron style), each a small ``nn.Module``.

Every parallel layer is told at construction which Hugging Face tensor(s) it holds and which
slice of them belongs to this rank (from the ShardPlan), and owns ``load(reader)`` to cut that
slice out of the checkpoint. Parameters are allocated empty, so a rank only ever touches memory
for its own share. The collectives they run are stated in each docstring; the model file that
uses them contains none.
"""

from __future__ import annotations

import platform
from typing import Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from plexus.models import kernels
from plexus.parallel.comm import Communicator
from plexus.parallel.hostmem import host_empty
from plexus.quant.qweight import QuantWeight, concat_rows


class TensorReader(Protocol):
    def read_linear(self, prefix: str, dim: int | None = None, start: int = 0,
                    end: int | None = None) -> "torch.Tensor | QuantWeight":
        """Linear weight ``prefix``.weight (or its rows / input columns [start, end)) as stored:
        dense, or a QuantWeight (a pre-quantized checkpoint, or --quantize)."""

    def read(self, name: str, dim: int | None = None, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Tensor ``name`` from the checkpoint, or only [start, end) along ``dim``."""

    def read_into(self, dest: torch.Tensor, name: str, dim: int | None = None, start: int = 0,
                  end: int | None = None) -> None:
        """Like ``dest.copy_(read(...))`` without holding a second full copy of the slice."""


# oneDNN's matmul (the kernel torch.compile picks for CPU linears), where this torch build has it;
# measured on x86-64 only, so used there only
_ONEDNN_LINEAR = (torch.ops.mkldnn._linear_pointwise.default  # .default: skips overload resolution per call
                  if torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
                  and platform.machine().lower() in ("x86_64", "amd64") else None)
ONEDNN_DTYPES = {torch.float32}  # bf16/fp16 weights gain nothing unpacked: F.linear already goes to oneDNN
use_onednn = _ONEDNN_LINEAR is not None  # benchmarks flip this to compare kernels


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T + b, as F.linear. Float32 on the CPU goes to oneDNN instead: for one row of x
    (a decode step) F.linear calls MKL's gemv, which streams W on a single thread, so a rank
    with several cores would get one core's share of the memory bandwidth; oneDNN splits the
    rows of W over all of the rank's threads (1.8-2.5x the GB/s on a 2-core EPYC, see
    docs/benchmarks.md), and is faster for prefill's many rows too."""
    if use_onednn and weight.dtype in ONEDNN_DTYPES and weight.device.type == "cpu":
        if bias is None and x.numel() == weight.shape[1] and kernels.library() is not None:
            # one row (a decode step's LM head): the fused kernel's loop streams faster still
            out = x.new_empty(*x.shape[:-1], weight.shape[0])
            kernels.matvec(weight, x.contiguous(), out)
            return out
        return _ONEDNN_LINEAR(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def _empty(shape, dtype, device) -> nn.Parameter:
    device = torch.device(device)
    t = host_empty(shape, dtype) if device.type == "cpu" else torch.empty(shape, dtype=dtype, device=device)
    return nn.Parameter(t, requires_grad=False)


class _Quantizable:
    """A linear layer whose weight is either ``weight`` (dense) or ``qweight`` (a QuantWeight:
    codes, scales and mins, plexus.quant.qweight), whichever the checkpoint reader returns. A
    layer built ``quantized`` allocates no dense weight; on the torch path (prefill, GPUs, no
    kernel) its weight is dequantized for each call, one layer at a time."""

    qweight: QuantWeight | None = None

    def _set(self, w, dtype: torch.dtype, device) -> None:
        if isinstance(w, QuantWeight):
            self.weight, self.qweight = None, w.to(device)
        else:
            self.weight = nn.Parameter(w.to(device=device, dtype=dtype).contiguous(), requires_grad=False)

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight as a dense tensor: a quantized one dequantized into the scratch buffer that
        every quantized layer of this dtype shares (valid until the next layer's call)."""
        q = self.qweight
        if q is None:
            return self.weight
        if q.device.type == "cpu":
            n = q.shape[0] * q.shape[1]
            buf = _SCRATCH.get(dtype)
            if buf is None or buf.numel() < n:
                buf = _SCRATCH[dtype] = torch.empty(n, dtype=dtype)
            out = buf[:n].view(q.shape)
            if kernels.dequantize_into(q, out):
                return out
        return q.dequantize(dtype)


_SCRATCH: dict = {}  # dtype -> the CPU buffer quantized layers are dequantized into, one at a time


class ColumnParallelLinear(_Quantizable, nn.Module):
    """Y = X A^T with A's output rows split across ranks: A = [A_1; ...; A_p], rank r computes
    X A_r^T. No collective: each rank keeps its slice of Y (its heads, its MLP columns).

    ``sources`` fuses several checkpoint matrices with the same input into one matmul
    (q/k/v, gate/up): [(hf_name, (row_start, row_end)), ...], stacked in order.
    """

    def __init__(self, in_features: int, sources: Sequence[tuple[str, tuple[int, int]]], bias: bool,
                 dtype: torch.dtype, device: torch.device, quantized: bool = False):
        super().__init__()
        self.sources, self.dtype, self.device = list(sources), dtype, device
        self.out_sizes = [b - a for _, (a, b) in self.sources]
        self.weight = None if quantized else _empty((sum(self.out_sizes), in_features), dtype, device)
        self.bias = _empty((sum(self.out_sizes),), dtype, device) if bias else None

    def load(self, reader: TensorReader) -> None:
        row, parts = 0, []
        for (name, (a, b)), n in zip(self.sources, self.out_sizes):
            if self.weight is not None:
                reader.read_into(self.weight[row:row + n], f"{name}.weight", 0, a, b)
            else:
                parts.append(reader.read_linear(name, 0, a, b))
            if self.bias is not None:
                self.bias[row:row + n].copy_(reader.read(f"{name}.bias", 0, a, b))
            row += n
        if parts:
            quantized = [isinstance(p, QuantWeight) for p in parts]
            if all(quantized):
                self._set(concat_rows(parts) if len(parts) > 1 else parts[0], self.dtype, self.device)
            else:  # some of the fused weights stored dense: the whole layer dense
                self._set(torch.cat([p.dequantize(self.dtype) if q else p.to(self.dtype)
                                     for p, q in zip(parts, quantized)]), self.dtype, self.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.dense_weight(x.dtype), self.bias)


class RowParallelLinear(_Quantizable, nn.Module):
    """Y = X A^T with A's input columns split across ranks: A = [A_1 ... A_p] and X = [X_1 ... X_p]
    (X_r is what this rank's column-parallel layer produced). Rank r computes X_r A_r^T, then one
    allreduce sums the partial products into Y on every rank.
    """

    def __init__(self, source: str, columns: tuple[int, int], out_features: int, comm: Communicator,
                 dtype: torch.dtype, device: torch.device, quantized: bool = False):
        super().__init__()
        self.source, self.columns, self.comm, self.dtype, self.device = source, columns, comm, dtype, device
        self.weight = None if quantized else _empty((out_features, columns[1] - columns[0]), dtype, device)

    def load(self, reader: TensorReader) -> None:
        if self.weight is not None:
            reader.read_into(self.weight, f"{self.source}.weight", 1, *self.columns)
        else:
            self._set(reader.read_linear(self.source, 1, *self.columns), self.dtype, self.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.comm.allreduce_(linear(x, self.dense_weight(x.dtype)))


def _stored_quantized(reader: TensorReader, prefix: str) -> bool:
    """Whether ``prefix``.weight is stored in a quantized type (a GGUF file says how each tensor
    is stored; other checkpoints keep embeddings and LM heads dense)."""
    stored = getattr(reader, "tensor_type", None)
    return stored is not None and stored(prefix) not in ("F32", "F16", "BF16")


class VocabParallelEmbedding(_Quantizable, nn.Module):
    """Embedding table split by vocabulary rows. Each rank looks up the ids in its row range,
    writes zeros for the rest, and one allreduce assembles the full embeddings. A table stored
    quantized (GGUF) stays quantized: only the rows looked up are dequantized."""

    def __init__(self, source: str, rows: tuple[int, int], hidden_size: int, comm: Communicator,
                 dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.source, self.rows, self.comm, self.hidden_size = source, rows, comm, hidden_size
        self.dtype, self.device = dtype, torch.device(device)
        self.weight = _empty((self.num_rows, hidden_size), dtype, device)  # untouched pages until read

    @property
    def num_rows(self) -> int:
        return self.rows[1] - self.rows[0]

    def load(self, reader: TensorReader) -> None:
        if _stored_quantized(reader, self.source):
            self._set(reader.read_linear(self.source, 0, *self.rows), self.dtype, self.device)
            return
        reader.read_into(self.weight, f"{self.source}.weight", 0, *self.rows)

    def lookup(self, local: torch.Tensor) -> torch.Tensor:
        """Rows ``local`` (ids minus this rank's first row, all in range) of this rank's table."""
        if self.qweight is None:
            return F.embedding(local, self.weight)
        ids, where = torch.unique(local.reshape(-1), return_inverse=True)
        return self.qweight.take(ids).dequantize(self.dtype)[where].view(*local.shape, self.hidden_size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.comm.size == 1:
            return self.lookup(ids)
        local = ids - self.rows[0]
        outside = (local < 0) | (local >= self.num_rows)
        out = self.lookup(local.clamp(0, self.num_rows - 1))
        out.masked_fill_(outside.unsqueeze(-1), 0)
        return self.comm.allreduce_(out)


class ParallelLMHead(_Quantizable, nn.Module):
    """Logits = H W^T with W split by vocabulary rows: each rank computes its slice of the
    logits, and one gather to rank 0 (which samples) assembles them in vocabulary order.
    With tied embeddings it shares the embedding's rows (dense or quantized) instead of holding
    its own."""

    def __init__(self, source: str, rows: tuple[int, int], hidden_size: int, vocab_sizes: Sequence[int],
                 comm: Communicator, dtype: torch.dtype, device: torch.device,
                 tied: VocabParallelEmbedding | None = None):
        super().__init__()
        self.source, self.rows, self.comm, self.vocab_sizes = source, rows, comm, list(vocab_sizes)
        self.tied = tied is not None
        self._embedding = [tied]  # in a list: not a submodule of the head (the model loads it first)
        self.weight = tied.weight if tied is not None else _empty((rows[1] - rows[0], hidden_size), dtype, device)

    def load(self, reader: TensorReader) -> None:
        if self.tied:
            embedding = self._embedding[0]
            self.weight, self.qweight = embedding.weight, embedding.qweight
            return
        if _stored_quantized(reader, self.source):
            # a quantized head stays quantized: the logits are computed on its codes
            self._set(reader.read_linear(self.source, 0, *self.rows), self.weight.dtype, self.weight.device)
        else:
            reader.read_into(self.weight, f"{self.source}.weight", 0, *self.rows)

    def forward(self, h: torch.Tensor) -> torch.Tensor | None:
        """(..., hidden) -> (..., vocab) float32 logits on rank 0; None on other ranks."""
        q = self.qweight
        if q is not None and h.device.type == "cpu" and h.numel() == q.shape[1] and kernels.library(h.dtype):
            out = torch.empty(q.shape[0])  # one row (a prefill's last position): straight from the codes
            kernels.qmatvec(q, h.reshape(-1).float().contiguous(), out, h.dtype)
            return self.gather(out.view(*h.shape[:-1], q.shape[0]))
        return self.gather(linear(h, self.dense_weight(h.dtype)).float())

    def gather(self, local: torch.Tensor) -> torch.Tensor | None:
        """This rank's slice of the logits -> all of them on rank 0 (None on other ranks)."""
        return self.comm.gather(local, dim=-1, sizes=self.vocab_sizes, root=0)


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 as transformers does. Replicated."""

    def __init__(self, source: str, hidden_size: int, eps: float, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.source, self.eps = source, eps
        self.weight = _empty((hidden_size,), dtype, device)

    def load(self, reader: TensorReader) -> None:
        self.weight.copy_(reader.read(f"{self.source}.weight"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # one fused kernel instead of six ops (per layer, twice, every decode step); the same
        # arithmetic as transformers: normalize in float32, round to x's dtype, then scale
        if not hasattr(F, "rms_norm"):  # torch < 2.4
            xf = x.float()
            return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return self.weight * F.rms_norm(x.float(), self.weight.shape, None, self.eps).to(x.dtype)
