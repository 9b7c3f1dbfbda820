"""compressed-tensors ``pack-quantized`` checkpoints (llm-compressor's W4A16 / W8A16), read into
QuantWeight and written by ``plexus quantize``.

The layout (compressed_tensors 0.20, compressors/pack_quantized), per linear ``prefix``:

- ``weight_packed`` int32 (out, ceil(in * bits / 32)): the signed codes q in [-2^(b-1), 2^(b-1))
  plus 2^(b-1), i.e. unsigned codes u, 32 // bits of them a word along the input, lowest bits
  first (input 8k + j of a 4-bit row in bits [4j, 4j + 4) of word k), the row's last word padded
  with zero fields;
- ``weight_scale`` (out, groups) in the model's float dtype (groups = 1 for the channel strategy);
- ``weight_zero_point`` int32 (ceil(out * bits / 32), groups), asymmetric schemes only: the signed
  zero points plus 2^(b-1), packed the same way but along the output (dim 0);
- ``weight_shape`` int64 [out, in]; ``weight_g_idx`` (in,) in older act-order ("group") files;
- W = (q - zp) * scale = scale * (u - z): for symmetric schemes z = 2^(b-1).

Plexus's own codes are the same unsigned u and zero points z, so reading and writing are exact:
``plexus quantize`` writes float16 scales, which hold Plexus's float16-rounded scales exactly.
"""

from __future__ import annotations

import re

import torch

from plexus.checkpoint.quant_base import (Format, act_order_perm, assemble, assemble_columns, locate, read_checked,
                                          unpack_words)
from plexus.errors import PlexusError
from plexus.quant.qweight import QuantWeight

LAYOUT_VERSION = "0.20.1"  # the compressed-tensors release whose layout and config this follows
METHOD = "compressed-tensors"
FORMAT = "pack-quantized"


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


