"""GPTQ and AWQ checkpoints: int32 words of 4- or 8-bit codes, float16 scales and packed zero
points per group of input columns, converted into QuantWeight (see plexus.checkpoint.quant_base).

GPTQ (AutoGPTQ / GPTQModel; ``quant_method: gptq``), per linear ``prefix``:

- ``qweight`` int32 (in * bits / 32, out): packed along the input, word k of column o holds inputs
  k*p .. k*p+p-1 (p = 32 // bits), input k*p+j in bits [j*bits, (j+1)*bits);
- ``qzeros`` int32 (groups, out * bits / 32): zero points packed along the output the same way;
- ``scales`` float16 (groups, out); ``g_idx`` int32 (in,): the group of each input column;
- W[o, i] = scales[g, o] * (q[i, o] - z[g, o]) with g = g_idx[i].

``checkpoint_format: gptq`` (v1, the default) stores the zero points minus one. They are decoded
as GPTQModel does (utils/model.py, convert_gptq_v1_to_v2_format_module): the int32 word plus
0x11111111 (4 bits) or 0x01010101 (8 bits), carries included, which exactly inverts GPTQModel's
own v2 -> v1 export (a word minus that constant, borrows included). Where no stored nibble is 15
this equals AutoGPTQ's per-field "z + 1"; where one is, the older kernels read a zero of 16 and
GPTQModel carries into the next field, and Plexus follows GPTQModel. ``gptq_v2`` stores the zero
points as they are. ``desc_act`` (act-order) checkpoints have a g_idx that is not column // group:
the weight's columns are stored sorted by group (QuantWeight.perm); a rank's input-column
(row-parallel) slice of such a weight reads every group's scales and zeros and is stored in
padded runs (quant_base.assemble_columns).

AWQ (AutoAWQ, ``quant_method: awq``, ``version: gemm``), 4-bit only:

- ``qweight`` int32 (in, out / 8) and ``qzeros`` int32 (groups, out / 8): packed along the output,
  8 outputs a word in AWQ's interleaved order: field f of word k holds output 8k + [0, 2, 4, 6,
  1, 3, 5, 7][f] (AutoAWQ's WQLinear_GEMM.from_linear);
- ``scales`` float16 (groups, out); W[o, i] = scales[g, o] * (q[i, o] - z[g, o]), g = i // group.
"""

from __future__ import annotations

import re

import torch

from plexus.checkpoint.quant_base import (Format, act_order_perm, assemble, assemble_columns, locate,
                                          read_checked, unpack_words)
from plexus.errors import PlexusError

AWQ_FIELD_OF_OUTPUT = [0, 4, 1, 5, 2, 6, 3, 7]  # output j of a word sits in field [j] (AutoAWQ's reverse order)
V1_ONES = {4: 0x11111111, 8: 0x01010101}


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


