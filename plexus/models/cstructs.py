"""ctypes mirrors of the structs in plexus/models/csrc/decode.c and qdot.h, field for field, and
how a layer's matrix (dense, or a QuantWeight) becomes a ``Mat``, here or as the rows a rank of a
node group hands the previous one to take (decode.c, "Taking rows")."""

from __future__ import annotations

import ctypes
import os

import torch

from plexus.models.node_group import LINE
from plexus.quant.qweight import row_bytes

_OFF = ("0", "off", "false", "no")  # PLEXUS_KERNELS / PLEXUS_TAKE_ROWS values that turn them off


class _Mat(ctypes.Structure):  # struct Mat in csrc/qdot.h: a dense or quantized matrix
    _fields_ = [(n, ctypes.c_void_p) for n in ("w", "q", "s", "m")] + [(n, ctypes.c_long) for n in ("bits", "group")] + [
        ("perm", ctypes.c_void_p), ("ks", ctypes.c_long), ("act8", ctypes.c_long)]


def int8_activations() -> bool:
    """PLEXUS_INT8_ACTIVATIONS=1: quantized layers multiply x rounded to 8 bits a group, with
    integer dot products (csrc/qdot.h, qdot_a8; CPUs with AVX-512 VNNI): faster, no longer
    exactly the dequantized model (as llama.cpp's quantized types). Off by default."""
    return os.environ.get("PLEXUS_INT8_ACTIVATIONS", "0").lower() not in _OFF


def _mat(linear, keep: list) -> _Mat:
    """A layer's matrix for the kernel: its dense ``weight`` or its ``qweight`` (a QuantWeight)."""
    q = getattr(linear, "qweight", None)
    if q is None:
        keep.append(linear.weight)
        return _Mat(linear.weight.data_ptr(), None, None, None, 0, 0, None, 0, 0)
    keep.extend(q.tensors())
    perm = None
    if q.perm is not None:
        perm = q.perm.to(torch.int64).contiguous()
        keep.append(perm)
    return _Mat(None, q.codes.data_ptr(), q.scales.data_ptr(), q.mins.data_ptr(), q.bits, q.group,
                None if perm is None else perm.data_ptr(), q.stored_columns, int(int8_activations()))


class _Layer(ctypes.Structure):  # struct Layer in decode.c, field for field
    _fields_ = [(n, ctypes.c_void_p) for n in ("input_norm", "qkv_bias", "post_norm")] + [
        (n, _Mat) for n in ("qkv", "o", "gate_up", "down")] + [
        (n, ctypes.c_void_p) for n in ("k_cache", "v_cache", "kv_of_q")] + [(n, ctypes.c_long) for n in (
            "num_heads", "num_kv_heads", "head_dim", "hidden", "intermediate", "max_context", "window",
            "kv_blocks")] + [
        ("eps", ctypes.c_float), ("o_tail", _Mat), ("down_tail", _Mat)] + [
        (n, ctypes.c_long) for n in ("tail_rows", "o_tail_cols", "down_tail_cols")]


class _Ends(ctypes.Structure):  # struct Ends in decode.c
    _fields_ = [("embed", _Mat), ("norm", ctypes.c_void_p), ("head", _Mat)] + [
        (n, ctypes.c_long) for n in ("first", "rows", "hidden")] + [("eps", ctypes.c_float), ("own_tail", ctypes.c_long),
        ("head_tail", _Mat), ("tail_first", ctypes.c_long), ("tail_rows", ctypes.c_long)]


class _Scratch(ctypes.Structure):  # struct Scratch in decode.c
    _fields_ = [(n, ctypes.c_void_p) for n in ("normed", "qkv", "attn", "scores", "gate_up")]


def _tail_layout(linear, rows: int) -> tuple:
    """How ``rows`` rows of a layer's matrix travel: ("dense", rows, cols, itemsize) or
    ("quantized", rows, cols, bits, group)."""
    q = linear.qweight
    if q is None:
        return ("dense", rows, linear.weight.shape[1], linear.weight.element_size())
    return ("quantized", rows, q.shape[1], q.bits, q.group)


def _piece_bytes(n: int) -> int:
    return -(-n // LINE) * LINE  # each piece starts on a cache line: its floats stay aligned


def _layout_parts(layout: tuple) -> list[int]:
    """Bytes of each part of a tail as it travels (dense: the rows; quantized: codes, scales, mins)."""
    if layout[0] == "dense":
        _, rows, cols, size = layout
        return [rows * cols * size]
    _, rows, cols, bits, group = layout
    groups = -(-cols // group)
    return [rows * row_bytes(bits, cols), rows * groups * 4, rows * groups * 4]


def _layout_bytes(layout: tuple) -> int:
    return sum(_piece_bytes(n) for n in _layout_parts(layout))


def _tail_pieces(linear, first: int, rows: int) -> list[torch.Tensor]:
    """The bytes of rows [first, first + rows) of a layer's matrix, each part padded as _layout_parts says."""
    q = linear.qweight
    parts = [linear.weight[first:first + rows]] if q is None else list(q.rows(first, first + rows).tensors())
    out = []
    for t in parts:
        b = t.contiguous().reshape(-1).view(torch.uint8)
        out.append(torch.cat([b, b.new_zeros(_piece_bytes(b.numel()) - b.numel())]))
    return out


def _tail_mat(layout: tuple, at: int) -> _Mat:
    """The kernel's view of a tail received at address ``at``."""
    if layout[0] == "dense":
        return _Mat(at, None, None, None, 0, 0, None, 0, 0)
    codes, scales, _ = (_piece_bytes(n) for n in _layout_parts(layout))
    return _Mat(None, at, at + codes, at + codes + scales, layout[3], layout[4], None, 0, int(int8_activations()))


class _Row(ctypes.Structure):  # struct Row in csrc/rows.h: one sequence of a batched step
    _fields_ = [("token", ctypes.c_long), ("pos", ctypes.c_long), ("table", ctypes.c_void_p)]


class _RowScratch(ctypes.Structure):  # struct RowScratch in csrc/rows.h
    _fields_ = [(n, ctypes.c_void_p) for n in ("x", "out", "normed", "qkv", "attn", "gate_up", "scores")]