class CompressedTensorsFormat(Format):
    method = METHOD

    def __init__(self, source: str, bits: int, group: int | None, symmetric: bool, act_order: bool,
                 targets: list[str], ignore: list[str]):
        pack = 32 // bits
        super().__init__(source, bits, group, align=pack if group is None else group,
                         row_align=1 if symmetric else pack)
        self.symmetric, self.act_order, self.targets, self.ignore = symmetric, act_order, targets, ignore

    def quantized(self, prefix: str) -> bool:
        """compressed-tensors' matching (utils/match.py): a target or ignore entry is "re:REGEX"
        (re.match on the module name), a module name, or a class name (all these are Linear)."""
        def hit(entry: str) -> bool:
            if entry.startswith("re:"):
                return re.match(entry[3:], prefix) is not None
            return entry == prefix or entry == "Linear"
        return any(hit(t) for t in self.targets) and not any(hit(i) for i in self.ignore)

    def marker(self, prefix: str) -> str:
        return f"{prefix}.weight_packed"

    def what(self) -> str:
        kind = "channel" if self.group is None else f"group_size {self.group}"
        return f"{self.source}'s quantization_config ({self.bits}-bit, {kind})"

    def shape(self, reader, prefix: str) -> tuple[int, int]:
        name = f"{prefix}.weight_shape"
        locate(reader, name, (2,), self.what())
        got = tuple(int(v) for v in reader.read(name).tolist())
        want = reader.expected.get(f"{prefix}.weight")
        if want is not None and got != tuple(want):
            raise PlexusError(f"{reader.location[name][0].name}: tensor {name} says the weight is {list(got)}, "
                              f"expected {list(want)} from config.json")
        if min(got) <= 0:
            raise PlexusError(f"{reader.location[name][0].name}: tensor {name} holds {list(got)}")
        return got

    def read(self, reader, prefix, out, cols, dim, start, end):
        bits, pack, what = self.bits, 32 // self.bits, self.what()
        group = self.group or cols
        groups = _ceil(cols, group)
        wp, ws, wz, gi = (f"{prefix}.{n}" for n in ("weight_packed", "weight_scale", "weight_zero_point",
                                                   "weight_g_idx"))
        locate(reader, wp, (out, _ceil(cols * bits, 32)), what)
        locate(reader, ws, (out, groups), what)
        if not self.symmetric:
            locate(reader, wz, (_ceil(out * bits, 32), groups), what)
        if dim == 0 and not self.symmetric:
            self.check_rows(wz, start, end, out, pack)
        elif dim == 1:
            self.check_columns(wp, start, end, cols, pack)
        perm = g_idx = None
        if gi in reader.location:
            g_idx = read_checked(reader, gi, (cols,), what)
            if g_idx.min() < 0 or g_idx.max() >= groups:
                raise PlexusError(f"{reader.location[gi][0].name}: tensor {gi} names groups outside 0-{groups - 1}")
            perm = act_order_perm(gi, g_idx, group, cols)
        zp = None
        if dim == 0:
            if not self.symmetric:
                zp = reader.read(wz, 0, start // pack, _ceil(end, pack))
            q, s = reader.read(wp, 0, start, end), reader.read(ws, 0, start, end)
            nrows, ncols = end - start, cols
        elif dim == 1:
            g0, g1 = (0, groups) if perm is not None else (start // group, _ceil(end, group))  # act-order: any group
            q, s = reader.read(wp, 1, start // pack, _ceil(end, pack)), reader.read(ws, 1, g0, g1)
            if not self.symmetric:
                zp = reader.read(wz, 1, g0, g1)
            nrows, ncols = out, end - start
        else:
            q, s = reader.read(wp), reader.read(ws)
            zp = None if self.symmetric else reader.read(wz)
            nrows, ncols = out, cols
        for name, t in ((wp, q), (wz, zp)):
            if t is not None and t.dtype != torch.int32:
                raise PlexusError(f"{reader.location[name][0].name}: tensor {name} is {t.dtype}, expected int32")
        if not s.is_floating_point() or not torch.isfinite(s.float()).all():
            raise PlexusError(f"{reader.location[ws][0].name}: tensor {ws} must hold finite floating-point scales")
        codes = unpack_words(q, bits, axis=1)[:, :ncols]
        if zp is None:
            zeros = torch.full(s.shape, float(1 << (bits - 1)))
        else:
            zeros = unpack_words(zp, bits, axis=0)[:nrows].float()
        if dim == 1 and perm is not None:
            return assemble_columns(codes, s.float(), zeros, bits, group, g_idx, start)
        return assemble(codes, s.float(), zeros, bits, group, perm)


# ---- writing (plexus quantize) -------------------------------------------------------------------

def pack_int32(u: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes (rows, n) -> int32 (rows, ceil(n * bits / 32)), 32 // bits a word along the
    rows' length, lowest bits first, the last word padded with zero fields (pack_to_int32's layout)."""
    per = 32 // bits
    rows, n = u.shape
    pad = -n % per
    v = u.to(torch.int64)
    if pad:
        v = torch.cat([v, v.new_zeros(rows, pad)], dim=1)
    shifts = torch.arange(0, 32, bits, dtype=torch.int64)
    words = (v.view(rows, -1, per) << shifts).sum(-1)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def compress(w: QuantWeight, symmetric: bool) -> dict[str, torch.Tensor]:
    """One QuantWeight as the tensors (local names) compressed-tensors stores for a linear. Its
    zero points must be integers in [0, 2^bits) (symmetric: 2^(bits-1)), as plexus.quant's
    round-to-nearest makes them; scales are written as float16, which must hold them exactly."""
    out, cols = w.shape
    scales = w.scales
    zeros = -w.mins / scales
    half = float(1 << (w.bits - 1))
    if not torch.equal(zeros, zeros.round()) or zeros.min() < 0 or zeros.max() >= 1 << w.bits:
        raise PlexusError("zero points that are not integer codes cannot be written as compressed-tensors")
    if symmetric and not bool((zeros == half).all()):
        raise PlexusError("a symmetric compressed-tensors weight needs every zero point at the middle code")
    scales16 = scales.to(torch.float16)
    if not torch.equal(scales16.float(), scales):
        raise PlexusError("scales not representable in float16 cannot be written as compressed-tensors")
    t = {"weight_packed": pack_int32(w.unpacked(), w.bits), "weight_scale": scales16.contiguous(),
         "weight_shape": torch.tensor([out, cols], dtype=torch.int64)}
    if not symmetric:
        t["weight_zero_point"] = pack_int32(zeros.to(torch.uint8).t(), w.bits).t().contiguous()
    return t


def quantization_config(bits: int, group: int | None, symmetric: bool, ignore: list[str]) -> dict:
    """config.json's quantization_config as compressed-tensors' ModelCompressor.update_config
    writes it for one ``Linear`` scheme (W4A16-style group or W8A16-style channel weights)."""
    weights = {"dynamic": False, "group_size": group, "num_bits": bits,
               "strategy": "channel" if group is None else "group", "symmetric": symmetric, "type": "int"}
    return {
        "config_groups": {"group_0": {"format": FORMAT, "input_activations": None, "output_activations": None,
                                      "targets": ["Linear"], "weights": weights}},
        "format": FORMAT, "global_compression_ratio": None, "ignore": list(ignore), "kv_cache_scheme": None,
        "moe_sparsity_config": None, "quant_method": METHOD, "quantization_status": "compressed",
        "sparsity_config": {}, "transform_config": {}, "version": LAYOUT_VERSION,
    }