class GPTQFormat(Format):
    method = "gptq"

    def __init__(self, source: str, bits: int, group_size: int, sym: bool, desc_act: bool, v1: bool):
        pack = 32 // bits
        group = None if group_size == -1 else group_size
        super().__init__(source, bits, group, align=pack if group is None else group, row_align=pack)
        self.sym, self.act_order, self.v1 = sym, desc_act, v1
        self.only: list[str] | None = None  # modules_in_block_to_quantize: name suffixes

    def quantized(self, prefix: str) -> bool:
        if self.only is not None and not any(prefix.endswith("." + s) for s in self.only):
            return False
        return super().quantized(prefix)

    def marker(self, prefix: str) -> str:
        return f"{prefix}.qweight"

    def what(self) -> str:
        return (f"{self.source}'s quantization_config (gptq, {self.bits}-bit, group_size "
                f"{self.group or -1})")

    def shape(self, reader, prefix: str) -> tuple[int, int]:
        want = reader.expected.get(f"{prefix}.weight")
        if want is not None:
            return want
        _, (rows, out) = reader._locate(f"{prefix}.qweight")
        g = reader.location.get(f"{prefix}.g_idx")
        return out, (g[1][0] if g is not None else rows * (32 // self.bits))

    def read(self, reader, prefix, out, cols, dim, start, end):
        bits, pack, what = self.bits, 32 // self.bits, self.what()
        group = self.group or cols
        groups = _ceil(cols, group)
        qw, qz, sc, gi = (f"{prefix}.{n}" for n in ("qweight", "qzeros", "scales", "g_idx"))
        locate(reader, qw, (_ceil(cols, pack), out), what)
        locate(reader, qz, (groups, _ceil(out, pack)), what)
        locate(reader, sc, (groups, out), what)
        if dim == 0:
            self.check_rows(qz, start, end, out, pack)
        elif dim == 1:
            self.check_columns(qw, start, end, cols, pack)
        perm = g_idx = None
        if gi in reader.location or self.act_order:
            g_idx = read_checked(reader, gi, (cols,), what)
            if g_idx.min() < 0 or g_idx.max() >= groups:
                raise PlexusError(f"{reader.location[gi][0].name}: tensor {gi} names groups outside 0-{groups - 1}")
            perm = act_order_perm(gi, g_idx, group, cols)
        if dim == 0:
            q = reader.read(qw, 1, start, end)
            z = reader.read(qz, 1, start // pack, _ceil(end, pack))
            s = reader.read(sc, 1, start, end)
            ncols, nrows = cols, end - start
        elif dim == 1:
            q = reader.read(qw, 0, start // pack, _ceil(end, pack))
            g0, g1 = (0, groups) if perm is not None else (start // group, _ceil(end, group))  # act-order: any group
            z, s = reader.read(qz, 0, g0, g1), reader.read(sc, 0, g0, g1)
            ncols, nrows = end - start, out
        else:
            q, z, s = reader.read(qw), reader.read(qz), reader.read(sc)
            ncols, nrows = cols, out
        self.check_dtypes(reader, (qw, q, "int32"), (qz, z, "int32"))
        s = _scales(reader, sc, s)
        if self.v1:
            z = z.to(torch.int64) + V1_ONES[bits]  # unpack_words keeps the low 32 bits: the carry out drops
        codes = unpack_words(q, bits, axis=0)[:ncols].t()
        zeros = unpack_words(z, bits, axis=1)[:, :nrows].t().float()
        if dim == 1 and perm is not None:
            return assemble_columns(codes, s.t(), zeros, bits, group, g_idx, start)
        return assemble(codes, s.t(), zeros, bits, group, perm)

    @staticmethod
    def check_dtypes(reader, *items) -> None:
        for name, t, want in items:
            if t.dtype != getattr(torch, want):
                raise PlexusError(f"{reader.location[name][0].name}: tensor {name} is {t.dtype}, expected {want}")


class AWQFormat(Format):
    method = "awq"

    def __init__(self, source: str, group_size: int):
        group = None if group_size == -1 else group_size
        super().__init__(source, 4, group, align=1 if group is None else group, row_align=8)

    def marker(self, prefix: str) -> str:
        return f"{prefix}.qweight"

    def shape(self, reader, prefix: str) -> tuple[int, int]:
        want = reader.expected.get(f"{prefix}.weight")
        if want is not None:
            return want
        _, (cols, _) = reader._locate(f"{prefix}.qweight")
        _, (_, out) = reader._locate(f"{prefix}.scales")
        return out, cols

    def read(self, reader, prefix, out, cols, dim, start, end):
        what = f"{self.source}'s quantization_config (awq gemm, 4-bit, group_size {self.group or -1})"
        group = self.group or cols
        groups = _ceil(cols, group)
        qw, qz, sc = (f"{prefix}.{n}" for n in ("qweight", "qzeros", "scales"))
        if out % 8:
            raise PlexusError(f"{prefix}: AWQ packs 8 output rows per int32 word, but the weight has {out} rows")
        locate(reader, qw, (cols, out // 8), what)
        locate(reader, qz, (groups, out // 8), what)
        locate(reader, sc, (groups, out), what)
        if dim == 0:
            self.check_rows(qw, start, end, out, 8)
            q = reader.read(qw, 1, start // 8, end // 8)
            z = reader.read(qz, 1, start // 8, end // 8)
            s = reader.read(sc, 1, start, end)
        elif dim == 1:
            self.check_columns(qw, start, end, cols, 1)
            g0, g1 = start // group, _ceil(end, group)
            q, z, s = reader.read(qw, 0, start, end), reader.read(qz, 0, g0, g1), reader.read(sc, 0, g0, g1)
        else:
            q, z, s = reader.read(qw), reader.read(qz), reader.read(sc)
        GPTQFormat.check_dtypes(reader, (qw, q, "int32"), (qz, z, "int32"))
        s = _scales(reader, sc, s)
        codes = unpack_words(q, 4, axis=1, order=AWQ_FIELD_OF_OUTPUT).t()
        zeros = unpack_words(z, 4, axis=1, order=AWQ_FIELD_OF_OUTPUT).t().float()
        return assemble(codes, s.t(), zeros, 4, group)


def _scales(reader, name: str, s: torch.Tensor) -> torch.Tensor:
    if not s.is_floating_point():
        raise PlexusError(f"{reader.location[name][0].name}: tensor {name} is {s.dtype}, expected float16")
    s = s.float()
    if not torch.isfinite(s).all():
        raise PlexusError(f"{reader.location[name][0].name}: tensor {name} holds non-finite scales")
    return s


def gptq_dynamic(fmt: GPTQFormat, dynamic, bad) -> None:
    """GPTQModel's per-module ``dynamic`` rules: "-:regex" leaves matching modules unquantized;
    a positive rule that changes bits, group_size, sym or desc_act is not supported."""
    if not dynamic:
        return
    if not isinstance(dynamic, dict):
        bad("dynamic", dynamic, "a map of module patterns")
    for pattern, override in dynamic.items():
        if pattern.startswith("-:"):
            fmt.skip_re.append(pattern[2:])
            continue
        pat = pattern[2:] if pattern.startswith("+:") else pattern
        re.compile(pat)
        mine = {"bits": fmt.bits, "group_size": fmt.group or -1, "sym": fmt.sym, "desc_act": fmt.act_order}
        changed = [k for k, v in (override or {}).items() if k in mine and v != mine[k]]
        if changed:
            bad(f"dynamic[{pattern!r}].{changed[0]}", override[changed[0]],
                "one bits/group_size/sym/desc_act for every module (per-module overrides)")
